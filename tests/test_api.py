"""HTTP behaviour of discovery, invocation and errors (rules 1-38, 65-66, 108-112)."""

from __future__ import annotations

import copy
import json
import shutil
import uuid

import pytest

from cds_service.data.jsonlimit import MAX_DEPTH
from cds_service.protocol.http import json_body
from hooks import SERVICES
from tests.conftest import example
from tests.helpers.http import PATIENT_VIEW, assert_outcome, nested, post, walk
from tests.helpers.services import TEST_SERVICES
from tests.helpers.validator import validate_response

# --- discovery -------------------------------------------------------------------------


def test_discovery_lists_one_entry_per_service_and_hook(client):
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = response.get_json()["services"]
    pairs = [(s["id"], s["hook"]) for s in services]
    assert pairs == [
        ("echo", "patient-view"), ("echo", "order-select"), ("echo", "order-sign"),
        ("greeter", "patient-view"), ("broken", "patient-view"),
    ]
    greeter = services[3]
    assert greeter["prefetch"] == {"patient": "Patient/{{context.patientId}}"}
    assert greeter["usageRequirements"] == "Needs Patient read access."
    assert greeter["title"] == "Greeter" and greeter["description"]
    # Rules 2-4: no nulls and no empty objects (echo declares no prefetch: key omitted).
    assert "prefetch" not in services[0]
    for path, value in walk(response.get_json()):
        assert value is not None and value != {} and value != "", path


def test_discovery_with_no_services_is_an_empty_list(make_app):
    client = make_app(SERVICES=()).test_client()
    assert client.get("/cds-services").get_json() == {"services": []}


def test_discovery_of_the_shipped_registry_uses_lintable_templates(make_app):
    from cds_service.data.prefetch import lint_template
    from hooks import SERVICES

    client = make_app(SERVICES=SERVICES).test_client()
    services = client.get("/cds-services").get_json()["services"]
    assert {(s["id"], s["hook"]) for s in services} == {
        ("kidney-risk", "patient-view"),
        ("nephrotoxic-order-check", "order-select"),
        ("nephrotoxic-order-check", "order-sign"),
    }
    for service in services:
        for template in service.get("prefetch", {}).values():
            assert lint_template(template) == [], template


# --- invocation: accepted shapes ---------------------------------------------------------


def test_patient_view_answers_cards(client):
    response = post(client, "/cds-services/echo", PATIENT_VIEW)
    assert response.status_code == 200
    body = response.get_json()
    assert body["cards"][0]["summary"] == "patient-view for Patient/1288992"
    assert validate_response(body, epic=True) == []


def test_response_bodies_are_json_with_sorted_keys_and_utf8_text(app):
    value = {"cards": [{"summary": "eGFR ≥ 60 mL/min/1.73 m²", "indicator": "info",
                        "detail": None, "n": [1, 2.5, True]}], "extension": {"b": 1, "a": 2}}
    body = json_body(value)
    assert json.loads(body) == value
    assert body.startswith(b'{"cards":[{"detail":null,"indicator":"info","n":[1,2.5,true],')
    assert body.endswith(b'"extension":{"a":2,"b":1}}')
    assert "≥ 60 mL/min/1.73 m²".encode() in body
    # A lone surrogate (from a chart's text) cannot be UTF-8: Flask's JSON escapes it instead.
    with app.app_context():
        odd = json_body({"detail": "x\ud800"})
    assert odd == b'{"detail": "x\\ud800"}' and json.loads(odd) == {"detail": "x\ud800"}


def test_no_guidance_is_an_empty_card_list(client):
    body = copy.deepcopy(PATIENT_VIEW)
    body["prefetch"] = {"patient": None}  # rule 48: known empty
    response = post(client, "/cds-services/greeter", body)
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def test_one_id_serves_several_hooks_dispatched_on_the_request_hook(client):
    context = example("hook-order-sign-context-r4.json")["context"]
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": context}
    response = post(client, "/cds-services/echo", body)
    assert response.status_code == 200
    assert response.get_json()["cards"][0]["summary"].startswith("order-sign for")


FULL_REQUESTS = [
    "cdshooks-1.0-request-patient-view.json",
    "cdshooks-2.0-request-patient-view.json",
    "epic-request-patient-view.json",
    "cdshooks-3.0ballot-request-order-sign-prefetch-pagination.json",
]


@pytest.mark.parametrize("name", FULL_REQUESTS)
def test_every_full_request_example_is_accepted(client, name):
    response = post(client, "/cds-services/echo", example(name))
    assert response.status_code == 200, response.get_json()
    assert validate_response(response.get_json(), epic=True) == []


