"""A real gunicorn on loopback, started through the `cds-service` command as operators run it.

    server = serve("--workers", "2", "--site-config", site_config)   # the `serve` fixture
    status, body = request(server.base + "/cds-services/kidney-risk", body)   # signed as the EHR

The `serve` fixture stops every server it started; `Server` alone is stopped by its caller.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import demo_signer, make_jwt

CLI = str(Path(sys.executable).parent / "cds-service")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token_for(url: str) -> str:
    key, kid, iss = demo_signer()
    return make_jwt(url, key=key, kid=kid, iss=iss)


def request(url, body=None, token=None, headers=None):
    """GET or POST `url`, signed as the demo site's EHR with a fresh token unless given one."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **(headers or {})}
    if "/cds-services" in url:
        headers["Authorization"] = f"Bearer {token or token_for(url)}"
    req = urllib.request.Request(  # noqa: S310 - loopback test server
        url, data=data, method="POST" if data else "GET", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Server:
    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None,
                 port: int | None = None):
        # `port`: when a file written before the start must name the URL (a redirect URI).
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # The demo site signs with its development key, as under `make run`.
        env = {**os.environ, "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
               "CDS_ALLOW_DEV_KEYS": "true", **(env or {})}
        self.log = (tmp_path / f"serve-{self.port}.log").open("w")
        # One pidfile per server: several may share `tmp_path`. A later --pidfile in `args` wins.
        self.pidfile = tmp_path / f"serve-{self.port}.pid"
        if "--pidfile" in args:
            self.pidfile = tmp_path / args[list(args).index("--pidfile") + 1]
        # The URL the tests call it at is the URL their tokens name (`aud`); a later
        # --public-url in `args` wins.
        self.process = subprocess.Popen(
            [CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--pidfile",
             str(self.pidfile), "--public-url", self.base, *args],
            env=env, cwd=tmp_path, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.output()}")
            try:
                if request(self.base + "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"server did not start: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.log.close()


def worker_pids(server) -> set[int]:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    return {int(pid) for pid in children.read_text().split()}


@pytest.fixture
def serve(tmp_path):
    servers = []

    def _start(*args, env=None, port=None):
        server = Server(tmp_path, *args, env=env, port=port)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        if server.process.poll() is None:
            server.stop()
