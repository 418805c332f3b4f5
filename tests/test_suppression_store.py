"""Storage for alert-fatigue suppression: issued cards joined to override feedback.

Runs on SQLite and on the local PostgreSQL (both for real; see tests/helpers/storage.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from cds_service.records import store as store_module
from cds_service.records.audit import AuditRecord
from cds_service.records.call import Call
from cds_service.records.database import StoreUnavailable
from cds_service.records.feedback import FeedbackItem
from cds_service.records.overrides import Override
from cds_service.records.store import Store
from cds_service.records.tables import issued_cards_table
from tests.helpers.store_queries import add_audit, list_feedback

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
SINCE = NOW - timedelta(days=1)
UNREACHABLE_PG = "postgresql://cds:s3cr3t-Pa55@127.0.0.1:1/test"


def issued(card_uuid: str, **overrides) -> dict:
    row = {
        "time": NOW - timedelta(hours=2),
        "site": "site-a",
        "service_id": "svc",
        "hook_instance": f"hook-{card_uuid}",
        "card_uuid": card_uuid,
        "user_id": "Practitioner/u1",
        "patient_id": "Patient/p1",
        "topic_system": "https://example.org/topics",
        "topic_code": "T1",
        "indicator": "warning",
    }
    row.update(overrides)
    return row


def item(card: str, at: datetime, outcome: str = "overridden") -> FeedbackItem:
    # The raw item differs per (card, outcome, time), so insert_feedback never dedupes two of them.
    stamp = at.isoformat()
    return FeedbackItem(
        card=card,
        outcome=outcome,
        outcome_timestamp=at,
        accepted_suggestions=("s-1",) if outcome == "accepted" else (),
        raw={"card": card, "outcome": outcome, "outcomeTimestamp": stamp},
    )


def overrides(store: Store, **kwargs) -> dict[str, Override]:
    query = {
        "site": "site-a",
        "service_id": "svc",
        "user_id": "Practitioner/u1",
        "patient_id": "Patient/p1",
        "topics": {"T1"},
        "since": SINCE,
    }
    query.update(kwargs)
    return store.recent_overrides(**query)


def record_issued(store: Store, rows: list[dict]) -> int:
    """Store issued cards as the service does: one call's records (`Store.add_calls`)."""
    return store.add_calls([Call(None, issued_cards=rows)])


def issued_card_uuids(store: Store) -> list[str]:
    table = issued_cards_table
    with store._engine.connect() as conn:
        return list(conn.execute(sa.select(table.c.card_uuid).order_by(table.c.id)).scalars())


def test_issued_cards_round_trip(store):
    rows = [issued("c1"), issued("c2", user_id=None, topic_code=None, indicator=None)]

    assert record_issued(store, rows) == 1  # one call, both cards

    with store._engine.connect() as conn:
        stored = [dict(r) for r in conn.execute(sa.select(issued_cards_table)).mappings()]
    assert [{k: v for k, v in r.items() if k != "id"} for r in stored] == rows
    assert stored[0]["time"].tzinfo is UTC
    assert store.add_calls([]) == 0
    assert issued_card_uuids(store) == ["c1", "c2"]


def test_override_is_found(store):
    record_issued(store, [issued("c1", indicator="critical")])
    at = NOW - timedelta(minutes=5)
    store.insert_feedback("site-a", "svc", [item("c1", at)])

    found = overrides(store)

    assert found == {"T1": Override(topic_code="T1", time=at, indicator="critical", card_uuid="c1")}
    assert found["T1"].time.tzinfo is UTC


def test_accepted_feedback_is_not_an_override(store):
    record_issued(store, [issued("c1"), issued("c2", indicator="info")])
    store.insert_feedback(
        "site-a",
        "svc",
        [item("c1", NOW - timedelta(hours=1)), item("c2", NOW, outcome="accepted")],
    )

    # The later, accepted card is not the answer; the earlier override is.
    assert overrides(store) == {
        "T1": Override("T1", NOW - timedelta(hours=1), "warning", "c1")
    }


def test_only_accepted_feedback_finds_nothing(store):
    record_issued(store, [issued("c1")])
    store.insert_feedback("site-a", "svc", [item("c1", NOW, outcome="accepted")])

    assert overrides(store) == {}


