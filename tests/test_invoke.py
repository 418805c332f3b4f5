"""`cds-service invoke`: builds Epic-shaped, signed requests from a Bundle file."""

from __future__ import annotations

import json
import subprocess

import jwt
import pytest

from cds_service.config import load_sites
from cds_service.invoke import InvokeError, build_request, signing_token
from cds_service.registry import index_services
from cds_service.validator import validate_response
from hooks import SERVICES
from tests.conftest import ROOT
from tests.test_serve import CLI, serve  # noqa: F401 - fixture

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


def test_invoke_against_the_running_demo(serve, tmp_path):  # noqa: F811
    server = serve("--workers", "1", "--site-config", str(ROOT / "site_config"))
    env_args = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 60}
    common = ["--bundle", str(BUNDLE), "--url", server.base, "--site-config",
              str(ROOT / "site_config")]
    result = subprocess.run([CLI, "invoke", "kidney-risk", *common], **env_args)
    assert result.returncode == 0, result.stderr
    assert "[warning] 5-year kidney failure risk 24% (eGFR 27, UACR 380 mg/g)" in result.stdout
    assert "metformin (contraindicated below eGFR 30)" in result.stdout
    assert "suggestion: Refer to nephrology (create ServiceRequest)" in result.stdout

    result = subprocess.run([CLI, "invoke", "nephrotoxic-order-check", "--hook", "order-select",
                             "--json", *common], **env_args)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert validate_response(answer, epic=True) == []
    action = answer["cards"][0]["suggestions"][0]["actions"][0]
    assert action == {"type": "delete", "description": "Remove the ibuprofen order.",
                      "resourceId": "MedicationRequest/draft-ibuprofen-1"}
