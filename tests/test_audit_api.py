"""Every invocation and feedback call leaves one audit record, with no token or resource content.

Runs on SQLite and on a fresh schema of the local PostgreSQL (`store_url`).
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import make_jwt
from tests.helpers.http import PATIENT_VIEW, post
from tests.helpers.store_queries import add_audit

TOKEN = "opaque-ehr-access-token-a1b2c3"


@pytest.fixture
def audited(store_url, make_app, fhir_server):  # apps close (and write their
    # queue) before the store goes
    return make_app(DATABASE_URL=store_url, SITE_YAML="prefetch:\n  allow_http_loopback: true\n",
                    FHIR_SERVERS=[fhir_server.url])


def records(app, **filters):
    return list(app.extensions["cds"].store.iter_audit(**filters))


def test_invocation_with_fallback_fetch_is_audited(audited, fhir_server):
    fhir_server.add("Patient/p-77", json={"resourceType": "Patient", "id": "p-77",
                                          "name": [{"given": ["Secret-Name-Zed"]}]})
    body = copy.deepcopy(PATIENT_VIEW)
    body.update(fhirServer=fhir_server.url,
                fhirAuthorization={"access_token": TOKEN, "token_type": "Bearer"})
    body["context"].update(patientId="p-77", encounterId="enc-9")
    response = post(audited.test_client(), "/cds-services/greeter", body)
    assert response.status_code == 200
    card = response.get_json()["cards"][0]

    [record] = records(audited)
    assert record["kind"] == "invoke" and record["status"] == 200
    assert (record["site"], record["service_id"], record["hook"]) == (
        "test-site", "greeter", "patient-view")
    assert (record["user_id"], record["patient_id"], record["encounter_id"]) == (
        "PractitionerRole/123", "p-77", "enc-9")
    assert record["hook_instance"] == body["hookInstance"]
    assert record["iss"] == "https://ehr.test/api/FHIR/R4" and record["sub"] == "test-client"
    assert record["prefetch_keys_used"] == ("patient:fetched",)
    assert record["fhir_urls_fetched"] == ("Patient/p-77",)
    assert record["card_uuids"] == (card["uuid"],)
    dumped = json.dumps(record, default=str)
    for secret in (TOKEN, "Secret-Name-Zed", "eyJ"):
        assert secret not in dumped


def test_refusals_and_failures_are_audited_too(audited):
    client = audited.test_client()
    post(client, "/cds-services/greeter", PATIENT_VIEW)  # 412: nothing prefetched, no token
    post(client, "/cds-services/echo", {"hook": "patient-view"})  # 400
    post(client, "/cds-services/echo", PATIENT_VIEW, headers={"Authorization": None})  # 401
    statuses = [(r["service_id"], r["status"]) for r in records(audited)]
    assert statuses == [("greeter", 412), ("echo", 400), ("echo", 401)]
    assert records(audited, status=412)[0]["patient_id"] == "1288992"


def test_feedback_is_audited_with_its_cards(audited):
    client = audited.test_client()
    token = make_jwt("http://localhost/cds-services/echo/feedback")
    an_hour_ago = f"{datetime.now(UTC) - timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}"
    feedback = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden",
                              "outcomeTimestamp": an_hour_ago} for _ in range(2)]}
    response = post(client, "/cds-services/echo/feedback", feedback,
                    headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    [record] = records(audited, kind="feedback")
    assert record["feedback_cards"] == tuple(item["card"] for item in feedback["feedback"])
    assert record["outcome"] == "received=2 stored=2"
    assert token not in json.dumps(record, default=str)


def test_discovery_reads_no_phi_and_is_not_audited(audited):
    assert audited.test_client().get("/cds-services").status_code == 200
    assert records(audited) == []


def test_purge_command_removes_records_past_retention(store_url, tmp_path):
    import subprocess

    from cds_service.records.audit import AuditRecord
    from cds_service.records.store import Store
    from tests.helpers.servers import CLI

    now = datetime.now(UTC)
    with Store(store_url) as store:
        for age in (400, 10):
            add_audit(store, AuditRecord(kind="invoke", time=now - timedelta(days=age),
                                        status=200, patient_id=f"p-{age}"))
    result = subprocess.run([CLI, "audit", "purge", "--older-than-days", "365"], cwd=tmp_path,
                            env={**os.environ, "CDS_DATABASE_URL": store_url},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "removed 1 audit records" in result.stdout
    with Store(store_url) as store:
        assert [r["patient_id"] for r in store.iter_audit()] == ["p-10"]


def test_show_command_reads_the_log_for_an_access_review(store_url, monkeypatch, capsys):

    from cds_service.cli import main
    from cds_service.records.audit import AuditRecord
    from cds_service.records.store import Store

    now = datetime.now(UTC)
    calls = [  # (days ago, patient, user, hookInstance, status, outcome)
        (40, "p1", "PractitionerRole/a", "h-old", 200, "cards=1"),
        (3, "p1", "PractitionerRole/b", "h-mid", 200, "cards=0 suppressed=1"),
        (1, "p2", "PractitionerRole/a", "h-new", 412, "412"),
    ]
    with Store(store_url) as store:
        for days, patient, user, hook_instance, status, outcome in calls:
            add_audit(store, AuditRecord(
                kind="invoke", time=now - timedelta(days=days), status=status, site="site-a",
                patient_id=patient, user_id=user, hook_instance=hook_instance,
                hook="patient-view", service_id="kidney-risk", outcome=outcome))
    monkeypatch.setenv("CDS_DATABASE_URL", store_url)

    def show(*args: str) -> list[dict]:
        assert main(["audit", "show", *args]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    def instances(*args: str) -> list[str]:
        return [row["hook_instance"] for row in show(*args)]

    [first, *_] = show("--patient", "p1")
    assert first["patient_id"] == "p1" and first["user_id"] == "PractitionerRole/a"
    assert datetime.fromisoformat(first["time"]) == now - timedelta(days=40)
    assert first["prefetch_keys_used"] == [] and first["time"].endswith("Z")
    assert instances("--patient", "p1") == ["h-old", "h-mid"]
    assert instances("--user", "PractitionerRole/a") == ["h-old", "h-new"]
    assert instances("--hook-instance", "h-mid") == ["h-mid"]
    assert instances("--outcome", "suppressed") == ["h-mid"]
    assert instances("--status", "412") == ["h-new"]
    assert instances("--since", "7d") == ["h-mid", "h-new"]
    until = (now - timedelta(days=2)).isoformat()
    assert instances("--until", until) == ["h-old", "h-mid"]
    assert instances("--since", "7d", "--until", until, "--user", "PractitionerRole/b") == [
        "h-mid"]
    assert instances("--patient", "p3") == []

    assert main(["audit", "show", "--patient", "p1", "--format", "table"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["time", "kind", "status", "site", "user_id", "patient_id", "hook",
                              "hook_instance", "service_id", "outcome"]
    assert [row.split()[:6] for row in rows] == [
        [(now - timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%SZ"), "invoke", "200", "site-a",
         user, "p1"] for d, user in ((40, "PractitionerRole/a"), (3, "PractitionerRole/b"))]
    assert rows[1].endswith("cards=0 suppressed=1")
    assert header.index("patient_id") == rows[0].index("p1")  # aligned

    assert main(["audit", "show", "--since", "1d", "--until", "7d"]) == 2
    assert "--since must be before --until" in capsys.readouterr().err


HOSTILE_JWT = "eyJhbGciOiJSUzM4NCJ9.eyJzdWIiOiJzZWNyZXQifQ.c2lnbmF0dXJl"


@pytest.mark.parametrize(("hook_instance", "user_id"), [
    ("a" * 100, "PractitionerRole/123"),  # the finding: 65-128 characters dropped the record
    ("b" * 128, "PractitionerRole/" + "c" * 200),
    (str(uuid.uuid4()), f"PractitionerRole/{HOSTILE_JWT}"),
    (HOSTILE_JWT, "Practitioner/ok"),
])
def test_hostile_ids_are_withheld_from_the_audit_record_not_the_record(audited, hook_instance,
                                                                        user_id):
    body = copy.deepcopy(PATIENT_VIEW)
    body["hookInstance"] = hook_instance
    body["context"]["userId"] = user_id
    body["prefetch"] = {"patient": {"resourceType": "Patient", "id": body["context"]["patientId"],
                                    "name": [{"given": ["Ada"]}]}}
    response = post(audited.test_client(), "/cds-services/greeter", body)
    assert response.status_code == 200, response.get_json()

    [record] = records(audited)
    assert record["status"] == 200 and record["outcome"] == "cards=1"
    dumped = json.dumps(record, default=str)
    for value in (hook_instance, user_id):
        if len(value) > 64 or value.count(".") == 2:
            assert value not in dumped and HOSTILE_JWT not in dumped
    assert "withheld sha256:" in dumped
