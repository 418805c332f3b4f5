"""Prometheus metrics (cds_service/ops/metrics.py): values and labels scraped from `/metrics` of a
real gunicorn with two workers, and in-process for FHIR fallback reads and shadow models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from cds_service.records.suppression import WITHHELD_EXTENSION
from tests.conftest import ROOT, demo_signer, make_jwt
from tests.helpers.golden import EGFR_28, golden_request, load, loopback_client, without_prefetch
from tests.helpers.http import post
from tests.helpers.servers import Server, request

SITE = "demo-hospital"
GOLDEN = EGFR_28


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} from the exposition at `base`/metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def post_raw(url: str, body: dict, authorization: str | None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_metrics_from_two_gunicorn_workers_count_every_call_with_its_labels(tmp_path):
    demo_signer()
    metrics_dir = tmp_path / "metrics"
    server = Server(tmp_path, "--workers", "2", "--site-config", str(ROOT / "site_config"),
                    env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        url = server.base + "/cds-services/kidney-risk"
        patients = [f"pat-{n:03d}-{uuid.uuid4().hex[:6]}" for n in range(30)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: request(url, golden_request(p)), patients))
        assert [status for status, _ in answers] == [200] * 30, answers[0]
        cards = [body["cards"][0] for _, body in answers]

        # Refused tokens: a forged signature under the demo issuer counts for the demo site;
        # a call with no token at all cannot be tied to any site.
        key, kid, iss = demo_signer()
        forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for _ in range(3):
            forged = make_jwt(url, key=forger, kid=kid, iss=iss)
            assert post_raw(url, golden_request("x"), f"Bearer {forged}")[0] == 401
        for _ in range(2):
            assert post_raw(url, golden_request("x"), None)[0] == 401

        # 412: the required eGFR neither prefetched nor readable (no fhirServer).
        for _ in range(2):
            body = golden_request("no-egfr")
            del body["prefetch"]["egfr"], body["fhirServer"], body["fhirAuthorization"]
            assert request(url, body)[0] == 412

        # An override, sent twice (Epic may resend): counted once, by the card's topic.
        card = cards[0]
        feedback = {"feedback": [{
            "card": card["uuid"], "outcome": "overridden",
            "overrideReason": {"reason": {"code": card["overrideReasons"][0]["code"],
                                          "system": card["overrideReasons"][0]["system"]}},
            # Within the demo site's 24 h window, whatever today is.
            "outcomeTimestamp": (datetime.now(UTC) - timedelta(minutes=1)).strftime(
                "%Y-%m-%dT%H:%M:%SZ")}]}
        assert request(url + "/feedback", feedback) == (200, {"received": 1, "stored": 1})
        assert request(url + "/feedback", feedback) == (200, {"received": 1, "stored": 0})
        # The same clinician opens the same chart again: the card is withheld.
        status, headers, body = post_raw(url, golden_request(patients[0]),
                                         f"Bearer {make_jwt(url, key=key, kid=kid, iss=iss)}")
        assert (status, body["cards"]) == (200, [])
        assert body["extension"][WITHHELD_EXTENSION][0]["overriddenCard"] == card["uuid"]
        assert "auth;dur=" in headers["Server-Timing"]
        assert "cards;dur=" in headers["Server-Timing"]
        assert "total;dur=" in headers["Server-Timing"]

        samples = scrape(server.base)
    finally:
        server.stop()

    # Both workers served (each writes its own files), and /metrics summed them all.
    pids = {path.stem.rsplit("_", 1)[1] for path in metrics_dir.glob("counter_*.db")}
    assert len(pids) >= 2, sorted(metrics_dir.iterdir())

    requests = "cds_requests_total"
    pv = {"site": SITE, "service": "kidney-risk", "hook": "patient-view"}
    assert value(samples, requests, **pv, status="200") == 31
    assert value(samples, requests, **pv, status="412") == 2
    assert value(samples, requests, site=SITE, hook="unknown", status="401") == 3
    assert value(samples, requests, site="unknown", hook="unknown", status="401") == 2
    assert value(samples, requests, site=SITE, hook="feedback", status="200") == 2
    assert value(samples, "cds_request_duration_seconds_count", **pv) == 33

    assert value(samples, "cds_jwt_rejections_total", site=SITE, reason="signature") == 3
    assert value(samples, "cds_jwt_rejections_total", site="unknown", reason="missing") == 2
    assert value(samples, "cds_jwt_rejections_total") == 5

    kidney = {"site": SITE, "service": "kidney-risk"}
    assert value(samples, "cds_prefetch_keys_total", **kidney, key="egfr", result="hit") == 31
    assert value(samples, "cds_prefetch_keys_total", **kidney, key="egfr", result="miss") == 2
    assert value(samples, "cds_prefetch_keys_total", **kidney, key="uacr", result="hit") == 33

    stage = "cds_stage_duration_seconds_count"
    # auth: every call that passed it (31 + 2 refused for data + 2 feedback); the rest: the
    # invocations that got that far.
    assert value(samples, stage, **kidney, stage="auth") == 35
    assert value(samples, stage, **kidney, stage="prefetch") == 33
    for name in ("features", "model", "cards"):
        assert value(samples, stage, **kidney, stage=name) == 31, name
    assert value(samples, stage, stage="fhir_fallback") == 0

    assert value(samples, "cds_cards_total", **kidney, topic="kidneyfunction") == 30
    assert value(samples, "cds_cards_total", **kidney, indicator=cards[0]["indicator"]) == 30
    assert value(samples, "cds_cards_suppressed_total", **kidney, topic="kidneyfunction") == 1
    assert value(samples, "cds_feedback_total", **kidney, outcome="overridden",
                 topic="kidneyfunction") == 1
    assert value(samples, "cds_feedback_total") == 1

    active = {"model_id": "kfre-4var", "role": "active"}
    assert value(samples, "cds_model_score_count", **active) == 31
    assert value(samples, "cds_model_inference_seconds_count", **active) == 31
    assert value(samples, "cds_model_score_bucket", **active, le="0.2") == 0  # risk 24%
    assert value(samples, "cds_model_score_bucket", **active, le="0.3") == 31
    assert value(samples, "cds_model_info", model_id="kfre-4var") == 1

    # No patient, user or encounter id in any label.
    context = load(GOLDEN / "request.json")["context"]
    labels = {v for (_, ls) in samples for _, v in ls}
    assert not labels & {*patients, "no-egfr", "x", *context.values()}


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_fhir_fallback_reads_are_timed_by_status_class(make_app, tmp_path, fhir_server):
    client = loopback_client(make_app, tmp_path, fhir_server)
    body, bundle = without_prefetch(GOLDEN, fhir_server)
    site = "test-site"
    ok_before = sample("cds_fhir_request_duration_seconds_count", site=site, status_class="2xx")
    err_before = sample("cds_fhir_request_duration_seconds_count", site=site, status_class="5xx")
    stage_before = sample("cds_stage_duration_seconds_count", site=site, service="kidney-risk",
                          stage="fhir_fallback")
    miss_before = sample("cds_prefetch_keys_total", site=site, service="kidney-risk", key="egfr",
                         result="miss")

    fhir_server.add("Observation", json=bundle, times=1)
    assert post(client, "/cds-services/kidney-risk", body).status_code == 200
    fhir_server.add("Observation", status=503, json={"resourceType": "OperationOutcome"})
    response = post(client, "/cds-services/kidney-risk", {**body, "hookInstance": "again"})
    assert response.status_code == 412
    assert "Server-Timing" in response.headers

    assert sample("cds_fhir_request_duration_seconds_count", site=site,
                  status_class="2xx") == ok_before + 1
    assert sample("cds_fhir_request_duration_seconds_count", site=site,
                  status_class="5xx") == err_before + 1
    assert sample("cds_stage_duration_seconds_count", site=site, service="kidney-risk",
                  stage="fhir_fallback") == stage_before + 2
    assert sample("cds_prefetch_keys_total", site=site, service="kidney-risk", key="egfr",
                  result="miss") == miss_before + 2


def test_shadow_model_score_difference_is_observed(make_app):
    from hooks import SERVICES

    app = make_app(SERVICES=SERVICES, SITE_YAML="services:\n  kidney-risk:\n"
                   "    shadow_model: ckd-progression-lr\n")
    labels = {"service": "kidney-risk", "active_model": "kfre-4var:1.0.0",
              "shadow_model": "ckd-progression-lr:0.1.0"}
    before = sample("cds_shadow_score_difference_count", **labels)
    shadow_before = sample("cds_model_score_count", model_id="ckd-progression-lr",
                           model_version="0.1.0", role="shadow")
    body = golden_request("p1")
    body.pop("fhirServer"), body.pop("fhirAuthorization")
    assert post(app.test_client(), "/cds-services/kidney-risk", body).status_code == 200
    assert sample("cds_shadow_score_difference_count", **labels) == before + 1
    assert sample("cds_model_score_count", model_id="ckd-progression-lr", model_version="0.1.0",
                  role="shadow") == shadow_before + 1


def test_metrics_endpoint_needs_no_token_and_names_the_catalogue(client):
    response = client.get("/metrics", headers={"Authorization": None})
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    catalogue = Path(ROOT / "cds_service" / "ops" / "metrics.py").read_text()
    for name in ("cds_requests", "cds_stage_duration_seconds", "cds_jwt_rejections"):
        assert f'"{name}"' in catalogue and f"# HELP {name}" in text


MULTIPROCESS_PID_SCRIPT = r"""
import os, sys
from cds_service.ops import metrics  # PROMETHEUS_MULTIPROC_DIR is set: multiprocess values
calls = []
def profile(frame, event, arg):  # prometheus_client holds os.getpid itself: see every C call
    if event == "c_call" and arg is os.getpid:
        calls.append(1)
sys.setprofile(profile)
for _ in range(100):
    metrics.count_request("s", "svc", "patient-view", 200, 0.01)
sys.setprofile(None)
print(len(calls))
pid = os.fork()
if pid == 0:
    for _ in range(7):
        metrics.count_request("s", "svc", "patient-view", 200, 0.01)
    os._exit(0)
os.waitpid(pid, 0)
print(pid)
sys.stdout.flush()
"""


def test_multiprocess_values_know_their_process_without_asking_the_kernel_each_time(tmp_path):
    # prometheus_client asks getpid() on every increment to notice a fork; ours knows the pid
    # and learns a child's at the fork, so each process still writes its own file.
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    done = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", MULTIPROCESS_PID_SCRIPT], capture_output=True, text=True,
        timeout=60, cwd=ROOT, check=False,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    assert done.returncode == 0, done.stderr
    getpid_calls, child = (int(line) for line in done.stdout.split())
    assert getpid_calls == 0
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    total = registry.get_sample_value("cds_requests_total", {
        "site": "s", "service": "svc", "hook": "patient-view", "status": "200"})
    assert total == 107
    # The child's 7 calls are in its own file, not in its parent's.
    assert (metrics_dir / f"counter_{child}.db").is_file()
