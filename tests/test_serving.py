"""gunicorn as `cds-service serve` configures it (cds_service/ops/serving.py): threaded workers keep
answering while one call waits on a slow FHIR server, and a recycled worker serves the
configuration the master validated, not whatever the files on disk say now."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import DEMO_JWKS, ROOT, demo_signer, fhir_servers_yaml
from tests.helpers.golden import golden_request
from tests.helpers.servers import Server, request

SLOW_S = 2.0


def demo_site(tmp_path: Path, prefetch: str = "", fhir_servers: tuple[str, ...] = ()) -> Path:
    """The demo site, trusting the demo key by absolute path, with extra prefetch settings and
    the FHIR bases its calls may read from."""
    text = (ROOT / "site_config" / "demo-hospital.yaml").read_text(encoding="utf-8")
    text = text.replace("../var/dev-keys/demo-hospital.jwks.json", str(DEMO_JWKS))
    block = re.search(r"\nprefetch:\n(  .*\n)+", text)
    text = text.replace(block.group(0), "\nprefetch:\n" + prefetch)
    text += fhir_servers_yaml(fhir_servers)
    site = tmp_path / "site.yaml"
    site.write_text(text, encoding="utf-8")
    return site


def timed(url: str, body: dict) -> tuple[int, float, float]:
    started = time.monotonic()
    status, _ = request(url, body)
    return status, started, time.monotonic()


@pytest.mark.parametrize("threads", [4, 1], ids=["gthread-4", "sync"])
def test_a_call_stuck_on_a_slow_fhir_server_does_not_delay_another_on_the_same_worker(
        tmp_path, fhir_server, threads):
    demo_signer()
    site = demo_site(tmp_path, "  deadline_seconds: 5\n  allow_http_loopback: true\n",
                     (fhir_server.url,))
    server = Server(tmp_path, "--workers", "1", "--threads", str(threads),
                    env={"CDS_SITE_CONFIG": str(site)})
    try:
        url = server.base + "/cds-services/kidney-risk"
        slow = golden_request("slow")
        egfr = slow["prefetch"].pop("egfr")
        slow["fhirServer"] = fhir_server.url
        fhir_server.add("Observation", json=egfr, delay=SLOW_S)
        fast = golden_request("fast")
        fast.pop("fhirServer"), fast.pop("fhirAuthorization")
        assert request(url, fast)[0] == 200  # warm: the worker has built its app

        results = {}
        stuck = threading.Thread(target=lambda: results.update(slow=timed(url, slow)))
        stuck.start()
        deadline = time.monotonic() + 5
        while not fhir_server.requests and time.monotonic() < deadline:
            time.sleep(0.01)  # until the slow call is waiting on the FHIR server
        results["fast"] = timed(url, fast)
        stuck.join(10)
    finally:
        server.stop()

    slow_status, slow_start, slow_end = results["slow"]
    fast_status, fast_start, fast_end = results["fast"]
    assert (slow_status, fast_status) == (200, 200)
    assert slow_end - slow_start >= SLOW_S
    print(f"threads={threads}: slow call {slow_end - slow_start:.2f}s, "  # noqa: T201
          f"concurrent call {fast_end - fast_start:.3f}s")
    if threads > 1:
        assert fast_end - fast_start < 0.5
        assert fast_end < slow_end  # answered while the slow call was still waiting
    else:  # the control: one thread per worker, and the second call waits its turn
        assert fast_end - fast_start > SLOW_S / 2


def test_recycled_workers_serve_the_validated_configuration_not_the_edited_file(tmp_path):
    demo_signer()
    site = demo_site(tmp_path, "  deadline_seconds: 2.5\n")
    server = Server(tmp_path, "--workers", "1", "--max-requests", "10",
                    env={"CDS_SITE_CONFIG": str(site)})
    try:
        url = server.base + "/cds-services/kidney-risk"
        # Edited in place without a reload (or a ConfigMap updated under the pod): broken.
        site.write_text("site: demo-hospital\nissuers: [oops\n", encoding="utf-8")
        statuses = [request(url, golden_request(f"p{n}"))[0] for n in range(35)]
        output = server.output()
    finally:
        server.stop()
    assert statuses == [200] * 35, output
    workers = set(re.findall(r"worker (\d+) ready", output))
    assert len(workers) >= 3, output  # recycled at least twice after ~10 requests each
    assert "Worker failed to boot" not in output
    assert "configuration error" not in output


def test_workers_keep_the_app_and_the_masters_objects_out_of_the_collectors_sight(
        tmp_path, site_file):
    """gc.freeze once a worker has built its app, and in the master before each fork (so the
    workers' collections never write to the pages they share with it); a worker's young
    generation collected every 50,000 allocations, not 700."""
    import argparse
    import gc

    from cds_service.app import load_deployment
    from cds_service.ops import serving

    deployment = load_deployment({
        "SITE_CONFIG": site_file(""), "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}",
        "REPLAY_CACHE_URL": f"sqlite:///{tmp_path / 'replay.sqlite3'}",
        "SPOOL_DIR": str(tmp_path / "spool"), "PUBLIC_URL": "http://localhost",
        "ALLOW_DEV_KEYS": True})
    args = argparse.Namespace(host="127.0.0.1", port=0, workers=1, threads=4, max_requests=0,
                              access_log=False, pidfile=None)
    server = serving.Server(args, deployment, {})
    assert server.cfg.pre_fork is serving._pre_fork
    gc.unfreeze()
    thresholds = gc.get_threshold()
    try:
        app = server.load()
        try:
            assert gc.get_freeze_count() > 0
            # A call's burst of objects no longer sets off dozens of collections.
            assert gc.get_threshold() == (serving.GC_YOUNG_THRESHOLD, *thresholds[1:])
            gc.unfreeze()
            serving._pre_fork(None, None)
            assert gc.get_freeze_count() > 0
        finally:
            app.extensions["cds"].close()
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def fresh_interpreter(code: str) -> str:
    """What `code` prints, run by a new Python process from the checkout: nothing imported or
    cached by earlier tests."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_worker_on_the_embedded_defaults_does_not_load_redis(tmp_path, site_file):
    """redis (7 MB of RSS per worker) is imported only where a Redis URL is configured."""
    code = (
        "import sys\n"
        "from cds_service.app import create_app\n"
        f"app = create_app({{'SITE_CONFIG': {str(site_file(''))!r}, "
        f"'DATABASE_URL': 'sqlite:///{tmp_path}/cds.sqlite3', "
        f"'REPLAY_CACHE_URL': 'sqlite:///{tmp_path}/replay.sqlite3', "
        f"'SPOOL_DIR': '{tmp_path}/spool', 'PUBLIC_URL': 'http://localhost', "
        "'ALLOW_DEV_KEYS': True})\n"
        "print('redis' in sys.modules)\n"
        "app.extensions['cds'].close()\n"
    )
    assert fresh_interpreter(code).strip().splitlines()[-1] == "False"


def test_the_deployment_compiles_what_a_first_call_would(tmp_path, site_file):
    """The master loads the deployment once and forks workers with it: feature specs compiled
    and the UCUM registry built there, not on each worker's first call (0.6 to 3 s)."""
    code = (
        "from cds_service.app import load_deployment\n"
        "from cds_service.features import compiled, units\n"
        "from hooks._kidney import INPUTS\n"
        "assert units._ucum_registry.cache_info().currsize == 0\n"
        f"deployment = load_deployment({{'SITE_CONFIG': {str(site_file(''))!r}, "
        "'PUBLIC_URL': 'http://localhost', 'ALLOW_DEV_KEYS': True})\n"
        "built = units._ucum_registry.cache_info().currsize\n"
        "before = compiled._compile.cache_info()\n"
        "for specs in [INPUTS, *(m.manifest.features for m in deployment.models)]:\n"
        "    compiled._compiled(tuple(specs))\n"
        "after = compiled._compile.cache_info()\n"
        "print(built, len(list(deployment.models)), after.misses - before.misses, "
        "after.hits - before.hits)\n"
    )
    built, models, misses, hits = map(int, fresh_interpreter(code).split())
    assert built == 1
    assert models >= 1
    assert (misses, hits) == (0, models + 1)


def _worker(workers: int, threads: int):
    from types import SimpleNamespace

    from cds_service.ops.worker import SharingThreadWorker

    worker = SharingThreadWorker.__new__(SharingThreadWorker)  # only what accept() reads
    worker.cfg = SimpleNamespace(workers=workers, threads=threads)
    worker.nr_conns = 0
    worker.accepted = []
    worker.enqueue_req = worker.accepted.append
    return worker


@pytest.mark.parametrize(("workers", "held", "waits"), [
    (2, 3, False),   # fewer connections than threads: accepts at once
    (2, 4, True),    # a connection per thread: lets another worker accept first
    (1, 9, False),   # alone: nobody else to take it
])
def test_sharing_worker_waits_before_accepting_only_when_full(monkeypatch, workers, held, waits):
    import socket

    from cds_service.ops import worker as worker_module

    slept: list[float] = []
    monkeypatch.setattr(worker_module.time, "sleep", slept.append)
    worker = _worker(workers, threads=4)
    worker.nr_conns = held
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        client = socket.create_connection(listener.getsockname())
        try:
            worker.accept(listener)
            assert slept == ([worker_module.DEFER_S] if waits else [])
            assert len(worker.accepted) == 1 and worker.nr_conns == held + 1
        finally:
            client.close()
            for conn in worker.accepted:
                conn.sock.close()


def test_sharing_worker_leaves_a_connection_another_worker_took(monkeypatch):
    import socket

    from cds_service.ops import worker as worker_module

    worker = _worker(2, threads=4)
    worker.nr_conns = 4
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        taken = []
        # While this worker waits, another one accepts the connection.
        monkeypatch.setattr(worker_module.time, "sleep",
                            lambda _s: taken.append(listener.accept()[0]))
        client = socket.create_connection(listener.getsockname())
        try:
            worker.accept(listener)  # EAGAIN: nothing accepted, nothing raised
            assert taken and worker.accepted == [] and worker.nr_conns == 4
        finally:
            client.close()
            for conn in taken:
                conn.close()


def test_two_workers_answer_many_concurrent_keepalive_connections(tmp_path):
    # Every connection answered while workers hold more connections than threads.
    import http.client

    server = Server(tmp_path, "--workers", "2", "--threads", "2")
    try:
        host, port = server.base.removeprefix("http://").split(":")
        conns = [http.client.HTTPConnection(host, int(port), timeout=10) for _ in range(12)]
        statuses = []
        for _ in range(3):
            for conn in conns:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
        for conn in conns:
            conn.close()
    finally:
        server.stop()
    assert statuses == [200] * 36


@pytest.mark.parametrize("access_log", [False, True], ids=["default", "--access-log"])
def test_the_access_line_is_built_only_when_asked_for(access_log):
    # gunicorn counts its access log as on whenever a logging dictionary is given (ours always
    # is) and formats each call's atoms for a logger held at WARNING to drop.
    from gunicorn.config import Config

    from cds_service.ops.logs import logconfig
    from cds_service.ops.serving import SETTINGS

    cfg = Config()
    for key, value in {**SETTINGS, "accesslog": "-" if access_log else None,
                       "logconfig_dict": logconfig("text", access_log=access_log)}.items():
        cfg.set(key, value)
    logger = cfg.logger_class(cfg)
    built = []
    logger.atoms = lambda *args: built.append(args) or {}
    logger.access(None, None, {}, None)
    assert len(built) == (1 if access_log else 0)
