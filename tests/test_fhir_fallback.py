"""Fallback reads against a real local FHIR server (tests/helpers/fhir_server.py): URLs, the bearer
header, GET only, deadlines, rate limits, redirects, pagination, and token hygiene."""

from __future__ import annotations

import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from cds_service.data.fhir import (
    FhirNotFound,
    FhirRedirectRefused,
    InsecureFhirServer,
    OffServerUrl,
    WriteRefused,
    check_fhir_server_url,
    parse_retry_after,
)
from cds_service.data.fhir_client import ReadOnlyFHIRClient, loggable_path
from cds_service.data.prefetch import PrefetchSettings
from cds_service.data.prefetch_resolve import resolve_prefetch
from cds_service.protocol.errors import FhirAccessError, PrefetchUnavailable
from tests.helpers.fhir_server import operation_outcome, searchset

# Distinctive, so a leak anywhere is found by a substring search.
TOKEN = "tok-" + secrets.token_urlsafe(24)
CONTEXT = {"patientId": "123", "encounterId": "E1", "userId": "PractitionerRole/456"}
PATIENT = {"resourceType": "Patient", "id": "123", "birthDate": "1974-12-25"}
ROLE = {"resourceType": "PractitionerRole", "id": "456"}
PATIENT_T = {"patient": "Patient/{{context.patientId}}"}
EPIC_4101 = {
    "resourceType": "Bundle",
    "type": "searchset",
    "total": 0,
    "entry": [
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "warning",
                        "code": "processing",
                        "details": {
                            "coding": [
                                {
                                    "system": "urn:oid:1.2.840.114350.1.13.861.1.7.2.657369",
                                    "code": "4101",
                                    "display": "Resource request returns no results.",
                                }
                            ],
                            "text": "Resource request returns no results.",
                        },
                    }
                ],
            },
            "search": {"mode": "outcome"},
        }
    ],
}


def observation(n: int) -> dict:
    return {"resourceType": "Observation", "id": f"o{n}", "subject": {"reference": "Patient/123"}}


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=8) as pool:
        yield pool


@pytest.fixture
def resolve(executor, fhir_server):  # server closes first: releases slow answers
    def run(templates, prefetch=None, *, server=None, token=TOKEN, optional=frozenset(), **kw):
        url = (server or fhir_server).url
        settings = PrefetchSettings(**{"allow_http_loopback": True, "deadline_s": 5.0,
                                       "fhir_servers": (url,), **kw})
        return resolve_prefetch(
            templates,
            context=CONTEXT,
            prefetch=prefetch,
            fhir_server=url,
            access_token=token,
            settings=settings,
            executor=executor,
            optional=optional,
        )

    return run


def assert_only_authorized_gets(server):
    assert server.requests, "expected requests"
    for request in server.requests:
        assert request.method == "GET"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert "fhir+json" in request.headers["accept"]


# -- fetching what is missing ----------------------------------------------------------------


def test_missing_keys_fetched_with_bearer_token(fhir_server, resolve):
    fhir_server.add("Patient/123", json=PATIENT)
    fhir_server.add(
        "Condition",
        query="patient=123&category=problem-list-item",
        json=searchset({"resourceType": "Condition", "id": "c1"}),
    )
    fhir_server.add("PractitionerRole/456", json=ROLE)
    templates = {
        **PATIENT_T,
        "conditions": "Condition?patient={{context.patientId}}&category=problem-list-item",
        "user": "{{context.userId}}",
    }
    result = resolve(templates, {"unrelated": {"resourceType": "Patient"}})
    assert result["patient"] == PATIENT
    assert result["conditions"] == [{"resourceType": "Condition", "id": "c1"}]
    assert result["user"] == ROLE
    assert set(result.sources.values()) == {"fetched"}
    assert result.fetched == [
        "Patient/123",
        "Condition?patient=123&category=problem-list-item",
        "PractitionerRole/456",
    ]
    assert_only_authorized_gets(fhir_server)
    assert sorted(r.path for r in fhir_server.requests) == [
        "Condition",
        "Patient/123",
        "PractitionerRole/456",
    ]
    (search,) = fhir_server.requests_for("Condition")
    assert search.query == {"patient": ["123"], "category": ["problem-list-item"]}
    assert search.raw_path == "/fhir/Condition"