def test_since_is_inclusive_and_older_overrides_are_ignored(store):
    record_issued(store, [issued("old"), issued("edge", topic_code="T2")])
    store.insert_feedback(
        "site-a",
        "svc",
        [item("old", SINCE - timedelta(microseconds=1)), item("edge", SINCE)],
    )

    assert overrides(store, topics=["T1", "T2"]) == {"T2": Override("T2", SINCE, "warning", "edge")}
    assert set(overrides(store, topics=["T1", "T2"], since=SINCE - timedelta(seconds=1))) == {
        "T1",
        "T2",
    }
    # `since` is a point in time whatever its zone.
    eastern = (SINCE + timedelta(microseconds=1)).astimezone(timezone(timedelta(hours=-5)))
    assert overrides(store, topics=["T1", "T2"], since=eastern) == {}


@pytest.mark.parametrize(
    ("issued_as", "asked_as"),
    [
        ({"user_id": "Practitioner/u2"}, {"user_id": "Practitioner/u2"}),
        ({"patient_id": "Patient/p2"}, {"patient_id": "Patient/p2"}),
        ({"topic_code": "T2"}, {"topics": ["T2"]}),
    ],
    ids=["another-user", "another-patient", "another-topic"],
)
def test_override_about_another_user_patient_or_topic_is_not_matched(store, issued_as, asked_as):
    record_issued(store, [issued("c1", **issued_as)])
    store.insert_feedback("site-a", "svc", [item("c1", NOW)])

    assert overrides(store) == {}
    # The same override is found when asked about its own user / patient / topic.
    assert [o.card_uuid for o in overrides(store, **asked_as).values()] == ["c1"]


@pytest.mark.parametrize(
    "elsewhere",
    [{"site": "site-b"}, {"service_id": "svc-2"}],
    ids=["another-site", "another-service"],
)
def test_override_at_another_site_or_service_is_not_matched(store, elsewhere):
    where = {"site": "site-a", "service_id": "svc", **elsewhere}
    record_issued(store, [issued("c1", **where)])
    store.insert_feedback(where["site"], where["service_id"], [item("c1", NOW)])

    assert overrides(store) == {}
    assert [o.card_uuid for o in overrides(store, **where).values()] == ["c1"]


@pytest.mark.parametrize(
    ("site", "service_id"), [("site-b", "svc"), ("site-a", "svc-2")], ids=["site", "service"]
)
def test_feedback_joins_the_card_of_its_own_site_and_service(store, site, service_id):
    # Card ids need not be globally unique (Epic sends "123456"): feedback from another site or
    # service about a card with the same id is not an override of ours.
    record_issued(store, [issued("123456")])
    store.insert_feedback(site, service_id, [item("123456", NOW)])

    assert overrides(store) == {}
    store.insert_feedback("site-a", "svc", [item("123456", NOW - timedelta(hours=1))])
    assert overrides(store) == {"T1": Override("T1", NOW - timedelta(hours=1), "warning", "123456")}


def test_feedback_for_a_card_never_issued_is_ignored(store):
    record_issued(store, [issued("c1")])
    store.insert_feedback("site-a", "svc", [item("ghost", NOW)])

    assert overrides(store) == {}
    store.insert_feedback("site-a", "svc", [item("c1", NOW - timedelta(hours=3))])
    assert [o.card_uuid for o in overrides(store).values()] == ["c1"]


