"""The shared level of the JWK Set cache: sets fetched by any worker on any host, kept in Redis
(`RedisJwksStore`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cds_service.trust.jwks_fetch import MAX_JWKS_BYTES
from cds_service.trust.keys import KeySet

if TYPE_CHECKING:
    import redis

# One logger for all of token verification: refusals, skipped keys and JWK Set fetches alike.
logger = logging.getLogger("cds_service.trust.auth")

SHARED_JWKS_PREFIX = "cds-service:jwks:"
# After a Redis error the shared level is skipped for this long: one warning, then in-process only.
SHARED_JWKS_RETRY_S = 30.0
# A fetched_at this far ahead of our clock is not clock skew between hosts but a bad entry.
_SHARED_SKEW_S = 60.0


class RedisJwksStore:
    """The shared level of `JwksCache`: JWK Sets fetched by any worker on any host, in Redis.

    One key per jku, `<prefix><sha256(jku)>`, holding JSON `{"jku", "fetched_at", "jwks"}`:
    `jwks` is the set as parsed from the jku (public verification keys only, never the response
    as received), `fetched_at` is epoch seconds (wall clock: monotonic clocks differ per host).
    A value expires with the stale-use window (2 × TTL).

    Values read back are parsed again with the strict trust-store rules, so a corrupt, truncated,
    foreign or tampered value is ignored (and overwritten by the next fetch). Strict parsing cannot
    tell a well-formed public key planted by someone with write access to Redis from the EHR's
    own: that access is as sensitive as the trust store (docs/deploy.md).

    Redis errors never fail a lookup: `get` answers None and `put` does nothing, the error class is
    logged once, and Redis is not asked again for SHARED_JWKS_RETRY_S.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = SHARED_JWKS_PREFIX,
        socket_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        client: redis.Redis | None = None,
    ):
        scheme = url.split(":", 1)[0].lower() if isinstance(url, str) else ""
        if scheme not in ("redis", "rediss"):
            # Never echo the URL: it may carry a password.
            raise ValueError(f"unsupported JWKS cache URL scheme {scheme[:16]!r} (use redis://)")
        import redis  # noqa: PLC0415 - a worker without Redis never loads it (7 MB of RSS)

        self.prefix = prefix
        self._clock = clock
        self._errors = redis.RedisError
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._retry_at = 0.0

    def key(self, jku: str) -> str:
        return self.prefix + hashlib.sha256(jku.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, jku: str) -> tuple[KeySet, float] | None:
        """The shared set for `jku` and its age in seconds; None when absent, unusable or
        Redis cannot answer."""
        if time.monotonic() < self._retry_at:
            return None
        try:
            raw = self._client.get(self.key(jku))
        except self._errors as exc:
            self._unavailable(exc)
            return None
        if raw is None:
            return None
        try:
            return self._parse(raw, jku)
        except ValueError as exc:
            logger.warning("shared JWK Set for %s ignored: %s", jku, exc)
            return None

    def put(self, jku: str, keys: KeySet, *, expire_s: float) -> None:
        """Publish `keys`, fetched from `jku` just now, for every process."""
        if time.monotonic() < self._retry_at:
            return
        value = json.dumps({"jku": jku, "fetched_at": self._clock(), "jwks": keys.as_jwks()},
                           separators=(",", ":"))
        try:
            self._client.set(self.key(jku), value, px=max(1, math.ceil(expire_s * 1000)))
        except self._errors as exc:
            self._unavailable(exc)

    def close(self) -> None:
        self._client.close()

    def _parse(self, raw: bytes, jku: str) -> tuple[KeySet, float]:
        if len(raw) > 2 * MAX_JWKS_BYTES:
            raise ValueError("value too large")
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            raise ValueError("not JSON") from None
        if not isinstance(document, dict) or document.get("jku") != jku:
            raise ValueError("not an entry for this jku")
        fetched_at = document.get("fetched_at")
        if (isinstance(fetched_at, bool) or not isinstance(fetched_at, int | float)
                or not math.isfinite(fetched_at)):
            raise ValueError("fetched_at is not a number")
        age = self._clock() - fetched_at
        if age < -_SHARED_SKEW_S:
            raise ValueError("fetched_at is in the future")
        keys = KeySet.parse(document.get("jwks"), strict=True, where="jwks")
        return keys, max(age, 0.0)

    def _unavailable(self, exc: Exception) -> None:
        self._retry_at = time.monotonic() + SHARED_JWKS_RETRY_S
        # The URL may carry a password: name only the failure class.
        logger.warning("shared JWK Set cache (redis) unavailable: %s; in-process cache only "
                       "for %.0f s", type(exc).__name__, SHARED_JWKS_RETRY_S)

