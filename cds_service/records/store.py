"""Durable storage for feedback and the PHI-access audit log: SQLAlchemy Core, SQLite or PostgreSQL.

One `Store` per process (per gunicorn worker: create it in the app factory, after the fork, so no
pooled connection is shared between processes).

* SQLite (the embedded default, `sqlite:///var/cds.db`): WAL so readers never block the writer,
  `synchronous=FULL` so a commit is on disk before we answer 200, and a busy timeout because several
  worker processes share the file. Write transactions start with `BEGIN IMMEDIATE`, taking the write
  lock up front, so they queue on the busy timeout instead of failing with SQLITE_BUSY on lock
  upgrade.
* PostgreSQL through psycopg 3 (`postgresql+psycopg://`; `postgresql://` and `postgres://` are
  rewritten). Put the tables in a schema of your choosing with the libpq `options` parameter:
  `postgresql://user@host/db?options=-csearch_path%3Dcds`.

The audit log (`cds_service.records.audit`) is append-only: the store inserts, reads and purges by
age, and has no update. A deployment can enforce that in PostgreSQL by granting the service role
only INSERT, SELECT and DELETE on `audit_log`. `issued_cards` (the cards we issued, for
alert-fatigue suppression) is kept for the same retention and needs the same three privileges.

There are no migrations yet: `create_all` at start-up creates missing tables and never alters
existing ones, except for nullable columns added since, listed in `_ADDED_COLUMNS` and added by a
guarded ALTER TABLE. Anything more needs a migration tool (Alembic) before it ships.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, quote_plus

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.types import TypeDecorator

from cds_service.protocol.errors import CdsError, ConfigError
from cds_service.records.audit import TEXT_FIELDS, TUPLE_FIELDS, AuditRecord
from cds_service.records.feedback import OVERRIDDEN, FeedbackItem

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 5
# libpq `tcp_user_timeout` (ms): a query sent into a network that drops packets fails after this
# instead of waiting out the kernel's retransmissions (about 15 minutes on Linux).
PG_TCP_USER_TIMEOUT_MS = 15_000
# Store calls on the answer path (`Store.within`) run on this many threads per worker; when all
# are waiting on the database, further calls fail at once instead of queueing behind them.
BOUNDED_THREADS = 8
# pg_advisory_xact_lock key serialising create_all across worker processes starting together
# (concurrent CREATE TABLE of the same name fails in PostgreSQL). Arbitrary constant.
_PG_SCHEMA_LOCK_KEY = 0x0CD5_F00D_BACC
_REDACTED = "***"


class StoreUnavailable(CdsError):
    """The database cannot be reached or is too busy; the message never contains a password."""

    # 503 + Retry-After tells the EHR to resend the feedback batch later. A write that timed out
    # may still complete; the resend is then stored once (dedupe key), so either way nothing is
    # lost or doubled.
    status = 503
    code = "transient"
    diagnostics = ("The feedback store did not take the feedback in time. Retry later: a repeat "
                   "is stored once.")
    headers = MappingProxyType({"Retry-After": "30"})
    log_level = logging.ERROR


class UtcDateTime(TypeDecorator):
    """Timezone-aware datetime stored in UTC; always read back as an aware UTC datetime.

    SQLite has no time zone type: values are stored as naive UTC text (sortable), and UTC is
    re-attached on read. PostgreSQL uses `timestamptz`.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; store only timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JsonText(TypeDecorator):
    """A JSON value stored as text (same bytes on both backends; no JSONB-only queries)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        if value is None:
            return None
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect: sa.Dialect) -> Any:
        return None if value is None else json.loads(value)


# All tables live in this one MetaData.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

feedback_table = sa.Table(
    "feedback",
    metadata,
    # INTEGER PRIMARY KEY on SQLite is the rowid alias (autoincrementing); BIGINT would not be.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("dedupe_key", sa.String(64), nullable=False, unique=True),
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("card", sa.Text, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("outcome_timestamp", UtcDateTime, nullable=False),
    sa.Column("accepted_suggestions", JsonText, nullable=False),
    sa.Column("override_code", sa.Text),
    sa.Column("override_system", sa.Text),
    sa.Column("override_display", sa.Text),
    sa.Column("user_comment", sa.Text),
    sa.Column("override_extension", JsonText),
    sa.Column("raw", JsonText, nullable=False),
    sa.Column("warnings", JsonText, nullable=False),
    sa.Column("received_at", UtcDateTime, nullable=False),
    sa.Index(None, "site", "service_id", "card"),
)

audit_log_table = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("site", sa.Text),
    sa.Column("iss", sa.Text),
    sa.Column("sub", sa.Text),
    sa.Column("user_id", sa.Text),
    sa.Column("patient_id", sa.Text),
    sa.Column("encounter_id", sa.Text),
    sa.Column("hook", sa.Text),
    sa.Column("hook_instance", sa.Text),
    sa.Column("service_id", sa.Text),
    sa.Column("prefetch_keys_used", JsonText, nullable=False),
    sa.Column("fhir_urls_fetched", JsonText, nullable=False),
    sa.Column("card_uuids", JsonText, nullable=False),
    sa.Column("suggestion_uuids", JsonText, nullable=False),
    sa.Column("feedback_cards", JsonText, nullable=False),
    sa.Column("outcome", sa.Text),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("fhir_server_refused", sa.Text),
    # Accounting of disclosures: "every access to this patient's data in a period".
    sa.Index(None, "patient_id", "time"),
)
# Every model score, active and shadow, keyed by hookInstance (join to audit_log for the patient).
# Shadow rows are how a candidate model is compared with the live one before it is switched on.
# Feature values are not stored here (they are clinical data); names of missing and imputed
# inputs and the contribution ranking are.
predictions_table = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("hook_instance", sa.Text, nullable=False, index=True),
    sa.Column("role", sa.String(8), nullable=False),
    sa.Column("model_id", sa.Text, nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("indicator", sa.String(16)),
    sa.Column("unavailable", sa.Text),
    sa.Column("missing", JsonText, nullable=False),
    sa.Column("imputed", JsonText, nullable=False),
    sa.Column("contributions", JsonText, nullable=False),
    sa.Index(None, "model_id", "model_version", "time"),
)
# One row per card we issued. Feedback names only the card uuid (not the user, patient or topic
# it was about): storing an override looks the card up here. Purged with the audit log.
issued_cards_table = sa.Table(
    "issued_cards",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),  # retention purge
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("hook_instance", sa.Text),
    sa.Column("card_uuid", sa.Text, nullable=False, index=True),
    sa.Column("user_id", sa.Text),
    sa.Column("patient_id", sa.Text),
    sa.Column("topic_system", sa.Text),
    sa.Column("topic_code", sa.Text),
    sa.Column("indicator", sa.String(16)),
    sa.Index(None, "site", "patient_id", "user_id", "topic_code"),
)

# The id of every call whose records (audit, issued cards, predictions) are stored, written in the
# same transaction: a call replayed from the spool after a crash or an outage is stored once.
# Purged with the audit log.
call_records_table = sa.Table(
    "call_records",
    metadata,
    sa.Column("record_id", sa.String(32), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),
)

# One row per override of a card we issued, with the card's user, patient, topic and indicator
# copied from `issued_cards` when the feedback is stored. Alert-fatigue suppression looks here on
# every call that has cards: a few rows found by index, where joining feedback to every card ever
# issued to this clinician for this patient grew with each chart opening. Purged with the audit
# log.
overrides_table = sa.Table(
    "card_overrides",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("time", UtcDateTime, nullable=False, index=True),  # see _record_overrides
    sa.Column("site", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text),
    sa.Column("patient_id", sa.Text),
    sa.Column("topic_code", sa.Text),
    sa.Column("indicator", sa.String(16)),
    sa.Column("card_uuid", sa.Text, nullable=False),
    sa.Index(None, "site", "service_id", "user_id", "patient_id", "topic_code", "time"),
)


def _record_overrides(conn: Connection, site: str, service_id: str, cards: Collection[str], *,
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
    f, c = feedback_table.c, issued_cards_table.c
    override_time = sa.case((f.outcome_timestamp < f.received_at, f.outcome_timestamp),
                            else_=f.received_at)
    query = (
        sa.select(override_time, c.site, c.service_id, c.user_id, c.patient_id,
                  c.topic_code, c.indicator, c.card_uuid)
        .select_from(feedback_table.join(issued_cards_table, sa.and_(
            c.card_uuid == f.card, c.site == f.site, c.service_id == f.service_id)))
        .where(f.site == site, f.service_id == service_id, f.outcome == OVERRIDDEN,
               f.card.in_(sorted(cards)))
    )
    if feedback_keys is not None:
        query = query.where(f.dedupe_key.in_(sorted(feedback_keys)))
    o = overrides_table.c
    conn.execute(sa.insert(overrides_table).from_select(
        [o.time, o.site, o.service_id, o.user_id, o.patient_id, o.topic_code, o.indicator,
         o.card_uuid], query))


def _overrides_stored_first(conn: Connection, issued: Sequence[dict[str, Any]]) -> None:
    """Overrides stored before the card they name was recorded: issued cards are written after
    the answer (by whichever worker or host issued them) while Epic's feedback lands anywhere,
    so whichever of the two is stored second records the override."""
    scopes: dict[tuple[str, str], set[str]] = {}
    for row in issued:
        scopes.setdefault((row["site"], row["service_id"]), set()).add(row["card_uuid"])
    for (site, service_id), cards in scopes.items():
        _record_overrides(conn, site, service_id, cards)


def _recent_overrides_query() -> sa.Select:
    """`Store.recent_overrides`, built once (it runs on every call that has cards)."""
    o = overrides_table.c
    return (
        sa.select(o.topic_code, o.time, o.indicator, o.card_uuid)
        .where(
            o.site == sa.bindparam("site"),
            o.service_id == sa.bindparam("service_id"),
            o.user_id == sa.bindparam("user_id"),
            o.patient_id == sa.bindparam("patient_id"),
            o.topic_code.in_(sa.bindparam("topics", expanding=True)),
            o.time >= sa.bindparam("since", type_=UtcDateTime),
        )
        # Newest first; ids break ties so the answer is deterministic.
        .order_by(o.time.desc(), o.id.desc())
    )


_RECENT_OVERRIDES = _recent_overrides_query()

# Identifier columns `list_audit` filters on: the record's text fields, less free text.
_AUDIT_FILTER_COLUMNS = (
    "kind", *(name for name in TEXT_FIELDS if name not in ("outcome", "detail")), "status",
)
# Rows deleted per purge transaction (audit_log and issued_cards): short write transactions, so
# request workers appending audit records never wait long on the SQLite write lock (busy timeout
# above).
AUDIT_PURGE_BATCH = 5_000

_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def redacted_url(url: str | URL) -> str:
    """`url` with any password (userinfo or `?password=` query parameter) replaced by ***."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        return "<unparseable database URL>"
    secret_keys = [k for k in parsed.query if "password" in k.lower()]
    if secret_keys:
        parsed = parsed.update_query_dict(dict.fromkeys(secret_keys, _REDACTED))
    rendered = parsed.render_as_string(hide_password=True)
    return rendered.replace(quote_plus(_REDACTED), _REDACTED) if secret_keys else rendered