def test_latest_override_per_topic_for_several_topics_in_one_query(store):
    record_issued(
        store,
        [
            issued("t1-a", indicator="info"),
            issued("t1-b", indicator="critical"),
            issued("t1-c", indicator="warning"),
            issued("t2-a", topic_code="T2", indicator="warning"),
            issued("t2-b", topic_code="T2", indicator="info"),
            issued("t3-a", topic_code="T3"),
        ]
    )
    # Inserted out of time order; t1-a is overridden twice (the later one counts).
    store.insert_feedback(
        "site-a",
        "svc",
        [
            item("t1-b", NOW - timedelta(hours=3)),
            item("t1-a", NOW - timedelta(minutes=10)),
            item("t1-c", NOW - timedelta(hours=1)),
            item("t1-a", NOW - timedelta(hours=5)),
            item("t2-b", NOW - timedelta(hours=2)),
            item("t2-a", NOW - timedelta(hours=4)),
            item("t3-a", NOW, outcome="accepted"),
        ],
    )
    statements: list[str] = []

    def count(conn, cursor, statement, *args):
        if "card_overrides" in statement or "issued_cards" in statement:
            statements.append(statement)

    engines = [store._engine, *([store._lookups.engine] if store._lookups else [])]
    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", count)
    # SQLite's lookup runs on the driver's connection (`DriverLookup`): SQLite's own trace.
    driver = store._lookups.get().connection.dbapi_connection if store._lookups else None
    if driver is not None:
        driver.set_trace_callback(lambda statement: count(None, None, statement))
    try:
        found = overrides(store, topics=("T1", "T2", "T3", "T4"))
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", count)
        if driver is not None:
            driver.set_trace_callback(None)

    assert found == {
        "T1": Override("T1", NOW - timedelta(minutes=10), "info", "t1-a"),
        "T2": Override("T2", NOW - timedelta(hours=2), "info", "t2-b"),
    }
    # One indexed read of the overrides: never a scan of every card issued to this user for
    # this patient, which grows with each chart opening.
    assert len(statements) == 1 and "issued_cards" not in statements[0]
    assert overrides(store, topics=["T2"]) == {"T2": found["T2"]}


def test_an_override_of_another_topic_never_stands_in(store):
    # Topics are picked from the rows of this user and patient after the query: a newer
    # override of another topic must neither suppress nor hide the one asked about.
    record_issued(store, [issued("t1", indicator="info"), issued("t2", topic_code="T2"),
                          issued("t1-old", indicator="critical"),
                          issued("none", topic_code=None)])
    store.insert_feedback("site-a", "svc", [
        item("t1", NOW - timedelta(hours=2)), item("t1-old", NOW - timedelta(hours=3)),
        item("t2", NOW - timedelta(minutes=1)), item("none", NOW)])

    assert overrides(store, topics={"T1"}) == {
        "T1": Override("T1", NOW - timedelta(hours=2), "info", "t1")}
    assert overrides(store, topics=["T2"]) == {
        "T2": Override("T2", NOW - timedelta(minutes=1), "warning", "t2")}
    assert overrides(store, topics=("T3",)) == {}
    assert set(overrides(store, topics=iter(["T1", "T2", "T3"]))) == {"T1", "T2"}


def test_two_overrides_of_a_topic_at_one_time_the_later_stored_counts(store):
    record_issued(store, [issued("first", indicator="critical"), issued("second")])
    at = NOW - timedelta(hours=1)
    store.insert_feedback("site-a", "svc", [item("first", at)])
    store.insert_feedback("site-a", "svc", [item("second", at)])

    assert overrides(store) == {"T1": Override("T1", at, "warning", "second")}


def test_sqlite_lookup_keeps_one_connection_per_thread_and_no_read_open(sqlite_store_url):
    import threading

    with Store(sqlite_store_url) as store:
        record_issued(store, [issued("c1")])
        store.insert_feedback("site-a", "svc", [item("c1", NOW)])
        assert set(overrides(store)) == {"T1"}
        conn = store._lookups._local.conn
        assert set(overrides(store)) == {"T1"} and store._lookups._local.conn is conn
        others: list = []
        thread = threading.Thread(target=lambda: others.append(overrides(store)))
        thread.start()
        thread.join()
        assert set(others[0]) == {"T1"} and len(store._lookups._open) == 2

        # Nothing pinned: with the lookup connections idle, a checkpoint empties the WAL.
        record_issued(store, [issued("c2")])
        with store._engine.connect() as other:
            busy, _, _ = other.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        assert busy == 0

        # Opened in another process (before a fork): left alone, never used here.
        store._lookups._local.pid = -1
        assert set(overrides(store)) == {"T1"}
        assert store._lookups._local.conn is not conn and not conn.closed

        # An invalidated connection reconnects to a new driver connection on its next use
        # (a driver error drops it instead: test_sqlite_driver_lookup_error_is_store_unavailable).
        kept = store._lookups._local.conn
        old_driver = kept.connection.dbapi_connection
        kept.invalidate()
        assert set(overrides(store)) == {"T1"}
        assert store._lookups._local.conn is kept
        assert kept.connection.dbapi_connection is not old_driver
        opened = list(store._lookups._open.values())
    assert opened and all(c.closed for c in opened)
    # Closed: a lookup still answers, on a pooled connection it returns.
    assert set(overrides(store)) == {"T1"} and not store._lookups._open
    conn.close()