def test_null_is_not_refetched(fhir_server, resolve):
    fhir_server.add("Patient/123", json=PATIENT)
    result = resolve(PATIENT_T, {"patient": None})
    assert result["patient"] is None
    assert result.sources["patient"] == "null"
    assert fhir_server.requests == []


def test_given_resource_is_not_refetched(fhir_server, resolve):
    result = resolve(PATIENT_T, {"patient": PATIENT})
    assert result.sources["patient"] == "prefetch"
    assert fhir_server.requests == []


@pytest.mark.parametrize(
    "value",
    [
        operation_outcome("error", "timeout", "prefetch timed out"),
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": operation_outcome("fatal", "exception")}],
        },
        "123",  # cdshooks-2.0-request-fragment-prefetch-data.json sends `"user": "123"`
    ],
    ids=["OperationOutcome", "error-Bundle", "bare-string"],
)
def test_failed_prefetch_value_is_refetched(fhir_server, resolve, value):
    fhir_server.add("Patient/123", json=PATIENT)
    result = resolve(PATIENT_T, {"patient": value})
    assert result["patient"] == PATIENT
    assert result.sources["patient"] == "fetched"
    assert_only_authorized_gets(fhir_server)
    assert len(fhir_server.requests) == 1


def test_error_bundle_for_search_is_refetched(fhir_server, resolve):
    fhir_server.add(
        "Condition", query="patient=123", json=searchset({"resourceType": "Condition", "id": "c1"})
    )
    prefetched = searchset({"resourceType": "Condition", "id": "stale"})
    prefetched["entry"].append({"resource": operation_outcome("error", "too-costly")})
    result = resolve(
        {"conditions": "Condition?patient={{context.patientId}}"}, {"conditions": prefetched}
    )
    assert result["conditions"] == [{"resourceType": "Condition", "id": "c1"}]
    assert result.sources["conditions"] == "fetched"


def test_epic_4101_empty_result_prefetched_and_fetched(fhir_server, resolve):
    fhir_server.add("Condition", query="patient=123", json=EPIC_4101)
    templates = {
        "conditions": "Condition?patient={{context.patientId}}",
        "allergies": "Condition?patient={{context.patientId}}",
    }
    result = resolve(templates, {"allergies": EPIC_4101})
    assert result["conditions"] == []
    assert result["allergies"] == []
    assert result.sources == {"conditions": "fetched", "allergies": "prefetch"}
    assert len(fhir_server.requests) == 1


def test_fetched_read_404_is_none(fhir_server, resolve):
    result = resolve({"encounter": "Encounter/{{context.encounterId}}"})
    assert result["encounter"] is None
    assert result.sources["encounter"] == "fetched"
    assert [r.path for r in fhir_server.requests] == ["Encounter/E1"]


def test_fetched_search_404_is_an_error(fhir_server, resolve):
    with pytest.raises(FhirAccessError) as excinfo:
        resolve({"conditions": "Condition?patient={{context.patientId}}"})
    assert "404" in excinfo.value.message


def test_unsatisfiable_template_sends_nothing(fhir_server, resolve):
    result = resolve({"practitioner": "Practitioner/{{userPractitionerId}}"})
    assert result.sources["practitioner"] == "unsatisfiable"
    assert fhir_server.requests == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>login</html>", "not JSON"),
        (json.dumps(operation_outcome("error")).encode(), "OperationOutcome"),
        (json.dumps({"resourceType": "Practitioner", "id": "123"}).encode(), "not a Patient"),
        (json.dumps(["Patient"]).encode(), "array"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than"),
    ],
)
def test_unusable_answer_is_412(fhir_server, resolve, body, why):
    fhir_server.add("Patient/123", body=body)
    with pytest.raises(FhirAccessError) as excinfo:
        resolve(PATIENT_T)
    assert why in excinfo.value.message
    assert "'patient'" in excinfo.value.message


# -- pagination ------------------------------------------------------------------------------


def test_fetched_search_follows_next_links(fhir_server, resolve):
    pages = fhir_server.add_searchset(
        "Observation", "patient=123&code=4548-4", [observation(n) for n in range(7)], page_size=2
    )
    result = resolve({"a1c": "Observation?patient={{context.patientId}}&code=4548-4"})
    assert [r["id"] for r in result["a1c"]] == [f"o{n}" for n in range(7)]
    assert result.truncated == frozenset()
    assert result.fetched == pages
    assert [r.relative_url for r in fhir_server.requests] == pages
    assert_only_authorized_gets(fhir_server)


