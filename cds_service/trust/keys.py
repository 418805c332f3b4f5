"""Verification keys: which JWKs a trust store or a fetched JWK Set may hold, the set of them by
kid (`KeySet`), and a key bound to the one algorithm a token may use (`bind_key`, `BoundKey`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jwt

from cds_service.trust.errors import AuthError, log_field

# One logger for all of token verification: refusals, skipped keys and JWK Set fetches alike.
logger = logging.getLogger("cds_service.trust.auth")

# CDS Hooks 2.0 §JWT Signing Algorithm: JWTs "SHALL NOT be signed using the `none` algorithm" nor
# "any symmetric algorithm"; ES384 and RS384 are RECOMMENDED (Epic signs with RS384).
# In this order in a site file's error messages (`jwt.algorithms`).
SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                      "PS256", "PS384", "PS512")
ASYMMETRIC_ALGORITHMS = frozenset(SIGNING_ALGORITHMS)
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
# Private or symmetric members of a JWK (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
_SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class BoundKey(jwt.PyJWK):
    """A PyJWK bound to one algorithm, its key prepared once for `Algorithm.verify`.

    `usable` is False when PyJWT's own `prepare_key` or `check_key_length` refuses the key (an
    RSA modulus under 2048 bits, NIST SP 800-131A): what `jwt.decode` with
    `enforce_minimum_key_length` refuses with InvalidKeyError on every token, after parsing it.
    """

    def __init__(self, jwk_data: dict[str, Any], algorithm: str):
        super().__init__(jwk_data, algorithm=algorithm)
        try:
            self.prepared = self.Algorithm.prepare_key(self.key)
        except jwt.InvalidKeyError:  # e.g. an EC key on another curve than `alg` names
            self.prepared, self.usable = None, False
        else:
            self.usable = self.Algorithm.check_key_length(self.prepared) is None


def bind_key(jwk_data: Mapping[str, Any], alg: str) -> BoundKey:
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
        return BoundKey(dict(jwk_data), algorithm=alg)
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


class KeySet:
    """Verification JWKs of one JWK Set by kid, with PyJWKs bound per (kid, alg) memoised."""

    def __init__(self, keys: Mapping[str, Mapping[str, Any]]):
        self._keys = dict(keys)
        self._bound: dict[tuple[str, str], BoundKey] = {}
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
    def parse(cls, jwks: Any, *, strict: bool, where: str) -> KeySet:
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
                    raise ValueError(f"{where}: keys[{n}] repeats kid {log_field(kid)}")
                duplicates.add(kid)
            keys[kid] = MappingProxyType(dict(jwk_data))
        for kid in duplicates:
            logger.warning("JWK Set %s: kid %s appears twice; not used", where, log_field(kid))
            del keys[kid]
        if strict and not keys:
            raise ValueError(f"{where}: no signature verification keys")
        return cls(keys)
