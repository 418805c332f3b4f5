"""Swapping a site's model with a gunicorn reload (SIGHUP) while Epic keeps calling.

Operators switch the active model by editing the site YAML and sending SIGHUP to the master:
gunicorn starts new workers (each runs `create_app()`, re-reading the YAML and loading the models
it names) and stops the old ones gracefully. No call may fail meanwhile, and every call is scored
and recorded by exactly one configuration, old or new.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from cds_service.records.store import Store
from tests.conftest import DEMO_JWKS, ROOT, demo_signer
from tests.helpers.golden import as_of_today
from tests.helpers.servers import CLI, Server, free_port, request, worker_pids
from tests.helpers.store_queries import list_predictions

PATIENT_VIEW = json.loads(
    (ROOT / "tests" / "data" / "kidney-risk" / "egfr-28-g4-warning" / "request.json")
    .read_text(encoding="utf-8"))
OLD, NEW = "kfre-4var", "ckd-progression-lr"
LOAD_THREADS = 4


def write_site(path: Path, **kidney_risk: str) -> None:
    """The demo site, trusting the repository's development key, with `kidney-risk` as given."""
    site = yaml.safe_load((ROOT / "site_config" / "demo-hospital.yaml").read_text("utf-8"))
    for issuer in site["issuers"]:
        issuer["jwks_file"] = str(DEMO_JWKS)  # relative to the YAML in the repository
    site["services"]["kidney-risk"] = dict(kidney_risk)
    # Write then rename, as an editor or config-management tool would: a worker booting at
    # that moment reads the old file or the new one, never half of one.
    scratch = path.with_suffix(".tmp")
    scratch.write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    scratch.replace(path)


def patient_view() -> dict:
    body = as_of_today(PATIENT_VIEW)
    del body["fhirServer"], body["fhirAuthorization"]  # full prefetch: nothing is fetched
    body["hookInstance"] = str(uuid.uuid4())
    return body


@dataclass
class Call:
    hook_instance: str
    started: float
    finished: float
    status: int | None  # None: no HTTP response at all (connection refused, reset, timeout)
    detail: str  # the first card's detail, or the error


class Load:
    """Threads sending signed patient-view calls back to back until stopped."""

    def __init__(self, url: str, threads: int = LOAD_THREADS):
        self.url = url
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def count(self, predicate=lambda call: True) -> int:
        with self._lock:
            return sum(1 for call in self.calls if predicate(call))

    def _run(self) -> None:
        while not self._stop.is_set():
            body = patient_view()
            started = time.monotonic()
            try:
                status, response = request(self.url, body)  # a fresh token every call
                cards = response.get("cards") or [{}]
                detail = cards[0].get("detail", json.dumps(response))
            except Exception as exc:  # noqa: BLE001 - record it; the test fails on it
                status, detail = None, repr(exc)
            call = Call(body["hookInstance"], started, time.monotonic(), status, detail)
            with self._lock:
                self.calls.append(call)


def wait_for(condition, timeout: float, what: str, output) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{output()}")
        time.sleep(0.05)


def wait_for_workers(server: Server, workers: int) -> None:
    """Until every worker has built its app: /healthz answers as soon as the first one has, and
    a worker still booting when the test edits the site file would read the edited one."""
    wait_for(lambda: len(worker_pids(server)) == workers
             and server.output().count(" ready: sites ") >= workers,
             30, f"{workers} workers to load the app", server.output)


def loaded_models(server: Server) -> dict[str, str]:
    status, ready = request(server.base + "/readyz")
    assert status == 200, f"{ready}\n{server.output()}"
    return {m["id"]: m["sha256"] for m in ready["checks"]["models"]["loaded"]}


def test_sighup_swaps_the_active_model_under_load_without_a_failed_call(tmp_path):
    demo_signer()  # make sure the development key pair exists before the site trusts it
    site = tmp_path / "site.yaml"
    write_site(site, model=OLD)
    # A snapshot of the shipped models: the workers started by the reload load the same
    # artifacts as the first ones, whatever happens to the checkout meanwhile.
    models = tmp_path / "models"
    for model_id in (OLD, NEW):
        shutil.copytree(ROOT / "models" / model_id, models / model_id)
    # The shipped NEW is approved for shadow use only; this copy stands for a model a local
    # validation approved for active use (the manifest is not part of the artifact's sha256).
    manifest = models / NEW / "manifest.yaml"
    doc = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    doc["approved_use"] = ["active", "shadow"]
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    server = Server(tmp_path, "--workers", "2",
                    env={"CDS_SITE_CONFIG": str(site), "CDS_MODELS_DIR": str(models)})
    try:
        run_swap(server, site, tmp_path)
    finally:
        if server.process.poll() is None:
            server.stop()
        else:
            server.log.close()


