"""`cds-service invoke`: builds Epic-shaped, signed requests from a Bundle file."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import UTC, date, datetime, timedelta

import jwt
import pytest

from cds_service.config import load_sites
from cds_service.service import index_services
from cds_service.tools.invoke import (
    InvokeError,
    build_request,
    dated_today,
    load_bundle,
    shift_dates,
    signing_token,
)
from hooks import SERVICES
from tests.conftest import ROOT
from tests.helpers.servers import CLI, request
from tests.helpers.validator import validate_response

BUNDLE = ROOT / "examples" / "bundles" / "ckd-patient-nsaid.json"


@pytest.fixture(scope="module")
def demo_site():
    sites = load_sites(ROOT / "site_config", index_services(SERVICES))
    return sites["demo-hospital"]


def test_patient_view_request_prefetches_from_the_bundle(demo_site):
    body = build_request(demo_site, "kidney-risk", json.loads(BUNDLE.read_text()))
    assert body["hook"] == "patient-view"
    assert body["context"] == {"userId": "PractitionerRole/cds-invoke",
                               "patientId": "demo-ckd-1", "encounterId": "demo-enc-1"}
    egfr = body["prefetch"]["egfr"]
    assert egfr["type"] == "searchset"
    # Every Observation of the patient: the services select by code themselves.
    assert {e["resource"]["id"] for e in egfr["entry"]} == {"egfr-2026-09", "egfr-2025-11",
                                                            "uacr-2026-09"}


def test_order_select_request_drafts_and_selections(demo_site):
    body = build_request(demo_site, "nephrotoxic-order-check", json.loads(BUNDLE.read_text()),
                         hook="order-select")
    assert body["context"]["selections"] == ["MedicationRequest/draft-ibuprofen-1"]
    assert body["context"]["draftOrders"]["type"] == "collection"


@pytest.mark.parametrize(
    ("service", "bundle", "hook", "message"),
    [
        ("nope", {"resourceType": "Bundle"}, None, "not enabled"),
        ("kidney-risk", {"resourceType": "Patient"}, None, "not a FHIR Bundle"),
        ("kidney-risk", {"resourceType": "Bundle", "entry": []}, None, "no Patient"),
        ("kidney-risk", {"resourceType": "Bundle"}, "order-sign", "answers patient-view"),
    ],
)
def test_build_request_errors(demo_site, service, bundle, hook, message):
    with pytest.raises(InvokeError, match=message):
        build_request(demo_site, service, bundle, hook=hook)


def test_token_has_epic_shape(demo_site):
    token = signing_token(demo_site, "http://127.0.0.1:8000/cds-services/kidney-risk")
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "RS384" and header["typ"] == "JWT" and header["kid"]
    assert claims["exp"] - claims["iat"] == 900 and claims["iat"] - claims["nbf"] == 300
    assert claims["iss"] == demo_site.issuers[0].iss


def test_invoke_against_the_running_demo(serve, tmp_path):
    server = serve("--workers", "1", "--site-config", str(ROOT / "site_config"))
    env_args = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 60}
    common = ["--bundle", str(BUNDLE), "--url", server.base, "--site-config",
              str(ROOT / "site_config")]
    result = subprocess.run([CLI, "invoke", "kidney-risk", *common], **env_args)
    assert result.returncode == 0, result.stderr
    assert ("[warning] Kidney failure risk 8% at 2 years, 24% at 5 years (eGFR 27, urine ACR "
            "380 mg/g)") in result.stdout
    assert "metformin (contraindicated at eGFR below 30)" in result.stdout
    assert "suggestion: Refer to nephrology (create ServiceRequest)" in result.stdout

    result = subprocess.run([CLI, "invoke", "nephrotoxic-order-check", "--hook", "order-select",
                             "--json", *common], **env_args)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert validate_response(answer, epic=True) == []
    action = answer["cards"][0]["suggestions"][0]["actions"][0]
    assert action == {"type": "delete", "description": "Remove the ibuprofen order.",
                      "resourceId": "MedicationRequest/draft-ibuprofen-1"}


def test_a_withheld_card_is_explained_until_its_suppression_is_cleared(serve, tmp_path):
    server = serve("--workers", "1", "--site-config", str(ROOT / "site_config"))
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 60,
           "env": {**os.environ, "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}"}}
    invoke = [CLI, "invoke", "kidney-risk", "--bundle", str(BUNDLE), "--url", server.base,
              "--site-config", str(ROOT / "site_config")]
    [card] = json.loads(subprocess.run([*invoke, "--json"], **run).stdout)["cards"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, _ = request(server.base + "/cds-services/kidney-risk/feedback", {"feedback": [{
        "card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": now,
        "overrideReason": {"reason": card["overrideReasons"][0]}}]})
    assert status == 200

    result = subprocess.run(invoke, **run)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "No cards shown.",
        "Withheld: the same user overrode a card of the same topic for this patient "
        "(alert-fatigue suppression)",
        f"[warning] {card['summary']}"]
    overridden_at, uuid, shown_again_after = re.fullmatch(
        r"    overridden at (\S+) \(card (\S+)\); shown again after (\S+), or sooner if more "
        r"severe", lines[3]).groups()
    assert uuid == card["uuid"]
    assert (datetime.fromisoformat(shown_again_after) - datetime.fromisoformat(overridden_at)
            == timedelta(hours=24))  # the demo site's window
    assert lines[4] == ("    to show it again now: cds-service suppressions clear --patient "
                        "demo-ckd-1 --user PractitionerRole/cds-invoke")

    cleared = subprocess.run([CLI, "suppressions", "clear", "--patient", "demo-ckd-1", "--user",
                              "PractitionerRole/cds-invoke", "--site-config",
                              str(ROOT / "site_config")], **run)
    assert cleared.stdout == "cleared 1 suppression(s)\n", cleared.stderr
    result = subprocess.run(invoke, **run)
    assert result.stdout.startswith(f"[warning] {card['summary']}\n"), result.stdout
    assert "Withheld" not in result.stdout


# --- synthetic examples are dated relative to today -------------------------------------------

HTEST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}


def test_shift_dates_moves_full_dates_and_keeps_time_and_offset():
    moved = shift_dates({
        "birthDate": "1956-03-02",
        "effectiveDateTime": "2026-09-14T08:30:00Z",
        "issued": "2026-12-31T23:59:59.123+02:00",
        "period": {"start": "2024-02-28", "end": "2024-02-29T10:00-05:00"},
        "valueString": "2026-09",  # partial dates are not moved
        "code": {"coding": [{"code": "2160-0"}]},
        "note": ["seen 2026-09-14 in clinic"],
        "value": 27,
    }, days=3)
    assert moved == {
        "birthDate": "1956-03-05",
        "effectiveDateTime": "2026-09-17T08:30:00Z",
        "issued": "2027-01-03T23:59:59.123+02:00",
        "period": {"start": "2024-03-02", "end": "2024-03-03T10:00-05:00"},
        "valueString": "2026-09",
        "code": {"coding": [{"code": "2160-0"}]},
        "note": ["seen 2026-09-14 in clinic"],
        "value": 27,
    }


def test_a_synthetic_bundle_is_moved_so_its_timestamp_is_today():
    bundle = {"resourceType": "Bundle", "meta": {"tag": [HTEST]},
              "timestamp": "2026-11-21T12:00:00Z",
              "entry": [{"resource": {"resourceType": "Observation",
                                      "effectiveDateTime": "2026-09-14T08:30:00Z"}}]}
    # 2026-11-21 → 2030-02-01 is 1168 days: 40 to 2026-12-31, 1096 (2028 leap) to 2029-12-31,
    # 32 more. 2026-09-14 + 1096 days = 2029-09-14, + 72 days = 2029-11-25.
    moved = dated_today(bundle, date(2030, 2, 1))
    assert moved["timestamp"] == "2030-02-01T12:00:00Z"
    assert moved["entry"][0]["resource"]["effectiveDateTime"] == "2029-11-25T08:30:00Z"
    assert bundle["timestamp"] == "2026-11-21T12:00:00Z"  # the input is not changed


@pytest.mark.parametrize("bundle", [
    {"resourceType": "Bundle", "timestamp": "2026-11-21T12:00:00Z"},  # not tagged synthetic
    {"resourceType": "Bundle", "meta": {"tag": [HTEST]}},  # no timestamp to count from
    {"resourceType": "Bundle", "meta": {"tag": [HTEST]}, "timestamp": "2026-11"},
])
def test_other_bundles_are_used_as_written(bundle):
    assert dated_today(bundle, date(2030, 2, 1)) is bundle


def test_the_example_bundles_are_synthetic_and_dated_from_their_timestamp():
    for path in sorted((ROOT / "examples" / "bundles").glob("*.json")):
        written = json.loads(path.read_text(encoding="utf-8"))
        assert HTEST in [{k: t[k] for k in ("system", "code")} for t in written["meta"]["tag"]]
        loaded = load_bundle(str(path), today=date(2031, 1, 1))
        assert loaded["timestamp"].startswith("2031-01-01T"), path.name


def test_a_bundle_file_nested_too_deep_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(InvokeError, match="deep.json is not usable JSON: JSON nested deeper"):
        load_bundle(str(path))