def test_empty_topics_finds_nothing(store):
    record_issued(store, [issued("c1")])
    store.insert_feedback("site-a", "svc", [item("c1", NOW)])

    assert overrides(store, topics=[]) == {}
    assert overrides(store, topics=set()) == {}
    assert set(overrides(store)) == {"T1"}


def test_empty_inputs_never_touch_the_database():
    store = Store(UNREACHABLE_PG)
    try:
        assert store.add_calls([]) == 0
        assert overrides(store, topics=()) == {}
        for call in (
            lambda: record_issued(store, [issued("c1")]),
            lambda: overrides(store),
        ):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert "s3cr3t" not in str(info.value)
    finally:
        store.dispose()


def test_naive_since_is_rejected(store):
    with pytest.raises(ValueError, match="timezone-aware"):
        overrides(store, since=datetime(2025, 6, 1))


def audit_at(time: datetime) -> AuditRecord:
    return AuditRecord(kind="invoke", time=time, status=200)


def test_purge_removes_old_issued_cards(store):
    cutoff = NOW - timedelta(days=365)
    record_issued(
        store,
        [
            issued("ancient", time=cutoff - timedelta(days=400)),
            issued("just-old", time=cutoff - timedelta(microseconds=1)),
            issued("at-cutoff", time=cutoff),
            issued("new", time=NOW),
        ]
    )
    add_audit(store, audit_at(cutoff - timedelta(days=1)))
    add_audit(store, audit_at(NOW))

    # The return value still counts audit rows only.
    assert store.purge_audit(cutoff) == 1
    assert issued_card_uuids(store) == ["at-cutoff", "new"]
    assert len(list(store.iter_audit())) == 1
    assert store.purge_audit(cutoff) == 0
    assert issued_card_uuids(store) == ["at-cutoff", "new"]


def test_purge_removes_old_issued_cards_in_batches(store, monkeypatch):
    monkeypatch.setattr(store_module, "AUDIT_PURGE_BATCH", 3)
    record_issued(
        store,
        [issued(f"old-{i}", time=NOW - timedelta(days=30, minutes=i)) for i in range(10)]
    )
    record_issued(store, [issued("new", time=NOW)])
    batches: list[str] = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("DELETE FROM ISSUED_CARDS"):
            batches.append(statement)

    sa.event.listen(store._engine, "before_cursor_execute", count)
    try:
        assert store.purge_audit(NOW - timedelta(days=1)) == 0
    finally:
        sa.event.remove(store._engine, "before_cursor_execute", count)

    assert issued_card_uuids(store) == ["new"]
    assert len(batches) == 4  # 3 + 3 + 3 + 1


def test_an_override_stored_before_its_card_is_recorded_still_counts(store):
    # Epic's feedback reached another worker or host before this one wrote the issued card.
    store.insert_feedback("site-a", "svc", [item("c1", NOW - timedelta(minutes=5))])
    assert overrides(store, topics=("T1",)) == {}
    record_issued(store, [issued("c1", indicator="warning")])
    assert overrides(store, topics=("T1",)) == {
        "T1": Override("T1", NOW - timedelta(minutes=5), "warning", "c1")}
    record_issued(store, [issued("c2")])  # a later card of the same topic adds nothing
    assert list(overrides(store, topics=("T1",)).values())[0].card_uuid == "c1"


