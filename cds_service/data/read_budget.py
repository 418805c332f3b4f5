"""The read budget: what one hook call's FHIR reads may spend, in time and bytes.

One hook call's reads share a `ReadBudget`: one deadline covering connect, TLS, every page and
every byte, a byte cap per response and per call, both enforced while the body streams in
(`cds_service.data.fhir_client`), and the sockets in flight, shut down when the caller stops
waiting, so a slow or dripping server frees its thread at the deadline instead of holding it for
as long as it keeps talking.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from cds_service.data.fhir import MIB, FhirResponseTooLarge

DEFAULT_MAX_RESPONSE_BYTES = 16 * MIB
DEFAULT_MAX_TOTAL_BYTES = 32 * MIB

_BUDGET: contextvars.ContextVar[ReadBudget | None] = contextvars.ContextVar(
    "cds_fhir_read_budget", default=None)


class ReadBudget:
    """What one hook call's FHIR reads may spend, shared by the threads reading for it.

    - `deadline`: a `time.monotonic()` instant covering connect, TLS, every page and every byte.
    - `max_response_bytes` per answer and `max_total_bytes` across the call's answers, counted
      after content decoding (urllib3 ≥ 2.6 decompresses at most one chunk per read).
    - `expire()` shuts down the sockets still in use, which ends a blocked read at once: a socket
      timeout bounds each `recv`, not a read that a server keeps alive one byte at a time (in the
      body, or in a header line that http.client reads up to 64 KiB of). Connections are tracked
      from the pool (`bounded_session`) while the reading thread runs inside `active()`.
    """

    def __init__(self, deadline: float, *, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES):
        self.deadline = deadline
        self.max_response_bytes = max_response_bytes
        self.max_total_bytes = max_total_bytes
        self._lock = threading.Lock()
        self._total = 0
        self._expired = False
        self._connections: set[Any] = set()

    def remaining(self) -> float:
        return 0.0 if self._expired else self.deadline - time.monotonic()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self.deadline

    def spend(self, n: int) -> None:
        """Count `n` more bytes read; `FhirResponseTooLarge` once the call's total is passed."""
        with self._lock:
            self._total += n
            over = self._total > self.max_total_bytes
        if over:
            raise FhirResponseTooLarge(
                f"FHIR server answers exceeded {format_mib(self.max_total_bytes)} in total")

    def expire(self) -> None:
        """Stop: no further request starts, and reads in progress fail now."""
        with self._lock:
            self._expired = True
            connections = list(self._connections)
        for conn in connections:
            sock = getattr(conn, "sock", None)
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would unwrap TLS
                # under a thread that is inside SSL_read. A blocked recv returns at once.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    @contextlib.contextmanager
    def active(self) -> Iterator[ReadBudget]:
        """Connections this thread takes from a `bounded_session` pool are watched meanwhile."""
        token = _BUDGET.set(self)
        try:
            yield self
        finally:
            _BUDGET.reset(token)

    def _watch(self, conn: Any) -> None:
        with self._lock:
            self._connections.add(conn)
            expired = self._expired
        if expired:
            self.expire()

    def _unwatch(self, conn: Any) -> None:
        with self._lock:
            self._connections.discard(conn)


class _WatchedPool:
    """Mixin for urllib3 pools: a connection in use by a thread inside `ReadBudget.active()` is
    watched by that budget until it goes back to the pool."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        budget = _BUDGET.get()
        if budget is not None:
            budget._watch(conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        budget = _BUDGET.get()
        if budget is not None and conn is not None:
            budget._unwatch(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class _WatchedHTTPPool(_WatchedPool, HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_WatchedPool, HTTPSConnectionPool):
    pass


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def bounded_session(pool_size: int = 10) -> requests.Session:
    """A session whose connections a `ReadBudget` can shut down (see `ReadBudget.expire`)."""
    session = requests.Session()
    adapter = _WatchedAdapter(pool_maxsize=max(10, pool_size))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def format_mib(n: int) -> str:
    return f"{n / MIB:g} MiB"
