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

The verifier runs the steps; the pieces live beside it: issuers and their keys in `issuers`
(`TrustStore`), JWKs in `keys`, the JWK Set cache in `jwks` (`jwks_fetch`, `jwks_shared`), the
claim rules in `claims`, the refusal reasons in `errors`.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cds_service.trust.claims import ClaimRules
from cds_service.trust.errors import AuthError, log_field
from cds_service.trust.issuers import TrustedIssuer, TrustStore
from cds_service.trust.jwks import JwksCache
from cds_service.trust.keys import ASYMMETRIC_ALGORITHMS, BoundKey
from cds_service.trust.replay import ReplayCache
from cds_service.trust.settings import AuthSettings

logger = logging.getLogger("cds_service.trust.auth")

MAX_TOKEN_BYTES = 16 * 1024  # an Epic token is under 1 KiB
MAX_KID_CHARS = 512

# A compact-serialisation segment as PyJWT >= 2.15 accepts it (`_decode_base64url_segment`): only
# the base64url alphabet (RFC 7515 §2), `=` only where it completes the last quantum, and
# canonical (RFC 4648 §3.5): a final 2- or 3-character group leaves 4 or 2 bits unused, which
# must be zero. One C-level match instead of PyJWT's per-character generator.
_SEGMENT = re.compile(
    r"(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}[AEIMQUYcgkosw048]=?|[A-Za-z0-9_-][AQgw](?:==)?)?"
)
# In PyJWT's order (`options["require"]`): a claim absent or null is refused with its name.
_REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")


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


class TokenVerifier:
    """Verifies CDS Hooks JWTs from a fixed set of trusted issuers; see the module docstring.

    The issuers and their keys are a `TrustStore`, the claim rules `ClaimRules`: the verifier
    runs the checks in their order and logs each refusal."""

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
        self.trust = TrustStore(issuers, settings, self.jwks_cache)
        self.claim_rules = ClaimRules(settings)

    @property
    def issuers(self) -> tuple[TrustedIssuer, ...]:
        return self.trust.issuers

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
                log_field(context.get("iss")),
                log_field(context.get("kid")),
                log_field(context.get("jti")),
            )
            raise

    def _verify(
        self, authorization: str | None, endpoint_url: str | None, context: dict[str, Any]
    ) -> VerifiedCaller:
        token = _bearer_token(authorization)

        segments, header, unverified = _peek(token)
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
        issuer = self.trust.get(iss)
        if issuer is None:
            raise AuthError("iss")
        if alg not in issuer.algorithms:
            raise AuthError("alg")

        key = self.trust.key(issuer, header, kid, alg)

        _verify_signature(segments, header, key, alg)
        claims = unverified  # now verified: the signed payload, parsed once by _peek
        for claim in _REQUIRED_CLAIMS:
            if claims.get(claim) is None:
                raise AuthError(claim)
        if claims["iss"] != issuer.config.iss:
            raise AuthError("iss")

        jti, exp = self.claim_rules.check(claims, endpoint_url, issuer.audiences)

        # Last: only a token that is valid in every other way may use up its jti.
        # Best practices §JWT: keep jti values for the token's lifetime (plus our clock skew).
        expires_at = exp + self.settings.leeway_s
        if not self.replay.first_use(issuer.config.iss, jti, expires_at=expires_at):
            raise AuthError("replay")

        sub = claims.get("sub")
        if logger.isEnabledFor(logging.DEBUG):  # log_field costs more than the rest of a call
            logger.debug("JWT accepted: iss=%s kid=%s jti=%s",
                         log_field(iss), log_field(kid), log_field(jti))
        return VerifiedCaller(
            iss=issuer.config.iss,
            site_id=issuer.config.site_id,
            sub=sub if isinstance(sub, str) else None,
            jti=jti,
            kid=kid,
            alg=alg,
            claims=MappingProxyType(claims),
        )


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


def _peek(token: str) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The three segments, and the header and claims parsed leniently, unverified, to choose the
    issuer and key. `_verify_signature` then checks the segments strictly: once they pass, these
    are the very values a strict parse would give."""
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
    return parts, header, claims


def _verify_signature(segments: list[str], header: Mapping[str, Any], key: BoundKey,
                      alg: str) -> None:
    """What `jwt.decode(token, key, algorithms=[alg])` (PyJWT 2.15) checks before the claims, in
    its order: strict segments ("malformed"), the key ("key"), the signature ("signature")."""
    if not all(_SEGMENT.fullmatch(segment) for segment in segments):
        raise AuthError("malformed")
    if header.get("b64", True) is False:
        # RFC 7797 unencoded payload: PyJWT refuses it unless `crit` lists b64 (refused already)
        # and a detached payload is passed (never).
        raise AuthError("malformed")
    if key.algorithm_name != alg or not key.usable:
        raise AuthError("key")
    signing_input = f"{segments[0]}.{segments[1]}".encode("ascii")
    signature = base64.urlsafe_b64decode(segments[2] + "=" * (-len(segments[2]) % 4))
    # PyJWT's own Algorithm.verify: PKCS#1 v1.5 or PSS for RSA; for ECDSA the JWS raw r||s form
    # (RFC 7518 §3.4), of the curve's exact length, converted to DER.
    if not key.Algorithm.verify(signing_input, key.prepared, signature):
        raise AuthError("signature")
