"""The shipped services (`hooks.SERVICES`) end to end: golden scenarios from tests/data, and the
`egfr` prefetch read from a real local FHIR server when the EHR did not send it."""

from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path

import pytest

from hooks import SERVICES
from hooks._kidney import EGFR_FAMILIES, search_codes
from tests.conftest import demo_signer
from tests.helpers.fhir_server import operation_outcome
from tests.helpers.golden import (
    DATA,
    DATE_KEYS,
    FETCH_SCENARIOS,
    FROZEN_NOW,
    GOLDEN_SITE,
    TOKEN,
    assert_matches_golden,
    load,
    loopback_client,
    scenario_id,
    without_prefetch,
    without_volatile,
)
from tests.helpers.http import assert_outcome, post, walk

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted(path.parent for path in DATA.glob("*/*/request.json"))
# README.md's quickstart posts this one to `make run` (site_config/).
README_SCENARIO = DATA / "nephrotoxic-order-check" / "nsaid-low-egfr"


@pytest.fixture
def shipped_client(make_app):
    return make_app(SERVICES=SERVICES, CLOCK=lambda: FROZEN_NOW,
                    SITE_YAML=GOLDEN_SITE).test_client()


# --- golden scenarios ------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=scenario_id)
def test_scenario(shipped_client, scenario, fhir_server):
    request = load(scenario / "request.json")
    # Each scenario carries Epic's fhirServer and token; its prefetch is complete, so the
    # local stand-in for Epic's FHIR server must see no request at all.
    request["fhirServer"] = fhir_server.url
    response = post(shipped_client, f"/cds-services/{scenario.parent.name}", request)
    assert_matches_golden(response, load(scenario / "expected.json"))
    assert fhir_server.requests == []


def test_scenarios_are_complete_and_cover_every_service_and_hook():
    by_id = {service.id: service for service in SERVICES}
    hooks_seen: dict[str, set[str]] = {service_id: set() for service_id in by_id}
    for service_dir in DATA.iterdir():
        if service_dir.is_dir():
            assert service_dir.name in by_id, f"{service_dir}: no such service"
            for scenario in service_dir.iterdir():
                assert sorted(p.name for p in scenario.iterdir()) == [
                    "expected.json", "request.json"
                ], scenario
    for scenario in SCENARIOS:
        hook = load(scenario / "request.json")["hook"]
        assert hook in by_id[scenario.parent.name].hooks, scenario
        hooks_seen[scenario.parent.name].add(hook)
    assert hooks_seen == {service_id: set(s.hooks) for service_id, s in by_id.items()}
    assert README_SCENARIO in SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS, ids=scenario_id)
def test_scenario_dates_are_not_in_the_future(scenario):
    # Results dated after the request time are dropped, so a future date would silently change
    # what the scenario tests once the calendar passes it (or never).
    for path, value in walk(load(scenario / "request.json")):
        if path.rsplit(".", 1)[-1] in DATE_KEYS:
            assert date.fromisoformat(value[:10]) <= date.today(), (path, value)


def test_readme_scenario_on_the_demo_site(make_app):
    app = make_app(SERVICES=SERVICES, SITE_CONFIG=str(ROOT / "site_config"),
                   CLOCK=lambda: FROZEN_NOW)
    app.config["TEST_SIGNER"] = demo_signer()
    client = app.test_client()
    response = post(client, "/cds-services/nephrotoxic-order-check",
                    load(README_SCENARIO / "request.json"))
    assert_matches_golden(response, load(README_SCENARIO / "expected.json"))


# --- the egfr prefetch read from a real local FHIR server ----------------------------------

# Every eGFR LOINC family of hooks/data/loinc_kidney.yaml, in one `code` parameter.
EGFR_QUERY = {"code": [search_codes(*EGFR_FAMILIES)]}


@pytest.mark.parametrize("scenario", FETCH_SCENARIOS, ids=scenario_id)
def test_missing_egfr_is_fetched_with_the_bearer_token(make_app, tmp_path, fhir_server,
                                                       scenario):
    client = loopback_client(make_app, tmp_path, fhir_server)
    body, bundle = without_prefetch(scenario, fhir_server)
    fhir_server.add("Observation", json=bundle)

    response = post(client, f"/cds-services/{scenario.parent.name}", body)

    assert_matches_golden(response, load(scenario / "expected.json"))
    [request] = fhir_server.requests
    assert request.method == "GET"
    assert request.path == "Observation"
    assert request.query == {"patient": [body["context"]["patientId"]], **EGFR_QUERY}
    searched = set(request.query["code"][0].split(","))
    assert {f"http://loinc.org|{c}" for c in ("33914-3", "62238-1", "98979-8", "98980-6",
                                               "50210-4", "69405-9")} <= searched
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert fhir_server.methods == {"GET"}


def test_the_newest_egfr_is_used_whatever_order_the_server_answers_in(make_app, tmp_path,
                                                                       fhir_server):
    # The templates send no `_sort` (Epic lists none); the server's own order, here oldest
    # first, must not change the card.
    scenario = FETCH_SCENARIOS[0]
    client = loopback_client(make_app, tmp_path, fhir_server)
    body, bundle = without_prefetch(scenario, fhir_server)
    dates = [e["resource"]["effectiveDateTime"] for e in bundle["entry"]]
    assert dates == sorted(dates, reverse=True) and len(dates) > 1
    fhir_server.add("Observation", json={**bundle, "entry": bundle["entry"][::-1]})

    response = post(client, f"/cds-services/{scenario.parent.name}", body)

    assert_matches_golden(response, load(scenario / "expected.json"))
    [request] = fhir_server.requests
    assert "_sort" not in request.query and "_count" not in request.query