CONTEXT_EXAMPLES = [
    ("patient-view", "hook-patient-view-context-practitioner-encounter.json"),
    ("patient-view", "hook-patient-view-context-practitionerrole.json"),
    ("patient-view", "cdshooks-2.0-fragment-context-patient-view.json"),
    ("order-select", "hook-order-select-context-r4.json"),
    ("order-select", "hook-order-select-context-stu3.json"),
    ("order-select", "hook-order-select-context-dstu2.json"),
    ("order-sign", "hook-order-sign-context-r4.json"),
    ("order-sign", "hook-order-sign-context-stu3.json"),
    ("order-sign", "hook-order-sign-context-dstu2.json"),
]


@pytest.mark.parametrize(("hook", "name"), CONTEXT_EXAMPLES)
def test_every_hook_library_context_is_accepted(client, hook, name):
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": example(name)["context"]}
    response = post(client, "/cds-services/echo", body)
    assert response.status_code == 200, response.get_json()
    assert validate_response(response.get_json(), epic=True) == []


def test_epic_draft_orders_with_medication_references_are_accepted(client):
    context = example("epic-request-fragment-context-draftOrders-medication-references.json")
    context = context["context"]
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": context}
    response = post(client, "/cds-services/echo", body)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("with_type", [True, False])
def test_draft_orders_with_and_without_bundle_type(client, with_type):
    context = copy.deepcopy(example("hook-order-select-context-r4.json")["context"])
    if with_type:
        context["draftOrders"]["type"] = "collection"
    else:
        context["draftOrders"].pop("type", None)
    body = {"hook": "order-select", "hookInstance": str(uuid.uuid4()), "context": context}
    response = post(client, "/cds-services/echo", body)
    assert response.status_code == 200
    card = response.get_json()["cards"][0]
    assert card["selectionBehavior"] == "any"  # Epic mode
    assert card["suggestions"][0]["actions"][0]["resourceId"] == context["selections"][0]


@pytest.mark.parametrize(
    "name", ["cdshooks-2.0-request-with-extension.json", "cdshooks-1.0-request-with-extension.json"]
)
def test_extension_examples_are_processed_normally(client, name):
    body = example(name)
    # As printed, their context lacks patientId: the spec's extension example is a fragment.
    response = post(client, "/cds-services/echo", body)
    assert_outcome(response, 400, "context.patientId")
    body["context"]["patientId"] = "123"
    assert post(client, "/cds-services/echo", body).status_code == 200


def test_epic_bpa_trigger_extension_and_non_object_extension(client):
    body = copy.deepcopy(PATIENT_VIEW)
    body["extension"] = {"com.epic.cdshooks.request.bpa-trigger-action": "18"}
    assert post(client, "/cds-services/echo", body).status_code == 200
    body["extension"] = "not an object"  # rule 137: ignored
    assert post(client, "/cds-services/echo", body).status_code == 200


def test_user_id_of_each_permitted_type(client):
    for user in ("Practitioner/abc", "PractitionerRole/e-QokEGUJIzyynNdkCFrs9w3",
                 "Patient/123", "RelatedPerson/r1"):
        body = copy.deepcopy(PATIENT_VIEW)
        body["context"]["userId"] = user
        assert post(client, "/cds-services/echo", body).status_code == 200, user


def test_unknown_prefetch_keys_are_ignored(client):
    body = copy.deepcopy(PATIENT_VIEW)
    body["prefetch"] = {"somethingElse": {"resourceType": "Patient", "id": "x"}}
    assert post(client, "/cds-services/echo", body).status_code == 200


# --- invocation: refused shapes ------------------------------------------------------------


