"""SMART Backend Services: a signed client assertion for an access token, refreshed before it
expires. https://hl7.org/fhir/smart-app-launch/backend-services.html

The token is held here and handed out as a `requests` auth object; it is never logged, and
errors name the token endpoint and the OAuth `error`, never the assertion or the token.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization

from cds_service.data.fhir import BearerAuth
from cds_service.training.errors import AuthFailed, ExportError

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Backend Services §Authenticating: `exp` "no more than five minutes in the future"; one second
# short of it, so a server comparing against its own clock never sees more.
ASSERTION_LIFETIME_S = 299
# Epic access tokens last about 5 minutes; servers that omit `expires_in` get the same guess.
DEFAULT_TOKEN_LIFETIME_S = 300
TIMEOUT_S = 30.0


def load_signing_key(path: Path, *, kid: str, algorithm: str, setting: str = "bulk_export"
                     ) -> Any:
    """The private key in `path`: a PEM, a private JWK, or a JWK Set holding a key whose `kid`
    is `kid`. Raises AuthFailed saying what is wrong with the file (never its contents), naming
    the site file's `setting` section."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthFailed(f"{setting}.private_key_file: cannot read {path}: "
                         f"{exc.strerror}") from exc
    if data.lstrip().startswith(b"{"):
        return _key_from_jwk(data, path, kid=kid, algorithm=algorithm, setting=setting)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuthFailed(f"{setting}.private_key_file: {path} is neither an unencrypted PEM "
                         "private key nor a JWK Set") from exc


def _key_from_jwk(data: bytes, path: Path, *, kid: str, algorithm: str, setting: str) -> Any:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise AuthFailed(f"{setting}.private_key_file: {path} is not JSON") from exc
    keys = document.get("keys", [document]) if isinstance(document, dict) else []
    matching = [k for k in keys if isinstance(k, dict) and k.get("kid") == kid]
    if not matching:
        raise AuthFailed(f"{setting}.private_key_file: {path} has no key with kid {kid!r} "
                         "(the kid the EHR registered the public key under)")
    jwk = matching[0]
    if "d" not in jwk:
        raise AuthFailed(f"{setting}.private_key_file: {path}: the key {kid!r} is a public "
                         "key; the private one signs client assertions")
    if jwk.get("alg") and jwk["alg"] != algorithm:
        raise AuthFailed(f"{setting}.private_key_file: {path}: the key {kid!r} is for "
                         f"{jwk['alg']}, {setting}.algorithm is {algorithm}")
    try:
        return jwt.PyJWK(jwk, algorithm).key
    except jwt.PyJWTError as exc:
        raise AuthFailed(f"{setting}.private_key_file: {path}: the key {kid!r} is not a "
                         f"usable {algorithm} key: {exc}") from exc


def default_scope(types: tuple[str, ...], smart_configuration: dict[str, Any]) -> str:
    """`system/<Type>.rs` (SMART v2) when the server advertises only `permission-v2`, else
    `system/<Type>.read` (v1, which Epic's backend apps are registered with)."""
    capabilities = smart_configuration.get("capabilities") or []
    v2_only = "permission-v2" in capabilities and "permission-v1" not in capabilities
    suffix = "rs" if v2_only else "read"
    return " ".join(f"system/{t}.{suffix}" for t in types)


