"""Which FHIR servers a call may read from (`fhir_servers`), and how much a read may cost: the
deadline over every byte, the byte caps, freed threads. Real loopback servers throughout
(tests/helpers/fhir_server.py, bench/hostile_fhir.py); time bounds are generous, never exact."""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from bench.hostile_fhir import MIB, ConnectionCounter, HostileFhirServer
from cds_service.data.fhir import FhirBase, allowed_by, origin_for_audit
from cds_service.data.prefetch import PrefetchSettings
from cds_service.data.prefetch_resolve import REFUSED_SERVER, resolve_prefetch
from cds_service.protocol.errors import ConfigError, FhirAccessError
from cds_service.records.audit import AuditRecord
from cds_service.records.store import Store
from tests.helpers.fhir_server import searchset
from tests.helpers.http import PATIENT_VIEW, post
from tests.helpers.store_queries import add_audit

TOKEN = "opaque-ehr-access-token-f00d"
CONTEXT = {"patientId": "123", "userId": "PractitionerRole/456"}
PATIENT = {"resourceType": "Patient", "id": "123"}
BASE = "https://ehr.example.org/api/FHIR/R4"


# -- the allow-list, as a pure function ------------------------------------------------------


@pytest.mark.parametrize("url", [
    BASE,
    BASE + "/",
    "https://EHR.Example.ORG/api/FHIR/R4",  # host names are case-insensitive
    "https://ehr.example.org:443/api/FHIR/R4",  # the default port, spelled out
    BASE + "/tenant-2",  # below the base
])
def test_allowed(url):
    assert allowed_by(url, [BASE])


@pytest.mark.parametrize("url", [
    "https://ehr.example.org/api/FHIR",  # above the base
    "https://ehr.example.org/api/FHIR/R4x",  # a prefix, but not at a `/` boundary
    "http://ehr.example.org/api/FHIR/R4",  # another scheme
    "https://ehr.example.org:8443/api/FHIR/R4",  # another port
    "https://ehr.example.org.evil.test/api/FHIR/R4",
    "https://user:pw@ehr.example.org/api/FHIR/R4",  # userinfo, even for the right host
    "https://ehr.example.org@127.0.0.1/api/FHIR/R4",
    BASE + "/../../admin",
    BASE + "/%2e%2e/%2E%2E/admin",
    BASE + "/a%2Fb",
    BASE + "?x=1",
    BASE + "#f",
    "https://ehr.example.org\\@127.0.0.1/api/FHIR/R4",
    "https://ehr.example.org/api/FHIR/R4 ",
    "https://ehr.example.org:99999/api/FHIR/R4",
    "//ehr.example.org/api/FHIR/R4",
    "ehr.example.org/api/FHIR/R4",
    "",
    None,
    42,
])
def test_refused(url):
    assert not allowed_by(url, [BASE])


def test_allow_list_covers_loopback_by_port():
    assert allowed_by("http://127.0.0.1:8080/fhir/x", ["http://127.0.0.1:8080/fhir"])
    assert not allowed_by("http://127.0.0.1:6379/fhir", ["http://127.0.0.1:8080/fhir"])
    assert not allowed_by("http://localhost:8080/fhir", ["http://127.0.0.1:8080/fhir"])
    assert allowed_by("https://[::1]/fhir", ["https://[0:0:0:0:0:0:0:1]:443/fhir"]) is False
    assert allowed_by("https://[::1]/fhir", ["https://[::1]:443/fhir"])


@pytest.mark.parametrize(("url", "shown"), [
    ("http://127.0.0.1:6379/", "http://127.0.0.1:6379"),
    ("https://Internal.Example:8443/fhir?x=secret", "https://internal.example:8443"),
    ("https://[fe80::1]/fhir", "https://[fe80::1]:443"),
    ("http://169.254.169.254/latest/meta-data", "http://169.254.169.254:80"),
    ("https://" + "a" * 80 + ".example/fhir", "https://(not a host name)"),
    ("ftp://x/", "(not an http(s) URL)"),
    ("https://x:99999/", "(not a URL)"),
])
def test_refused_origin_for_the_audit_log(url, shown):
    assert origin_for_audit(url) == shown


def test_fhir_base_reason_never_echoes_the_url():
    with pytest.raises(ValueError) as excinfo:
        FhirBase.parse("https://secret-host.internal/a/../b")
    assert "secret-host" not in str(excinfo.value)


# -- refused servers are never contacted -----------------------------------------------------


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=16) as pool:
        yield pool


def resolve(executor, templates, fhir_server, *, allowed, prefetch=None, **settings):
    return resolve_prefetch(
        templates, context=CONTEXT, prefetch=prefetch, fhir_server=fhir_server,
        access_token=TOKEN, executor=executor,
        settings=PrefetchSettings(allow_http_loopback=True, fhir_servers=tuple(allowed),
                                  **settings))