def _without(path):
    body = copy.deepcopy(PATIENT_VIEW)
    *parents, leaf = path.split(".")
    target = body
    for part in parents:
        target = target[part]
    del target[leaf]
    return body


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (_without("hook"), "hook"),
        (_without("hookInstance"), "hookInstance"),
        (_without("context"), "context"),
        (_without("context.patientId"), "context.patientId"),
        (_without("context.userId"), "context.userId"),
        ({**PATIENT_VIEW, "hook": "encounter-discharge"}, "hook"),
        ({**PATIENT_VIEW, "hookInstance": "not a uuid; drop table"}, "hookInstance"),
        ({**PATIENT_VIEW, "context": {**PATIENT_VIEW["context"], "userId": "123"}},
         "context.userId"),
        ({**PATIENT_VIEW, "context": "Patient/1"}, "context"),
        ({**PATIENT_VIEW, "fhirAuthorization": {"access_token": "t", "token_type": "Bearer"}},
         "fhirServer"),
        ({**PATIENT_VIEW, "fhirServer": "https://ehr.example.org/fhir",
          "fhirAuthorization": {"token_type": "Bearer"}}, "fhirAuthorization.access_token"),
        ({**PATIENT_VIEW, "fhirServer": "https://ehr.example.org/fhir",
          "fhirAuthorization": {"access_token": "t", "token_type": "MAC"}},
         "fhirAuthorization.token_type"),
        ({**PATIENT_VIEW, "fhirServer": "not a url"}, "fhirServer"),
        ([PATIENT_VIEW], "request body"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_requests_get_400_naming_the_field(client, body, fragment):
    assert_outcome(post(client, "/cds-services/echo", body), 400, fragment)


@pytest.mark.parametrize(
    ("hook", "missing", "fragment"),
    [
        ("order-select", "selections", "context.selections"),
        ("order-select", "draftOrders", "Unsigned Order"),
        ("order-sign", "draftOrders", "context.draftOrders"),
    ],
)
def test_order_hooks_require_their_context(client, hook, missing, fragment):
    context = copy.deepcopy(example("hook-order-select-context-r4.json")["context"])
    if hook == "order-sign":
        del context["selections"]
    del context[missing]
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    assert_outcome(post(client, "/cds-services/echo", body), 400, fragment)


def test_draft_orders_must_be_a_bundle(client):
    context = copy.deepcopy(example("hook-order-sign-context-r4.json")["context"])
    context["draftOrders"] = [{"resourceType": "MedicationRequest"}]
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": context}
    assert_outcome(post(client, "/cds-services/echo", body), 400, "context.draftOrders")


def test_wrong_hook_for_the_service_is_400(client):
    context = example("hook-order-sign-context-r4.json")["context"]
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": context}
    assert_outcome(post(client, "/cds-services/greeter", body), 400, "patient-view")


def test_unknown_service_is_404(client):
    assert_outcome(post(client, "/cds-services/nope", PATIENT_VIEW), 404, "nope")
    assert_outcome(post(client, "/cds-services/nope/feedback", {"feedback": []}), 404)


def test_get_on_a_service_is_405(client):
    response = client.get("/cds-services/echo")
    assert_outcome(response, 405, "GET")
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_body_is_415(client, content_type):
    response = client.post("/cds-services/echo", data=json.dumps(PATIENT_VIEW),
                           content_type=content_type)
    assert_outcome(response, 415, "application/json")


def test_fhir_json_content_type_is_accepted(client):
    response = client.post("/cds-services/echo", data=json.dumps(PATIENT_VIEW),
                           content_type="application/fhir+json; charset=utf-8")
    assert response.status_code == 200


def test_malformed_json_is_400(client):
    response = client.post("/cds-services/echo", data='{"hook": "patient-view",',
                           content_type="application/json")
    assert_outcome(response, 400, "JSON")


# Python's json raises RecursionError (not a ValueError) past ~1000 levels.
NESTED_TOO_DEEP = {
    "objects": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "arrays": "[" * 100_000 + "]" * 100_000,
    "unterminated": "[" * 100_000,
    "parseable": json.dumps({**PATIENT_VIEW, "prefetch": {"deep": nested(MAX_DEPTH - 1)}}),
}


@pytest.mark.parametrize("registry", ["test", "shipped"])
def test_json_nested_too_deep_is_400_on_every_service_and_feedback(make_app, registry):
    app = make_app(SERVICES=TEST_SERVICES if registry == "test" else SERVICES)
    client = app.test_client()
    service_ids = list(app.extensions["cds"].services)
    assert service_ids
    for service_id in service_ids:
        for path in (f"/cds-services/{service_id}", f"/cds-services/{service_id}/feedback"):
            for name, body in NESTED_TOO_DEEP.items():
                response = client.post(path, data=body, content_type="application/json")
                outcome = assert_outcome(response, 400, f"nested deeper than {MAX_DEPTH} levels")
                assert outcome["issue"][0]["code"] == "too-long", (path, name)


def test_json_nested_up_to_the_limit_is_processed(client):
    # body > prefetch > "deep": the request itself holds two of the levels.
    body = {**PATIENT_VIEW, "prefetch": {"deep": nested(MAX_DEPTH - 2)}}
    response = post(client, "/cds-services/echo", body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["cards"]


def test_oversized_body_is_413_with_default_5_mb(client, make_app):
    big = copy.deepcopy(PATIENT_VIEW)
    big["prefetch"] = {"padding": {"resourceType": "Basic", "text": "x" * (5 * 1024 * 1024)}}
    assert_outcome(post(client, "/cds-services/echo", big), 413)
    small_limit = make_app(MAX_CONTENT_LENGTH=1024).test_client()
    big["prefetch"]["padding"]["text"] = "x" * 2048
    assert_outcome(post(small_limit, "/cds-services/echo", big), 413)


class _ServerInput:
    """A WSGI server's input: at most `step` bytes per read, as a socket hands them over."""

    def __init__(self, data: bytes, step: int):
        self.data, self.step, self.reads = data, step, 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        size = self.step if size < 0 else min(size, self.step)
        piece, self.data = self.data[:size], self.data[size:]
        return piece


def _post_from(client, server_input: _ServerInput, content_length: int):
    return client.post("/cds-services/echo", data=server_input.data,
                       content_type="application/json", environ_overrides={
                           "wsgi.input": server_input, "CONTENT_LENGTH": str(content_length)})


def test_a_body_of_known_length_is_asked_for_in_one_read(client):
    # werkzeug alone reads 64 KiB at a time: gunicorn copies what it holds on each (http.py).
    data = json.dumps({**PATIENT_VIEW, "extension": {"pad": "x" * 300_000}}).encode()
    server_input = _ServerInput(data, step=len(data))
    response = _post_from(client, server_input, len(data))
    assert response.status_code == 200, response.get_json()
    assert server_input.reads == 1


def test_a_body_handed_over_in_pieces_is_read_whole(client):
    data = json.dumps({**PATIENT_VIEW, "extension": {"pad": "y" * 300_000}}).encode()
    server_input = _ServerInput(data, step=4096)
    response = _post_from(client, server_input, len(data))
    assert response.status_code == 200, response.get_json()
    assert server_input.reads == -(-len(data) // 4096)


def test_a_body_shorter_than_its_content_length_is_400(client):
    data = json.dumps(PATIENT_VIEW).encode()
    assert_outcome(_post_from(client, _ServerInput(data, step=len(data)), len(data) + 10), 400)


def test_handler_failure_is_500_outcome_without_internals(client, caplog):
    response = post(client, "/cds-services/broken", PATIENT_VIEW)
    body = assert_outcome(response, 500)
    assert "secret internals" not in json.dumps(body)
    assert "secret internals" in caplog.text  # but the operator can see it


def test_unknown_path_is_404_outcome(client):
    assert_outcome(client.get("/nowhere"), 404)


# --- prefetch paths through the endpoint -----------------------------------------------------


def test_missing_prefetch_without_fhir_access_is_412(client):
    body = assert_outcome(post(client, "/cds-services/greeter", PATIENT_VIEW), 412, "patient")
    assert body["issue"][0]["code"] in {"incomplete", "not-found", "login", "timeout",
                                        "exception", "security"}


def test_prefetched_patient_is_used(client):
    body = copy.deepcopy(PATIENT_VIEW)
    body["prefetch"] = {"patient": {"resourceType": "Patient", "id": "1288992",
                                    "name": [{"given": ["Ada"]}]}}
    response = post(client, "/cds-services/greeter", body)
    assert response.get_json()["cards"][0]["summary"] == "Hello Ada"


# --- health and docs -----------------------------------------------------------------------


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.get_json()
    assert body["status"] == "ok"
    assert body["checks"]["spool"]["status"] == "ok"
    assert body["checks"]["services"]["ids"] == ["echo", "greeter", "broken"]
    detail = client.get("/healthz/detail").get_json()
    assert detail["status"] == "ok" and detail["checks"]["store"]["status"] == "ok"


def test_readiness_ignores_the_shared_store_and_detail_reports_it(make_app):
    """Every pod failing readiness at once over the shared store would empty the Service: the
    store's state is in /healthz/detail and cds_store_up instead."""
    app = make_app(DATABASE_URL="postgresql+psycopg://nobody:s3cret@127.0.0.1:1/none"
                                "?connect_timeout=1")
    assert app.test_client().get("/readyz").status_code == 200
    response = app.test_client().get("/healthz/detail")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "degraded"
    assert body["checks"]["store"]["status"] == "fail"
    assert body["checks"]["spool"]["status"] == "ok"
    assert "s3cret" not in response.get_data(as_text=True)


def test_readiness_fails_when_the_spool_cannot_be_written(make_app, tmp_path):
    spool = tmp_path / "spool-gone"
    app = make_app(SPOOL_DIR=str(spool))
    shutil.rmtree(spool)  # a volume unmounted under the pod: root or not, nothing is written
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["spool"] == {
        "status": "fail", "directory": str(spool), "backlog": 0}


def test_openapi_document_and_docs_ui(client):
    spec = client.get("/openapi.json").get_json()
    assert "/cds-services/{service_id}" in spec["paths"]
    assert "/cds-services/{service_id}/feedback" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_order_select_with_epic_length_draft_order_ids(client):
    context = copy.deepcopy(example(
        "epic-request-fragment-context-draftOrders-medication-references.json")["context"])
    draft_id = context["draftOrders"]["entry"][0]["resource"]["id"]
    context["selections"] = [f"MedicationRequest/{draft_id}"]
    body = {"hook": "order-select", "hookInstance": str(uuid.uuid4()), "context": context}
    response = post(client, "/cds-services/echo", body)
    assert response.status_code == 200, response.get_json()
    action = response.get_json()["cards"][0]["suggestions"][0]["actions"][0]
    assert action["resourceId"] == f"MedicationRequest/{draft_id}"