def test_each_override_is_one_row_whatever_is_stored_first(store):
    # `cds-service suppressions clear` deletes rows by id: a second row for one override would
    # go on suppressing after the operator cleared the first.
    store.insert_feedback("site-a", "svc", [item("c1", NOW - timedelta(hours=1))])
    record_issued(store, [issued("c1")])  # the card second: its override recorded now
    store.insert_feedback("site-a", "svc", [  # a new override of the same card, and a repeat
        item("c1", NOW - timedelta(minutes=30)), item("c1", NOW - timedelta(hours=1))])
    record_issued(store, [issued("c2")])  # another card of this site and service

    rows = store.list_overrides(since=SINCE)
    assert sorted(row["time"] for row in rows) == [NOW - timedelta(hours=1),
                                                   NOW - timedelta(minutes=30)]



def test_an_override_counts_when_its_card_and_feedback_are_stored_at_the_same_moment(
        store_url, monkeypatch):
    """Host A's writer stores the card while host B stores the clinician's override of it. With
    A's transaction past its override step and not yet committed, B's feedback must not commit
    without the override: it waits for A's commit and records it then (PostgreSQL: an advisory
    lock; SQLite: BEGIN IMMEDIATE)."""
    import threading

    real_step = store_module.overrides_stored_first
    stepped, go = threading.Event(), threading.Event()

    def step_then_wait(conn, issued_rows):
        real_step(conn, issued_rows)
        stepped.set()
        go.wait(5)  # A's transaction stays open here, before its commit

    monkeypatch.setattr(store_module, "overrides_stored_first", step_then_wait)
    with Store(store_url) as host_a, Store(store_url) as host_b:
        host_a._ensure_schema()
        writer = threading.Thread(target=record_issued, args=(host_a, [issued("c1")]))
        writer.start()
        assert stepped.wait(10)
        override = item("c1", NOW - timedelta(minutes=30))
        feedback = threading.Thread(target=host_b.insert_feedback,
                                    args=("site-a", "svc", [override]), kwargs={"received_at": NOW})
        feedback.start()
        feedback.join(1.0)  # B's chance to commit without A's card, if nothing makes it wait
        go.set()
        writer.join(10)
        feedback.join(10)
        assert not writer.is_alive() and not feedback.is_alive()
        assert overrides(host_a, since=NOW - timedelta(days=1)) == {
            "T1": Override("T1", NOW - timedelta(minutes=30), "warning", "c1")}

# The suppression window starts at the outcome timestamp, at the latest when we received the
# feedback: the EHR's clock can neither push it later nor, by delivering late, restart it.
@pytest.mark.parametrize(("stamped", "starts"), [
    (NOW + timedelta(minutes=4), NOW),                    # ahead of our clock, within the skew
    (NOW - timedelta(hours=3), NOW - timedelta(hours=3)),  # delivered three hours late
    (NOW, NOW),
], ids=["ahead", "late", "on-time"])
@pytest.mark.parametrize("card_first", [True, False], ids=["card-first", "feedback-first"])
def test_override_time_is_the_outcome_timestamp_at_the_latest_its_receipt(store, stamped, starts,
                                                                          card_first):
    if card_first:
        record_issued(store, [issued("c1")])
    store.insert_feedback("site-a", "svc", [item("c1", stamped)], received_at=NOW)
    if not card_first:
        record_issued(store, [issued("c1")])

    assert overrides(store, since=NOW - timedelta(days=1)) == {
        "T1": Override("T1", starts, "warning", "c1")}
    [row] = list_feedback(store)
    assert (row["outcome_timestamp"], row["received_at"]) == (stamped, NOW)


