"""`JwksCache`: JWK Sets from allow-listed jku URLs, kept per process (and, with a
`RedisJwksStore`, shared by every worker), refetched on expiry or an unknown kid."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jwt
import requests

from cds_service.trust.errors import AuthError
from cds_service.trust.jwks_fetch import FetchFailed, JwksFetcher, check_jku_url
from cds_service.trust.jwks_shared import RedisJwksStore
from cds_service.trust.keys import KeySet
from cds_service.trust.settings import AuthSettings

# One logger for all of token verification: refusals, skipped keys and JWK Set fetches alike.
logger = logging.getLogger("cds_service.trust.auth")


@dataclass
class _JwksEntry:
    keys: KeySet | None = None
    fetched_at: float | None = None  # when `keys` was fetched (here or by another process)
    last_attempt: float | None = None  # any fetch, failed or not (the refetch rate limit)
    lock: threading.Lock = field(default_factory=threading.Lock)


class JwksCache:
    """JWK Sets fetched from allow-listed jku URLs, keyed by (jku, kid). Thread-safe.

    - A set is fetched on first use and again after `jwks_ttl_s`; a kid missing from a cached set
      triggers one refetch, at most once per `jwks_refetch_min_interval_s` per jku (key rotation
      without letting unknown kids hammer the EHR). Failed fetches count towards that interval.
    - When a refetch fails, keys older than the TTL stay usable for one more TTL (the EHR's key
      endpoint being down should not stop decision support; a removed key is dropped as soon as
      a fetch succeeds).
    - With `shared` (a `RedisJwksStore`), every worker and host shares what any of them fetched.
      The in-process level still answers first: Redis is read only when it cannot (no fresh set,
      or an unknown kid), and a newer shared set replaces the local one; a set fetched here is
      published. A set fetched by anyone within the minimum interval counts as an attempt, so
      an unknown kid is refused without asking the EHR again. Redis down: in-process only.
    - Only https URLs are fetched (or http to loopback when `allow_http_loopback_jku`); redirects
      are never followed; the body is limited to MAX_JWKS_BYTES; the whole fetch to
      `jwks_timeout_s`. Callers check the jku allow-list first: this class fetches what it is
      asked for.
    """

    def __init__(
        self,
        settings: AuthSettings,
        session: requests.Session | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        shared: RedisJwksStore | None = None,
    ):
        self.settings = settings
        self._fetcher = JwksFetcher(settings, session)
        self._clock = clock
        self.shared = shared
        self._entries: dict[str, _JwksEntry] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._fetcher.close()
        if self.shared is not None:
            self.shared.close()

    def key(self, jku: str, kid: str, alg: str | None = None) -> jwt.PyJWK:
        """The key `kid` of the JWK Set at `jku`, bound to `alg` when given.

        Raises AuthError: "jku" (URL not fetchable, nothing sent), "jku-fetch" (no usable set),
        "kid" (not in the set, even after the refetch allowed now), "key" (cannot verify `alg`).
        """
        problem = check_jku_url(jku, allow_http_loopback=self.settings.allow_http_loopback_jku)
        if problem is not None:
            raise AuthError("jku")
        with self._lock:
            entry = self._entries.setdefault(jku, _JwksEntry())
        keys = self._fresh_keys(entry, self._clock())
        if keys is not None and kid in keys:
            return keys.bind(kid, alg)
        with entry.lock:  # one fetch per jku at a time; waiters then see its result
            now = self._clock()
            keys = self._fresh_keys(entry, now)
            if keys is not None and kid in keys:
                return keys.bind(kid, alg)
            if self.shared is not None:
                self._adopt_shared(jku, entry, now)
                keys = self._fresh_keys(entry, now)
                if keys is not None and kid in keys:
                    return keys.bind(kid, alg)
            interval = self.settings.jwks_refetch_min_interval_s
            if all(t is None or now - t >= interval
                   for t in (entry.last_attempt, entry.fetched_at)):
                entry.last_attempt = now
                try:
                    entry.keys = self._fetcher.fetch(jku)
                    entry.fetched_at = now
                except FetchFailed as exc:
                    logger.warning("JWK Set fetch from %s failed: %s", jku, exc)
                else:
                    if self.shared is not None:
                        self.shared.put(jku, entry.keys, expire_s=2 * self.settings.jwks_ttl_s)
            keys = self._usable_keys(entry, now)
            if keys is None:
                raise AuthError("jku-fetch")
            if kid not in keys:
                raise AuthError("kid")
            return keys.bind(kid, alg)

    def _adopt_shared(self, jku: str, entry: _JwksEntry, now: float) -> None:
        found = self.shared.get(jku)
        if found is None:
            return
        keys, age = found
        if entry.fetched_at is None or now - age > entry.fetched_at:
            entry.keys, entry.fetched_at = keys, now - age

    def _fresh_keys(self, entry: _JwksEntry, now: float) -> KeySet | None:
        if entry.keys is None or entry.fetched_at is None:
            return None
        return entry.keys if now - entry.fetched_at < self.settings.jwks_ttl_s else None

    def _usable_keys(self, entry: _JwksEntry, now: float) -> KeySet | None:
        if entry.keys is None or entry.fetched_at is None:
            return None
        return entry.keys if now - entry.fetched_at < 2 * self.settings.jwks_ttl_s else None
