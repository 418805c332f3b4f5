"""`AuthSettings`: the verifier's and the JWK Set cache's limits, one frozen value for both."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuthSettings:
    """Verifier limits; the defaults suit Epic (exp = iat + 900, nbf = iat − 300)."""

    leeway_s: int = 30  # clock skew for exp/iat/nbf
    max_lifetime_s: int = 3600  # refuse exp - iat beyond this (best practice: ≤ 1 hour)
    jwks_ttl_s: int = 3600
    jwks_refetch_min_interval_s: float = 60.0  # one refetch on unknown kid, at most this often
    jwks_timeout_s: float = 3.0
    allow_http_loopback_jku: bool = False  # tests only: http jku on 127.0.0.0/8, ::1, localhost
