"""The call records' inserts on SQLite's own connection (`records.driver.DriverInsert`) store what
SQLAlchemy's `insert()` stores: the same text, numbers and NULLs, and the same errors."""

from __future__ import annotations

import json
import math
import random
import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from cds_service.records.database import create_engine, create_schema, normalize_url
from cds_service.records.driver import DriverInsert
from cds_service.records.tables import (
    JsonText,
    UtcDateTime,
    audit_log_table,
    issued_cards_table,
    predictions_table,
)

TABLES = (audit_log_table, issued_cards_table, predictions_table)
TEXTS = ("", "plain", "naïve café", "日本語", "quote ' and \" and \\", "line\nbreak", "x" * 300)
JSON_VALUES = ([], ["a", "b"], {"k": [1, 2.5, None, True]}, {"é": "ü", "n": {"deep": [[]]}},
               [1e300, -0.0, 12345678901234567890], "text")


def _value(column: sa.Column, rng: random.Random):
    if column.nullable and rng.random() < 0.2:
        return None
    kind = column.type
    if isinstance(kind, UtcDateTime):
        zone = rng.choice([UTC, timezone(timedelta(hours=-5)),
                           timezone(timedelta(hours=5, minutes=30))])
        return datetime(2026, 1, 1, tzinfo=UTC).astimezone(zone) + timedelta(
            seconds=rng.randrange(10**8), microseconds=rng.randrange(10**6))
    if isinstance(kind, JsonText):
        return rng.choice(JSON_VALUES)
    if isinstance(kind, sa.Float):
        return rng.choice([0.0, 0.125, 1 / 3, 99.5, 1e-9])
    if isinstance(kind, sa.Integer):
        return rng.choice([100, 200, 412, 599])
    return rng.choice(TEXTS)


def _rows(table: sa.Table, rng: random.Random, n: int) -> list[dict]:
    """Rows of every column but `id`; some leave out a nullable column (another set of keys)."""
    rows = []
    for _ in range(n):
        row = {c.name: _value(c, rng) for c in table.columns if c.name != "id"}
        for column in table.columns:
            if column.nullable and column.name != "id" and rng.random() < 0.1:
                row.pop(column.name)
        rows.append(row)
    return rows


def _stored(url: str, table: sa.Table) -> list[tuple]:
    """The raw stored rows but their ids (rows with one set of keys go in together), sorted."""
    columns = ", ".join(c.name for c in table.columns if c.name != "id")
    with sqlite3.connect(normalize_url(url).database) as conn:
        rows = conn.execute(f"SELECT {columns} FROM {table.name}").fetchall()  # noqa: S608 - test tables
    return sorted(rows, key=repr)


@pytest.fixture
def two_databases(tmp_path):
    engines = []
    for name in ("driver", "sqlalchemy"):
        engine = create_engine(normalize_url(f"sqlite:///{tmp_path / name}.sqlite3"))
        with engine.begin() as conn:
            create_schema(conn)
        engines.append(engine)
    yield engines
    for engine in engines:
        engine.dispose()


def _insert_by_driver(engine, table, rows):
    by_keys: dict[frozenset, list] = {}
    for row in rows:
        by_keys.setdefault(frozenset(row), []).append(row)
    with engine.begin() as conn:
        for keys, same in by_keys.items():
            DriverInsert(table, keys, conn.dialect).run(conn.connection.dbapi_connection, same)


def _insert_by_sqlalchemy(engine, table, rows):
    with engine.begin() as conn:
        for row in rows:  # one by one: executemany wants one set of keys
            conn.execute(sa.insert(table), [row])


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_the_driver_stores_what_sqlalchemy_stores(two_databases, table):
    rows = _rows(table, random.Random(table.name), 400)  # noqa: S311 - test data
    driver, alchemy = two_databases
    _insert_by_driver(driver, table, rows)
    _insert_by_sqlalchemy(alchemy, table, rows)

    stored = _stored(str(driver.url), table)
    assert len(stored) == len(rows)
    assert stored == _stored(str(alchemy.url), table)


def test_stored_values_read_back_as_written(two_databases):
    # The oracle above is SQLAlchemy; this one is the values themselves, through the table types.
    driver, _ = two_databases
    when = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-5)))
    row = {"time": when, "site": "s", "service_id": "svc", "hook_instance": "h", "role": "active",
           "model_id": "m", "model_version": "1", "sha256": "0" * 64, "output": "risk",
           "score": 1 / 3, "indicator": None, "unavailable": None, "missing": ["uacr"],
           "imputed": {"age": 60}, "contributions": [{"feature": "égfr", "value": -0.25}]}
    _insert_by_driver(driver, predictions_table, [row])
    with driver.connect() as conn:
        back = conn.execute(sa.select(predictions_table)).mappings().one()
    assert back["time"] == when and back["time"].tzinfo == UTC
    assert back["score"] == 1 / 3 and back["indicator"] is None
    assert (back["missing"], back["imputed"], back["contributions"]) == (
        ["uacr"], {"age": 60}, [{"feature": "égfr", "value": -0.25}])


def test_json_columns_are_written_as_json_dumps_writes_them():
    column = JsonText()
    dialect = sa.create_engine("sqlite://").dialect
    for value in (*JSON_VALUES, {"nan": math.nan, "inf": -math.inf}, {"z": 1, "a": 2}):
        assert column.process_bind_param(value, dialect) == json.dumps(
            value, ensure_ascii=True, separators=(",", ":"))


def test_the_driver_raises_what_sqlalchemy_raises(two_databases):
    driver, alchemy = two_databases
    row = {"time": datetime(2026, 1, 1, tzinfo=UTC), "kind": "invoke", "status": 200,
           "prefetch_keys_used": None,  # NOT NULL
           "fhir_urls_fetched": [], "card_uuids": [], "suggestion_uuids": [], "feedback_cards": []}
    with pytest.raises(sa_exc.IntegrityError) as by_driver:
        _insert_by_driver(driver, audit_log_table, [row])
    with pytest.raises(sa_exc.IntegrityError) as by_sqlalchemy:
        _insert_by_sqlalchemy(alchemy, audit_log_table, [row])
    assert str(by_driver.value.orig) == str(by_sqlalchemy.value.orig)
    assert by_driver.value.hide_parameters and "prefetch_keys_used" in str(by_driver.value)

    # A database another connection holds locked: OperationalError, which the store reports as
    # unavailable (its callers keep the records and retry).
    blocker = sqlite3.connect(driver.url.database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with driver.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            dbapi.execute("PRAGMA busy_timeout = 0")
            with pytest.raises(sa_exc.OperationalError, match="locked"):
                DriverInsert(audit_log_table, ["kind"], conn.dialect).run(dbapi, [{"kind": "x"}])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
