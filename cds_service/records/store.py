"""The `Store`: feedback, the PHI-access audit log and calls' records (issued cards, predictions,
card overrides) on one database, SQLite or PostgreSQL (`cds_service.records.database`).

One `Store` per process (per gunicorn worker: create it in the app factory, after the fork, so no
pooled connection is shared between processes).

The audit log (`cds_service.records.audit`) is append-only: the store inserts, reads and purges by
age, and has no update. A deployment can enforce that in PostgreSQL by granting the service role
only INSERT, SELECT and DELETE on `audit_log`. `issued_cards` (the cards we issued, for
alert-fatigue suppression) is kept for the same retention and needs the same three privileges.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from cds_service.records.audit import TEXT_FIELDS, TUPLE_FIELDS
from cds_service.records.call import Call
from cds_service.records.database import (
    StoreUnavailable,
    ThreadConnections,
    create_engine,
    create_schema,
    normalize_url,
    redacted_url,
    scrub,
    url_secrets,
)
from cds_service.records.driver import DriverInsert
from cds_service.records.feedback import OVERRIDDEN, FeedbackItem
from cds_service.records.overrides import (
    RECENT_OVERRIDES,
    DriverLookup,
    Override,
    overrides_stored_first,
    record_overrides,
)
from cds_service.records.recorder import Recorder
from cds_service.records.tables import (
    audit_log_table,
    audit_row,
    call_records_table,
    feedback_table,
    issued_cards_table,
    overrides_table,
    predictions_table,
)

log = logging.getLogger(__name__)

# Store calls on the answer path (`Store.within`) run on this many threads per worker; when all
# are waiting on the database, further calls fail at once instead of queueing behind them.
BOUNDED_THREADS = 8

# Identifier columns `iter_audit` filters on: the record's text fields, less free text.
_AUDIT_FILTER_COLUMNS = (
    "kind", *(name for name in TEXT_FIELDS if name not in ("outcome", "detail")), "status",
)
# Rows deleted per purge transaction (audit_log and issued_cards): short write transactions, so
# request workers appending audit records never wait long on the SQLite write lock (busy timeout
# database.SQLITE_BUSY_TIMEOUT_MS).
AUDIT_PURGE_BATCH = 5_000

_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class Store:
    """Feedback and audit-log storage on one SQLAlchemy engine (SQLite file or PostgreSQL)."""

    def __init__(self, url: str, *, spool_dir: str | Path | None = None) -> None:
        """`spool_dir`: spool calls' records there before writing them (`cds_service.records.spool`,
        what a serving worker does); without it they are queued in memory (`Recorder`)."""
        self._url = normalize_url(url)
        self._secrets = url_secrets(self._url)
        self.url = redacted_url(self._url)
        self.dialect = self._url.get_backend_name()
        self._engine = create_engine(self._url)
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._slots = threading.BoundedSemaphore(BOUNDED_THREADS)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        # SQLite: each thread keeps one connection for the override lookup, which runs on every
        # call with cards (a pool checkout and its reset-on-return cost a third of the lookup).
        # Its own engine without a pool, so these never starve the pooled writers and readers.
        self._lookups = (ThreadConnections(create_engine(self._url, pooled=False))
                         if self.dialect == "sqlite" else None)
        self._inserts: dict[tuple[str, frozenset[str]], DriverInsert] = {}
        self._driver_lookup = (DriverLookup(self._lookups.engine.dialect)
                               if self._lookups is not None else None)
        try:
            self._ensure_schema()
            up = True
        except StoreUnavailable as exc:
            # Start anyway: calls are answered and their records spooled, /healthz/detail and
            # cds_store_up report the outage, and workers do not crash-loop while the database
            # restarts. Tables are created on the first successful use.
            log.warning("%s; tables will be created on first successful use", exc)
            up = False
        if spool_dir is None:
            self.recorder = Recorder(self.add_calls)
        else:
            from cds_service.ops import metrics
            from cds_service.records.spool import SpoolRecorder

            metrics.store_up(up)
            self.recorder = SpoolRecorder(self.add_calls, self.ping, spool_dir)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    @contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            orig = getattr(exc, "orig", None) or exc
            detail = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
            raise StoreUnavailable(
                f"database {self.url} unavailable: {scrub(detail, self._secrets)}"
            ) from exc

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(cds_write=True)
            with conn.begin():
                yield conn

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            with self._unavailable_on_error(), self._write() as conn:
                create_schema(conn)
            self._schema_ready = True

    def ping(self) -> None:
        """Round-trip `SELECT 1` (creating tables first if start-up could not); raise
        StoreUnavailable when the database cannot be used."""
        self._ensure_schema()
        with self._unavailable_on_error(), self._engine.connect() as conn:
            conn.execute(sa.select(1)).scalar_one()

    def within(self, seconds: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` (a method of this store), given at most `seconds`: on the answer
        path, where a database that does not answer (a network dropping packets: no error, no
        reply) must not hold the call. Raises StoreUnavailable when it takes longer, or at once
        when BOUNDED_THREADS earlier calls are all still waiting on the database. A call that
        times out still runs to its end in the background."""
        from cds_service.ops import metrics

        if not self._slots.acquire(blocking=False):
            metrics.store_up(False)
            raise StoreUnavailable(f"database {self.url} unavailable: {BOUNDED_THREADS} calls "
                                   "already waiting on it")

        def run() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                self._slots.release()

        try:
            future = self._bounded_pool().submit(run)
        except RuntimeError:  # the pool is shut down: the store is being disposed
            self._slots.release()
            raise StoreUnavailable(f"database {self.url} unavailable: store closed") from None
        try:
            result = future.result(timeout=seconds)
        except FutureTimeout:
            metrics.store_up(False)
            raise StoreUnavailable(
                f"database {self.url} unavailable: no answer within {seconds:g} s") from None
        except StoreUnavailable:
            metrics.store_up(False)
            raise
        metrics.store_up(True)
        return result

    def _bounded_pool(self) -> ThreadPoolExecutor:
        # Threads do not survive a fork: a worker forked from a process that used it makes its own.
        if self._pool is None or self._pool_pid != os.getpid():
            with self._schema_lock:
                if self._pool is None or self._pool_pid != os.getpid():
                    self._pool = ThreadPoolExecutor(BOUNDED_THREADS, thread_name_prefix="store")
                    self._pool_pid = os.getpid()
        return self._pool

    def insert_feedback(self, site: str, service_id: str, items: Sequence[FeedbackItem], *,
                        keys: Sequence[str] | None = None,
                        received_at: datetime | None = None) -> set[str]:
        """Store `items` in one transaction, committed before returning; return the dedupe keys
        of the items actually inserted (the new ones).

        Replays (rule 105: the same feedback may arrive several times) are stored once, within
        the batch and across calls, by the unique `dedupe_key`. `keys`: the items'
        `dedupe_key`s when the caller has them already. `received_at`: now, unless the caller
        has its own clock.
        """
        # The cards this feedback is about are on record first, if the writer can do it in time
        # (if not, whichever of the two is stored second records the override).
        self.recorder.flush(timeout=1.0)
        if received_at is None:
            received_at = datetime.now(UTC)
        rows: dict[str, dict[str, Any]] = {}
        if keys is None:
            keys = [item.dedupe_key(site, service_id) for item in items]
        for item, key in zip(items, keys, strict=True):
            rows.setdefault(
                key,
                {
                    "dedupe_key": key,
                    "site": site,
                    "service_id": service_id,
                    "card": item.card,
                    "outcome": item.outcome,
                    "outcome_timestamp": item.outcome_timestamp,
                    "accepted_suggestions": list(item.accepted_suggestions),
                    "override_code": item.override_code,
                    "override_system": item.override_system,
                    "override_display": item.override_display,
                    "user_comment": item.user_comment,
                    "override_extension": item.override_extension,
                    "raw": item.raw,
                    "warnings": list(item.warnings),
                    "received_at": received_at,
                },
            )
        if not rows:
            return set()
        self._ensure_schema()
        stmt = (
            _INSERT[self.dialect](feedback_table)
            .on_conflict_do_nothing(index_elements=[feedback_table.c.dedupe_key])
            .returning(feedback_table.c.dedupe_key)
        )
        # RETURNING yields only the rows actually inserted; rowcount is unreliable for executemany.
        with self._unavailable_on_error(), self._write() as conn:
            new = set(conn.execute(stmt, list(rows.values())).scalars())
            overridden = {rows[key]["card"] for key in new if rows[key]["outcome"] == OVERRIDDEN}
            if overridden:
                record_overrides(conn, site, service_id, overridden, feedback_keys=new)
        return new

    def card_topics(self, site: str, service_id: str,
                    card_uuids: Collection[str]) -> dict[str, str]:
        """Topic code of each issued card among `card_uuids` (cards without a topic absent)."""
        if not card_uuids:
            return {}
        c = issued_cards_table.c
        query = sa.select(c.card_uuid, c.topic_code).where(
            c.site == site, c.service_id == service_id, c.card_uuid.in_(sorted(set(card_uuids))),
            c.topic_code.is_not(None))
        self._ensure_schema()
        with self._unavailable_on_error(), self._engine.connect() as conn:
            return {uuid: topic for uuid, topic in conn.execute(query).all()}

    def add_calls(self, calls: Sequence[Call]) -> int:
        """Append the records of several calls (audit, issued cards, predictions) in one committed
        transaction: what the background `recorder` writes. A call already stored (same `id`: a
        replay from the spool) is skipped; return how many were new."""
        if not calls:
            return 0
        self._ensure_schema()
        ids = _INSERT[self.dialect](call_records_table).on_conflict_do_nothing(
            index_elements=[call_records_table.c.record_id]
        ).returning(call_records_table.c.record_id)
        with self._unavailable_on_error(), self._write() as conn:
            new = set(conn.execute(ids, [{"record_id": c.id, "time": c.time}
                                         for c in {c.id: c for c in calls}.values()]).scalars())
            calls = [c for c in calls if c.id in new]
            audit = [audit_row(c.audit) for c in calls if c.audit is not None]
            issued = [row for c in calls for row in c.issued_cards]
            predictions = [row for c in calls for row in c.predictions]
            for table, rows in ((audit_log_table, audit), (issued_cards_table, issued),
                                (predictions_table, predictions)):
                if rows:
                    self._insert(conn, table, rows)
            overrides_stored_first(conn, issued)
        return len(calls)

    def _insert(self, conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
        """`rows` into `table` in `conn`'s transaction; on SQLite through the driver
        (`driver.DriverInsert`, one per table and set of keys): storing a patient-view's records
        took 0.23 ms of CPU through SQLAlchemy's execution, 0.21 this way (issue 20)."""
        if self.dialect != "sqlite":
            conn.execute(sa.insert(table), rows)
            return
        by_keys: dict[frozenset[str], list[dict[str, Any]]] = {}
        for row in rows:
            by_keys.setdefault(frozenset(row), []).append(row)
        for keys, same in by_keys.items():
            insert = self._inserts.get((table.name, keys))
            if insert is None:
                insert = self._inserts.setdefault((table.name, keys),
                                                  DriverInsert(table, keys, conn.dialect))
            insert.run(conn.connection.dbapi_connection, same)

    def record(self, call: Call) -> None:
        """Queue a call's records for the background writer; returns at once (see `Recorder`)."""
        self.recorder.submit(call)

    def recent_overrides(
        self,
        *,
        site: str,
        service_id: str,
        user_id: str,
        patient_id: str,
        topics: Collection[str],
        since: datetime,
    ) -> dict[str, Override]:
        """The latest override per topic code in `topics` of a card issued by this site and
        service to this user for this patient, with an override time
        (`overrides.record_overrides`) at or after `since`.

        Feedback is matched to issued cards by card uuid, site and service (`card_overrides`,
        written by whichever of the two is stored second); feedback for a card never recorded
        is ignored. Topics with no such override are absent.
        """
        if since.utcoffset() is None:
            raise ValueError("recent_overrides: since must be a timezone-aware datetime")
        if not topics:
            return {}
        params = {"site": site, "service_id": service_id, "user_id": user_id,
                  "patient_id": patient_id, "since": since}
        self._ensure_schema()
        with self._unavailable_on_error():
            rows = self._lookup_rows(params)
        wanted = topics if isinstance(topics, set | frozenset) else set(topics)
        latest: dict[str, Override] = {}
        for topic_code, when, indicator, card_uuid in rows:  # newest first
            # A NULL topic never equalled anything in SQL: it matches no topic here either.
            if topic_code is not None and topic_code in wanted and topic_code not in latest:
                latest[topic_code] = Override(topic_code, when, indicator, card_uuid)
        return latest

    def _lookup_rows(self, params: dict[str, Any]) -> list[sa.Row]:
        conn = self._lookups.get() if self._lookups is not None else None
        if conn is None:
            with self._engine.connect() as pooled:
                return pooled.execute(RECENT_OVERRIDES, params).all()
        try:
            # Autocommit, and `fetchall()` reads every row and resets the statement: SQLite's
            # implicit read transaction ends here, none is left to hold back WAL checkpoints.
            return self._driver_lookup.rows(conn.connection.dbapi_connection, params)
        except BaseException:
            self._lookups.drop(conn)
            raise

    def list_overrides(self, *, since: datetime, site: str | None = None,
                       service_id: str | None = None, user_id: str | None = None,
                       patient_id: str | None = None) -> list[dict[str, Any]]:
        """`card_overrides` rows (each with its `id`) from `since` on, oldest first, matching
        every filter given: the overrides suppression may still act on."""
        if since.utcoffset() is None:
            raise ValueError("list_overrides: since must be a timezone-aware datetime")
        self.recorder.flush()
        o = overrides_table.c
        query = sa.select(overrides_table).where(o.time >= since).order_by(o.time, o.id)
        for column, value in (("site", site), ("service_id", service_id), ("user_id", user_id),
                              ("patient_id", patient_id)):
            if value is not None:
                query = query.where(o[column] == value)
        self._ensure_schema()
        with self._unavailable_on_error(), self._engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def delete_overrides(self, ids: Collection[int]) -> int:
        """Delete `card_overrides` rows by id, so they suppress nothing; return how many. The
        feedback they came from stays: it is the record of what the clinician did."""
        if not ids:
            return 0
        self._ensure_schema()
        stmt = sa.delete(overrides_table).where(overrides_table.c.id.in_(sorted(ids)))
        with self._unavailable_on_error(), self._write() as conn:
            return conn.execute(stmt).rowcount

    def iter_audit(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        outcome_contains: str | None = None,
        **filters: str | int,
    ) -> Iterator[dict[str, Any]]:
        """Audit rows in time order (then id), as dicts of the `AuditRecord` fields plus `id`,
        streamed in batches: an access review may read years of the log.

        `since` is inclusive, `until` exclusive; `outcome_contains` matches part of the outcome
        text (`suppressed`, `cards=0`); `filters` match columns exactly, e.g.
        `iter_audit(patient_id="p1", kind="invoke", since=start)`. Tuple fields come back as tuples.
        """
        self.recorder.flush()
        unknown = sorted(set(filters) - set(_AUDIT_FILTER_COLUMNS))
        if unknown:
            raise TypeError(f"iter_audit: unknown filter(s) {', '.join(unknown)}")
        table = audit_log_table
        query = sa.select(table).order_by(table.c.time, table.c.id).limit(limit)
        for column, value in filters.items():
            query = query.where(table.c[column] == value)
        if since is not None:
            query = query.where(table.c.time >= since)
        if until is not None:
            query = query.where(table.c.time < until)
        if outcome_contains is not None:
            query = query.where(table.c.outcome.contains(outcome_contains, autoescape=True))
        self._ensure_schema()
        with self._unavailable_on_error(), self._engine.connect() as conn:
            for row in conn.execution_options(yield_per=1000).execute(query).mappings():
                record = dict(row)
                for name in TUPLE_FIELDS:
                    record[name] = tuple(record[name])
                yield record

    def purge_audit(self, older_than: datetime) -> int:
        """Delete audit rows with `time` before `older_than` (the retention cutoff); return count.

        Issued-card records (`issued_cards`) older than the same cutoff are deleted too; they are
        logged but not counted in the return value, which stays the number of audit rows.
        Deletes in batches of AUDIT_PURGE_BATCH rows, one committed transaction each.
        """
        self.recorder.flush()
        if older_than.utcoffset() is None:
            raise ValueError("purge_audit: older_than must be a timezone-aware datetime")
        self._ensure_schema()
        total = self._purge_older(audit_log_table, older_than)
        log.info("purged %d audit record(s) older than %s", total, older_than.isoformat())
        cards = self._purge_older(issued_cards_table, older_than)
        log.info("purged %d issued card record(s) older than %s", cards, older_than.isoformat())
        overrides = self._purge_older(overrides_table, older_than)
        log.info("purged %d card override record(s) older than %s", overrides,
                 older_than.isoformat())
        self._purge_older(call_records_table, older_than, key="record_id")
        return total

    def _purge_older(self, table: sa.Table, older_than: datetime, key: str = "id") -> int:
        """Delete rows of `table` with `time` before `older_than` in committed batches; count."""
        batch = (
            sa.select(table.c[key])
            .where(table.c.time < older_than)
            .order_by(table.c[key])
            .limit(AUDIT_PURGE_BATCH)
            .scalar_subquery()
        )
        stmt = sa.delete(table).where(table.c[key].in_(batch))
        total = 0
        while True:
            with self._unavailable_on_error(), self._write() as conn:
                deleted = conn.execute(stmt).rowcount
            total += deleted
            if deleted < AUDIT_PURGE_BATCH:
                break
        return total

    def dispose(self) -> None:
        """Write what is queued, then close all pooled connections."""
        self.recorder.close()
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._lookups is not None:
            self._lookups.close()
        self._engine.dispose()