def _secrets(url: URL) -> set[str]:
    values = [url.password] if url.password else []
    for key, value in url.query.items():
        if "password" in key.lower():
            values.extend([value] if isinstance(value, str) else value)
    return {form for v in values if v for form in (str(v), quote(str(v)), quote_plus(str(v)))}


def _normalize_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigError("storage URL is not a valid database URL") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgres", "postgresql"):
        if driver not in ("", "psycopg"):
            raise ConfigError(
                f"storage URL {redacted_url(parsed)}: driver {driver!r} is not supported; "
                "use postgresql+psycopg:// (psycopg 3)"
            )
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ConfigError(
                f"storage URL {redacted_url(parsed)}: only the built-in sqlite3 driver is supported"
            )
        if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
            raise ConfigError("in-memory SQLite is not durable; give a file path (sqlite:///path)")
        return parsed
    raise ConfigError(
        f"storage URL {redacted_url(parsed)}: unsupported database {backend!r}; "
        "use sqlite:///path or postgresql://"
    )


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Take transaction control away from the sqlite3 module (it would BEGIN lazily, DEFERRED);
    # _sqlite_on_begin emits BEGIN itself. SQLAlchemy recipe "Serializable isolation / Savepoints /
    # Transactional DDL" in the SQLite dialect docs.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
        # journal_mode is stored in the file (a no-op once set); synchronous is per connection:
        # FULL syncs the WAL on every commit, so a 200 means the feedback is on disk.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Writes take the write lock up front. A read is one SELECT, which SQLite runs in its own
    # implicit transaction: no BEGIN round trip (the override lookup runs on every call).
    if conn.get_execution_options().get("cds_write", False):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# Nullable columns added to existing tables after their first release: (table, column). Added in