def test_pagination_stops_at_max_pages(fhir_server, resolve, caplog):
    fhir_server.add_searchset(
        "Observation", "patient=123", [observation(n) for n in range(7)], page_size=2
    )
    result = resolve({"obs": "Observation?patient={{context.patientId}}"}, max_pages=2)
    assert [r["id"] for r in result["obs"]] == ["o0", "o1", "o2", "o3"]
    assert len(fhir_server.requests) == 2
    assert result.truncated == {"obs"}
    assert "page cap" in caplog.text


def test_prefetched_page_continued_with_token(fhir_server, resolve):
    pages = fhir_server.add_searchset(
        "MedicationRequest", "patient=123", [observation(n) for n in range(5)], page_size=2
    )
    first = searchset(observation(0), observation(1), next_url=fhir_server.url_for(pages[1]))
    result = resolve(
        {"orders": "MedicationRequest?patient={{context.patientId}}"}, {"orders": first}
    )
    assert [r["id"] for r in result["orders"]] == ["o0", "o1", "o2", "o3", "o4"]
    assert result.sources["orders"] == "prefetch"
    assert result.fetched == pages[1:]
    assert_only_authorized_gets(fhir_server)


def test_prefetched_next_link_off_server_not_followed(
    fhir_server,
    fhir_server_factory,
    resolve,
):
    other = fhir_server_factory()
    other.add("MedicationRequest", json=searchset(observation(9)))
    first = searchset(observation(0), next_url=other.url_for("MedicationRequest?patient=123"))
    result = resolve(
        {"orders": "MedicationRequest?patient={{context.patientId}}"}, {"orders": first}
    )
    assert [r["id"] for r in result["orders"]] == ["o0"]
    assert result.truncated == {"orders"}
    assert other.requests == []
    assert fhir_server.requests == []


def test_next_link_that_only_contains_the_base_url_is_refused(fhir_server):
    # fhirpy's own check is `base_url in url`; ours compares origin and base path.
    with ReadOnlyFHIRClient(fhir_server.url, access_token=TOKEN, allow_http_loopback=True) as c:
        for url in (
            f"http://evil.invalid/?next={fhir_server.url}/Patient",
            f"{fhir_server.origin}/other/Patient",
            f"{fhir_server.url}-evil/Patient",
            f"http://user@{fhir_server.url.removeprefix('http://')}/Patient",
        ):
            with pytest.raises(OffServerUrl):
                c.get_json(url)
    assert fhir_server.requests == []


def test_prefetched_next_link_without_token_not_followed(fhir_server, resolve):
    fhir_server.add("MedicationRequest", json=searchset(observation(1)))
    first = searchset(observation(0), next_url=fhir_server.url_for("MedicationRequest?p=2"))
    result = resolve(
        {"orders": "MedicationRequest?patient={{context.patientId}}"}, {"orders": first}, token=None
    )
    assert [r["id"] for r in result["orders"]] == ["o0"]
    assert result.truncated == {"orders"}
    assert fhir_server.requests == []


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 500, 503])
def test_error_status_is_412_naming_key(fhir_server, resolve, status):
    fhir_server.add("Patient/123", status=status, json=operation_outcome("error", "security"))
    with pytest.raises(FhirAccessError) as excinfo:
        resolve(PATIENT_T)
    error = excinfo.value
    assert error.status == 412
    assert error.message == f"FHIR server answered {status} for prefetch key 'patient'"
    (issue,) = error.issues
    assert issue.expression == ("prefetch.patient",)
    assert issue.code == ("forbidden" if status in (401, 403) else "transient")
    assert len(fhir_server.requests) == 1


def test_optional_key_failure_is_tolerated(fhir_server, resolve):
    fhir_server.add("Patient/123", json=PATIENT)
    fhir_server.add("PractitionerRole/456", status=500)
    result = resolve({**PATIENT_T, "user": "{{context.userId}}"}, optional=frozenset({"user"}))
    assert result["patient"] == PATIENT
    assert result["user"] is None
    assert result.sources == {"patient": "fetched", "user": "optional-missing"}


