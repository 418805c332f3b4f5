"""Verify the JWT an EHR sends in `Authorization: Bearer …` (CDS Hooks 2.0 §Trusting CDS Clients).

Trust is configured, never discovered: a `TrustedIssuer` names an exact `iss`, the site it
belongs to, the JWK Set URLs (`jku`) it may point at and/or a JWK Set exchanged out of band, the
`aud` values the site typed into Epic, and the asymmetric algorithms it may use.

`TokenVerifier.verify` checks, in this order, and refuses with `AuthError(reason)`:

1. the header is `Bearer <jwt>` ("missing", "scheme", "malformed");
2. the JOSE header: `alg` asymmetric (`none` and HS* are refused here, before any key is looked
   up), no `crit` (we implement no JWS extension), `kid` present, `typ` JWT ("alg", "crit",
   "kid", "typ");
3. `iss` is a trusted issuer, `alg` is in its allow-list ("iss", "alg");
4. the key: with a `jku` header, only an allow-listed jku is fetched (exact string match; nothing
   else is ever requested); without one, the issuer's out-of-band JWK Set ("jku", "jku-fetch",
   "kid", "key"). Embedded `jwk`/`x5c`/`x5u` headers are never used;
5. the signature, with the key bound to the one allowed algorithm ("signature", "key");
6. claims: iss, aud, exp, iat, jti required; aud names this endpoint (its URL as configured,
   never as the request's Host header says) or a configured audience;
   exp/iat/nbf within leeway; exp − iat ≤ max lifetime ("aud", "exp", "iat", "nbf", "lifetime",
   "jti");
7. last, the jti replay cache, so a forged token cannot burn a jti ("replay").

Each refusal is logged once at WARNING on `cds_service.trust.auth` with the reason and the
(unverified) iss/kid/jti — never the token or any part of it (best practices §JWT: never store,
share or log JWTs).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import jwt
import redis
import requests

from cds_service.data.fhir import is_loopback_host
from cds_service.protocol.errors import CdsError
from cds_service.trust.replay import ReplayCache

logger = logging.getLogger("cds_service.trust.auth")

# CDS Hooks 2.0 §JWT Signing Algorithm: JWTs "SHALL NOT be signed using the `none` algorithm" nor
# "any symmetric algorithm"; ES384 and RS384 are RECOMMENDED (Epic signs with RS384).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
# Private or symmetric members of a JWK (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
_SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

MAX_TOKEN_BYTES = 16 * 1024  # an Epic token is under 1 KiB
MAX_JTI_CHARS = 512
MAX_KID_CHARS = 512
MAX_JWKS_BYTES = 256 * 1024
_LOG_FIELD_CHARS = 128

_DESCRIPTIONS = {
    "missing": "no Authorization header",
    "scheme": "the Authorization scheme is not Bearer",
    "malformed": "the token is not a well-formed JWS",
    "alg": "the signing algorithm is not accepted",
    "kid": "no trusted key has this kid",
    "typ": "the JOSE header typ is not JWT",
    "crit": "the token requires a JWS extension this service does not implement",
    "iss": "the issuer is not trusted",
    "jku": "the jku is not allow-listed for this issuer",
    "jku-fetch": "the JWK Set could not be fetched",
    "key": "the key cannot verify this algorithm",
    "signature": "the signature does not verify",
    "aud": "the audience is not this service",
    "exp": "the token has expired",
    "iat": "the token is issued in the future",
    "nbf": "the token is not valid yet",
    "lifetime": "the token lifetime is too long",
    "jti": "the jti claim is missing or invalid",
    "replay": "the token has already been used",
}


class AuthError(CdsError):
    """Token refused; `reason` is a short machine-readable code for logs and metrics.

    The message names the reason only: never the token or any part of it.
    """

    # Best practice (rule 110): the same bare 401 for every reason; the verifier logs the reason.
    status = 401
    code = "login"
    diagnostics = "Authentication required."
    headers = MappingProxyType({"WWW-Authenticate": "Bearer"})
    log_level = logging.DEBUG

    def __init__(self, reason: str):
        super().__init__(f"JWT refused ({reason}): {_DESCRIPTIONS.get(reason, 'invalid token')}")
        self.reason = reason


@dataclass(frozen=True)
class TrustedIssuer:
    """An EHR we accept JWTs from, and the site (tenant) its `iss` selects."""

    iss: str  # exact string match
    site_id: str
    jku: tuple[str, ...] = ()  # allow-listed JWK Set URLs for this issuer
    jwks: Mapping | None = None  # JWK Set exchanged out of band (already loaded from jwks_file)
    # The site's configured `aud` values (Epic's aud is typed in by each hospital).
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS384", "ES384")


@dataclass(frozen=True)
class AuthSettings:
    """Verifier limits; the defaults suit Epic (exp = iat + 900, nbf = iat − 300)."""

    leeway_s: int = 30  # clock skew for exp/iat/nbf
    max_lifetime_s: int = 3600  # refuse exp - iat beyond this (best practice: ≤ 1 hour)
    jwks_ttl_s: int = 3600
    jwks_refetch_min_interval_s: float = 60.0  # one refetch on unknown kid, at most this often
    jwks_timeout_s: float = 3.0
    allow_http_loopback_jku: bool = False  # tests only: http jku on 127.0.0.0/8, ::1, localhost


@dataclass(frozen=True)
class VerifiedCaller:
    """Who called: the verified issuer, its site, and the token's identifiers and claims."""

    iss: str
    site_id: str
    sub: str | None
    jti: str
    kid: str
    alg: str
    claims: Mapping


