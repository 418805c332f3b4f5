"""The developer sandbox (`/sandbox`), through the Flask test client.

The sandbox calls this same server's `/cds-services/...` over HTTP; here its transport is swapped
for one that replays each call through the test client on another thread (as a server thread
would run it), so authentication, suppression, the audit log and the feedback store all run.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import jwt
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from cds_service import create_app
from cds_service.data.jsonlimit import MAX_DEPTH
from cds_service.protocol.errors import ConfigError
from cds_service.records.suppression import WITHHELD_EXTENSION
from cds_service.records.tables import overrides_table
from cds_service.tools import sandbox
from cds_service.tools.invoke import INVOKE_USER, load_bundle
from hooks._medications import TERMINOLOGY
from tests.conftest import DEMO_ISS, DEMO_JWKS, ROOT
from tests.helpers.store_queries import list_feedback, list_predictions

DEMO_SITE = ROOT / "site_config" / "demo-hospital.yaml"
KIDNEY_SUMMARY = "Kidney failure risk 8% at 2 years, 24% at 5 years (eGFR 27, urine ACR 380 mg/g)"


class ThreadedTestTransport:
    """Each call through the app's test client on a fresh thread: no request context shared
    with the sandbox view that makes it, as with a real server."""

    def __init__(self, app):
        self.app = app
        self.calls: list[dict] = []

    def __call__(self, url, headers, body):
        self.calls.append({"url": url, "headers": dict(headers), "body": body})
        parts = urlsplit(url)

        def post():
            response = self.app.test_client().post(
                parts.path, json=body, headers=dict(headers),
                base_url=f"{parts.scheme}://{parts.netloc}")
            return response.status_code, response.get_json()

        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(post).result()


@pytest.fixture
def demo(tmp_path):
    app = create_app({"SITE_CONFIG": str(DEMO_SITE), "PUBLIC_URL": "http://localhost",
                      "ALLOW_DEV_KEYS": True,
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}",
                      "REPLAY_CACHE_URL": f"sqlite:///{tmp_path / 'replay.sqlite3'}"})
    app.config["TESTING"] = True
    transport = ThreadedTestTransport(app)
    app.extensions["sandbox"]["transport"] = transport
    yield app, app.test_client(), transport
    app.extensions["cds"].close()


def invoke(client, **body):
    return client.post("/sandbox/api/invoke", json=body)


# ---------------------------------------------------------------------------------------------
# Enabling

def test_sandbox_is_404_and_unmounted_when_no_site_enables_it(make_app):
    app = make_app()
    client = app.test_client()
    for path in ("/sandbox", "/sandbox/", "/sandbox/api/patients", "/sandbox/static/sandbox.js"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.get_json()["resourceType"] == "OperationOutcome"
    assert "sandbox" not in app.blueprints and "sandbox" not in app.extensions


def test_sandbox_needs_a_development_key(make_app):
    # The test site trusts a plain jwks_file issuer: a production-like site cannot mint tokens.
    with pytest.raises(ConfigError, match=r"test-site-0\.yaml: sandbox: needs an issuer with "
                                          r"`dev_keypair: true`"):
        make_app(SITE_YAML="sandbox: true\n")


def test_sandbox_key_must_be_a_boolean(make_app):
    with pytest.raises(ConfigError, match=r"test-site-0\.yaml: sandbox: Not a valid boolean"):
        make_app(SITE_YAML="sandbox: sometimes\n")


def test_demo_site_enables_it_and_production_default_is_off(demo, make_app):
    app, _, _ = demo
    assert app.extensions["cds"].sites["demo-hospital"].sandbox is True
    assert make_app().extensions["cds"].default_site.sandbox is False


# ---------------------------------------------------------------------------------------------
# The page

def test_page_and_its_assets_are_served_by_the_app(demo):
    _, client, _ = demo
    page = client.get("/sandbox")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert 'src="/sandbox/static/sandbox.js"' in html
    assert 'href="/sandbox/static/sandbox.css"' in html
    assert "unauthenticated" in html and "demo-hospital" in html
    assert 'data-reset="/sandbox/api/reset-overrides"' in html and 'id="reset-overrides"' in html
    # Works offline: nothing is loaded from another origin.
    assert "://" not in html.split("<body")[0]
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    for asset, mimetype in (("sandbox.js", "text/javascript"), ("sandbox.css", "text/css")):
        response = client.get(f"/sandbox/static/{asset}")
        assert response.status_code == 200 and response.mimetype == mimetype
        assert "@import" not in response.get_data(as_text=True)
        response.close()
    assert client.get("/sandbox/").status_code == 200


def test_sandbox_is_not_part_of_the_openapi_spec(demo):
    _, client, _ = demo
    paths = client.get("/openapi.json").get_json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/sandbox")]


# ---------------------------------------------------------------------------------------------
# Listings

def test_lists_bundled_patients(demo):
    _, client, _ = demo
    patients = {p["id"]: p for p in client.get("/sandbox/api/patients").get_json()["patients"]}
    assert patients["ckd-patient-nsaid"]["patientId"] == "demo-ckd-1"
    assert patients["ckd-patient-nsaid"]["name"] == "Rosa Example"
    assert patients["low-egfr-no-uacr"]["patientId"] == "sandbox-low-egfr-1"
    assert patients["nsaid-order-candidate"]["gender"] == "male"


def test_a_missing_bundles_directory_lists_no_patients(demo, tmp_path):
    app, client, _ = demo
    app.config["SANDBOX_BUNDLES_DIR"] = str(tmp_path / "nowhere")
    assert client.get("/sandbox/api/patients").get_json() == {"patients": []}


def test_lists_the_sandbox_sites_services_and_hooks(demo):
    _, client, _ = demo
    [site] = client.get("/sandbox/api/services").get_json()["sites"]
    assert site["site"] == "demo-hospital"
    assert {s["id"]: s["hooks"] for s in site["services"]} == {
        "kidney-risk": ["patient-view"],
        "nephrotoxic-order-check": ["order-select", "order-sign"]}


def test_medications_to_draft_are_the_bundles_orders_then_the_catalogue(demo):
    _, client, _ = demo
    response = client.post("/sandbox/api/medications", json={"patient": "ckd-patient-nsaid"})
    listed = {m["id"]: m for m in response.get_json()["medications"]}
    assert listed["MedicationRequest/draft-ibuprofen-1"]["status"] == "draft"
    assert listed["MedicationRequest/metformin-active-1"]["label"] == "metformin 500 mg tablet"
    assert listed["catalogue/ibuprofen-400"]["rxnorm"] == "5640"
    assert [m["source"] for m in listed.values()][:2] == ["bundle", "bundle"]


def test_catalogue_codes_are_rxnorm_ingredients():
    for key, (code, display) in sandbox.CATALOGUE.items():
        assert display.lower().startswith(TERMINOLOGY.ingredients[code]), key


# ---------------------------------------------------------------------------------------------
# Invoking

def test_calls_go_to_this_server_whatever_host_the_caller_names(demo):
    # The Host header is the caller's to choose; the signed call must not follow it elsewhere.
    _, client, transport = demo
    response = client.post("/sandbox/api/invoke", headers={"Host": "attacker.example.org"},
                           json={"patient": "ckd-patient-nsaid", "service": "kidney-risk",
                                 "hook": "patient-view"})
    assert response.status_code == 200, response.get_json()
    [sent] = transport.calls
    assert sent["url"] == "http://localhost/cds-services/kidney-risk"


def test_patient_view_sends_a_signed_request_and_returns_cards_and_explanation(demo):
    _, client, transport = demo
    response = invoke(client, patient="ckd-patient-nsaid", service="kidney-risk",
                      hook="patient-view")
    assert response.status_code == 200, response.get_json()
    result = response.get_json()

    [sent] = transport.calls
    assert sent["url"] == "http://localhost/cds-services/kidney-risk"
    token = sent["headers"]["Authorization"].removeprefix("Bearer ")
    public = jwt.PyJWKSet.from_dict(json.loads(DEMO_JWKS.read_text()))
    key = public[jwt.get_unverified_header(token)["kid"]].key
    claims = jwt.decode(token, key, algorithms=["RS384"], audience=sent["url"])
    assert claims["iss"] == DEMO_ISS and claims["exp"] - claims["iat"] == 900

    # Shown exactly as sent, the token only truncated.
    assert result["request"]["body"] == sent["body"]
    assert result["request"]["url"] == sent["url"]
    shown = result["request"]["headers"]["Authorization"]
    assert shown == f"Bearer {token[:sandbox.TOKEN_SHOWN]}…" and token not in json.dumps(result)
    assert result["request"]["jwt"]["claims"]["jti"] == claims["jti"]
    assert sent["body"]["context"]["patientId"] == "demo-ckd-1"

    assert result["response"]["status"] == 200
    [card] = result["response"]["body"]["cards"]
    assert card["indicator"] == "warning" and card["summary"] == KIDNEY_SUMMARY
    assert "| Result | Value | Category | Date |" in card["detail"]

    explanation = result["explanation"]
    assert explanation["model"]["id"] == "kfre-4var"
    assert explanation["score"] == pytest.approx(0.24, abs=0.005)
    assert explanation["contributions"][0]["name"] == "egfr"


def test_the_explanation_is_the_score_the_service_served_counted_once(demo):
    # One scoring path (ModelBinding.score via hooks/_kidney.risk) for the hook and the sandbox;
    # the sandbox's second scoring stays out of the model metrics.
    app, client, transport = demo
    labels = {"model_id": "kfre-4var", "model_version": app.extensions["cds"].models.get(
        "kfre-4var").version, "role": "active"}
    before = REGISTRY.get_sample_value("cds_model_score_count", labels) or 0
    result = invoke(client, patient="ckd-patient-nsaid", service="kidney-risk",
                    hook="patient-view").get_json()
    [sent] = transport.calls
    [served] = list_predictions(app.extensions["cds"].store,
                                hook_instance=sent["body"]["hookInstance"])
    assert result["explanation"]["score"] == pytest.approx(served["score"], abs=1e-9)
    assert REGISTRY.get_sample_value("cds_model_score_count", labels) == before + 1


def test_a_calculated_egfr_reaches_the_explanation(demo):
    # Creatinine only: the service and the explanation both use CKD-EPI 2021 from creatinine;
    # without a urine ACR the model reports what is missing instead of a score.
    _, client, _ = demo
    result = invoke(client, patient="low-egfr-no-uacr", service="kidney-risk",
                    hook="patient-view").get_json()
    [card] = result["response"]["body"]["cards"]
    assert card["indicator"] == "warning" and "calculated eGFR" in card["summary"]
    assert [s["label"] for s in card["suggestions"]] == [
        "Order urine albumin/creatinine ratio"]
    explanation = result["explanation"]
    assert explanation["score"] is None and "uacr" in explanation["unavailable"]
    features = {f["name"]: f for f in explanation["features"]["features"]}
    assert features["egfr"]["status"] == "observed"
    assert features["egfr"]["value"] == float(card["summary"].split("calculated eGFR ")[1][:2])


def test_an_uploaded_example_bundle_is_dated_today_like_a_bundled_one(demo):
    _, client, transport = demo
    path = ROOT / "examples/bundles/ckd-patient-nsaid.json"
    uploaded = json.loads(path.read_text())
    result = invoke(client, bundle=uploaded, service="kidney-risk", hook="patient-view").get_json()
    assert result["response"]["body"]["cards"][0]["summary"] == KIDNEY_SUMMARY
    egfr = transport.calls[0]["body"]["prefetch"]["egfr"]
    observations = {e["resource"]["id"]: e["resource"] for e in load_bundle(str(path))["entry"]
                    if e["resource"]["resourceType"] == "Observation"}
    assert {e["resource"]["id"]: e["resource"] for e in egfr["entry"]} == observations
    assert set(observations) == {"egfr-2026-09", "egfr-2025-11", "uacr-2026-09"}


def test_an_uploaded_bundle_not_tagged_synthetic_is_used_as_sent(demo):
    _, client, transport = demo
    bundle = json.loads((ROOT / "examples/bundles/ckd-patient-nsaid.json").read_text())
    del bundle["meta"]
    invoke(client, bundle=bundle, service="kidney-risk", hook="patient-view")
    sent = transport.calls[0]["body"]["prefetch"]["egfr"]["entry"]
    assert [e["resource"] for e in sent] == [e["resource"] for e in bundle["entry"]
                                             if e["resource"]["resourceType"] == "Observation"]


def test_order_select_drafts_the_chosen_catalogue_and_chart_medications(demo):
    _, client, transport = demo
    result = invoke(client, patient="ckd-patient-nsaid", service="nephrotoxic-order-check",
                    hook="order-select",
                    medications=["catalogue/naproxen-500",
                                 "MedicationRequest/metformin-active-1"]).get_json()
    context = transport.calls[0]["body"]["context"]
    assert context["selections"] == ["MedicationRequest/sandbox-draft-1",
                                     "MedicationRequest/sandbox-draft-2"]
    drafts = {e["resource"]["id"]: e["resource"] for e in context["draftOrders"]["entry"]}
    # The Bundle's own draft stays in draftOrders (Epic sends every draft), unselected.
    assert set(drafts) == {"draft-ibuprofen-1", "sandbox-draft-1", "sandbox-draft-2"}
    assert drafts["sandbox-draft-1"]["medicationCodeableConcept"]["coding"][0]["code"] == "7258"
    assert drafts["sandbox-draft-2"]["medicationCodeableConcept"]["text"] == \
        "metformin 500 mg tablet"
    assert all(d["status"] == "draft" and d["subject"] == {"reference": "Patient/demo-ckd-1"}
               for d in drafts.values())
    cards = result["response"]["body"]["cards"]
    assert [c["indicator"] for c in cards] == ["critical", "critical"]
    assert cards[0]["summary"].startswith("Naproxen ordered with eGFR 27")
    assert "metformin" in cards[1]["summary"].lower()


def test_order_select_of_the_bundles_draft_nsaid(demo):
    _, client, _ = demo
    result = invoke(client, patient="nsaid-order-candidate", service="nephrotoxic-order-check",
                    hook="order-select",
                    medications=["MedicationRequest/draft-naproxen-1"]).get_json()
    [card] = result["response"]["body"]["cards"]
    assert card["indicator"] == "warning"
    assert card["summary"].startswith("Naproxen ordered with eGFR 48")
    assert card["overrideReasons"] and card["suggestions"]


# ---------------------------------------------------------------------------------------------
# Feedback

def _kidney_card(client):
    result = invoke(client, patient="ckd-patient-nsaid", service="kidney-risk",
                    hook="patient-view").get_json()
    return result["response"]["body"]["cards"][0]


def test_accepting_a_suggestion_stores_feedback(demo):
    app, client, transport = demo
    card = _kidney_card(client)
    suggestion = card["suggestions"][0]
    response = client.post("/sandbox/api/feedback", json={
        "service": "kidney-risk", "card": card["uuid"], "outcome": "accepted",
        "suggestion": suggestion["uuid"]})
    assert response.status_code == 200, response.get_json()
    result = response.get_json()
    assert result["response"] == {"status": 200, "body": {"received": 1, "stored": 1}}
    sent = transport.calls[-1]
    assert sent["url"] == "http://localhost/cds-services/kidney-risk/feedback"
    [item] = sent["body"]["feedback"]
    assert item["acceptedSuggestions"] == [{"id": suggestion["uuid"]}]
    assert item["outcomeTimestamp"].endswith("Z")

    [row] = list_feedback(app.extensions["cds"].store, site="demo-hospital",
                                                      service_id="kidney-risk")
    assert row["card"] == card["uuid"] and row["outcome"] == "accepted"
    assert row["accepted_suggestions"] == [suggestion["uuid"]]


def test_overriding_with_a_reason_stores_it_and_suppresses_the_card(demo):
    app, client, _ = demo
    card = _kidney_card(client)
    reason = card["overrideReasons"][0]
    result = client.post("/sandbox/api/feedback", json={
        "service": "kidney-risk", "card": card["uuid"], "outcome": "overridden",
        "reason": reason, "comment": "seen by renal last week"}).get_json()
    assert result["response"]["body"] == {"received": 1, "stored": 1}
    assert result["request"]["body"]["feedback"][0]["overrideReason"] == {
        "reason": reason, "userComment": "seen by renal last week"}
    [row] = list_feedback(app.extensions["cds"].store, card=card["uuid"])
    assert (row["override_code"], row["user_comment"]) == (reason["code"],
                                                            "seen by renal last week")
    # Real feedback: the same card for the same user and patient is now silenced.
    again = invoke(client, patient="ckd-patient-nsaid", service="kidney-risk",
                   hook="patient-view").get_json()
    assert again["response"]["body"]["cards"] == []


def test_a_withheld_card_is_explained_and_reset_shows_it_again(demo):
    app, client, _ = demo
    card = _kidney_card(client)
    client.post("/sandbox/api/feedback", json={
        "service": "kidney-risk", "card": card["uuid"], "outcome": "overridden"})
    store = app.extensions["cds"].store
    # Someone else's override of the same patient, and the sandbox user's at another site: the
    # sandbox's reset leaves both alone.
    now = datetime.now(UTC)
    with store._engine.begin() as conn:
        conn.execute(sa.insert(overrides_table), [
            {"time": now, "site": site, "service_id": "kidney-risk", "user_id": user,
             "patient_id": "demo-ckd-1", "topic_code": "kidneyfunction", "indicator": "warning",
             "card_uuid": f"{site}-{user}"}
            for site, user in (("demo-hospital", "PractitionerRole/real-clinician"),
                               ("another-site", INVOKE_USER))])

    body = invoke(client, patient="ckd-patient-nsaid", service="kidney-risk",
                  hook="patient-view").get_json()["response"]["body"]
    assert body["cards"] == []
    [withheld] = body["extension"][WITHHELD_EXTENSION]
    assert (withheld["summary"], withheld["overriddenCard"]) == (KIDNEY_SUMMARY, card["uuid"])

    response = client.post("/sandbox/api/reset-overrides", json={"patient": "ckd-patient-nsaid"})
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"cleared": 1, "site": "demo-hospital",
                                   "userId": INVOKE_USER, "patientId": "demo-ckd-1"}
    assert {r["card_uuid"] for r in store.list_overrides(since=now - timedelta(days=1))} == {
        "demo-hospital-PractitionerRole/real-clinician", f"another-site-{INVOKE_USER}"}
    again = invoke(client, patient="ckd-patient-nsaid", service="kidney-risk",
                   hook="patient-view").get_json()["response"]["body"]
    assert [c["summary"] for c in again["cards"]] == [KIDNEY_SUMMARY]
    assert "extension" not in again
    assert client.post("/sandbox/api/reset-overrides",
                       json={"patient": "ckd-patient-nsaid"}).get_json()["cleared"] == 0


# ---------------------------------------------------------------------------------------------
# Bad input: a 400 OperationOutcome naming the problem, never a 500

@pytest.mark.parametrize(("path", "body", "message"), [
    ("invoke", {}, "service: Missing data"),
    ("invoke", {"service": "kidney-risk", "hook": "patient-view"}, "give either `patient`"),
    ("invoke", {"patient": "ckd-patient-nsaid", "bundle": {}, "service": "kidney-risk",
                "hook": "patient-view"}, "give either `patient`"),
    ("invoke", {"patient": "../../etc/passwd", "service": "kidney-risk", "hook": "patient-view"},
     "no bundled patient '../../etc/passwd'"),
    ("invoke", {"bundle": {"resourceType": "Patient"}, "service": "kidney-risk",
                "hook": "patient-view"}, "not a FHIR Bundle"),
    ("invoke", {"bundle": {"resourceType": "Bundle", "entry": [{"resource": "x"}]},
                "service": "kidney-risk", "hook": "patient-view"}, "no Patient with an id"),
    ("invoke", {"bundle": [], "service": "kidney-risk", "hook": "patient-view"},
     "bundle: Not a valid mapping"),
    ("invoke", {"patient": "ckd-patient-nsaid", "service": "nope", "hook": "patient-view"},
     "service 'nope' is not enabled"),
    ("invoke", {"patient": "ckd-patient-nsaid", "service": "kidney-risk", "hook": "order-sign"},
     "kidney-risk answers patient-view, not order-sign"),
    ("invoke", {"patient": "low-egfr-no-uacr", "service": "nephrotoxic-order-check",
                "hook": "order-select"}, "order-select needs a draft order"),
    ("invoke", {"patient": "ckd-patient-nsaid", "service": "nephrotoxic-order-check",
                "hook": "order-select", "medications": ["catalogue/aspirin"]},
     "medications[0]: 'catalogue/aspirin' is neither"),
    ("invoke", {"patient": "ckd-patient-nsaid", "service": "kidney-risk",
                "hook": "patient-view", "site": "other"}, "site 'other' has no sandbox"),
    ("invoke", {"patient": "ckd-patient-nsaid", "service": "kidney-risk",
                "hook": "patient-view", "token": "eyJ"}, "token: Unknown field"),
    ("medications", {"bundle": {"resourceType": "Bundle"}}, "no Patient with an id"),
    ("reset-overrides", {}, "give either `patient`"),
    ("reset-overrides", {"patient": "ckd-patient-nsaid", "site": "other"},
     "site 'other' has no sandbox"),
    ("feedback", {"service": "kidney-risk", "card": "c1", "outcome": "accepted"},
     "suggestion: an accepted card names"),
    ("feedback", {"service": "kidney-risk", "card": "c1", "outcome": "maybe"},
     "outcome: Must be one of"),
    ("feedback", {"service": "kidney-risk", "card": "c1", "outcome": "overridden",
                  "reason": {"code": "x"}}, "reason.system: Missing data"),
    ("feedback", ["not", "an", "object"], "must be a JSON object"),
])
def test_bad_input_is_a_400_operation_outcome(demo, path, body, message):
    _, client, transport = demo
    response = client.post(f"/sandbox/api/{path}", json=body)
    assert response.status_code == 400
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert message in " ".join(i["diagnostics"] for i in outcome["issue"])
    assert transport.calls == []


def test_malformed_json_and_wrong_content_type(demo):
    _, client, _ = demo
    response = client.post("/sandbox/api/invoke", data="{not json",
                           content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["resourceType"] == "OperationOutcome"
    # A cross-site form post cannot drive the sandbox: only JSON is accepted.
    response = client.post("/sandbox/api/invoke", data={"service": "kidney-risk"})
    assert response.status_code == 415
    assert response.get_json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("path", ["invoke", "medications", "feedback"])
def test_json_nested_too_deep_is_a_400(demo, path):
    _, client, transport = demo
    response = client.post(f"/sandbox/api/{path}", data="[" * 100_000 + "]" * 100_000,
                           content_type="application/json")
    assert response.status_code == 400
    [issue] = response.get_json()["issue"]
    assert f"nested deeper than {MAX_DEPTH} levels" in issue["diagnostics"]
    assert transport.calls == []


def test_an_unreachable_server_is_a_502(demo):
    app, client, _ = demo
    app.extensions["sandbox"]["transport"] = sandbox.http_transport
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    response = client.post("/sandbox/api/invoke", base_url=f"http://127.0.0.1:{port}",
                           json={"patient": "ckd-patient-nsaid", "service": "kidney-risk",
                                 "hook": "patient-view"})
    assert response.status_code == 502
    [issue] = response.get_json()["issue"]
    assert issue["code"] == "transient" and "cannot reach" in issue["diagnostics"]
