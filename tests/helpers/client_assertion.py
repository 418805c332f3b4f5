"""The token endpoint's check of a client's signed assertion (SMART Backend Services,
"Authenticating to the token endpoint"; RFC 7523), shared by the loopback OAuth servers."""

from __future__ import annotations

import threading
import time
from typing import Any

import jwt


def check_assertion(assertion: str, key: Any, alg: str, *, token_url: str, client_id: str,
                    seen_jti: set[str], lock: threading.Lock) -> dict:
    """The assertion's claims; ValueError naming the rule it breaks. iss and sub are the
    client_id, aud the token URL, exp at most five minutes ahead, each jti used once."""
    try:
        claims = jwt.decode(assertion, key, algorithms=[alg], audience=token_url,
                            issuer=client_id,
                            options={"require": ["exp", "jti", "iss", "sub", "aud"]})
    except jwt.PyJWTError as exc:
        raise ValueError(f"assertion refused: {exc}") from exc
    if claims["sub"] != client_id:
        raise ValueError("sub is not the client_id")
    if claims["exp"] > time.time() + 300:
        raise ValueError("exp more than five minutes ahead")
    with lock:
        if claims["jti"] in seen_jti:
            raise ValueError("jti replayed")
        seen_jti.add(claims["jti"])
    return claims
