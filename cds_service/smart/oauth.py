"""The OAuth side of the SMART EHR launch: discovery, the authorize redirect, the code exchange,
refresh, and the id_token. SMART App Launch 2.x, https://hl7.org/fhir/smart-app-launch/.

Nothing here talks to a server that is not a trusted issuer's: `iss` is checked against the site
before discovery, and the endpoints discovery names must be https (plain http only on loopback,
for tests). Errors name the endpoint and the OAuth `error`, never a code, token or assertion.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
import requests

from cds_service.data.fhir import InsecureFhirServer, check_fhir_server_url
from cds_service.smart.settings import SmartAppSettings
from cds_service.training.smart_auth import CLIENT_ASSERTION_TYPE, load_signing_key

TIMEOUT_S = 5.0
MAX_BODY = 1 << 20
DISCOVERY_TTL_S = 3600.0
# Backend Services §Authenticating (also used for a confidential app): exp ≤ 5 minutes ahead.
ASSERTION_LIFETIME_S = 299


class LaunchFailed(Exception):
    """The launch cannot go on; `status` and `public` are what the clinician sees."""

    def __init__(self, message: str, *, status: int = 502, public: str | None = None):
        super().__init__(message)
        self.status = status
        self.public = public or "The EHR's sign-in service could not be reached. Try again."


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636 §4.1-4.2: 64 unreserved characters and
    base64url(SHA-256(verifier)) without padding."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _json(response: requests.Response, what: str) -> Any:
    if len(response.content) > MAX_BODY:
        raise LaunchFailed(f"{what}: answer over {MAX_BODY} bytes")
    try:
        return response.json()
    except ValueError as exc:
        raise LaunchFailed(f"{what}: answer is not JSON") from exc


def _checked(url: Any, what: str, allow_http_loopback: bool) -> str:
    if not isinstance(url, str):
        raise LaunchFailed(f"{what} missing from the SMART configuration")
    try:
        check_fhir_server_url(url, allow_http_loopback=allow_http_loopback)
    except InsecureFhirServer as exc:
        raise LaunchFailed(f"{what} {url!r} is not https") from exc
    return url


class Discovery:
    """`{iss}/.well-known/smart-configuration` per issuer, kept an hour in this process."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, iss: str, *, allow_http_loopback: bool) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(iss)
        if hit and hit[0] > now:
            return hit[1]
        url = iss.rstrip("/") + "/.well-known/smart-configuration"
        try:
            response = requests.get(url, headers={"Accept": "application/json"},
                                    timeout=TIMEOUT_S, allow_redirects=False)
        except requests.RequestException as exc:
            raise LaunchFailed(f"{url} unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise LaunchFailed(f"{url} answered {response.status_code}")
        config = _json(response, url)
        if not isinstance(config, dict):
            raise LaunchFailed(f"{url}: not a JSON object")
        for name in ("authorization_endpoint", "token_endpoint"):
            _checked(config.get(name), name, allow_http_loopback)
        if config.get("jwks_uri") is not None:
            _checked(config["jwks_uri"], "jwks_uri", allow_http_loopback)
        methods = config.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            # SMART App Launch 2.x §PKCE: servers SHALL support S256; we never fall back to
            # `plain` (or to no PKCE), which would let a stolen code be redeemed.
            raise LaunchFailed(f"{url}: the server does not support PKCE S256")
        with self._lock:
            self._cache[iss] = (now + DISCOVERY_TTL_S, config)
        return config


def authorize_url(config: dict[str, Any], app: SmartAppSettings, *, iss: str, launch: str,
                  state: str, challenge: str) -> str:
    """SMART App Launch §Obtain authorization code: the EHR launch's request, with `aud` (the
    FHIR base the token is for) and PKCE."""
    query = urlencode({
        "response_type": "code", "client_id": app.client_id, "redirect_uri": app.redirect_uri,
        "launch": launch, "scope": app.scope_for(config), "state": state, "aud": iss,
        "code_challenge": challenge, "code_challenge_method": "S256"})
    endpoint = config["authorization_endpoint"]
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"


@dataclass(frozen=True)
class Tokens:
    access_token: str
    expires_at: float
    refresh_token: str | None
    scope: str
    patient: str | None
    encounter: str | None
    id_token: str | None


def _client_auth(config: dict[str, Any], app: SmartAppSettings) -> dict[str, str]:
    if app.client_auth == "public":
        return {"client_id": app.client_id}
    # SMART App Launch §Confidential asymmetric client: a JWT signed with our registered key.
    key = load_signing_key(app.private_key_file, kid=app.kid, algorithm=app.algorithm,
                           setting="smart_app")
    now = int(time.time())
    assertion = jwt.encode(
        {"iss": app.client_id, "sub": app.client_id, "aud": config["token_endpoint"],
         "iat": now, "exp": now + ASSERTION_LIFETIME_S, "jti": str(uuid.uuid4())},
        key, algorithm=app.algorithm, headers={"kid": app.kid, "typ": "JWT"})
    return {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion}


def _token_request(config: dict[str, Any], app: SmartAppSettings, form: dict[str, str]
                   ) -> Tokens:
    endpoint = config["token_endpoint"]
    started = time.time()
    try:
        response = requests.post(endpoint, data={**form, **_client_auth(config, app)},
                                 headers={"Accept": "application/json"}, timeout=TIMEOUT_S,
                                 allow_redirects=False)
    except requests.RequestException as exc:
        raise LaunchFailed(f"token endpoint {endpoint} unreachable: {type(exc).__name__}"
                           ) from exc
    body = _json(response, f"token endpoint {endpoint}") if response.content else {}
    if response.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        raise LaunchFailed(
            f"token endpoint {endpoint} answered {response.status_code}"
            + (f" ({error})" if isinstance(error, str) else ""), status=400,
            public="The EHR did not accept this sign-in. Open the app again from the chart.")
    if not (isinstance(body, dict) and isinstance(body.get("access_token"), str)
            and str(body.get("token_type", "")).lower() == "bearer"):
        raise LaunchFailed(f"token endpoint {endpoint} sent no bearer access_token")
    try:
        lifetime = float(body.get("expires_in") or 300)
    except (TypeError, ValueError):
        lifetime = 300.0  # Epic's tokens last about 5 minutes

    def text(name: str) -> str | None:
        value = body.get(name)
        return value if isinstance(value, str) and value else None

    return Tokens(access_token=body["access_token"], expires_at=started + lifetime,
                  refresh_token=text("refresh_token"), scope=text("scope") or "",
                  patient=text("patient"), encounter=text("encounter"),
                  id_token=text("id_token"))


def exchange_code(config: dict[str, Any], app: SmartAppSettings, *, code: str,
                  verifier: str) -> Tokens:
    """SMART App Launch §Obtain access token: the code, our redirect URI and the PKCE verifier."""
    return _token_request(config, app, {"grant_type": "authorization_code", "code": code,
                                        "redirect_uri": app.redirect_uri,
                                        "code_verifier": verifier})


def refresh(config: dict[str, Any], app: SmartAppSettings, refresh_token: str) -> Tokens:
    """SMART App Launch §Refresh access token."""
    return _token_request(config, app, {"grant_type": "refresh_token",
                                        "refresh_token": refresh_token})


def fhir_user(config: dict[str, Any], app: SmartAppSettings, id_token: str | None,
              *, allow_http_loopback: bool) -> str | None:
    """The `fhirUser` claim of a verified id_token (OpenID Connect Core §3.1.3.7: signature by
    the server's published key, `aud` our client id, `iss` the configuration's `issuer` when it
    names one, unexpired); None when there is no id_token or no key set to check it with."""
    if not id_token or not config.get("jwks_uri"):
        return None
    url = _checked(config["jwks_uri"], "jwks_uri", allow_http_loopback)
    try:
        response = requests.get(url, timeout=TIMEOUT_S, allow_redirects=False)
        keys = jwt.PyJWKSet.from_dict(_json(response, url))
        kid = jwt.get_unverified_header(id_token).get("kid")
        matching = [k for k in keys.keys if kid is None or k.key_id == kid]
        if not matching:
            raise LaunchFailed(f"id_token kid {kid!r} not in {url}")
        claims = jwt.decode(id_token, matching[0].key, algorithms=["RS256", "RS384", "ES384"],
                            audience=app.client_id, issuer=config.get("issuer"),
                            options={"verify_iss": bool(config.get("issuer"))}, leeway=60)
    except (requests.RequestException, jwt.PyJWTError, json.JSONDecodeError) as exc:
        raise LaunchFailed(f"id_token not verified: {type(exc).__name__}", status=400,
                           public="The EHR's sign-in could not be verified. Open the app "
                                  "again from the chart.") from exc
    value = claims.get("fhirUser")
    return value if isinstance(value, str) else None
