"""Why a token is refused: `AuthError` and its reason codes, and how an unverified value from a
refused token may appear in a log line."""

from __future__ import annotations

import json
import logging
from types import MappingProxyType
from typing import Any

from cds_service.protocol.errors import CdsError

_LOG_FIELD_CHARS = 128

DESCRIPTIONS = {
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
        super().__init__(f"JWT refused ({reason}): {DESCRIPTIONS.get(reason, 'invalid token')}")
        self.reason = reason


def log_field(value: Any) -> str:
    """An unverified header/claim value made safe for one log line: printable, bounded."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:_LOG_FIELD_CHARS] + ("…" if len(text) > _LOG_FIELD_CHARS else "")
