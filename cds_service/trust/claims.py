"""The claims of a token whose signature verified (`ClaimRules`): jti, exp/iat/nbf within the
leeway, the lifetime, and an `aud` naming this endpoint or a configured audience."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from cds_service.trust.errors import AuthError
from cds_service.trust.issuers import normalise_aud
from cds_service.trust.settings import AuthSettings

MAX_JTI_CHARS = 512


class ClaimRules:
    """Checks verified claims against `AuthSettings`; raises AuthError with the claim's reason."""

    def __init__(self, settings: AuthSettings):
        self.settings = settings

    def check(self, claims: Mapping[str, Any], endpoint_url: str | None,
              audiences: frozenset[str]) -> tuple[str, float]:
        """The token's jti and exp, once every claim rule holds."""
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise AuthError("jti")
        exp = numeric_date(claims, "exp")
        iat = numeric_date(claims, "iat")
        nbf = numeric_date(claims, "nbf") if "nbf" in claims else None
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
        if not audience_ok(claims["aud"], endpoint_url, audiences):
            raise AuthError("aud")
        return jti, exp


def audience_ok(aud: Any, endpoint_url: str | None, audiences: frozenset[str]) -> bool:
    # CDS Hooks 2.0: aud is a string or an array of strings, the URL of the endpoint being
    # invoked. Epic's aud is whatever each hospital typed in, hence the configured audiences.
    values: Iterable[Any] = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not values:
        return False
    if not all(isinstance(v, str) for v in values):
        return False
    accepted = audiences
    if endpoint_url:
        accepted = accepted | {normalise_aud(endpoint_url)}
    return any(normalise_aud(v) in accepted for v in values)


def numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    # RFC 7519 §2: NumericDate is a JSON number; strings and booleans are refused.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(name)
    return float(value)
