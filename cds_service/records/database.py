"""Connecting to the database: the storage URL (checked, normalised, redacted for logs), the
engine (SQLite pragmas, PostgreSQL timeouts), creating the schema, and `StoreUnavailable`.

* SQLite (the embedded default, `sqlite:///var/cds.db`): WAL so readers never block the writer,
  `synchronous=FULL` so a commit is on disk before we answer 200, and a busy timeout because several
  worker processes share the file. Write transactions start with `BEGIN IMMEDIATE`, taking the write
  lock up front, so they queue on the busy timeout instead of failing with SQLITE_BUSY on lock
  upgrade.
* PostgreSQL through psycopg 3 (`postgresql+psycopg://`; `postgresql://` and `postgres://` are
  rewritten). Put the tables in a schema of your choosing with the libpq `options` parameter:
  `postgresql://user@host/db?options=-csearch_path%3Dcds`.

There are no migrations yet: `create_all` at start-up creates missing tables and never alters
existing ones, except for nullable columns added since, listed in `_ADDED_COLUMNS` and added by a
guarded ALTER TABLE. Anything more needs a migration tool (Alembic) before it ships.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, quote_plus

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from cds_service.protocol.errors import CdsError, ConfigError
from cds_service.records.tables import metadata

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 5
# libpq `tcp_user_timeout` (ms): a query sent into a network that drops packets fails after this
# instead of waiting out the kernel's retransmissions (about 15 minutes on Linux).
PG_TCP_USER_TIMEOUT_MS = 15_000
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


def url_secrets(url: URL) -> set[str]:
    """The passwords in `url` in every form a message may quote them (raw, percent-encoded), for
    `scrub`."""
    values = [url.password] if url.password else []
    for key, value in url.query.items():
        if "password" in key.lower():
            values.extend([value] if isinstance(value, str) else value)
    return {form for v in values if v for form in (str(v), quote(str(v)), quote_plus(str(v)))}


def scrub(text: str, secrets: set[str]) -> str:
    """`text` with every form of every secret in `secrets` (`url_secrets`) replaced by ***."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    return text


def normalize_url(url: str) -> URL:
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


def create_engine(url: URL, *, pooled: bool = True) -> Engine:
    """The engine for `url` (from `normalize_url`): SQLite with its pragmas and `BEGIN IMMEDIATE`
    for writes (its directory created), PostgreSQL with connect and TCP timeouts. `pooled=False`
    (SQLite only): no pool and autocommit, for connections the caller keeps open (and closes)."""
    # hide_parameters: SQL errors must not carry clinician comments (PHI) into logs.
    if url.get_backend_name() == "sqlite":
        directory = Path(url.database).expanduser().parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create directory {directory}: {exc.strerror}") from exc
        options: dict[str, Any] = {} if pooled else {
            "poolclass": sa.NullPool, "isolation_level": "AUTOCOMMIT",
            "connect_args": {"check_same_thread": False}}
        engine = sa.create_engine(url, hide_parameters=True, **options)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    if "tcp_user_timeout" not in url.query:
        connect_args["tcp_user_timeout"] = PG_TCP_USER_TIMEOUT_MS
    if "application_name" not in url.query:
        connect_args["application_name"] = "cds-service"
    return sa.create_engine(
        url, connect_args=connect_args, pool_pre_ping=True, hide_parameters=True
    )


def create_schema(conn: Connection) -> None:
    """Create missing tables and add missing columns, in the caller's write transaction."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK_KEY)))
    metadata.create_all(conn)
    _add_missing_columns(conn)


class ThreadConnections:
    """One connection per thread from `engine` (`create_engine(..., pooled=False)`), kept open
    across calls; `get` returns None once closed. A connection opened before a fork belongs to
    the parent: the child neither uses nor closes it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: dict[int, Connection] = {}  # id -> connection, of process `_pid`
        self._pid = os.getpid()
        self._closed = False

    def get(self) -> Connection | None:
        if self._closed:
            return None
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid():
            return conn
        conn = self.engine.connect()
        with self._lock:
            if self._pid != os.getpid():
                self._open, self._pid = {}, os.getpid()
            if self._closed:
                conn.close()
                return None
            self._open[id(conn)] = conn
        local.conn, local.pid = conn, os.getpid()
        return conn

    def drop(self, conn: Connection) -> None:
        """Close `conn` (this thread's, after an error); the next `get` opens another."""
        self._local.conn = None
        with self._lock:
            self._open.pop(id(conn), None)
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - already broken
            log.debug("closing a broken connection", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._open.values()) if self._pid == os.getpid() else []
            self._open = {}
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing anyway
                log.debug("closing a connection", exc_info=True)