# the schema transaction (PostgreSQL: under the advisory lock; SQLite: under BEGIN IMMEDIATE), so
# workers starting together add each once.
_ADDED_COLUMNS = (("audit_log", "fhir_server_refused"),)


def _add_missing_columns(conn: Connection) -> None:
    inspector = sa.inspect(conn)
    for table_name, column_name in _ADDED_COLUMNS:
        if column_name in {c["name"] for c in inspector.get_columns(table_name)}:
            continue
        column = metadata.tables[table_name].c[column_name]
        kind = column.type.compile(dialect=conn.dialect)
        preparer = conn.dialect.identifier_preparer
        conn.exec_driver_sql(f"ALTER TABLE {preparer.quote(table_name)} ADD COLUMN "
                             f"{preparer.quote(column_name)} {kind}")
        log.info("added column %s.%s", table_name, column_name)


def _audit_row(record: AuditRecord) -> dict[str, Any]:
    row = {name: getattr(record, name) for name in audit_log_table.c.keys() if name != "id"}
    for name in TUPLE_FIELDS:
        row[name] = list(row[name])
    return row


@dataclass(frozen=True)
class Call:
    """What one CDS call leaves in the store besides feedback: its audit record, the cards it
    issued (`issued_cards_table` rows) and the predictions made (`predictions_table` rows).
    `id` makes storing it idempotent (`call_records_table`)."""

    audit: AuditRecord | None
    issued_cards: Sequence[dict[str, Any]] = ()
    predictions: Sequence[dict[str, Any]] = ()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def time(self) -> datetime:
        if self.audit is not None:
            return self.audit.time
        rows = [*self.issued_cards, *self.predictions]
        return rows[0]["time"] if rows else datetime.now(UTC)