def test_refused_server_sees_no_connection_and_the_412_says_nothing_about_it(
        executor, fhir_server):
    with ConnectionCounter() as listener:
        named = f"http://127.0.0.1:{listener.port}/fhir"
        with pytest.raises(FhirAccessError) as excinfo:
            resolve(executor, {"patient": "Patient/{{context.patientId}}"}, named,
                    allowed=[fhir_server.url])
        time.sleep(0.2)  # a connection attempt, had there been one, is accepted by now
        assert listener.accepted == 0
    assert excinfo.value.message == (f"{REFUSED_SERVER}; prefetch data was not fetched: "
                                     "'patient'")
    assert [i.code for i in excinfo.value.issues] == ["security"]
    assert fhir_server.requests == []


def test_refused_server_leaves_the_call_to_its_prefetch(executor, fhir_server):
    with ConnectionCounter() as listener:
        result = resolve(executor, {"patient": "Patient/{{context.patientId}}",
                                    "conditions": "Condition?patient={{context.patientId}}"},
                         f"http://127.0.0.1:{listener.port}/fhir", allowed=[fhir_server.url],
                         prefetch={"patient": PATIENT, "conditions": searchset()})
        assert result["patient"] == PATIENT and result.fetched == []
    assert listener.accepted == 0


def test_412_is_the_same_whatever_the_refused_host(make_app, fhir_server):
    app = make_app(SITE_YAML="prefetch:\n  allow_http_loopback: true\n",
                   FHIR_SERVERS=[fhir_server.url])
    client = app.test_client()
    with ConnectionCounter() as listener, HostileFhirServer(drip=0.2) as drip:
        named = [
            f"http://127.0.0.1:{listener.port}/fhir",  # something listens
            f"http://127.0.0.1:{_closed_port()}/fhir",  # nothing does
            drip.url,  # a server that would hold the call
            "https://127.0.0.1:6379/",  # Redis's port, https
            "http://169.254.169.254/latest/meta-data",  # cloud metadata, link-local
            "https://10.1.2.3/fhir",  # private, unroutable here
            "https://unresolvable.invalid/fhir",  # would need DNS
            "https://user:pw@ehr.test/api/FHIR/R4",
            "https://ehr.test/api/FHIR/R4",  # the test issuer's iss: replaced by the list
        ]
        answers, seconds = [], []
        for url in named:
            body = copy.deepcopy(PATIENT_VIEW)
            body.update(fhirServer=url,
                        fhirAuthorization={"access_token": TOKEN, "token_type": "Bearer"})
            started = time.monotonic()
            response = post(client, "/cds-services/greeter", body)
            seconds.append(time.monotonic() - started)
            assert response.status_code == 412, url
            answers.append(response.get_json())
        time.sleep(0.2)
        assert (listener.accepted, drip.connections) == (0, 0)
    assert all(answer == answers[0] for answer in answers)
    assert "127.0.0.1" not in str(answers[0]) and "refused" not in str(answers[0])
    assert max(seconds) < 1.5  # nothing waited on a network
    rows = list(app.extensions["cds"].store.iter_audit(kind="invoke"))
    refused = [row["fhir_server_refused"] for row in rows]
    assert f"http://127.0.0.1:{listener.port}" in refused
    assert "http://169.254.169.254:80" in refused and "https://ehr.test:443" in refused


def test_allowed_server_is_still_read(make_app, fhir_server):
    fhir_server.add("Patient/p1", json={"resourceType": "Patient", "id": "p1",
                                        "name": [{"given": ["Ada"]}]})
    app = make_app(SITE_YAML="prefetch:\n  allow_http_loopback: true\n",
                   FHIR_SERVERS=[fhir_server.url])
    body = {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "fhirServer": fhir_server.url + "/",
            "fhirAuthorization": {"access_token": TOKEN, "token_type": "Bearer"},
            "context": {"userId": "PractitionerRole/1", "patientId": "p1"}}
    response = post(app.test_client(), "/cds-services/greeter", body)
    assert response.get_json()["cards"][0]["summary"] == "Hello Ada"
    [row] = list(app.extensions["cds"].store.iter_audit(kind="invoke"))
    assert row["fhir_server_refused"] is None


def _closed_port() -> int:
    with ConnectionCounter() as listener:
        return listener.port


# -- the site's list -------------------------------------------------------------------------


def test_default_list_is_the_sites_fhir_server_and_issuers(make_app):
    app = make_app(SITE_YAML="fhir_server: https://fhir.hospital.example/R4\n")
    site = next(iter(app.extensions["cds"].sites.values()))
    assert site.prefetch_settings.fhir_servers == ("https://fhir.hospital.example/R4",
                                                   "https://ehr.test/api/FHIR/R4")


@pytest.mark.parametrize(("entry", "why"), [
    ("http://fhir.hospital.example/R4", "must be https"),
    ("http://127.0.0.1:8080/fhir", "must be https"),  # loopback needs the test setting
    ("https://u:p@fhir.hospital.example/R4", "credentials"),
    ("https://fhir.hospital.example/R4?tenant=1", "query"),
    ("https://fhir.hospital.example/R4/../admin", "'..'"),
])
def test_bad_list_entry_is_refused_at_start_naming_it(make_app, entry, why):
    with pytest.raises(ConfigError, match=rf"fhir_servers\[1\]: .*{why}"):
        make_app(FHIR_SERVERS=["https://ok.example/R4", entry])