# -- keys -----------------------------------------------------------------------------------


def bind_key(jwk_data: Mapping[str, Any], alg: str) -> jwt.PyJWK:
    """A PyJWK that verifies only `alg`; AuthError("key") when the JWK cannot serve it.

    PyJWK binds one algorithm at construction (RSA keys default to RS256), so the key is bound
    to the already-allowed token `alg` after checking the key's own type, curve and `alg`.
    """
    declared = jwk_data.get("alg")
    if declared is not None and declared != alg:
        raise AuthError("key")
    if jwk_data.get("kty") != _KTY.get(alg[:2]):
        raise AuthError("key")
    if alg in _CURVE and jwk_data.get("crv") != _CURVE[alg]:
        raise AuthError("key")
    try:
        return jwt.PyJWK(dict(jwk_data), algorithm=alg)
    except jwt.PyJWTError:
        raise AuthError("key") from None


def _check_public_jwk(jwk_data: Any) -> str | None:
    """Why this JWK Set member is unusable as a signature verification key, or None."""
    if not isinstance(jwk_data, Mapping):
        return "not a JSON object"
    kid = jwk_data.get("kid")
    if not isinstance(kid, str) or not kid:
        return "has no kid"
    if jwk_data.get("kty") == "oct" or _SECRET_MEMBERS & set(jwk_data):
        # A trust store holds public keys only: a symmetric or private key here is a leak.
        return "holds secret or private key material"
    if jwk_data.get("kty") not in ("RSA", "EC"):
        return f"has unsupported kty {str(jwk_data.get('kty'))[:16]!r}"
    if "alg" in jwk_data and jwk_data["alg"] not in ASYMMETRIC_ALGORITHMS:
        return f"declares alg {str(jwk_data['alg'])[:16]!r}"
    try:
        jwt.PyJWK(dict(jwk_data))
    except jwt.PyJWTError as exc:
        return f"is not a usable public key ({type(exc).__name__})"
    return None


def _is_signing_key(jwk_data: Mapping[str, Any]) -> bool:
    use = jwk_data.get("use")
    ops = jwk_data.get("key_ops")
    return (use is None or use == "sig") and (ops is None or "verify" in ops)