def test_fhir_server_401_is_412_naming_the_key(make_app, tmp_path, fhir_server):
    client = loopback_client(make_app, tmp_path, fhir_server)
    body, _ = without_prefetch(FETCH_SCENARIOS[0], fhir_server)
    fhir_server.add("Observation", status=401,
                    json=operation_outcome("error", "login", "invalid access token"))

    response = post(client, "/cds-services/kidney-risk", body)

    outcome = assert_outcome(response, 412, "prefetch.egfr", "401")
    assert TOKEN not in json.dumps(outcome)
    assert [r.method for r in fhir_server.requests] == ["GET"]


def test_missing_egfr_without_a_token_is_412(make_app, tmp_path, fhir_server):
    client = loopback_client(make_app, tmp_path, fhir_server)
    body, _ = without_prefetch(FETCH_SCENARIOS[1], fhir_server, token=None)

    response = post(client, "/cds-services/nephrotoxic-order-check", body)

    assert_outcome(response, 412, "prefetch.egfr", "fhirAuthorization")
    assert fhir_server.requests == []


def test_fhir_server_slower_than_the_site_deadline_is_412(make_app, tmp_path, fhir_server):
    client = loopback_client(make_app, tmp_path, fhir_server, "deadline_seconds: 0.3")
    body, bundle = without_prefetch(FETCH_SCENARIOS[0], fhir_server)
    fhir_server.add("Observation", json=bundle, delay=5)

    started = time.monotonic()
    response = post(client, "/cds-services/kidney-risk", body)
    elapsed = time.monotonic() - started

    assert_outcome(response, 412, "prefetch.egfr")
    assert elapsed < 2, elapsed


def test_rate_limit_with_retry_after_0_is_retried(make_app, tmp_path, fhir_server):
    client = loopback_client(make_app, tmp_path, fhir_server)
    scenario = FETCH_SCENARIOS[0]
    body, bundle = without_prefetch(scenario, fhir_server)
    fhir_server.add("Observation", json=bundle)
    fhir_server.add("Observation", status=429, headers={"Retry-After": "0"}, times=1,
                    json=operation_outcome("error", "throttled", "too many requests"))

    response = post(client, "/cds-services/kidney-risk", body)

    assert_matches_golden(response, load(scenario / "expected.json"))
    assert [r.method for r in fhir_server.requests] == ["GET", "GET"]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fhir_server.requests)


NESTED_100K = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError, not ValueError


def test_fhir_answer_nested_too_deep_is_data_unavailable(make_app, tmp_path, fhir_server, caplog):
    # `uacr` is optional for kidney-risk: unusable, it is missing data, as when the FHIR server
    # fails; the card says so instead of the call failing.
    client = loopback_client(make_app, tmp_path, fhir_server)
    body = load(FETCH_SCENARIOS[0] / "request.json")
    del body["prefetch"]["uacr"]
    body["fhirServer"] = fhir_server.url
    body["fhirAuthorization"]["access_token"] = TOKEN
    fhir_server.add("Observation", status=500, times=1)
    failed = post(client, "/cds-services/kidney-risk", body)
    assert failed.status_code == 200, failed.get_json()
    fhir_server.add("Observation", body=NESTED_100K)

    response = post(client, "/cds-services/kidney-risk", body)

    assert_matches_golden(response, without_volatile(failed.get_json()))
    assert without_volatile(response.get_json()) != load(FETCH_SCENARIOS[0] / "expected.json")
    assert [r.path for r in fhir_server.requests] == ["Observation", "Observation"]
    assert "prefetch key 'uacr': FHIR server answered with JSON nested deeper than" in caplog.text


def test_required_fhir_answer_nested_too_deep_is_412_naming_the_key(make_app, tmp_path,
                                                                    fhir_server):
    client = loopback_client(make_app, tmp_path, fhir_server)
    body, _ = without_prefetch(FETCH_SCENARIOS[0], fhir_server)
    fhir_server.add("Observation", body=NESTED_100K)

    response = post(client, "/cds-services/kidney-risk", body)

    assert_outcome(response, 412, "prefetch.egfr", "nested deeper than")


@pytest.mark.parametrize("scenario", [
    DATA / "kidney-risk" / "creatinine-umol-l-calculated-egfr",
    DATA / "nephrotoxic-order-check" / "nsaid-creatinine-umol-l-string",
], ids=scenario_id)
def test_without_any_prefetch_every_key_is_read_from_the_fhir_server(make_app, tmp_path,
                                                                     fhir_server, scenario):
    # Epic sends no prefetch when the OPA record has none configured: every search the service
    # declares is then made with the bearer token, and the answer is the same card.
    from cds_service.data.prefetch import render_template

    client = loopback_client(make_app, tmp_path, fhir_server)
    body = load(scenario / "request.json")
    prefetched = body.pop("prefetch")
    body["fhirServer"] = fhir_server.url
    body["fhirAuthorization"]["access_token"] = TOKEN
    service = next(s for s in SERVICES if s.id == scenario.parent.name)
    for key, template in service.prefetch.items():
        path, _, query = render_template(template, body["context"]).partition("?")
        fhir_server.add(path, query=query or None, json=prefetched[key])

    response = post(client, f"/cds-services/{service.id}", body)

    assert_matches_golden(response, load(scenario / "expected.json"))
    assert len(fhir_server.requests) == len(service.prefetch)
    assert fhir_server.methods == {"GET"}
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fhir_server.requests)
