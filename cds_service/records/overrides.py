"""Card overrides: the `card_overrides` rows written when an override or the card it names is
stored (whichever comes second), and the lookup alert-fatigue suppression runs on every call that
has cards (`Store.recent_overrides`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cds_service.records import driver
from cds_service.records.feedback import OVERRIDDEN
from cds_service.records.tables import (
    UtcDateTime,
    feedback_table,
    issued_cards_table,
    overrides_table,
)


@dataclass(frozen=True)
class Override:
    """The latest override of an issued card on one topic (see `Store.recent_overrides`)."""

    topic_code: str
    time: datetime  # outcome timestamp, at the latest when received (record_overrides); UTC
    indicator: str | None  # the overridden card's indicator, as issued
    card_uuid: str


def _insert_overrides(by_feedback_key: bool) -> sa.Insert:
    """`record_overrides`'s statement, built once (it runs in every transaction of call records):
    the site, service, cards and feedback keys are bound parameters, the lists expanding."""
    f, c = feedback_table.c, issued_cards_table.c
    override_time = sa.case((f.outcome_timestamp < f.received_at, f.outcome_timestamp),
                            else_=f.received_at)
    query = (
        sa.select(override_time, c.site, c.service_id, c.user_id, c.patient_id,
                  c.topic_code, c.indicator, c.card_uuid)
        .select_from(feedback_table.join(issued_cards_table, sa.and_(
            c.card_uuid == f.card, c.site == f.site, c.service_id == f.service_id)))
        .where(f.site == sa.bindparam("site"), f.service_id == sa.bindparam("service_id"),
               f.outcome == OVERRIDDEN, f.card.in_(sa.bindparam("cards", expanding=True)))
    )
    if by_feedback_key:
        query = query.where(f.dedupe_key.in_(sa.bindparam("feedback_keys", expanding=True)))
    o = overrides_table.c
    return sa.insert(overrides_table).from_select(
        [o.time, o.site, o.service_id, o.user_id, o.patient_id, o.topic_code, o.indicator,
         o.card_uuid], query)


_INSERT_OVERRIDES = {False: _insert_overrides(False), True: _insert_overrides(True)}

# pg_advisory_xact_lock key taken by every transaction that records overrides (see
# `record_overrides`); any constant unused elsewhere (database.py holds the schema's).
_PG_OVERRIDES_LOCK_KEY = 0x0CD5_0FE2_1DE5
_TAKE_TURN = sa.select(sa.func.pg_advisory_xact_lock(_PG_OVERRIDES_LOCK_KEY))


def record_overrides(conn: Connection, site: str, service_id: str, cards: Collection[str], *,
                     feedback_keys: Collection[str] | None = None) -> None:
    """`card_overrides` rows for the overrides (only `feedback_keys`, when given) of the cards
    `cards` this site and service issued, joined and inserted in one statement. Feedback for a
    card never recorded as issued cannot suppress anything.

    The override's time, where the suppression window starts, is the EHR's `outcomeTimestamp`
    but never later than we received the feedback: a timestamp ahead of our clock (skew, within
    feedback.MAX_CLOCK_SKEW) does not stretch the window, and feedback delivered late (the EHR
    retrying after an outage) does not restart it. Either way the card comes back sooner, never
    later, than the clinician's override implies.
    """
    # The card and its feedback are often stored at the same moment, by different hosts: the
    # writer of the host that answered, and the host Epic's feedback reached. Under PostgreSQL's
    # READ COMMITTED, two such transactions in flight at once each miss the other's row, and
    # neither records the override (write skew): the card would not be suppressed. This lock,
    # held until commit, makes them take turns, and the statement after it reads what the other
    # committed. SQLite writes already take turns (BEGIN IMMEDIATE).
    if conn.dialect.name == "postgresql":
        conn.execute(_TAKE_TURN)
    params = {"site": site, "service_id": service_id, "cards": sorted(cards)}
    if feedback_keys is not None:
        params["feedback_keys"] = sorted(feedback_keys)
    conn.execute(_INSERT_OVERRIDES[feedback_keys is not None], params)


def overrides_stored_first(conn: Connection, issued: Sequence[dict[str, Any]]) -> None:
    """Overrides stored before the card they name was recorded: issued cards are written after
    the answer (by whichever worker or host issued them) while Epic's feedback lands anywhere,
    so whichever of the two is stored second records the override."""
    scopes: dict[tuple[str, str], set[str]] = {}
    for row in issued:
        scopes.setdefault((row["site"], row["service_id"]), set()).add(row["card_uuid"])
    for (site, service_id), cards in scopes.items():
        record_overrides(conn, site, service_id, cards)


def _recent_overrides_query() -> sa.Select:
    """`Store.recent_overrides`, built once (it runs on every call that has cards): every topic;
    the caller keeps those it asked for. The four equalities leave a handful of rows (one per
    override this clinician made for this patient within the window), and without an expanding
    `IN` the compiled statement is cached whole instead of rendered on each call."""
    o = overrides_table.c
    return (
        sa.select(o.topic_code, o.time, o.indicator, o.card_uuid)
        .where(
            o.site == sa.bindparam("site"),
            o.service_id == sa.bindparam("service_id"),
            o.user_id == sa.bindparam("user_id"),
            o.patient_id == sa.bindparam("patient_id"),
            o.time >= sa.bindparam("since", type_=UtcDateTime),
        )
        # Newest first; ids break ties so the answer is deterministic.
        .order_by(o.time.desc(), o.id.desc())
    )


RECENT_OVERRIDES = _recent_overrides_query()


class DriverLookup:
    """`RECENT_OVERRIDES` as SQLAlchemy compiles it for `dialect` (SQLite), run on the driver's
    own connection with SQLAlchemy's own bind and result processors (`driver`): the same SQL,
    parameters and values, without the execution layer around them (about 60 of its 75 µs per
    call here)."""

    def __init__(self, dialect: sa.Dialect):
        compiled = RECENT_OVERRIDES.compile(dialect=dialect)
        self.sql = str(compiled)
        self.params = driver.bind_processors(compiled, dialect)
        self.results = driver.result_processors(RECENT_OVERRIDES.selected_columns, dialect)
        self.dialect = dialect

    def rows(self, dbapi_connection: Any, params: Mapping[str, Any]) -> list[tuple]:
        try:
            fetched = dbapi_connection.execute(self.sql, driver.bound(self.params, params)
                                               ).fetchall()
        except sqlite3.Error as exc:
            raise driver.wrapped(exc, self.sql, self.dialect) from exc
        return [tuple(value if process is None else process(value)
                      for value, process in zip(row, self.results, strict=True))
                for row in fetched]