def test_slow_server_fails_within_deadline(fhir_server, resolve):
    fhir_server.add("Patient/123", json=PATIENT, delay=5.0)
    started = time.monotonic()
    with pytest.raises(FhirAccessError) as excinfo:
        resolve(PATIENT_T, deadline_s=0.3)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5  # the server would take 5 s
    assert "deadline" in excinfo.value.message
    assert excinfo.value.issues[0].code == "timeout"


def test_deadline_is_shared_by_pages(fhir_server, resolve):
    fhir_server.add_searchset(
        "Observation",
        "patient=123",
        [observation(n) for n in range(10)],
        page_size=1,
        delay=0.25,
    )
    started = time.monotonic()
    with pytest.raises(FhirAccessError):
        resolve({"obs": "Observation?patient={{context.patientId}}"}, deadline_s=0.6)
    assert time.monotonic() - started < 2.5  # ten pages would take 2.5 s
    assert len(fhir_server.requests) < 10


@pytest.mark.parametrize("retry_after", ["0", "1"])
def test_429_retried_after_retry_after(fhir_server, resolve, retry_after):
    fhir_server.add("Patient/123", json=PATIENT)
    fhir_server.add("Patient/123", status=429, headers={"Retry-After": retry_after}, times=1)
    result = resolve(PATIENT_T)
    assert result["patient"] == PATIENT
    assert len(fhir_server.requests) == 2
    assert_only_authorized_gets(fhir_server)
    gap = fhir_server.requests[1].started - fhir_server.requests[0].finished
    assert gap >= int(retry_after) - 0.05


def test_429_with_http_date_retry_after(fhir_server, resolve):
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    fhir_server.add("Patient/123", json=PATIENT)
    fhir_server.add("Patient/123", status=429, headers={"Retry-After": past}, times=1)
    assert resolve(PATIENT_T)["patient"] == PATIENT
    assert len(fhir_server.requests) == 2


@pytest.mark.parametrize("retry_after", ["30", None, "soon"])
def test_429_not_retried_beyond_deadline(fhir_server, resolve, retry_after):
    headers = {"Retry-After": retry_after} if retry_after else {}
    fhir_server.add("Patient/123", status=429, headers=headers)
    started = time.monotonic()
    with pytest.raises(FhirAccessError) as excinfo:
        resolve(PATIENT_T, deadline_s=2.0)
    assert time.monotonic() - started < 1.9  # failed at once instead of sleeping
    assert "429" in excinfo.value.message
    assert len(fhir_server.requests) == 1


def test_429_retries_are_capped(fhir_server, resolve):
    fhir_server.add("Patient/123", status=429, headers={"Retry-After": "0"})
    with pytest.raises(FhirAccessError):
        resolve(PATIENT_T, max_rate_limit_retries=2)
    assert len(fhir_server.requests) == 3


def test_redirect_to_other_port_not_followed(
    fhir_server,
    fhir_server_factory,
    resolve,
):
    other = fhir_server_factory()
    other.add("Patient/123", json=PATIENT)
    fhir_server.redirect("Patient/123", other.url_for("Patient/123"))
    with pytest.raises(FhirAccessError) as excinfo:
        resolve(PATIENT_T)
    assert "another origin" in excinfo.value.message
    assert other.requests == []
    assert len(fhir_server.requests) == 1


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2"])
def test_redirect_to_other_host_not_followed(fhir_server, resolve, host):
    # Same port, different host: if followed, the request would land on this very server.
    fhir_server.redirect(
        "Patient/123", f"http://{host}:{fhir_server.port}/fhir/Patient/123", status=307
    )
    with pytest.raises(FhirAccessError):
        resolve(PATIENT_T)
    assert len(fhir_server.requests) == 1


def test_same_origin_redirect_followed(fhir_server, resolve):
    fhir_server.redirect("Patient/123", "/fhir/Patient/123-current", status=301)
    fhir_server.add("Patient/123-current", json=PATIENT)
    assert resolve(PATIENT_T)["patient"] == PATIENT
    assert [r.path for r in fhir_server.requests] == ["Patient/123", "Patient/123-current"]
    assert_only_authorized_gets(fhir_server)