# -- bounded reads ---------------------------------------------------------------------------

KEYS = {f"k{n}": f"Observation?patient={{{{context.patientId}}}}&n={n}" for n in range(8)}


def test_50_mb_answer_stops_at_the_cap(executor):
    with HostileFhirServer(size=50 * MIB) as big:
        with pytest.raises(FhirAccessError) as excinfo:
            resolve(executor, {"k0": KEYS["k0"]}, big.url, allowed=[big.url],
                    max_response_bytes=2 * MIB)
        assert excinfo.value.issues[0].code == "too-costly"
        assert "exceeded 2 MiB" in excinfo.value.message
        _wait_for(lambda: big.hangups)
        assert big.bytes_sent < 20 * MIB  # the socket was closed long before the end


def test_declared_length_over_the_cap_is_refused_unread(executor):
    with HostileFhirServer(size=50 * MIB, declare_length=True) as big:
        with pytest.raises(FhirAccessError, match="exceeded 16 MiB"):
            resolve(executor, {"k0": KEYS["k0"]}, big.url, allowed=[big.url])


def test_gzip_bomb_is_capped_after_decoding(executor):
    with HostileFhirServer(size=50 * MIB, gzip_body=True) as bomb:
        with pytest.raises(FhirAccessError, match="exceeded 1 MiB"):
            resolve(executor, {"k0": KEYS["k0"]}, bomb.url, allowed=[bomb.url],
                    max_response_bytes=MIB)


def test_answers_together_are_capped_per_call(executor):
    with HostileFhirServer(size=MIB - 1000) as server:
        with pytest.raises(FhirAccessError, match="answers exceeded 3 MiB in total"):
            resolve(executor, KEYS, server.url, allowed=[server.url],
                    max_response_bytes=MIB, max_total_bytes=3 * MIB)
        # Under both caps the same answers are read.
        result = resolve(executor, dict(list(KEYS.items())[:2]), server.url,
                         allowed=[server.url], max_response_bytes=MIB, max_total_bytes=3 * MIB)
        assert result["k0"] == [] and result.sources["k1"] == "fetched"


@pytest.mark.parametrize("drip_in", ["body", "headers"])
def test_dripping_server_is_cut_off_at_the_deadline_and_frees_the_thread(drip_in):
    with ThreadPoolExecutor(max_workers=1) as one_thread, \
            HostileFhirServer(drip=0.1, drip_in=drip_in) as drip:
        started = time.monotonic()
        with pytest.raises(FhirAccessError) as excinfo:
            resolve(one_thread, {"k0": KEYS["k0"]}, drip.url, allowed=[drip.url],
                    deadline_s=1.0)
        answered = time.monotonic() - started
        assert excinfo.value.issues[0].code == "timeout"
        assert answered < 1.0 + 1.5
        # The only executor thread is free again: it ran the read and let go at the deadline.
        assert one_thread.submit(lambda: "free").result(timeout=1.5) == "free"
        _wait_for(lambda: drip.hangups)
        assert drip.hangups[0] - started < 1.0 + 1.5


def test_a_healthy_call_beside_a_dripping_one_is_unaffected(executor, fhir_server):
    fhir_server.add("Observation", json=searchset({"resourceType": "Observation", "id": "o1"}))
    many = {f"k{n}": f"Observation?patient={{{{context.patientId}}}}&n={n}" for n in range(12)}
    with HostileFhirServer(drip=0.2) as drip:
        outcome = {}

        def stuck() -> None:
            try:
                resolve(executor, many, drip.url, allowed=[drip.url], deadline_s=3.0)
            except FhirAccessError as exc:
                outcome["stuck"] = exc

        thread = threading.Thread(target=stuck)
        thread.start()
        _wait_for(lambda: drip.connections >= 8)
        started = time.monotonic()
        healthy = resolve(executor, KEYS, fhir_server.url, allowed=[fhir_server.url],
                          deadline_s=2.5)
        took = time.monotonic() - started
        thread.join(10)
    assert all(healthy[key] == [{"resourceType": "Observation", "id": "o1"}] for key in KEYS)
    assert took < 1.5  # done long before the dripping call's deadline
    assert drip.connections == 8  # one call holds at most max_parallel_reads threads
    assert outcome["stuck"].issues[0].code == "timeout"


def _wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


# -- the audit column on databases made before it --------------------------------------------


def test_refused_column_is_added_to_an_existing_audit_log(store_url):
    with Store(store_url) as store:  # then back to the previous release's audit_log
        add_audit(store, AuditRecord(kind="invoke", time=datetime.now(UTC), status=412,
                                    patient_id="p1"))
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_log DROP COLUMN fhir_server_refused")
    engine.dispose()
    for _ in range(2):  # a second start finds the column there
        with Store(store_url) as store:
            add_audit(store, AuditRecord(kind="invoke", time=datetime.now(UTC), status=412,
                                        fhir_server_refused="http://127.0.0.1:6379"))
            rows = list(store.iter_audit(status=412))
    assert [r["fhir_server_refused"] for r in rows] == [
        None, "http://127.0.0.1:6379", "http://127.0.0.1:6379"]