class Recorder:
    """Writes calls' records on a background thread, many calls per transaction: in processes
    without a spool (CLI tools, tests). A serving worker spools them first
    (`cds_service.records.spool.SpoolRecorder`), so neither a crash nor an outage loses them.

    A call's audit record, issued cards and predictions used to cost three committed
    transactions (three fsyncs on SQLite) before the answer left; Epic waits for that answer.
    Now the answer leaves first and a writer thread commits whatever has queued meanwhile in one
    transaction. What this trades: records of calls answered in the last moments before a hard
    kill (SIGKILL, power loss) can be lost; a graceful stop (SIGTERM, reload, worker recycling)
    writes everything first (`close`). Feedback is not queued: it is committed before its 200.

    Reads that must see this process's own calls (`list_*`, purge, storing feedback, so that a
    card is on record before an override of it) call `flush()` first. The queue is bounded:
    a writer that cannot keep up slows callers down instead of growing without limit. A failed
    write is logged and counted (`cds_store_write_failures_total`); the calls are not retried.
    """

    MAX_QUEUED = 10_000
    # After waking, the writer waits this long for more calls, so that even sequential traffic
    # shares transactions (a commit costs more than a row). Bounds what a hard kill can lose.
    LINGER_S = 0.01

    def __init__(self, write: Callable[[Sequence[Call]], None]):
        self._write = write
        self._queue: list[Call] = []
        self._unwritten = 0  # queued or being written
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._closed = False

    def submit(self, call: Call) -> None:
        with self._cond:
            if self._closed:
                self._write_now([call])
                return
            self._start()
            self._cond.wait_for(lambda: len(self._queue) < self.MAX_QUEUED)
            self._queue.append(call)
            self._unwritten += 1
            if len(self._queue) == 1:  # the writer waits for the first call only
                self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every call submitted is written (or `timeout`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._unwritten == 0, timeout):
                log.error("store writer: %d call record(s) still unwritten after %.0f s",
                          self._unwritten, timeout)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _start(self) -> None:
        # Threads do not survive a fork: a worker forked from a process that wrote starts its own.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._queue, self._unwritten, self._pid = [], 0, os.getpid()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                closing = self._closed
            if not closing:
                # Not a wait on the condition: every call queued meanwhile would cut it short,
                # and waking the writer (and handing it the GIL) per call costs the callers.
                time.sleep(self.LINGER_S)
            with self._cond:
                batch, self._queue = self._queue, []
                self._cond.notify_all()  # room in the queue again
            self._write_now(batch)
            with self._cond:
                self._unwritten -= len(batch)
                self._cond.notify_all()

    def _write_now(self, batch: list[Call]) -> None:
        try:
            self._write(batch)
        except Exception:  # noqa: BLE001 - a lost record is logged and counted, never raised
            from cds_service.ops import metrics

            metrics.STORE_WRITE_FAILURES.inc(len(batch))
            log.exception("store writer: %d call record(s) not written", len(batch))