def test_redirect_loop_is_bounded(fhir_server, resolve):
    fhir_server.redirect("Patient/123", fhir_server.url_for("Patient/123"))
    with pytest.raises(FhirAccessError) as excinfo:
        resolve(PATIENT_T, max_redirects=3)
    assert "too many" in excinfo.value.message
    assert len(fhir_server.requests) == 4


def test_http_server_refused_without_loopback_setting(fhir_server, resolve):
    fhir_server.add("Patient/123", json=PATIENT)
    with pytest.raises(FhirAccessError) as excinfo:
        resolve(PATIENT_T, allow_http_loopback=False)
    assert "https" in excinfo.value.message
    assert excinfo.value.issues[0].code == "security"
    assert fhir_server.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://ehr.example.org/fhir",
        "http://10.0.0.1/fhir",
        "ftp://127.0.0.1/fhir",
        "https://user:pw@ehr.example.org/fhir",
        "https://ehr.example.org/fhir?x=1",
        "ehr.example.org/fhir",
        "https://[::1/fhir",
    ],
)
def test_check_fhir_server_url_refuses(url):
    with pytest.raises(InsecureFhirServer):
        check_fhir_server_url(url, allow_http_loopback=True)


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("https://ehr.example.org/api/FHIR/R4", False),
        ("http://127.0.0.1:8080/fhir", True),
        ("http://127.9.9.9/fhir", True),
        ("http://localhost/fhir", True),
        ("http://[::1]:8080/fhir", True),
    ],
)
def test_check_fhir_server_url_accepts(url, loopback):
    check_fhir_server_url(url, allow_http_loopback=loopback)


def test_missing_data_without_token_is_prefetch_unavailable(fhir_server, resolve):
    fhir_server.add("Patient/123", json=PATIENT)
    templates = {**PATIENT_T, "user": "{{context.userId}}"}
    for token in (None, ""):
        with pytest.raises(PrefetchUnavailable) as excinfo:
            resolve(templates, {"user": ROLE}, token=token)
        assert type(excinfo.value) is PrefetchUnavailable
        assert excinfo.value.status == 412
        assert [i.expression for i in excinfo.value.issues] == [("prefetch.patient",)]
    assert fhir_server.requests == []


def test_parallel_fetch(fhir_server, resolve):
    templates = {}
    for n in range(6):
        fhir_server.add(f"Observation/o{n}", json=observation(n), delay=0.3)
        templates[f"obs{n}"] = f"Observation/o{n}"
    started = time.monotonic()
    result = resolve(templates)
    elapsed = time.monotonic() - started
    assert [result[f"obs{n}"]["id"] for n in range(6)] == [f"o{n}" for n in range(6)]
    assert fhir_server.max_concurrency() >= 3
    assert elapsed < 1.5  # one after another would take 1.8 s


def test_required_failure_does_not_wait_for_slow_keys(executor, fhir_server, resolve):
    # `executor` first: the server closes before the pool joins the abandoned slow fetch.
    fhir_server.add("Patient/123", status=401)
    fhir_server.add("PractitionerRole/456", json=ROLE, delay=3.0)
    started = time.monotonic()
    with pytest.raises(FhirAccessError) as excinfo:
        resolve({**PATIENT_T, "user": "{{context.userId}}"}, deadline_s=10.0)
    assert time.monotonic() - started < 2.5
    assert "401" in excinfo.value.message


# -- token hygiene ---------------------------------------------------------------------------


def test_token_never_logged_nor_in_errors(
    fhir_server,
    fhir_server_factory,
    resolve,
    caplog,
):
    caplog.set_level(logging.DEBUG)
    other = fhir_server_factory()
    fhir_server.add("Patient/123", json=PATIENT)
    fhir_server.add("Encounter/E1", status=401, json=operation_outcome("error", "login"))
    fhir_server.redirect("PractitionerRole/456", other.url_for("PractitionerRole/456"))
    fhir_server.add("Condition", json=searchset(), delay=3.0)

    texts = [repr(resolve(PATIENT_T))]
    for templates, kw in (
        ({"encounter": "Encounter/{{context.encounterId}}"}, {}),
        ({"user": "{{context.userId}}"}, {}),
        ({"conditions": "Condition?patient={{context.patientId}}"}, {"deadline_s": 0.3}),
        (PATIENT_T, {"allow_http_loopback": False}),
    ):
        with pytest.raises(FhirAccessError) as excinfo:
            resolve(templates, **kw)
        error = excinfo.value
        texts += [str(error), repr(error), json.dumps(error.to_operation_outcome())]
        cause = error.__cause__ or error.__context__
        texts.append(repr(cause))

    # The URL is named, its ids and parameter values are not (logs.py: patient ids only in the
    # audit log).
    messages = [r.getMessage().replace(fhir_server.url, "<base>") for r in caplog.records
                if r.name == "cds_service.data.fhir"]
    assert "FHIR GET <base>/Patient/… -> 200" in " ".join(messages)
    assert "FHIR GET <base>/Encounter/… -> 401" in " ".join(messages)
    assert TOKEN not in caplog.text
    for text in texts:
        assert TOKEN not in text
    assert all("123" not in m and "E1" not in m for m in messages)


