"""PHI-access audit log: AuditRecord guards, strip_url_secrets, and the store on SQLite and the
local PostgreSQL (both for real; see tests/helpers/storage.py)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.records import store as store_module
from cds_service.records.audit import (
    AUDIT_FIELDS,
    MAX_ITEMS,
    MAX_TEXT,
    AuditRecord,
    lenient_record,
    prefetch_key_sources,
    safe_text,
    strip_url_secrets,
)
from cds_service.records.database import StoreUnavailable
from cds_service.records.store import Store
from cds_service.records.tables import audit_log_table
from tests.helpers.store_queries import add_audit

JWT = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2VuLXZhbHVl.c2lnbmF0dXJl"
OPAQUE = "Nxfve4q3H9TKs5F5vf6kRYAZqzK7j9LHvrg1Bw7fU_07_FdV9aRzLCI1GxOn20LuO2Ahl5RkRnz-p8u1MeYWqA"
UNREACHABLE_PG = "postgresql://cds:s3cr3t-Pa55@127.0.0.1:1/test"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TEXT_FIELDS = [
    "site",
    "iss",
    "sub",
    "user_id",
    "patient_id",
    "encounter_id",
    "hook",
    "hook_instance",
    "service_id",
    "outcome",
    "detail",
]
TUPLE_FIELDS = ["fhir_urls_fetched", "card_uuids", "suggestion_uuids", "feedback_cards"]


def invoke(**overrides) -> AuditRecord:
    fields = {
        "kind": "invoke",
        "time": NOW,
        "site": "site-a",
        "iss": "https://fhir.example.org/api/FHIR/R4",
        "sub": "d6f7c2a4-client",
        "user_id": "PractitionerRole/ABC123",
        "patient_id": "erXuFYUfucBZaryVksYEcMg3",
        "encounter_id": "eoK8nLRcEypNjtns4dgnF3Q3",
        "hook": "patient-view",
        "hook_instance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "service_id": "diabetes",
        "prefetch_keys_used": ("patient:prefetch", "egfr:fetched"),
        "fhir_urls_fetched": ("Observation?patient=erXuFYUfucBZaryVksYEcMg3&_sort=-date",),
        "card_uuids": (
            "0f3f0a1e-0f4c-4b8e-9b35-8c5d6f0e2a11",
            "a8c5d6f0-0f4c-4b8e-9b35-8c5d6f0e2a12",
        ),
        "suggestion_uuids": ("e56e1945-20b3-4393-8503-a1a20fd73152",),
        "outcome": "200 cards=2",
        "status": 200,
        "detail": "suppressed: same card shown 2h ago",
    }
    return AuditRecord(**{**fields, **overrides})


def feedback(**overrides) -> AuditRecord:
    fields = {
        "kind": "feedback",
        "time": NOW,
        "site": "site-a",
        "service_id": "diabetes",
        "feedback_cards": ("123456", "0f3f0a1e-0f4c-4b8e-9b35-8c5d6f0e2a11"),
        "outcome": "200",
        "status": 200,
    }
    return AuditRecord(**{**fields, **overrides})


def as_row(record: AuditRecord, id_: int) -> dict:
    return {"id": id_, **dataclasses.asdict(record)}


# --- AuditRecord -------------------------------------------------------------------------------


def test_record_normalizes_time_and_sequences():
    record = invoke(
        time=datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
        card_uuids=["c1", "c2"],
    )
    assert record.time == NOW
    assert record.time.tzinfo is UTC
    assert record.card_uuids == ("c1", "c2")


def test_record_minimal():
    record = AuditRecord(kind="invoke", time=NOW, status=401, outcome="401")
    assert record.patient_id is None
    assert record.fhir_urls_fetched == ()


def test_record_strips_url_secrets():
    record = invoke(
        iss="https://user:pw@fhir.example.org/R4?access_token=" + OPAQUE,
        fhir_urls_fetched=[
            f"Observation?patient=p1&access_token={OPAQUE}&code=http://loinc.org|33914-3",
            f"Patient/p1?token={JWT}",
        ],
    )
    assert record.iss == "https://fhir.example.org/R4"
    assert record.fhir_urls_fetched == (
        "Observation?patient=p1&code=http://loinc.org|33914-3",
        "Patient/p1",
    )


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (JWT, "JWT"),
        (f"Bearer {JWT}", "JWT"),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.", "JWT"),  # alg none: empty signature
        (OPAQUE, "credential"),
        ("retry with access_token=abc", "credential"),
        ('{"resourceType": "Patient", "id": "p1"}', "resource"),
        ("x" * (MAX_TEXT + 1), "longer than"),
        ("a\x00b", "NUL"),
        ({"resourceType": "Patient", "id": "p1"}, "expected a string"),
        ([{"resourceType": "Observation"}], "expected a string"),
        (["p1"], "expected a string"),
        (b"p1", "expected a string"),
        (42, "expected a string"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v[:16],
)
def test_text_field_guards(field, value, message):
    with pytest.raises(ValueError, match=message) as info:
        invoke(**{field: value})
    assert field in str(info.value)
    if isinstance(value, str):
        assert value not in str(info.value), "the rejected value must not be echoed"


@pytest.mark.parametrize("field", [*TUPLE_FIELDS, "prefetch_keys_used"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (("ok:ok", JWT), "JWT"),
        (("ok:ok", OPAQUE), "credential"),
        (("ok:ok", {"resourceType": "Patient"}), "expected a string"),
        (("ok:ok", ("nested:x",)), "expected a string"),
        ({"resourceType": "Bundle", "entry": []}, "expected a tuple"),
        ("ok:ok", "expected a tuple"),
        (("ok:ok",) * (MAX_ITEMS + 1), "more than"),
    ],
    ids=["jwt", "opaque", "dict-item", "nested", "dict", "str", "too-many"],
)
def test_tuple_field_guards(field, value, message):
    with pytest.raises(ValueError, match=message):
        invoke(**{field: value})


def test_token_in_a_non_credential_parameter_is_still_rejected():
    with pytest.raises(ValueError, match="JWT"):
        invoke(fhir_urls_fetched=(f"Patient?_id=p1&state={JWT}",))


@pytest.mark.parametrize("value", ["egfr", "egfr:", ":fetched", "a:b:c", "egfr fetched"])
def test_prefetch_keys_used_shape(value):
    with pytest.raises(ValueError, match="key:source"):
        invoke(prefetch_keys_used=(value,))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "read"}, "kind"),
        ({"time": datetime(2025, 3, 1, 12, 0)}, "timezone-aware"),
        ({"time": "2025-03-01T12:00:00Z"}, "timezone-aware"),
        ({"status": "200"}, "status"),
        ({"status": True}, "status"),
        ({"status": 99}, "status"),
        ({"status": 600}, "status"),
    ],
)
def test_required_field_guards(overrides, message):
    with pytest.raises(ValueError, match=message):
        invoke(**overrides)


def test_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        invoke().patient_id = "other"  # type: ignore[misc]


def test_prefetch_key_sources():
    assert prefetch_key_sources({"patient": "prefetch", "egfr": "fetched"}) == (
        "egfr:fetched",
        "patient:prefetch",
    )
    assert invoke(prefetch_keys_used=prefetch_key_sources({"a1c": "null"})).prefetch_keys_used == (
        "a1c:null",
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("Patient/p1", "Patient/p1"),
        ("Observation?patient=p1&_sort=-date", "Observation?patient=p1&_sort=-date"),
        ("Observation?patient=p1&access_token=abc", "Observation?patient=p1"),
        ("Observation?access_token=abc&patient=p1", "Observation?patient=p1"),
        ("Patient/p1?token=abc", "Patient/p1"),
        ("Patient/p1?id_token=a&refresh_token=b&client_secret=c&password=d", "Patient/p1"),
        ("Patient/p1?ACCESS-TOKEN=a&Client.Secret=b&access%5Ftoken=c", "Patient/p1"),
        ("Observation?code=http://loinc.org|62238-1&state=xyz",
         "Observation?code=http://loinc.org|62238-1&state=xyz"),  # FHIR code kept
        (
            "Patient/p1?client_assertion=a&api_key=b&key=c&sig=d&X-Amz-Security-Token=e",
            "Patient/p1",
        ),
        ("Patient/p1?pwd=a&passwd=b&sessionid=c&jwt=d", "Patient/p1"),
        # Kept parameters are left as given, not re-encoded.
        (
            "Observation?patient=p1&category=laboratory&_count=10&token=x&date=ge2024-01-01",
            "Observation?patient=p1&category=laboratory&_count=10&date=ge2024-01-01",
        ),
        (
            "Observation?subject=Patient%2Fp1&author=Practitioner/9",
            "Observation?subject=Patient%2Fp1&author=Practitioner/9",
        ),
        ("Patient/p1?&&access_token=a&", "Patient/p1"),
        ("Patient/p1?access_token", "Patient/p1"),  # no value
        ("Patient/p1?x=1;token=b", "Patient/p1?x=1"),  # ";" separator (old CGI style)
        ("Patient/p1#access_token=abc", "Patient/p1"),  # implicit-grant fragment
        (
            "https://user:pw@fhir.example.org:8443/R4/Patient/p1",
            "https://fhir.example.org:8443/R4/Patient/p1",
        ),
        (
            "https://fhir.example.org/R4/Patient?_id=p1",
            "https://fhir.example.org/R4/Patient?_id=p1",
        ),
        ("", ""),
    ],
)
def test_strip_url_secrets(url, expected):
    assert strip_url_secrets(url) == expected


# --- Store -------------------------------------------------------------------------------------


def test_add_and_list_round_trip_every_field(store):
    records = [invoke(), feedback(time=NOW + timedelta(seconds=1))]

    ids = [add_audit(store, r) for r in records]

    rows = list(store.iter_audit())
    assert rows == [as_row(r, i) for r, i in zip(records, ids, strict=True)]
    assert set(rows[0]) == {"id", *(f.name for f in dataclasses.fields(AuditRecord))}
    assert rows[0]["time"].tzinfo is UTC
    assert ids[0] < ids[1]
    # Every optional field empty round-trips too.
    empty = AuditRecord(kind="invoke", time=NOW, status=401)
    empty_id = add_audit(store, empty)
    assert list(store.iter_audit(status=401)) == [as_row(empty, empty_id)]


def test_list_filters(store):
    p1 = [invoke(time=NOW + timedelta(minutes=m)) for m in (0, 10, 20)]
    p2 = invoke(patient_id="p2", site="site-b", time=NOW + timedelta(minutes=5))
    fb = feedback(time=NOW + timedelta(minutes=15))
    denied = AuditRecord(kind="invoke", time=NOW + timedelta(minutes=30), status=401, outcome="401")
    for r in [*p1, p2, fb, denied]:
        add_audit(store, r)

    def times(rows):
        return [r["time"] for r in rows]

    assert times(list(store.iter_audit())) == sorted(r.time for r in [*p1, p2, fb, denied])
    assert times(list(store.iter_audit(patient_id=p1[0].patient_id))) == [r.time for r in p1]
    assert times(list(store.iter_audit(kind="feedback"))) == [fb.time]
    assert times(list(store.iter_audit(site="site-b"))) == [p2.time]
    assert times(list(store.iter_audit(status=401))) == [denied.time]
    assert len(list(store.iter_audit(service_id="diabetes", kind="invoke"))) == 4
    assert times(
        list(store.iter_audit(
            patient_id=p1[0].patient_id, since=NOW + timedelta(minutes=10), until=p1[2].time
        ))
    ) == [p1[1].time]
    assert times(list(store.iter_audit(limit=2))) == [p1[0].time, p2.time]
    assert list(store.iter_audit(user_id="PractitionerRole/nobody")) == []
    # Part of the outcome text; LIKE's wildcards match themselves.
    assert times(list(store.iter_audit(outcome_contains="40"))) == [denied.time]
    assert list(store.iter_audit(outcome_contains="4%")) == []
    with pytest.raises(TypeError, match="patient"):
        list(store.iter_audit(patient="p1"))


def test_purge_removes_only_old_rows(store):
    cutoff = NOW - timedelta(days=365)
    old = [invoke(time=cutoff - timedelta(days=d)) for d in (400, 1)]
    old.append(invoke(time=cutoff - timedelta(microseconds=1)))
    kept = [invoke(time=cutoff), invoke(time=NOW), feedback(time=NOW)]
    for r in [*old, *kept]:
        add_audit(store, r)

    assert store.purge_audit(cutoff) == 3
    assert [r["time"] for r in store.iter_audit()] == [r.time for r in kept]
    assert store.purge_audit(cutoff) == 0
    # The cutoff is a point in time whatever its zone.
    assert store.purge_audit(NOW.astimezone(timezone(timedelta(hours=-5)))) == 1
    assert [r["time"] for r in store.iter_audit()] == [NOW, NOW]


def test_purge_in_batches(store, monkeypatch):
    monkeypatch.setattr(store_module, "AUDIT_PURGE_BATCH", 3)
    for minute in range(10):
        add_audit(store, invoke(time=NOW - timedelta(days=30, minutes=minute)))
    add_audit(store, invoke())

    assert store.purge_audit(NOW - timedelta(days=1)) == 10
    assert len(list(store.iter_audit())) == 1


def test_purge_rejects_naive_cutoff(store):
    with pytest.raises(ValueError, match="timezone-aware"):
        store.purge_audit(datetime(2025, 1, 1))


def test_store_has_no_way_to_update_audit_rows():
    assert [name for name in dir(Store) if "audit" in name] == [
        "iter_audit",
        "purge_audit",
    ]


def test_no_token_reaches_the_database(store):
    add_audit(
        store,
        invoke(
            iss=f"https://u:{OPAQUE}@fhir.example.org/R4",
            fhir_urls_fetched=(
                f"Observation?patient=p1&access_token={OPAQUE}",
                f"MedicationRequest?patient=p1&client_secret=shh&token={JWT}",
            ),
        )
    )

    with store._engine.connect() as conn:
        raw = conn.execute(sa.select(audit_log_table)).mappings().all()
    dumped = json.dumps([dict(r) for r in raw], default=str)
    assert "p1" in dumped
    for secret in (OPAQUE, JWT, "shh", "access_token", "client_secret"):
        assert secret not in dumped
    [row] = list(store.iter_audit())
    assert row["fhir_urls_fetched"] == ("Observation?patient=p1", "MedicationRequest?patient=p1")


def test_survives_restart(store_url):
    first = Store(store_url)
    add_audit(first, invoke())
    add_audit(first, feedback())
    first.dispose()

    with Store(store_url) as second:
        rows = list(second.iter_audit())
        assert [r["kind"] for r in rows] == ["invoke", "feedback"]
        assert rows[0] == as_row(invoke(), rows[0]["id"])


def test_audit_and_feedback_share_the_database(sqlite_store_url):
    with Store(sqlite_store_url) as store:
        add_audit(store, feedback())

    # Committed to the file: visible to a plain connection that knows nothing of the Store.
    engine = sa.create_engine(sqlite_store_url)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"feedback", "audit_log"} <= tables
        assert conn.exec_driver_sql("SELECT count(*) FROM audit_log").scalar() == 1
    engine.dispose()


def test_unavailable_database_raises_store_unavailable():
    store = Store(UNREACHABLE_PG)
    try:
        for call in (
            lambda: add_audit(store, invoke()),
            lambda: list(store.iter_audit()),
            lambda: store.purge_audit(NOW),
        ):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert "s3cr3t" not in str(info.value)
    finally:
        store.dispose()


# --- hostile values: the record is written, the value is not --------------------------------

LONG_ID = "a" * 100  # passes the request schema (1-128 of [A-Za-z0-9._:-]), trips the guard


@pytest.mark.parametrize(("value", "expected"), [
    ("d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"),
    (LONG_ID, "[token-like value withheld sha256:"),
    (JWT, "[token-like value withheld sha256:"),
    (f"Bearer {JWT}", "[token-like value withheld sha256:"),
    (OPAQUE, "[token-like value withheld sha256:"),
    ("x?password=hunter2", "[token-like value withheld sha256:"),
    ('{"resourceType": "Patient", "name": "Zed"}', "[resource-like value withheld sha256:"),
    ("line\nbreak\x00nul\x1b[31m\x85", "line\\x0abreak\\x00nul\\x1b[31m\\x85"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
    ("word " * 200, "word word"),
    (12345, "[int value withheld]"),
    ({"resourceType": "Patient"}, "[dict value withheld]"),
    (["a"], "[list value withheld]"),
])
def test_safe_text_keeps_what_is_safe_and_withholds_the_rest(value, expected):
    text = safe_text(value)
    assert text.startswith(expected)
    assert len(text) <= MAX_TEXT
    AuditRecord(kind="invoke", time=NOW, status=200, detail=text)  # the strict guard passes
    assert safe_text(value) == text  # deterministic: still correlates
    if isinstance(value, str) and len(value) > 64:
        assert value not in text


def test_a_long_value_keeps_its_start_and_says_how_long_it_was():
    text = safe_text("word " * 200)
    assert text.startswith("word word") and "…[truncated, 1000 characters, sha256:" in text


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("value", [LONG_ID, JWT, OPAQUE, "nul\x00", 7, {"a": 1}, "x" * 5000])
def test_lenient_record_is_always_built_and_holds_no_secret(field, value):
    record = lenient_record(**{**dataclasses.asdict(invoke()), field: value})
    stored = getattr(record, field)
    assert isinstance(stored, str)
    if isinstance(value, str) and value != "nul\x00":
        assert value not in stored
    assert strictly_rebuilt(record) == record


def strictly_rebuilt(record: AuditRecord) -> AuditRecord:
    """`record` built again through every check (lenient_record's own are skipped)."""
    return AuditRecord(**{name: getattr(record, name) for name in AUDIT_FIELDS})


_ANY_TEXT = st.one_of(
    st.text(), st.text(alphabet="eyJ.=&?\"/:_-tokenpasswordresourceType0123456789 "),
    st.sampled_from([LONG_ID, JWT, OPAQUE, "x" * 5000]))


@settings(max_examples=300, deadline=None)
@given(values=st.fixed_dictionaries({}, optional={
    **{name: st.one_of(_ANY_TEXT, st.integers(), st.none()) for name in TEXT_FIELDS},
    **{name: st.lists(_ANY_TEXT, max_size=5)
       for name in [*TUPLE_FIELDS, "prefetch_keys_used"]}}))
def test_what_lenient_record_keeps_passes_every_strict_check(values):
    record = lenient_record(kind="invoke", time=NOW, status=200, **values)
    assert strictly_rebuilt(record) == record


def test_lenient_record_tuple_fields():
    record = lenient_record(kind="invoke", time=NOW, status=200, user_id=None,
                            fhir_urls_fetched=[f"Observation?access_token={OPAQUE}", JWT],
                            card_uuids="not-a-list",
                            suggestion_uuids=[str(n) for n in range(MAX_ITEMS + 5)],
                            prefetch_keys_used=["egfr:prefetch", "not a key"])
    assert record.user_id is None
    assert record.fhir_urls_fetched[0] == "Observation"
    assert record.fhir_urls_fetched[1].startswith("[token-like value withheld")
    assert record.card_uuids == ("not-a-list",)
    assert len(record.suggestion_uuids) == MAX_ITEMS
    assert record.prefetch_keys_used[0] == "egfr:prefetch"
    assert record.prefetch_keys_used[1].startswith("withheld:sha256-")


def test_plain_passes_every_check():
    # `_plain` lets identifier-like strings skip the checks: it must only ever admit strings that
    # every check passes and `safe_text` keeps as they are.
    import random

    from cds_service.records import audit

    def full_checks_pass(value: str) -> bool:
        return not (audit._UNPRINTABLE.search(value) or audit._JWT.search(value)
                    or audit._OPAQUE_TOKEN.search(value) or audit._CREDENTIAL_PAIR.search(value)
                    or audit._RESOURCE_JSON.search(value)) and len(value) <= MAX_TEXT

    alphabet = "abcyzAEJYZ0189._:/@|-=\"~+ \t\x00eyJ"
    rng = random.Random(20)  # noqa: S311 - reproducible test strings, not secrets
    samples = ["", "a" * 64, "a" * 65, "eyJ", "xeyJa.b.c", "eyJa..", "Patient/abc.12-x",
               "urn:uuid:6f1c2a3e-1d2b-4c5d-8e9f-0a1b2c3d4e5f", "egfr:prefetch", "token=abc",
               "https://fhir.example.org/api/FHIR/R4", "a" * 30 + "=" + "b" * 30]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
                for _ in range(20_000)]
    admitted = 0
    for value in samples:
        if audit._plain(value):
            admitted += 1
            assert full_checks_pass(value), value
            assert safe_text(value) == value
            AuditRecord(kind="invoke", time=datetime.now(UTC), status=200, detail=value)
    assert admitted > 100
    assert not audit._plain("a" * 65) and not audit._plain("eyJa..") \
        and not audit._plain("token=abc")
