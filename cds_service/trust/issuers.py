"""The issuers a verifier trusts (`TrustedIssuer`), checked once into a `TrustStore` that finds
an issuer by `iss` and the key a token of theirs names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cds_service.trust.errors import AuthError
from cds_service.trust.jwks import JwksCache
from cds_service.trust.jwks_fetch import check_jku_url
from cds_service.trust.keys import ASYMMETRIC_ALGORITHMS, BoundKey, KeySet
from cds_service.trust.settings import AuthSettings


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
class Issuer:
    """A `TrustedIssuer` as checked: its allow-lists as sets, its out-of-band keys parsed."""

    config: TrustedIssuer
    jku: frozenset[str]
    keys: KeySet | None
    audiences: frozenset[str]
    algorithms: frozenset[str]


def normalise_aud(url: str) -> str:
    return url.rstrip("/")


class TrustStore:
    """Trusted issuers by `iss`; ValueError at construction on any unusable configuration."""

    def __init__(self, issuers: Sequence[TrustedIssuer], settings: AuthSettings,
                 jwks_cache: JwksCache):
        self.jwks_cache = jwks_cache
        self._issuers: dict[str, Issuer] = {}
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
                keys = KeySet.parse(issuer.jwks, strict=True, where=f"{where}: jwks")
            for audience in issuer.audiences:
                if not isinstance(audience, str) or not audience:
                    raise ValueError(f"{where}: audiences must be non-empty strings")
            self._issuers[issuer.iss] = Issuer(
                config=issuer,
                jku=frozenset(issuer.jku),
                keys=keys,
                audiences=frozenset(normalise_aud(a) for a in issuer.audiences),
                algorithms=frozenset(issuer.algorithms),
            )

    @property
    def issuers(self) -> tuple[TrustedIssuer, ...]:
        return tuple(i.config for i in self._issuers.values())

    def get(self, iss: Any) -> Issuer | None:
        return self._issuers.get(iss) if isinstance(iss, str) else None

    def key(self, issuer: Issuer, header: Mapping[str, Any], kid: str, alg: str) -> BoundKey:
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