class BackendServicesToken:
    """Access tokens from `token_url`, one client assertion each; `auth()` refreshes ahead of
    expiry (a quarter of the lifetime, at most a minute, before it) so a long status poll or
    download never starts with a token about to lapse."""

    def __init__(self, session: requests.Session, *, token_url: str, client_id: str, key: Any,
                 kid: str, algorithm: str, scope: str,
                 clock: Callable[[], float] = time.time,
                 on_retry: Callable[[requests.Response, int], None] | None = None):
        self._session = session
        self.token_url = token_url
        self._client_id = client_id
        self._key = key
        self._kid = kid
        self._algorithm = algorithm
        self.scope = scope
        self._clock = clock
        # Called with a 429/503 answer and how many in a row; waits, or raises to give up.
        self._on_retry = on_retry
        self._token: str | None = None
        self._refresh_at = 0.0
        self.issued = 0  # tokens obtained so far (progress, tests)

    def auth(self) -> BearerAuth:
        token = self._token
        if token is None or self._clock() >= self._refresh_at:
            token = self._fetch()
        return BearerAuth(token)

    def invalidate(self) -> None:
        """The server refused the token (401): the next `auth()` gets a new one."""
        self._token = None

    def client_assertion(self) -> str:
        now = int(self._clock())
        claims = {"iss": self._client_id, "sub": self._client_id, "aud": self.token_url,
                  "iat": now, "exp": now + ASSERTION_LIFETIME_S, "jti": str(uuid.uuid4())}
        try:
            # The EHR looks the public key up by this kid: always send the registered one.
            return jwt.encode(claims, self._key, algorithm=self._algorithm,
                              headers={"kid": self._kid, "typ": "JWT"})
        except (jwt.PyJWTError, TypeError, ValueError) as exc:  # e.g. an EC key for RS384
            raise AuthFailed(f"bulk_export: the private key cannot sign {self._algorithm} "
                             f"({type(exc).__name__}); check bulk_export.algorithm") from exc

    def _fetch(self) -> str:
        renewing = self.issued > 0
        flaky_400_retried = False
        busy = 0
        while True:
            started = self._clock()
            try:
                response = self._session.post(self.token_url, timeout=TIMEOUT_S, data={
                    "grant_type": "client_credentials",
                    "scope": self.scope,
                    "client_assertion_type": CLIENT_ASSERTION_TYPE,
                    "client_assertion": self.client_assertion(),
                })
            except requests.RequestException as exc:
                raise AuthFailed(f"token endpoint {self.token_url} unreachable: "
                                 f"{type(exc).__name__}") from exc
            if response.status_code in (429, 503) and self._on_retry:
                busy += 1
                self._on_retry(response, busy)
                continue
            if response.status_code == 400 and renewing and not flaky_400_retried:
                # Epic has answered a renewal with a bare 400 (the wrong-credentials answer) now
                # and then, though the same client just got a token: retry it once
                # (cumulus-fhir-support, auth.py JwtAuth.authorize).
                flaky_400_retried = True
                continue
            break
        if response.status_code != 200:
            raise AuthFailed(f"token endpoint {self.token_url} answered {response.status_code}"
                             f"{_oauth_error(response)}; check bulk_export.client_id, kid and "
                             "the key registered with the EHR")
        try:
            body = response.json()
            token = body["access_token"]
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME_S)
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthFailed(f"token endpoint {self.token_url} sent no usable access_token"
                             ) from exc
        if str(body.get("token_type", "bearer")).lower() != "bearer" or not isinstance(token, str):
            raise AuthFailed(f"token endpoint {self.token_url} sent a non-bearer token")
        self._token = token
        self._refresh_at = started + lifetime - min(60.0, lifetime / 4)
        self.issued += 1
        return token


def _oauth_error(response: requests.Response) -> str:
    """RFC 6749 §5.2 `error` (and description), safe to show: it never echoes the assertion."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return ""
    description = body.get("error_description")
    return f" ({body['error']}{': ' + description if isinstance(description, str) else ''})"


def discover_token_endpoint(session: requests.Session, fhir_url: str) -> dict[str, Any]:
    """`<fhir_url>/.well-known/smart-configuration` (SMART App Launch §Discovery); it must name a
    `token_endpoint`."""
    url = fhir_url.rstrip("/") + "/.well-known/smart-configuration"
    try:
        response = session.get(url, headers={"Accept": "application/json"}, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise ExportError(f"{url} unreachable: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise ExportError(f"{url} answered {response.status_code}: the server publishes no "
                          "SMART configuration")
    try:
        config = response.json()
    except ValueError as exc:
        raise ExportError(f"{url} is not JSON") from exc
    if not isinstance(config, dict) or not isinstance(config.get("token_endpoint"), str):
        raise ExportError(f"{url} names no token_endpoint")
    return config
