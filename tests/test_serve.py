"""The `cds-service` command as operators run it: a real gunicorn on loopback."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cds_service.records.store import Store
from tests.conftest import ROOT, demo_signer, example, make_jwt
from tests.helpers.servers import CLI, free_port, request, token_for, worker_pids
from tests.helpers.store_queries import list_feedback


def test_serve_two_workers_end_to_end_and_feedback_survives_restart(serve, tmp_path):
    site_config = str(ROOT / "site_config")
    server = serve("--workers", "2", "--site-config", site_config)

    status, discovery = request(server.base + "/cds-services")
    assert status == 200
    assert {s["id"] for s in discovery["services"]} == {"kidney-risk", "nephrotoxic-order-check"}
    status, ready = request(server.base + "/readyz")
    assert status == 200 and ready["status"] == "ok"

    measured = (datetime.now(UTC) - timedelta(days=80)).date().isoformat()
    pv = {"hook": "patient-view", "hookInstance": "0c5a2c1e-7c39-4c1e-9f57-0a0e3c2b9d11",
          "context": {"userId": "PractitionerRole/123", "patientId": "p1"},
          "prefetch": {"egfr": {"resourceType": "Bundle", "type": "searchset", "total": 1,
                                "entry": [{"resource": {
                                    "resourceType": "Observation", "status": "final",
                                    "code": {"coding": [{"system": "http://loinc.org",
                                                         "code": "62238-1"}]},
                                    "effectiveDateTime": f"{measured}T08:00:00Z",
                                    "valueQuantity": {"value": 28, "unit": "mL/min/1.73m2"}}}]}}}
    status, body = request(server.base + "/cds-services/kidney-risk", pv)
    assert status == 200, body
    assert body["cards"][0]["summary"] == f"CKD G4 (severely decreased): eGFR 28 on {measured}"

    status, outcome = request(server.base + "/cds-services/kidney-risk", {"hook": "patient-view"})
    assert status == 400 and outcome["resourceType"] == "OperationOutcome"

    feedback = example("epic-feedback-overridden-with-extension.json")
    assert request(server.base + "/cds-services/kidney-risk/feedback", feedback) == (
        200, {"received": 1, "stored": 1})
    server.stop()

    # Logs: one JSON object per line, gunicorn's own lines included; the invocation's line is
    # correlated with its site, service and hookInstance, and names no patient.
    output = Path(server.log.name).read_text(encoding="utf-8")
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert any(r["logger"] == "gunicorn.error" for r in records)
    [invoked] = [r for r in records if r["logger"] == "cds_service.protocol.views"
                 and r["message"].startswith("hook=")]
    assert invoked["site"] == "demo-hospital" and invoked["service"] == "kidney-risk"
    assert invoked["hook_instance"] == pv["hookInstance"] and len(invoked["request_id"]) == 32
    assert '"p1"' not in output

    # Durable: a new process on the same database sees it, and a replay is stored once.
    server = serve("--workers", "1", "--site-config", site_config)
    assert request(server.base + "/cds-services/kidney-risk/feedback", feedback) == (
        200, {"received": 1, "stored": 0})
    with Store(f"sqlite:///{tmp_path / 'serve.sqlite3'}") as store:
        rows = list_feedback(store, site="demo-hospital", service_id="kidney-risk")
    assert [r["override_code"] for r in rows] == ["45"]


def test_bad_site_configuration_stops_start_up_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: x\nservices:\n  kidney-risk:\n    prefetch:\n      nope: Patient/1\n")
    for command in (["serve", "--port", str(free_port())], ["check-config"]):
        result = subprocess.run([CLI, *command, "--site-config", str(bad)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result
        assert "bad.yaml: services.kidney-risk.prefetch.nope" in result.stderr


def demo_env() -> dict:
    """The environment `make run` gives the demo site: its development key turned on."""
    return {**os.environ, "CDS_ALLOW_DEV_KEYS": "true"}


def test_check_config_prints_sites_services_and_templates(tmp_path):
    result = subprocess.run([CLI, "check-config", "--site-config", str(ROOT / "site_config")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=demo_env())
    assert result.returncode == 0, result.stderr
    assert "site demo-hospital" in result.stdout
    assert "      hooks: [order-select, order-sign]" in result.stdout
    assert "&category=laboratory&" in result.stdout  # the site's override, not the default


@pytest.mark.parametrize("replay_cache", ["sqlite", "redis"])
def test_replayed_token_is_refused_across_workers(serve, tmp_path, replay_cache):
    url = {"sqlite": f"sqlite:///{tmp_path / 'replay.sqlite3'}",
           "redis": "redis://127.0.0.1:6379/0"}[replay_cache]
    server = serve("--workers", "2", "--threads", "1", "--site-config",
                   str(ROOT / "site_config"), env={"CDS_REPLAY_CACHE_URL": url})
    discovery = server.base + "/cds-services"
    # Two workers, one thread each, and a request in flight on one: the replay lands on the
    # other worker at least some of the time; every replay must be refused either way.
    pids = set()
    for _ in range(6):
        token = token_for(discovery)
        status, _ = request(discovery, token=token)
        assert status == 200
        status, body = request(discovery, token=token)
        assert status == 401 and body["issue"][0]["diagnostics"] == "Authentication required."
        pids.update(worker_pids(server))
    assert len(pids) == 2


def test_unsigned_and_foreign_requests_get_the_same_bare_401(serve):
    server = serve("--workers", "1", "--site-config", str(ROOT / "site_config"))
    discovery = server.base + "/cds-services"
    bodies = set()
    for token in ("not-a-jwt", make_jwt(discovery), token_for(server.base + "/elsewhere")):
        status, body = request(discovery, token=token)
        assert status == 401
        bodies.add(json.dumps(body))
    assert len(bodies) == 1


@pytest.mark.parametrize("replay_cache", ["sqlite", "redis"])
def test_replay_is_refused_by_another_process(serve, tmp_path, replay_cache):
    """Deterministic twin of the test above: two servers (so certainly two processes) share the
    replay cache; a token used on one is refused by the other."""
    from tests.conftest import DEMO_JWKS

    demo_signer()  # make sure the development key pair exists
    audience = "https://cds.example.org/cds-services"
    site = tmp_path / "shared-site.yaml"
    site.write_text(
        "site: shared\nissuers:\n  - iss: https://demo-ehr.example.org/api/FHIR/R4\n"
        f"    jwks_file: {DEMO_JWKS}\naudiences: [{audience}]\n", encoding="utf-8")
    url = {"sqlite": f"sqlite:///{tmp_path / 'replay.sqlite3'}",
           "redis": "redis://127.0.0.1:6379/0"}[replay_cache]
    first = serve("--workers", "1", "--site-config", str(site), env={"CDS_REPLAY_CACHE_URL": url})
    second = serve("--workers", "1", "--site-config", str(site), env={"CDS_REPLAY_CACHE_URL": url})

    key, kid, iss = demo_signer()
    token = make_jwt(audience, key=key, kid=kid, iss=iss)
    assert request(first.base + "/cds-services", token=token)[0] == 200
    assert request(second.base + "/cds-services", token=token)[0] == 401
    fresh = make_jwt(audience, key=key, kid=kid, iss=iss)
    assert request(second.base + "/cds-services", token=fresh)[0] == 200


def test_output_piped_into_a_reader_that_leaves_prints_no_traceback(tmp_path):
    # `cds-service … | head -1` after head has exited: every write meets a closed pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([CLI, "check-config", "--site-config", str(ROOT / "site_config")],
                              stdout=write_end, stderr=subprocess.PIPE, cwd=tmp_path, text=True,
                              timeout=60, env=demo_env())
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def reload(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "reload", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=90)


def test_reload_reports_whether_the_new_configuration_was_taken(serve, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("site: before\n", encoding="utf-8")
    # The default pidfile, var/cds-service.pid under the working directory, as `make run` has it.
    server = serve("--workers", "2", "--pidfile", "var/cds-service.pid",
                   env={"CDS_SITE_CONFIG": str(site)})
    assert server.pidfile.read_text().strip() == str(server.process.pid)
    old_workers = worker_pids(server)

    site.write_text("site: after\n", encoding="utf-8")
    done = reload(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"reloaded (master pid {server.process.pid}): sites after; ")
    new_workers = {int(pid) for pid in done.stdout.split("workers ")[1].split(", ")}
    assert len(new_workers) == 2 and not new_workers & old_workers
    assert worker_pids(server) == new_workers
    assert request(server.base + "/readyz")[1]["checks"]["config"]["sites"] == ["after"]

    # A broken file: refused, said so, exit 1; the workers that were serving still are.
    site.write_text("site: after\nservices:\n  kidney-risk:\n    prefetch:\n"
                    "      nope: Patient/1\n", encoding="utf-8")
    done = reload(tmp_path, "--pidfile", str(server.pidfile))
    assert done.returncode == 1, done
    assert done.stderr.startswith("reload refused: configuration error: ")
    assert "site.yaml: services.kidney-risk.prefetch.nope" in done.stderr
    assert "keep serving the previous configuration" in done.stderr
    assert worker_pids(server) == new_workers
    assert request(server.base + "/readyz")[1]["checks"]["config"]["sites"] == ["after"]

    server.stop()
    assert not server.pidfile.exists()
    done = reload(tmp_path)
    assert done.returncode == 2
    assert done.stderr == (f"reload: no pidfile {Path('var/cds-service.pid')}: the service is "
                           "not running here, or was started with another --pidfile\n")


def test_reload_never_signals_a_process_a_stale_pidfile_names(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile = tmp_path / "gone.pid"
    pidfile.write_text(f"{gone.pid}\n")
    done = reload(tmp_path, "--pidfile", str(pidfile))
    assert done.returncode == 2
    assert f"stale pidfile {pidfile}: no process {gone.pid}" in done.stderr

    # A pid the system has given to another process since: SIGHUP would terminate it.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pidfile.write_text(f"{bystander.pid}\n")
        done = reload(tmp_path, "--pidfile", str(pidfile))
        assert done.returncode == 2
        assert f"process {bystander.pid} named by {pidfile} has written no reload status" in \
            done.stderr
        # Even beside a status file naming that pid (both left by a crash): not cds-service.
        (tmp_path / "gone.reload.json").write_text(
            json.dumps({"pid": bystander.pid, "generation": 0}))
        assert reload(tmp_path, "--pidfile", str(pidfile)).returncode == 2
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_second_instance_on_the_same_pidfile_is_refused(serve, tmp_path):
    first = serve("--workers", "1")
    result = subprocess.run([CLI, "serve", "--port", str(free_port()), "--pidfile",
                             str(first.pidfile)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"process {first.process.pid} holds it" in result.stderr
    assert first.pidfile.read_text().strip() == str(first.process.pid)
