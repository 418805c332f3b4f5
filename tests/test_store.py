"""Feedback storage on SQLite and on the local PostgreSQL (both for real; see
tests/helpers/storage.py)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from cds_service.protocol.errors import ConfigError
from cds_service.records.call import Call
from cds_service.records.database import StoreUnavailable, redacted_url
from cds_service.records.feedback import FeedbackItem, FeedbackRequestSchema
from cds_service.records.store import Store
from tests.conftest import example
from tests.helpers.store_queries import list_feedback, list_predictions

EXAMPLE_FILES = [
    "cdshooks-2.0-feedback-accepted.json",
    "cdshooks-2.0-feedback-overridden-no-reason.json",
    "cdshooks-2.0-feedback-overridden-with-reason.json",
    "epic-feedback-accepted.json",
    "epic-feedback-overridden-with-reason.json",
    "epic-feedback-overridden-with-extension.json",
]
UNREACHABLE_PG = "postgresql://cds:s3cr3t-Pa55@127.0.0.1:1/test"


def example_items() -> list[FeedbackItem]:
    items = []
    for name in EXAMPLE_FILES:
        items.extend(FeedbackRequestSchema().load(example(name)))
    return items


def make_items(n: int, prefix: str = "card") -> list[FeedbackItem]:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    return [
        FeedbackItem(
            card=f"{prefix}-{i}",
            outcome="overridden",
            outcome_timestamp=base + timedelta(seconds=i),
            user_comment="ß✓ non-ASCII",
            raw={"card": f"{prefix}-{i}", "outcome": "overridden", "n": i},
        )
        for i in range(n)
    ]


def test_add_and_list(store):
    items = example_items()

    assert len(store.insert_feedback("site-a", "diabetes", items)) == len(items) == 6

    rows = list_feedback(store)
    assert [r["card"] for r in rows] == [i.card for i in items]
    epic_ext = rows[5]
    assert epic_ext["site"] == "site-a"
    assert epic_ext["service_id"] == "diabetes"
    assert epic_ext["outcome"] == "overridden"
    assert epic_ext["outcome_timestamp"] == datetime(2022, 5, 19, 19, 44, 4, tzinfo=UTC)
    assert epic_ext["outcome_timestamp"].tzinfo is UTC
    assert (epic_ext["override_code"], epic_ext["override_system"]) == ("45", None)
    assert epic_ext["override_display"] == "Does not meet criteria"
    assert epic_ext["user_comment"] == "User Entered Free Text"
    assert epic_ext["override_extension"] == items[5].override_extension
    assert epic_ext["raw"] == items[5].raw
    assert epic_ext["warnings"] == []
    assert epic_ext["dedupe_key"] == items[5].dedupe_key("site-a", "diabetes")
    assert abs(datetime.now(UTC) - epic_ext["received_at"]) < timedelta(minutes=1)
    assert rows[0]["accepted_suggestions"] == ["e56e1945-20b3-4393-8503-a1a20fd73152"]
    assert rows[2]["override_system"] == "https://example.com/cds-hooks/override-reason-system"
    assert rows[2]["override_display"] is None


def test_list_filters(store):
    store.insert_feedback("site-a", "svc-1", make_items(3, "a"))
    store.insert_feedback("site-b", "svc-1", make_items(2, "b"))
    store.insert_feedback("site-a", "svc-2", make_items(1, "a"))

    assert len(list_feedback(store)) == 6
    assert len(list_feedback(store, site="site-a")) == 4
    assert len(list_feedback(store, service_id="svc-1")) == 5
    assert [r["card"] for r in list_feedback(store, site="site-a", service_id="svc-1")] == [
        "a-0",
        "a-1",
        "a-2",
    ]
    [row] = list_feedback(store, site="site-a", service_id="svc-2", card="a-0")
    assert row["user_comment"] == "ß✓ non-ASCII"
    assert list_feedback(store, card="nope") == []


def test_replay_across_calls_is_stored_once(store):
    items = example_items()
    store.insert_feedback("site-a", "svc", items)

    assert len(store.insert_feedback("site-a", "svc", items)) == 0
    assert len(store.insert_feedback("site-a", "svc", [*items, *make_items(1)])) == 1
    assert len(list_feedback(store)) == 7


def test_replay_within_a_batch_is_stored_once(store):
    a, b = make_items(2)

    assert len(store.insert_feedback("site-a", "svc", [a, b, a, a, b])) == 2
    assert [r["card"] for r in list_feedback(store)] == ["card-0", "card-1"]


def test_same_item_for_another_site_or_service_is_distinct(store):
    items = make_items(1)
    store.insert_feedback("site-a", "svc", items)

    assert len(store.insert_feedback("site-b", "svc", items)) == 1
    assert len(store.insert_feedback("site-a", "svc-2", items)) == 1


def test_empty_batch(store):
    assert len(store.insert_feedback("site-a", "svc", [])) == 0


def test_large_batch(store):
    assert len(store.insert_feedback("site-a", "svc", make_items(1500))) == 1500
    assert len(store.insert_feedback("site-a", "svc", make_items(1500))) == 0
    assert len(list_feedback(store)) == 1500


def test_survives_restart(store_url):
    first = Store(store_url)
    first.insert_feedback("site-a", "svc", example_items())
    first.dispose()

    with Store(store_url) as second:
        rows = list_feedback(second)
        assert len(rows) == 6
        assert len(second.insert_feedback("site-a", "svc", example_items())) == 0


def test_sqlite_creates_directory_and_is_durable(sqlite_store_url):
    path = Path(sqlite_store_url.removeprefix("sqlite:///"))
    assert not path.parent.exists()

    with Store(sqlite_store_url) as store:
        store.insert_feedback("site-a", "svc", make_items(1))
        with store._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000

    # Committed to the file: visible to a plain connection that knows nothing of the Store.
    engine = sa.create_engine(sqlite_store_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM feedback").scalar() == 1
    engine.dispose()


def test_ping_ok(store):
    store.ping()


def test_ping_unreachable_fails_fast_without_password(caplog):
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cds_service.records.store"):
        store = Store(UNREACHABLE_PG)  # starts anyway; the outage is reported by ping
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.ping()
        with pytest.raises(StoreUnavailable):
            store.insert_feedback("site-a", "svc", make_items(1))
    finally:
        store.dispose()

    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "127.0.0.1:1" in message
    assert "***" in message
    assert "s3cr3t" not in message
    assert "s3cr3t" not in repr(store)
    assert caplog.records, "construction should log that the database is unavailable"
    assert "s3cr3t" not in caplog.text


def test_postgres_url_forms_use_psycopg(postgresql_store_url):
    for scheme in ("postgres://", "postgresql://", "postgresql+psycopg://"):
        url = scheme + postgresql_store_url.split("://", 1)[1]
        with Store(url) as store:
            store.ping()
            assert store.url.startswith("postgresql+psycopg://")
            assert store.dialect == "postgresql"


def test_postgres_tables_in_the_configured_schema(postgresql_store_url):
    with Store(postgresql_store_url) as store:
        store.insert_feedback("site-a", "svc", make_items(1))
        with store._engine.connect() as conn:
            schema = conn.exec_driver_sql(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'feedback'"
                " AND table_schema = current_schema()"
            ).scalar_one()
    assert schema.startswith("test_store_")


def test_postgres_concurrent_startup_creates_tables_once(postgresql_store_url):
    barrier = threading.Barrier(4)
    errors: list[Exception] = []
    stores: list[Store] = []

    def start() -> None:
        barrier.wait()
        try:
            stores.append(Store(postgresql_store_url))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        for s in stores:
            s.ping()
    finally:
        for s in stores:
            s.dispose()


def test_concurrent_sqlite_writers_lose_nothing(sqlite_store_url):
    stores = [Store(sqlite_store_url), Store(sqlite_store_url)]
    shared = make_items(5, "shared")  # every writer sends these: stored once
    barrier = threading.Barrier(4)
    errors: list[Exception] = []
    new_counts: list[int] = []

    def write(store: Store, writer: int) -> None:
        barrier.wait()
        try:
            for batch in range(20):
                items = make_items(5, f"w{writer}-b{batch}") + shared
                new_counts.append(len(store.insert_feedback("site-a", "svc", items)))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(stores[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert sum(new_counts) == 4 * 20 * 5 + 5
        rows = list_feedback(stores[0])
        assert len(rows) == 4 * 20 * 5 + 5
        assert len({r["dedupe_key"] for r in rows}) == len(rows)
    finally:
        for s in stores:
            s.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:p@h/db",
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql+psycopg2://u:p@h/db",
        "not a url",
    ],
)
def test_unsupported_urls_rejected(url):
    with pytest.raises(ConfigError) as info:
        Store(url)
    assert ":p@" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgres://u:p%40ss@h/db", "postgres://u:***@h/db"),
        (
            "postgresql://u@h/db?password=secret&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:////var/lib/cds/cds.db", "sqlite:////var/lib/cds/cds.db"),
        ("::not a url::", "<unparseable database URL>"),
    ],
)
def test_redacted_url(url, expected):
    assert redacted_url(url) == expected


def _prediction_row(hook_instance: str, role: str, model_id: str, score: float | None) -> dict:
    return {"time": datetime.now(UTC), "site": "s", "service_id": "kidney-risk",
            "hook_instance": hook_instance, "role": role, "model_id": model_id,
            "model_version": "1.0.0", "sha256": "a" * 64, "output": "risk_5y", "score": score,
            "indicator": "warning" if score else None,
            "unavailable": None if score else "missing uacr",
            "missing": [] if score else ["uacr"], "imputed": ["sbp"],
            "contributions": [{"name": "egfr", "contribution": 0.9}]}


def test_predictions_active_and_shadow_round_trip(store):
    # Stored as the service stores them: with their call's records (`Store.add_calls`).
    assert store.add_calls([Call(None, predictions=[
        _prediction_row("h1", "active", "kfre-4var", 0.2355),
        _prediction_row("h1", "shadow", "ckd-progression-lr", None),
        _prediction_row("h2", "active", "kfre-4var", 0.5),
    ])]) == 1
    rows = list_predictions(store, hook_instance="h1")
    assert [(r["role"], r["model_id"], r["score"]) for r in rows] == [
        ("active", "kfre-4var", 0.2355), ("shadow", "ckd-progression-lr", None)]
    assert rows[1]["missing"] == ["uacr"] and rows[1]["unavailable"] == "missing uacr"
    assert rows[0]["contributions"] == [{"name": "egfr", "contribution": 0.9}]
    assert rows[0]["time"].tzinfo is not None
    assert [r["hook_instance"] for r in list_predictions(store, role="active")] == ["h1", "h2"]
    assert store.add_calls([]) == 0