def test_suppressions_list_and_clear_commands(store, store_url, tmp_path, monkeypatch, capsys):
    from cds_service.cli import main
    from cds_service.records.tables import overrides_table

    now = datetime.now(UTC)
    (tmp_path / "a.yaml").write_text("site: site-a\nalert_fatigue:\n  override_window_hours: 2\n",
                                     encoding="utf-8")
    (tmp_path / "b.yaml").write_text("site: site-b\n", encoding="utf-8")  # 24 h by default
    recorded = [  # (site, user, patient, topic, hours ago); in force while within the window
        ("site-a", "u1", "p1", "T1", 1),
        ("site-a", "u1", "p1", "T2", 3),
        ("site-b", "u2", "p2", "T1", 20),
        ("site-b", "u1", "p2", "T1", 30),
        ("site-b", "u3", "p3", "T3", 5),
    ]
    with store._engine.begin() as conn:
        conn.execute(sa.insert(overrides_table), [
            {"time": now - timedelta(hours=hours), "site": site, "service_id": "svc",
             "user_id": user, "patient_id": patient, "topic_code": topic, "indicator": "warning",
             "card_uuid": f"card-{site}-{topic}-{hours}"}
            for site, user, patient, topic, hours in recorded])
    monkeypatch.setenv("CDS_DATABASE_URL", store_url)
    monkeypatch.setenv("CDS_SITE_CONFIG", str(tmp_path))

    def suppressions(*args: str) -> str:
        assert main(["suppressions", *args]) == 0
        return capsys.readouterr().out

    listed = [json.loads(line) for line in suppressions("list", "--format", "jsonl").splitlines()]
    assert [(r["site"], r["user_id"], r["topic_code"]) for r in listed] == [
        ("site-b", "u2", "T1"), ("site-b", "u3", "T3"), ("site-a", "u1", "T1")]
    expires = {r["card_uuid"]: datetime.fromisoformat(r["expires"]) for r in listed}
    assert expires["card-site-a-T1-1"] == now + timedelta(hours=1)
    assert expires["card-site-b-T1-20"] == now + timedelta(hours=4)

    header, *rows = suppressions("list", "--user", "u1").splitlines()
    assert header.split()[:3] == ["time", "expires", "site"]
    assert [row.split()[2:8] for row in rows] == [["site-a", "svc", "u1", "p1", "T1", "warning"]]

    assert suppressions("clear", "--patient", "p2") == "cleared 1 suppression(s)\n"
    assert main(["suppressions", "clear"]) == 2  # everyone's, only when asked for
    assert "or give --all" in capsys.readouterr().err
    assert suppressions("clear", "--site", "site-a", "--user", "u1") == \
        "cleared 1 suppression(s)\n"
    assert suppressions("list", "--format", "jsonl").count("\n") == 1
    assert suppressions("clear", "--all") == "cleared 1 suppression(s)\n"
    assert main(["suppressions", "list"]) == 0
    assert capsys.readouterr().err == "no suppressions in force\n"
    # Expired overrides are left for the retention purge; they suppress nothing either way.
    assert len(store.list_overrides(since=now - timedelta(days=2))) == 2


def test_sqlite_driver_lookup_answers_as_sqlalchemy_does(sqlite_store_url):
    # The SQLite lookup runs RECENT_OVERRIDES on the driver's connection: the same rows, values
    # and order as SQLAlchemy's execution of it, times included (aware UTC, microseconds).
    from cds_service.records.overrides import RECENT_OVERRIDES

    with Store(sqlite_store_url) as store:
        record_issued(store, [issued(f"c{i}", topic_code=f"T{i % 3}" if i % 4 else None,
                                     indicator=("info", "warning", "critical")[i % 3])
                              for i in range(12)])
        for i in range(12):
            at = NOW - timedelta(hours=i % 5, microseconds=137 * i)
            store.insert_feedback("site-a", "svc", [item(f"c{i}", at)])
        params = {"site": "site-a", "service_id": "svc", "user_id": "Practitioner/u1",
                  "patient_id": "Patient/p1", "since": NOW - timedelta(hours=3)}
        with store._engine.connect() as conn:
            expected = [tuple(row) for row in conn.execute(RECENT_OVERRIDES, params)]
        got = store._lookup_rows(params)
        assert len(expected) == 8 and got == expected
        assert all(row[1].tzinfo is UTC for row in got)
        assert got == store._lookup_rows(params)  # the thread's kept connection, again
        assert store._lookup_rows({**params, "since": NOW + timedelta(seconds=1)}) == []


def test_sqlite_driver_lookup_error_is_store_unavailable(sqlite_store_url, monkeypatch):
    with Store(sqlite_store_url) as store:
        overrides(store)
        monkeypatch.setattr(store._driver_lookup, "sql", "SELECT * FROM no_such_table")
        with pytest.raises(StoreUnavailable, match="no such table"):
            overrides(store)
        assert store._lookups._local.conn is None  # dropped; the next lookup opens another
