"""jti replay caches: has this (iss, jti) been used before it expires?

CDS Hooks 2.0: `jti` is "a nonce string value that uniquely identifies this authentication JWT
(used to protect against replay attacks)"; best practices §JWT: keep processed jti values in
short-term storage for the maximum JWT lifetime. The cache must be shared by every process that
verifies tokens, or a token replayed to another gunicorn worker would pass:

- `SqliteReplayCache` (default): one SQLite file, shared by the worker processes of one machine.
- `RedisReplayCache`: shared by every host that uses the same Redis.
- `MemoryReplayCache`: one process only (tests); NOT for gunicorn, whose workers would each
  keep their own set.

`first_use` is one atomic operation in every implementation, so two workers racing with the same
token cannot both win. When the store cannot answer, `ReplayCacheError` is raised: the token is
refused rather than accepted unchecked (fail closed), and the caller should answer 503, not 401.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from cds_service.protocol.errors import CdsError

if TYPE_CHECKING:
    import redis

PURGE_INTERVAL_S = 60.0


class ReplayCacheError(CdsError):
    """The replay cache could not be read or written; the token cannot be checked for replay."""

    # Without the replay cache a token cannot be checked for reuse: refuse, retryably.
    status = 503
    code = "transient"
    diagnostics = "Authentication is temporarily unavailable. Retry later."
    headers = MappingProxyType({"Retry-After": "5"})
    log_level = logging.ERROR


class ReplayCache(Protocol):
    def first_use(self, iss: str, jti: str, expires_at: float) -> bool:
        """Atomically record (iss, jti) until `expires_at` (epoch seconds); True if it was not
        already recorded and unexpired, False for a replay."""
        ...


class MemoryReplayCache:
    """In-process cache for tests and single-process tools. Not for gunicorn: each worker
    process would keep its own set, and a replay sent to another worker would pass."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._next_purge = 0.0

    def first_use(self, iss: str, jti: str, expires_at: float) -> bool:
        now = time.time()
        with self._lock:
            if now >= self._next_purge:
                self._seen = {k: exp for k, exp in self._seen.items() if exp > now}
                self._next_purge = now + PURGE_INTERVAL_S
            seen = self._seen.get((iss, jti))
            if seen is not None and seen > now:
                return False
            self._seen[(iss, jti)] = expires_at
            return True

    def __len__(self) -> int:
        return len(self._seen)


class SqliteReplayCache:
    """One SQLite file shared by the processes of one machine (WAL, busy timeout).

    Each thread of each process uses its own connection, opened on first use and re-opened
    after a fork (a connection must not cross fork()); it is closed when its thread ends. A
    connection is kept rather than opened per call because closing the last connection to a WAL
    database checkpoints it (about 1 ms). The check and the write are one
    `INSERT … ON CONFLICT DO UPDATE … WHERE expired` statement, atomic under SQLite's write
    lock; expired rows are purged at most once a minute per process.
    """

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS jti_seen ("
        " iss TEXT NOT NULL, jti TEXT NOT NULL, expires_at REAL NOT NULL,"
        " PRIMARY KEY (iss, jti)) WITHOUT ROWID"
    )
    _INSERT = (
        "INSERT INTO jti_seen (iss, jti, expires_at) VALUES (?, ?, ?)"
        " ON CONFLICT (iss, jti) DO UPDATE SET expires_at = excluded.expires_at"
        " WHERE jti_seen.expires_at <= ?"
    )

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._next_purge = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connection()
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: recorded in the file
            conn.execute(self._SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        if getattr(self._local, "pid", None) != pid:
            # check_same_thread=False only so the finalizer below may close it from the thread
            # that collects the dead Thread; no two threads ever use one connection.
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across app crashes
            weakref.finalize(threading.current_thread(), conn.close)
            self._local.conn, self._local.pid = conn, pid
        return self._local.conn

    def first_use(self, iss: str, jti: str, expires_at: float) -> bool:
        now = time.time()
        try:
            conn = self._connection()
            if now >= self._next_purge:
                self._next_purge = now + PURGE_INTERVAL_S
                conn.execute("DELETE FROM jti_seen WHERE expires_at <= ?", (now,))
            cursor = conn.execute(self._INSERT, (iss, jti, float(expires_at), now))
            return cursor.rowcount == 1
        except sqlite3.Error as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the calling thread's connection (others close when their thread ends)."""
        if getattr(self._local, "pid", None) == os.getpid():
            self._local.conn.close()
        self._local = threading.local()


class RedisReplayCache:
    """`SET key 1 NX PX <ttl>`: atomic in Redis, shared across hosts.

    Keys are `<prefix><sha256(iss, jti)>`, so their length is bounded whatever the issuer sends.
    The TTL is computed from our clock (relative PX rather than absolute EXAT), so a skewed Redis
    clock cannot shorten it.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "cds-service:jti:",
        socket_timeout_s: float = 2.0,
        client: redis.Redis | None = None,
    ):
        import redis  # noqa: PLC0415 - a worker without Redis never loads it (7 MB of RSS)

        self.prefix = prefix
        self._errors = redis.RedisError
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )

    def key(self, iss: str, jti: str) -> str:
        digest = hashlib.sha256()
        for part in (iss, jti):  # length-prefixed: ("ab", "c") and ("a", "bc") differ
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "big") + data)
        return self.prefix + digest.hexdigest()

    def first_use(self, iss: str, jti: str, expires_at: float) -> bool:
        ttl_ms = max(1, math.ceil((expires_at - time.time()) * 1000))
        try:
            return bool(self._client.set(self.key(iss, jti), b"1", nx=True, px=ttl_ms))
        except self._errors as exc:
            # The URL may carry a password: name only the failure class.
            raise ReplayCacheError(f"replay cache (redis): {type(exc).__name__}") from exc

    def close(self) -> None:
        self._client.close()


def replay_cache_from_url(
    url: str | None, default_sqlite_path: str | os.PathLike[str]
) -> ReplayCache:
    """`redis://…` or `rediss://…` → Redis; `sqlite:///relative/path`, `sqlite:////abs/path` or
    None → SQLite (None uses `default_sqlite_path`)."""
    if not url:
        return SqliteReplayCache(default_sqlite_path)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return RedisReplayCache(url)
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ValueError("sqlite replay cache URL must look like sqlite:///path/to/file")
        path = url[len("sqlite:///") :]
        if not path or path == ":memory:" or "?" in path:
            # An in-memory database is private to one process: useless against replays.
            raise ValueError("sqlite replay cache URL needs a file path (no :memory:, no query)")
        return SqliteReplayCache(path)
    # Never echo the URL: a redis URL can carry a password.
    raise ValueError(f"unsupported replay cache URL scheme {scheme[:16]!r} (use redis:// or sqlite:///)")