def run_swap(server: Server, site: Path, tmp_path: Path) -> None:
    output = server.output
    wait_for_workers(server, 2)
    old_shas = loaded_models(server)
    assert set(old_shas) == {OLD}, output()
    old_workers = worker_pids(server)
    assert len(old_workers) == 2, output()

    with Load(server.base + "/cds-services/kidney-risk") as load:
        wait_for(lambda: load.count(lambda c: c.status == 200) >= 20, 20,
                 "calls before the swap", output)
        write_site(site, model=NEW, shadow_model=OLD)
        hup = time.monotonic()
        os.kill(server.process.pid, signal.SIGHUP)

        # Swapped: the old workers have exited, and /readyz (answered by whichever new worker
        # accepts) names the new model on ten consecutive calls.
        wait_for(lambda: not worker_pids(server) & old_workers, 30, "old workers to exit",
                 output)
        streak = 0
        deadline = time.monotonic() + 30
        while streak < 10:
            assert time.monotonic() < deadline, f"/readyz never settled on {NEW}\n{output()}"
            streak = streak + 1 if set(loaded_models(server)) == {NEW, OLD} else 0
        swapped = time.monotonic()
        new_shas = loaded_models(server)
        assert len(worker_pids(server)) == 2, output()

        # Keep calling a while on the new workers.
        wait_for(lambda: load.count(lambda c: c.started > swapped) >= 20, 20,
                 "calls after the swap", output)
        time.sleep(1)  # not synchronisation: more calls against the settled workers

    calls = load.calls
    failed = [c for c in calls if c.status != 200]
    assert not failed, f"{len(failed)} of {len(calls)} calls failed: {failed[:5]}\n{output()}"
    before = [c for c in calls if c.finished < hup]  # certainly served by an old worker
    after = [c for c in calls if c.started > swapped]  # certainly by a new one
    during = [c for c in calls if c.finished >= hup and c.started <= swapped]
    print(f"calls: {len(before)} before the swap, {len(during)} during, "  # noqa: T201
          f"{len(after)} after ({swapped - hup:.1f}s from SIGHUP to settled)")
    assert len(before) >= 20 and len(after) >= 20, output()

    with Store(f"sqlite:///{tmp_path / 'serve.sqlite3'}") as store:
        # Predictions are written by the workers' background writers just after each answer.
        answered = {c.hook_instance for c in calls}
        wait_for(lambda: answered <= {r["hook_instance"] for r in list_predictions(store)}, 10,
                 "every call's predictions", output)

        def recorded(call: Call) -> dict[str, tuple[str, str]]:
            rows = list_predictions(store, hook_instance=call.hook_instance)
            assert len({r["role"] for r in rows}) == len(rows), rows
            return {r["role"]: (r["model_id"], r["sha256"]) for r in rows}

        old_config = {"active": (OLD, old_shas[OLD])}
        new_config = {"active": (NEW, new_shas[NEW]), "shadow": (OLD, new_shas[OLD])}
        for call in before:
            assert recorded(call) == old_config, (call, output())
            assert f"(model {OLD} " in call.detail, call
        for call in after:
            assert recorded(call) == new_config, (call, output())
            assert f"(model {NEW} " in call.detail, call
        # In the overlap a call is served by an old worker or a new one: wholly one config.
        for call in during:
            config = recorded(call)
            assert config in (old_config, new_config), (call, config, output())
            model = NEW if config == new_config else OLD
            assert f"(model {model} " in call.detail, call


def test_a_site_naming_a_missing_model_stops_start_up(tmp_path):
    site = tmp_path / "missing-model.yaml"
    write_site(site, model="no-such-model")
    result = subprocess.run(
        [CLI, "serve", "--port", str(free_port())], cwd=tmp_path, capture_output=True,
        text=True, timeout=60, env={**os.environ, "CDS_SITE_CONFIG": str(site),
                                    "CDS_ALLOW_DEV_KEYS": "true"})
    assert result.returncode == 2, result
    assert "configuration error: " in result.stderr, result.stderr
    assert "missing-model.yaml: services.kidney-risk.model" in result.stderr, result.stderr
    assert "no-such-model" in result.stderr, result.stderr
    assert "Listening at" not in result.stdout + result.stderr  # gunicorn never started


def assert_still_serving_the_old_model(server: Server, workers_before) -> None:
    """After a refused reload: the master is up, the same workers answer, with model OLD."""
    assert server.process.poll() is None, server.output()
    assert worker_pids(server) == workers_before, server.output()
    status, body = request(server.base + "/cds-services/kidney-risk", patient_view())
    assert status == 200, (body, server.output())
    assert f"(model {OLD} " in body["cards"][0]["detail"]


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.stop()
    else:
        server.log.close()


def test_sighup_with_a_broken_site_is_refused_and_the_service_keeps_serving(tmp_path):
    demo_signer()
    site = tmp_path / "site.yaml"
    write_site(site, model=OLD)
    server = Server(tmp_path, "--workers", "2", env={"CDS_SITE_CONFIG": str(site)})
    try:
        wait_for_workers(server, 2)
        before = worker_pids(server)
        write_site(site, model="no-such-model")
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused" in server.output(), 30, "the refused reload",
                 server.output)
        assert "no-such-model" in server.output()
        assert_still_serving_the_old_model(server, before)
    finally:
        stop(server)


def test_a_reload_making_a_shadow_only_model_active_is_refused(tmp_path):
    # ckd-progression-lr's manifest: `approved_use: [shadow]`. The reload is refused with the
    # site file, the key, the model and the manifest field; the old workers keep serving.
    demo_signer()
    site = tmp_path / "site.yaml"
    write_site(site, model=OLD, shadow_model=NEW)
    server = Server(tmp_path, "--workers", "1", env={"CDS_SITE_CONFIG": str(site)})
    try:
        wait_for_workers(server, 1)
        before = worker_pids(server)
        write_site(site, model=NEW, shadow_model=OLD)
        result = subprocess.run([CLI, "reload", "--pidfile", str(server.pidfile)],
                                capture_output=True, text=True, timeout=90, cwd=tmp_path)
        assert result.returncode == 1, (result, server.output())
        assert result.stderr.startswith(
            f"reload refused: configuration error: {site}: services.kidney-risk.model: "
            f"{NEW} is not approved for active use ("), result.stderr
        assert f"{NEW}/manifest.yaml: approved_use: [shadow])" in result.stderr, result.stderr
        assert_still_serving_the_old_model(server, before)
    finally:
        stop(server)