@dataclass(frozen=True)
class Override:
    """The latest override of an issued card on one topic (see `Store.recent_overrides`)."""

    topic_code: str
    time: datetime  # outcome timestamp, at the latest when received (_record_overrides); UTC
    indicator: str | None  # the overridden card's indicator, as issued
    card_uuid: str


class Store:
    """Feedback and audit-log storage on one SQLAlchemy engine (SQLite file or PostgreSQL)."""

    def __init__(self, url: str, *, spool_dir: str | Path | None = None) -> None:
        """`spool_dir`: spool calls' records there before writing them (`cds_service.records.spool`,
        what a serving worker does); without it they are queued in memory (`Recorder`)."""
        self._url = _normalize_url(url)
        self._secrets = _secrets(self._url)
        self.url = redacted_url(self._url)
        self.dialect = self._url.get_backend_name()
        self._engine = self._create_engine()
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._slots = threading.BoundedSemaphore(BOUNDED_THREADS)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
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

    def _create_engine(self) -> Engine:
        # hide_parameters: SQL errors must not carry clinician comments (PHI) into logs.
        if self.dialect == "sqlite":
            directory = Path(self._url.database).expanduser().parent
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create directory {directory}: {exc.strerror}") from exc
            engine = sa.create_engine(self._url, hide_parameters=True)
            event.listen(engine, "connect", _sqlite_on_connect)
            event.listen(engine, "begin", _sqlite_on_begin)
            return engine
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in self._url.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        if "tcp_user_timeout" not in self._url.query:
            connect_args["tcp_user_timeout"] = PG_TCP_USER_TIMEOUT_MS
        if "application_name" not in self._url.query:
            connect_args["application_name"] = "cds-service"
        return sa.create_engine(
            self._url, connect_args=connect_args, pool_pre_ping=True, hide_parameters=True
        )

    def _scrub(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, _REDACTED)
        return text

    @contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            orig = getattr(exc, "orig", None) or exc
            detail = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
            raise StoreUnavailable(
                f"database {self.url} unavailable: {self._scrub(detail)}"
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
                if self.dialect == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK_KEY)))
                metadata.create_all(conn)
                _add_missing_columns(conn)
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

    def add_feedback(self, site: str, service_id: str, items: Sequence[FeedbackItem], *,
                     received_at: datetime | None = None) -> int:
        """Store `items` in one transaction, committed before returning; return how many are new.

        Replays (rule 105: the same feedback may arrive several times) are stored once, within
        the batch and across calls, by the unique `dedupe_key`. `received_at`: now, unless the
        caller has its own clock.
        """
        return len(self.insert_feedback(site, service_id, items, received_at=received_at))

    def insert_feedback(self, site: str, service_id: str, items: Sequence[FeedbackItem], *,
                        keys: Sequence[str] | None = None,
                        received_at: datetime | None = None) -> set[str]:
        """As `add_feedback`, returning the dedupe keys of the items actually inserted; `keys`:
        the items' `dedupe_key`s when the caller has them already."""
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
                _record_overrides(conn, site, service_id, overridden, feedback_keys=new)
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

    def list_feedback(
        self, site: str | None = None, service_id: str | None = None, card: str | None = None
    ) -> list[dict[str, Any]]:
        """Stored feedback, oldest first, as plain dicts with JSON fields decoded."""
        self._ensure_schema()
        self.recorder.flush()
        query = sa.select(feedback_table).order_by(feedback_table.c.id)
        for column, value in (("site", site), ("service_id", service_id), ("card", card)):
            if value is not None:
                query = query.where(feedback_table.c[column] == value)
        with self._unavailable_on_error(), self._engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def add_audit(self, record: AuditRecord) -> int:
        """Append `record`, committed before returning; return its id."""
        row = _audit_row(record)
        self._ensure_schema()
        stmt = sa.insert(audit_log_table).returning(audit_log_table.c.id)
        with self._unavailable_on_error(), self._write() as conn:
            return conn.execute(stmt, row).scalar_one()

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
            audit = [_audit_row(c.audit) for c in calls if c.audit is not None]
            issued = [row for c in calls for row in c.issued_cards]
            predictions = [row for c in calls for row in c.predictions]
            for table, rows in ((audit_log_table, audit), (issued_cards_table, issued),
                                (predictions_table, predictions)):
                if rows:
                    conn.execute(sa.insert(table), rows)
            _overrides_stored_first(conn, issued)
        return len(calls)

    def record(self, call: Call) -> None:
        """Queue a call's records for the background writer; returns at once (see `Recorder`)."""
        self.recorder.submit(call)

    def add_predictions(self, rows: Sequence[dict[str, Any]]) -> int:
        """Append prediction records (see `predictions_table`) in one committed transaction."""
        if not rows:
            return 0
        self._ensure_schema()
        with self._unavailable_on_error(), self._write() as conn:
            conn.execute(sa.insert(predictions_table), list(rows))
        return len(rows)

    def list_predictions(self, *, hook_instance: str | None = None,
                         role: str | None = None) -> list[dict[str, Any]]:
        self.recorder.flush()
        query = sa.select(predictions_table).order_by(predictions_table.c.id)
        if hook_instance is not None:
            query = query.where(predictions_table.c.hook_instance == hook_instance)
        if role is not None:
            query = query.where(predictions_table.c.role == role)
        self._ensure_schema()
        with self._unavailable_on_error(), self._engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def add_issued_cards(self, rows: Sequence[dict[str, Any]]) -> int:
        """Record issued cards (keys: `issued_cards_table` columns but `id`) in one committed
        transaction; return how many."""
        if not rows:
            return 0
        self._ensure_schema()
        with self._unavailable_on_error(), self._write() as conn:
            conn.execute(sa.insert(issued_cards_table), list(rows))
            _overrides_stored_first(conn, rows)
        return len(rows)

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
        service to this user for this patient, with an override time (`_record_overrides`) at or
        after `since`.

        Feedback is matched to issued cards by card uuid, site and service (`card_overrides`,
        written by whichever of the two is stored second); feedback for a card never recorded
        is ignored. Topics with no such override are absent.
        """
        if since.utcoffset() is None:
            raise ValueError("recent_overrides: since must be a timezone-aware datetime")
        if not topics:
            return {}
        params = {"site": site, "service_id": service_id, "user_id": user_id,
                  "patient_id": patient_id, "topics": sorted(set(topics)), "since": since}
        self._ensure_schema()
        with self._unavailable_on_error(), self._engine.connect() as conn:
            rows = conn.execute(_RECENT_OVERRIDES, params).all()
        latest: dict[str, Override] = {}
        for topic_code, when, indicator, card_uuid in rows:
            latest.setdefault(topic_code, Override(topic_code, when, indicator, card_uuid))
        return latest

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

    def list_audit(self, **query: Any) -> list[dict[str, Any]]:
        """`iter_audit`, as a list."""
        return list(self.iter_audit(**query))

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
        `list_audit(patient_id="p1", kind="invoke", since=start)`. Tuple fields come back as tuples.
        """
        self.recorder.flush()
        unknown = sorted(set(filters) - set(_AUDIT_FILTER_COLUMNS))
        if unknown:
            raise TypeError(f"list_audit: unknown filter(s) {', '.join(unknown)}")
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
        self._engine.dispose()