@pytest.mark.parametrize(("relative", "shown"), [
    ("metadata", "metadata"),
    ("Patient/123", "Patient/…"),
    ("Observation?patient=123&code=http://loinc.org|98979-8&_count=5",
     "Observation?patient=…&code=…&_count=…"),
    ("Patient/123/_history/2", "Patient/…/_history/…"),
    ("Patient/$match", "Patient/$match"),
    ("Observation?_getpages=abc&_getpagesoffset=10", "Observation?_getpages=…&_getpagesoffset=…"),
    ("Observation?subject%3APatient=123", "Observation?subject:Patient=…"),
    ("", ""),
])
def test_logged_urls_name_types_and_parameters_but_no_ids_or_values(relative, shown):
    assert loggable_path(relative) == shown


# -- ReadOnlyFHIRClient directly ---------------------------------------------------------------


def test_client_refuses_writes_without_sending(fhir_server):
    with ReadOnlyFHIRClient(fhir_server.url, access_token=TOKEN, allow_http_loopback=True) as c:
        attempts = [
            lambda: c.execute("Patient", method="post", data={"resourceType": "Patient"}),
            lambda: c.execute("Patient/1", method="PUT", data={"resourceType": "Patient"}),
            lambda: c.execute("Patient/1", method="get", data={"resourceType": "Patient"}),
            lambda: c.resource("Patient", id="1").save(),
            lambda: c.resource("Patient").create(),
            lambda: c.delete("Patient", "1"),
            lambda: c.patch("Patient", "1", active=False),
            lambda: c.resources("Patient").search(name="x").delete(),
        ]
        for attempt in attempts:
            with pytest.raises(WriteRefused):
                attempt()
        assert fhir_server.requests == []

        # ... while reads work, through fhirpy's own API too.
        fhir_server.add("Patient/1", json={"resourceType": "Patient", "id": "1"})
        fhir_server.add(
            "Patient", query="name=x", json=searchset({"resourceType": "Patient", "id": "1"})
        )
        assert c.get("Patient", "1")["id"] == "1"
        assert [p["id"] for p in c.resources("Patient").search(name="x").fetch()] == ["1"]
    assert fhir_server.methods == {"GET"}
    assert_only_authorized_gets(fhir_server)
    assert [r.relative_url for r in fhir_server.requests] == ["Patient/1", "Patient?name=x"]


def test_client_404_and_redirect_errors(fhir_server, fhir_server_factory):
    other = fhir_server_factory()
    fhir_server.redirect("Patient/2", other.url_for("Patient/2"))
    with ReadOnlyFHIRClient(fhir_server.url, access_token=TOKEN, allow_http_loopback=True) as c:
        with pytest.raises(FhirNotFound) as excinfo:
            c.get_json("Patient/1")
        assert excinfo.value.status == 404
        with pytest.raises(FhirRedirectRefused):
            c.get_json("Patient/2")
    assert other.requests == []


def test_client_without_trailing_question_mark(fhir_server):
    fhir_server.add("Patient/1", json={"resourceType": "Patient", "id": "1"})
    with ReadOnlyFHIRClient(fhir_server.url + "/", allow_http_loopback=True) as c:
        c.get_json("Patient/1")
        c.get_json("/fhir/Patient/1", params={"_elements": ["id"]})
    assert [r.query_string for r in fhir_server.requests] == ["", "_elements=id"]
    assert "authorization" not in fhir_server.requests[0].headers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),
        ("-1", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value, expected):
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected
