"""Server-side sessions of the SMART app (backend-for-frontend): tokens never reach the browser.

The browser holds one opaque session id in an HttpOnly, Secure, SameSite cookie. Everything else
(the pending launch's `state` and PKCE verifier, then each launch's access and refresh tokens and
patient context) is kept here, in a store every worker and host shares:

- `SqliteKv`: one SQLite file, shared by the worker processes of one machine (the default, beside
  the replay cache);
- `RedisKv`: shared by every host using the same Redis (`SMART_SESSION_URL`, or the replay
  cache's Redis when that is one);
- `MemoryKv`: one process only (tests of this module).

A record's key is a hash of the session id and the record's name, and its value is sealed with
AES-GCM under a key derived from the session id: the store alone (a backup, a Redis dump) gives
neither a usable cookie nor a token. `take` reads and deletes in one atomic step, so a `state`
is good for one callback only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cds_service.protocol.errors import CdsError

# 256 bits from the OS's CSPRNG, base64url: 43 characters (OWASP session management: ≥ 64 bits
# of entropy).
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


class SessionStoreError(CdsError):
    status = 503
    code = "transient"
    diagnostics = "Sessions are temporarily unavailable. Retry later."


class Kv(Protocol):
    def put(self, key: str, value: bytes, ttl_s: float) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def take(self, key: str) -> bytes | None: ...
    def delete(self, key: str) -> None: ...


class MemoryKv:
    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        with self._lock:
            self._data[key] = (value, time.time() + ttl_s)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value, expires = self._data.get(key, (None, 0.0))
            return value if expires > time.time() else None

    def take(self, key: str) -> bytes | None:
        with self._lock:
            value, expires = self._data.pop(key, (None, 0.0))
            return value if expires > time.time() else None

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)


class SqliteKv:
    """WAL SQLite, one connection per thread and process (as the replay cache keeps them)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._local = threading.local()
        self._next_purge = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connection()
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS smart_sessions (key TEXT PRIMARY KEY,"
                         " value BLOB NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID")
        except (OSError, sqlite3.Error) as exc:
            raise SessionStoreError(f"session store {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA synchronous = NORMAL")
            weakref.finalize(threading.current_thread(), conn.close)
            self._local.conn, self._local.pid = conn, os.getpid()
        return self._local.conn

    def _run(self, sql: str, args: tuple) -> sqlite3.Cursor:
        now = time.time()
        try:
            conn = self._connection()
            if now >= self._next_purge:
                self._next_purge = now + 60
                conn.execute("DELETE FROM smart_sessions WHERE expires_at <= ?", (now,))
            return conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise SessionStoreError(f"session store {self.path}: {exc}") from exc

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._run("INSERT INTO smart_sessions (key, value, expires_at) VALUES (?, ?, ?)"
                  " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                  " expires_at = excluded.expires_at", (key, value, time.time() + ttl_s))

    def get(self, key: str) -> bytes | None:
        row = self._run("SELECT value FROM smart_sessions WHERE key = ? AND expires_at > ?",
                        (key, time.time())).fetchone()
        return row[0] if row else None

    def take(self, key: str) -> bytes | None:
        row = self._run("DELETE FROM smart_sessions WHERE key = ? RETURNING value, expires_at",
                        (key,)).fetchone()
        return row[0] if row and row[1] > time.time() else None

    def delete(self, key: str) -> None:
        self._run("DELETE FROM smart_sessions WHERE key = ?", (key,))


class RedisKv:
    def __init__(self, url: str, *, prefix: str = "cds-service:smart:"):
        import redis  # noqa: PLC0415 - a worker without Redis never loads it (7 MB of RSS)

        self.prefix = prefix
        self._errors = redis.RedisError
        self._client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    def _call(self, method: str, key: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, method)(self.prefix + key, *args, **kwargs)
        except self._errors as exc:
            # The URL may carry a password: name only the failure class.
            raise SessionStoreError(f"session store (redis): {type(exc).__name__}") from exc

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._call("set", key, value, px=max(1, math.ceil(ttl_s * 1000)))

    def get(self, key: str) -> bytes | None:
        return self._call("get", key)

    def take(self, key: str) -> bytes | None:
        return self._call("getdel", key)  # Redis ≥ 6.2: read and delete atomically

    def delete(self, key: str) -> None:
        self._call("delete", key)


def kv_from_url(url: str | None, replay_cache_url: str | None,
                default_sqlite_path: str | os.PathLike[str]) -> Kv:
    """`SMART_SESSION_URL` (redis://… or sqlite:///path); unset: the replay cache's Redis when it
    is one (the same shared store), else a SQLite file beside it."""
    if not url and replay_cache_url and replay_cache_url.split(":", 1)[0] in ("redis", "rediss"):
        url = replay_cache_url
    if not url:
        return SqliteKv(default_sqlite_path)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return RedisKv(url)
    if scheme == "sqlite" and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteKv(url[len("sqlite:///"):])
    raise ValueError(f"unsupported SMART session URL scheme {scheme[:16]!r} "
                     "(use redis:// or sqlite:///path)")


def new_id() -> str:
    return secrets.token_urlsafe(32)


class Sessions:
    """Records of one browser session, each named (`launch:<state>`, `context:<id>`), sealed
    with a key only the session id gives."""

    def __init__(self, kv: Kv):
        self.kv = kv

    @staticmethod
    def _key(session_id: str, name: str) -> str:
        return hashlib.sha256(f"cds-smart-record\0{session_id}\0{name}".encode()).hexdigest()

    @staticmethod
    def _aead(session_id: str) -> AESGCM:
        return AESGCM(hashlib.sha256(f"cds-smart-seal\0{session_id}".encode()).digest())

    def put(self, session_id: str, name: str, record: dict[str, Any], ttl_s: float) -> None:
        key = self._key(session_id, name)
        nonce = os.urandom(12)
        sealed = self._aead(session_id).encrypt(nonce, json.dumps(record).encode(), key.encode())
        self.kv.put(key, nonce + sealed, max(1.0, ttl_s))

    def _open(self, session_id: str, key: str, blob: bytes | None) -> dict[str, Any] | None:
        if blob is None:
            return None
        try:
            plain = self._aead(session_id).decrypt(blob[:12], blob[12:], key.encode())
        except (InvalidTag, ValueError):
            return None
        return json.loads(plain)

    def get(self, session_id: str, name: str) -> dict[str, Any] | None:
        key = self._key(session_id, name)
        return self._open(session_id, key, self.kv.get(key))

    def take(self, session_id: str, name: str) -> dict[str, Any] | None:
        key = self._key(session_id, name)
        return self._open(session_id, key, self.kv.take(key))

    def delete(self, session_id: str, name: str) -> None:
        self.kv.delete(self._key(session_id, name))
