"""The optional ops listener: /metrics and detailed health on their own port, never the public one.

`cds-service serve --ops-port 9100` (OPS_PORT, `CDS_OPS_PORT`) makes gunicorn bind a second
socket; every worker serves both. This middleware tells them apart by the local port of the
connection the request arrived on (gunicorn's `gunicorn.socket`), which the caller cannot choose,
never by the Host header:

- on the public port, an ops path answers 404 (as if it did not exist), and `/readyz` answers its
  status only (`{"status": "ok"}` or `"fail"`, with the same HTTP status): enough for a load
  balancer or a Kubernetes probe, nothing about sites, models or the store;
- on the ops port, only the ops paths and the probes are served, in full; the CDS API is not.

Without an ops port every path is served on the one listener, as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask

# Served only on the ops listener when there is one. One list: a detailed health endpoint added
# later belongs here.
OPS_PATHS = ("/metrics", "/healthz/detail")
# Probes answer on both listeners; /readyz in full only on the ops one.
PROBE_PATHS = ("/healthz", "/readyz")

_NOT_FOUND = json.dumps({"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "not-found", "diagnostics": "Not found."}]}).encode()


def is_ops_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPS_PATHS)


def local_port(environ: dict[str, Any]) -> int | None:
    """The port of the listening socket this request came in on."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            return int(sock.getsockname()[1])
        except (OSError, IndexError, TypeError, ValueError):
            return None
    # Not under gunicorn (the Flask test client, another WSGI server): the server's own port.
    try:
        return int(environ.get("SERVER_PORT") or 0) or None
    except ValueError:
        return None


class OpsListener:
    """WSGI middleware routing by listener; see the module docstring."""

    def __init__(self, app: Callable, ops_port: int):
        self.app = app
        self.ops_port = ops_port

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if local_port(environ) == self.ops_port:
            if is_ops_path(path) or path in PROBE_PATHS:
                return self.app(environ, start_response)
            return _not_found(start_response)
        if is_ops_path(path):
            return _not_found(start_response)
        if path == "/readyz":
            return self._status_only(environ, start_response)
        return self.app(environ, start_response)

    def _status_only(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list, exc_info: Any = None) -> Callable:
            captured["status"] = status
            return lambda data: None

        chunks = self.app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        try:
            state = json.loads(body).get("status")
        except (ValueError, AttributeError):
            state = None
        answer = json.dumps({"status": state if state in ("ok", "fail") else "fail"}).encode()
        start_response(captured.get("status", "503 SERVICE UNAVAILABLE"), [
            ("Content-Type", "application/json"), ("Content-Length", str(len(answer))),
            ("Cache-Control", "no-store")])
        return [answer]


def _not_found(start_response: Callable) -> Iterable[bytes]:
    start_response("404 NOT FOUND", [("Content-Type", "application/json"),
                                 ("Content-Length", str(len(_NOT_FOUND)))])
    return [_NOT_FOUND]


def check_ops_port(value: Any) -> int | None:
    """OPS_PORT as an int, or None; ValueError naming what is wrong."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"OPS_PORT (CDS_OPS_PORT, serve --ops-port): {value!r} is not a TCP port")
    return value


def init_app(app: Flask) -> None:
    """Route by listener when OPS_PORT is set; otherwise nothing changes."""
    ops_port = check_ops_port(app.config.get("OPS_PORT"))
    if ops_port is not None:
        app.wsgi_app = OpsListener(app.wsgi_app, ops_port)