class _KeySet:
    """Verification JWKs of one JWK Set by kid, with PyJWKs bound per (kid, alg) memoised."""

    def __init__(self, keys: Mapping[str, Mapping[str, Any]]):
        self._keys = dict(keys)
        self._bound: dict[tuple[str, str], jwt.PyJWK] = {}
        self._lock = threading.Lock()

    def __contains__(self, kid: str) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def as_jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The verification keys as a JWK Set document (public members only, as parsed)."""
        return {"keys": [dict(jwk_data) for jwk_data in self._keys.values()]}

    def bind(self, kid: str, alg: str | None) -> jwt.PyJWK:
        jwk_data = self._keys[kid]
        if alg is None:
            try:
                return jwt.PyJWK(dict(jwk_data))
            except jwt.PyJWTError:
                raise AuthError("key") from None
        with self._lock:
            bound = self._bound.get((kid, alg))
        if bound is None:
            bound = bind_key(jwk_data, alg)
            with self._lock:
                self._bound[(kid, alg)] = bound
        return bound

    @classmethod
    def parse(cls, jwks: Any, *, strict: bool, where: str) -> _KeySet:
        """Strict (a trust store from configuration): ValueError on anything suspicious.
        Lenient (fetched from a jku): unusable members are skipped and logged."""
        keys_list = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(keys_list, list):
            raise ValueError(f"{where}: not a JWK Set (no `keys` list)")
        keys: dict[str, Mapping[str, Any]] = {}
        duplicates: set[str] = set()
        for n, jwk_data in enumerate(keys_list):
            problem = _check_public_jwk(jwk_data)
            if problem is None and not _is_signing_key(jwk_data):
                continue  # e.g. an encryption key published alongside
            if problem is not None:
                if strict:
                    raise ValueError(f"{where}: keys[{n}] {problem}")
                logger.warning("JWK Set %s: keys[%d] skipped: %s", where, n, problem)
                continue
            kid = jwk_data["kid"]
            if kid in keys:
                # RFC 7517 §4.5 / CDS Hooks: kid is unique within the set; two keys with one kid
                # are ambiguous, so neither is used.
                if strict:
                    raise ValueError(f"{where}: keys[{n}] repeats kid {_clean(kid)}")
                duplicates.add(kid)
            keys[kid] = MappingProxyType(dict(jwk_data))
        for kid in duplicates:
            logger.warning("JWK Set %s: kid %s appears twice; not used", where, _clean(kid))
            del keys[kid]
        if strict and not keys:
            raise ValueError(f"{where}: no signature verification keys")
        return cls(keys)


def check_jku_url(url: Any, *, allow_http_loopback: bool) -> str | None:
    """Why `url` may not be fetched as a JWK Set, or None: https only (or http to a loopback host
    when allowed), no credentials, no fragment."""
    if not isinstance(url, str) or not url:
        return "is not a URL"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "is not a valid URL"
    if not host:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if parts.fragment:
        return "must not carry a fragment"
    scheme = parts.scheme.lower()
    if scheme == "https":
        return None
    if scheme == "http" and allow_http_loopback and is_loopback_host(host):
        return None
    return "is not https"


class _FetchFailed(Exception):
    """The JWK Set at a jku could not be fetched or parsed; message names the class of failure."""


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
        self.prefix = prefix
        self._clock = clock
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._retry_at = 0.0

    def key(self, jku: str) -> str:
        return self.prefix + hashlib.sha256(jku.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, jku: str) -> tuple[_KeySet, float] | None:
        """The shared set for `jku` and its age in seconds; None when absent, unusable or
        Redis cannot answer."""
        if time.monotonic() < self._retry_at:
            return None
        try:
            raw = self._client.get(self.key(jku))
        except redis.RedisError as exc:
            self._unavailable(exc)
            return None
        if raw is None:
            return None
        try:
            return self._parse(raw, jku)
        except ValueError as exc:
            logger.warning("shared JWK Set for %s ignored: %s", jku, exc)
            return None

    def put(self, jku: str, keys: _KeySet, *, expire_s: float) -> None:
        """Publish `keys`, fetched from `jku` just now, for every process."""
        if time.monotonic() < self._retry_at:
            return
        value = json.dumps({"jku": jku, "fetched_at": self._clock(), "jwks": keys.as_jwks()},
                           separators=(",", ":"))
        try:
            self._client.set(self.key(jku), value, px=max(1, math.ceil(expire_s * 1000)))
        except redis.RedisError as exc:
            self._unavailable(exc)

    def close(self) -> None:
        self._client.close()

    def _parse(self, raw: bytes, jku: str) -> tuple[_KeySet, float]:
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
        keys = _KeySet.parse(document.get("jwks"), strict=True, where="jwks")
        return keys, max(age, 0.0)

    def _unavailable(self, exc: redis.RedisError) -> None:
        self._retry_at = time.monotonic() + SHARED_JWKS_RETRY_S
        # The URL may carry a password: name only the failure class.
        logger.warning("shared JWK Set cache (redis) unavailable: %s; in-process cache only "
                       "for %.0f s", type(exc).__name__, SHARED_JWKS_RETRY_S)


@dataclass
class _JwksEntry:
    keys: _KeySet | None = None
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
        self._session = session if session is not None else requests.Session()
        self._owns_session = session is None
        self._clock = clock
        self.shared = shared
        self._entries: dict[str, _JwksEntry] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()
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
                    entry.keys = self._fetch(jku)
                    entry.fetched_at = now
                except _FetchFailed as exc:
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

    def _fresh_keys(self, entry: _JwksEntry, now: float) -> _KeySet | None:
        if entry.keys is None or entry.fetched_at is None:
            return None
        return entry.keys if now - entry.fetched_at < self.settings.jwks_ttl_s else None

    def _usable_keys(self, entry: _JwksEntry, now: float) -> _KeySet | None:
        if entry.keys is None or entry.fetched_at is None:
            return None
        return entry.keys if now - entry.fetched_at < 2 * self.settings.jwks_ttl_s else None

    def _fetch(self, jku: str) -> _KeySet:
        timeout = self.settings.jwks_timeout_s
        started = time.monotonic()
        try:
            response = self._session.get(
                jku,
                timeout=(timeout, timeout),
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/jwk-set+json, application/json"},
            )
        except requests.RequestException as exc:
            raise _FetchFailed(type(exc).__name__) from None
        try:
            if response.status_code != 200:
                raise _FetchFailed(f"HTTP {response.status_code}")
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                raise _FetchFailed("response too large")
            body = bytearray()
            try:
                for chunk in response.iter_content(chunk_size=16 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _FetchFailed("response too large")
                    if time.monotonic() - started > timeout:
                        raise _FetchFailed("timed out")
            except requests.RequestException as exc:
                raise _FetchFailed(type(exc).__name__) from None
        finally:
            response.close()
        try:
            document = json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise _FetchFailed("body is not JSON") from None
        try:
            keys = _KeySet.parse(document, strict=False, where=jku)
        except ValueError as exc:
            raise _FetchFailed(str(exc)) from None
        logger.info("JWK Set fetched from %s: %d signing keys", jku, len(keys))
        return keys


# -- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Issuer:
    config: TrustedIssuer
    jku: frozenset[str]
    keys: _KeySet | None
    audiences: frozenset[str]
    algorithms: frozenset[str]


class TokenVerifier:
    """Verifies CDS Hooks JWTs from a fixed set of trusted issuers; see the module docstring."""

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        replay: ReplayCache,
        settings: AuthSettings = AuthSettings(),  # noqa: B008 - frozen, immutable default
        jwks_cache: JwksCache | None = None,
    ):
        self.settings = settings
        self.replay = replay
        self.jwks_cache = jwks_cache if jwks_cache is not None else JwksCache(settings)
        self._issuers: dict[str, _Issuer] = {}
        for issuer in issuers:
            if not isinstance(issuer.iss, str) or not issuer.iss:
                raise ValueError("an issuer has an empty `iss`")
            where = f"issuer {issuer.iss}"
            if issuer.iss in self._issuers:
                raise ValueError(f"{where}: configured twice (iss selects the site)")
            if not issuer.algorithms:
                raise ValueError(f"{where}: no algorithms allowed")
            for alg in issuer.algorithms:
                if alg not in ASYMMETRIC_ALGORITHMS:
                    # CDS Hooks 2.0: never `none`, never a symmetric algorithm.
                    raise ValueError(
                        f"{where}: algorithm {alg!r} is not allowed "
                        f"(choose from {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
                    )
            for url in issuer.jku:
                problem = check_jku_url(
                    url, allow_http_loopback=settings.allow_http_loopback_jku
                )
                if problem is not None:
                    raise ValueError(f"{where}: jku {url!r} {problem}")
            if not issuer.jku and issuer.jwks is None:
                raise ValueError(f"{where}: give jku URLs or an out-of-band JWK Set")
            keys = None
            if issuer.jwks is not None:
                keys = _KeySet.parse(issuer.jwks, strict=True, where=f"{where}: jwks")
            for audience in issuer.audiences:
                if not isinstance(audience, str) or not audience:
                    raise ValueError(f"{where}: audiences must be non-empty strings")
            self._issuers[issuer.iss] = _Issuer(
                config=issuer,
                jku=frozenset(issuer.jku),
                keys=keys,
                audiences=frozenset(_normalise_aud(a) for a in issuer.audiences),
                algorithms=frozenset(issuer.algorithms),
            )

    @property
    def issuers(self) -> tuple[TrustedIssuer, ...]:
        return tuple(i.config for i in self._issuers.values())

    def verify(self, authorization: str | None, endpoint_url: str | None) -> VerifiedCaller:
        """Verify the `Authorization` header for a call to `endpoint_url`; raises AuthError.

        `endpoint_url` comes from configuration (the public URL and the route invoked), or is
        None when none is configured: then only the issuer's `audiences` are accepted."""
        context: dict[str, Any] = {}
        try:
            return self._verify(authorization, endpoint_url, context)
        except AuthError as exc:
            logger.warning(
                "JWT refused: reason=%s iss=%s kid=%s jti=%s",
                exc.reason,
                _clean(context.get("iss")),
                _clean(context.get("kid")),
                _clean(context.get("jti")),
            )
            raise

    def _verify(
        self, authorization: str | None, endpoint_url: str | None, context: dict[str, Any]
    ) -> VerifiedCaller:
        token = _bearer_token(authorization)

        header, unverified = _peek(token)
        context["kid"] = header.get("kid")
        context["iss"] = unverified.get("iss")
        context["jti"] = unverified.get("jti")

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            # `none`, every HS* (including an RSA public key used as an HMAC secret) and anything
            # unknown stop here, before a key is looked up or fetched.
            raise AuthError("alg")
        if "crit" in header:
            # RFC 7515 §4.1.11: a recipient that does not understand every extension `crit` lists
            # must reject the JWS. We implement none, so any `crit` (even an empty or malformed
            # one, itself invalid there) is refused here, whatever the PyJWT release: before
            # 2.12 PyJWT ignored `crit` (hence the floor in pyproject.toml).
            raise AuthError("crit")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
            raise AuthError("kid")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "jwt":
            raise AuthError("typ")

        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("iss")
        if alg not in issuer.algorithms:
            raise AuthError("alg")

        key = self._key(issuer, header, kid, alg)

        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                issuer=issuer.config.iss,
                options={
                    "require": ["iss", "aud", "exp", "iat", "jti"],
                    # Checked below, after the signature, with our own rules and reasons.
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_sub": False,
                    "verify_jti": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError("signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(exc.claim if exc.claim in _DESCRIPTIONS else "malformed") from None
        except jwt.InvalidIssuerError:
            raise AuthError("iss") from None
        except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError):
            raise AuthError("key") from None
        except jwt.PyJWTError:
            raise AuthError("malformed") from None

        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise AuthError("jti")
        exp = _numeric_date(claims, "exp")
        iat = _numeric_date(claims, "iat")
        nbf = _numeric_date(claims, "nbf") if "nbf" in claims else None
        leeway = self.settings.leeway_s
        now = time.time()
        if exp <= now - leeway:
            raise AuthError("exp")
        if iat > now + leeway:
            raise AuthError("iat")
        # Epic sends nbf = iat − 300 (Epic CDS Hooks tutorial, "JWT Tokens"): a past nbf is fine.
        if nbf is not None and nbf > now + leeway:
            raise AuthError("nbf")
        if exp <= iat or exp - iat > self.settings.max_lifetime_s:
            raise AuthError("lifetime")
        if not self._audience_ok(claims["aud"], endpoint_url, issuer):
            raise AuthError("aud")

        # Last: only a token that is valid in every other way may use up its jti.
        # Best practices §JWT: keep jti values for the token's lifetime (plus our clock skew).
        if not self.replay.first_use(issuer.config.iss, jti, expires_at=exp + leeway):
            raise AuthError("replay")

        sub = claims.get("sub")
        logger.debug("JWT accepted: iss=%s kid=%s jti=%s", _clean(iss), _clean(kid), _clean(jti))
        return VerifiedCaller(
            iss=issuer.config.iss,
            site_id=issuer.config.site_id,
            sub=sub if isinstance(sub, str) else None,
            jti=jti,
            kid=kid,
            alg=alg,
            claims=MappingProxyType(claims),
        )

    def _key(self, issuer: _Issuer, header: Mapping[str, Any], kid: str, alg: str) -> jwt.PyJWK:
        if "jku" in header:
            jku = header["jku"]
            # Allow-list by exact string before anything is fetched: a jku chosen by the token's
            # author would let them choose the verification key (and point us anywhere: SSRF).
            # Epic: "verify the jku exists on your trusted allowlist of jku's".
            if not isinstance(jku, str) or jku not in issuer.jku:
                raise AuthError("jku")
            return self.jwks_cache.key(jku, kid, alg)
        if issuer.keys is None:
            raise AuthError("jku")  # this issuer's keys are only published at a jku
        if kid not in issuer.keys:
            raise AuthError("kid")
        return issuer.keys.bind(kid, alg)

    @staticmethod
    def _audience_ok(aud: Any, endpoint_url: str | None, issuer: _Issuer) -> bool:
        # CDS Hooks 2.0: aud is a string or an array of strings, the URL of the endpoint being
        # invoked. Epic's aud is whatever each hospital typed in, hence the configured audiences.
        values: Iterable[Any] = [aud] if isinstance(aud, str) else aud
        if not isinstance(values, list) or not values:
            return False
        if not all(isinstance(v, str) for v in values):
            return False
        accepted = issuer.audiences
        if endpoint_url:
            accepted = accepted | {_normalise_aud(endpoint_url)}
        return any(_normalise_aud(v) in accepted for v in values)


def _bearer_token(authorization: str | None) -> str:
    if authorization is None or not authorization.strip():
        raise AuthError("missing")
    scheme, _, token = authorization.strip().partition(" ")
    # RFC 6750 §2.1 / RFC 9110 §11.1: the auth-scheme is case-insensitive.
    if scheme.lower() != "bearer":
        raise AuthError("scheme")
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_BYTES or len(token.split()) != 1:
        raise AuthError("malformed")
    return token


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, unverified, only to choose the issuer and key. PyJWT then parses the
    token again, strictly, and verifies it; parsing it strictly twice was a tenth of a call."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed")
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
                          for part in parts[:2])
    except (ValueError, RecursionError):  # binascii.Error and JSONDecodeError are ValueErrors
        raise AuthError("malformed") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AuthError("malformed")
    if "kid" in header and not isinstance(header["kid"], str):
        raise AuthError("malformed")  # RFC 7515 §4.1.4: a string (PyJWT's own header rule)
    return header, claims


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    # RFC 7519 §2: NumericDate is a JSON number; strings and booleans are refused.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(name)
    return float(value)


def _normalise_aud(url: str) -> str:
    return url.rstrip("/")


def _clean(value: Any) -> str:
    """An unverified header/claim value made safe for one log line: printable, bounded."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:_LOG_FIELD_CHARS] + ("…" if len(text) > _LOG_FIELD_CHARS else "")
