"""A SMART App Launch 2.x authorization server and FHIR server on one loopback origin, for the
companion app's tests: EHR launch, PKCE, public and confidential (private_key_jwt) clients,
refresh tokens, and FHIR reads that need the access token issued for that patient.

    server = SmartServer()                       # or the `smart_server` fixture
    server.redirect_uris = ["http://localhost/smart/callback"]
    launch = server.new_launch(patient="p1", encounter="e1", fhir_user="Practitioner/dr1")
    server.add_patient_chart("p1", patient={...}, observations=[...], conditions=[...],
                             medication_requests=[...], medications=[...])
    server.fhir.add("Practitioner/dr1", json={...})          # any other canned FHIR answer
    server.client_jwks = {"keys": [public_jwk]}              # confidential client from now on
    server.capabilities = ["launch-ehr", "permission-v1", ...]   # e.g. a SMART v1-only EHR
    server.expire_access_tokens()                            # every access token now gets 401
    server.revoke_all()                                      # access and refresh tokens alike
    server.deny_authorization = "access_denied"              # authorize redirects with it
    server.grant_refresh_tokens = False                      # offline_access is never granted
    s256(verifier), new_verifier()                           # PKCE helpers for tests

Addresses: `server.origin` (http://127.0.0.1:<port>), `server.iss` (`{origin}/fhir`, the FHIR
base and the `aud` of the authorize request), `server.authorize_url`, `server.token_url`,
`server.jwks_url`.

What arrived: `discovery_hits`, `authorize_requests` (each query, and the outcome),
`token_requests` (each form, with `status`, `error`, `client_auth`, `pkce_ok`), `denied` (FHIR
requests refused: path, status, reason), `fhir.requests` (every FHIR request, with headers), and
`issued_access_tokens` / `issued_refresh_tokens` (every token string, so a test can assert one
never reaches a page, a cookie, a log or browser storage).

Checks, with their sources: the authorize endpoint never redirects to an unregistered
redirect_uri or for an unknown client (400 page), and redirects other errors with
`error=invalid_request&state=…` (RFC 6749 §4.1.2.1); a code is single-use (a replay gets
`invalid_grant` and revokes the tokens issued from it, §4.1.2), lives 60 s (`code_lifetime`) and
needs the same redirect_uri (§4.1.3); PKCE S256 only (RFC 7636 §4.6; SMART requires S256); a
confidential client's assertion is checked as SMART's asymmetric client authentication says
(kid, RS384/ES384, iss = sub = client_id, aud = the token URL, exp at most five minutes ahead, a
jti never seen before). FHIR: no or an unknown/expired token → 401 (RFC 6750 §3.1,
`invalid_token`); a valid token for another patient, or without a scope for that resource type
→ 403 (`insufficient_scope`).

Everything is in memory; one thread per request; time is `time.time()` (the suite also runs with
the clock shifted years ahead).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.helpers.client_assertion import check_assertion
from tests.helpers.fhir_server import (
    FHIR_JSON,
    FhirTestServer,
    RecordedRequest,
    Route,
    operation_outcome,
)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_CAPABILITIES = (
    "launch-ehr",
    "client-public",
    "client-confidential-asymmetric",
    "context-ehr-patient",
    "context-ehr-encounter",
    "permission-v2",
    "permission-v1",
    "permission-patient",
    "permission-offline",
    "sso-openid-connect",
)
ASSERTION_ALGORITHMS = ("RS384", "ES384")
CHART_SEARCHES = {
    "Observation": "observations",
    "Condition": "conditions",
    "MedicationRequest": "medication_requests",
}
_PKCE_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43,128}$")


def s256(verifier: str) -> str:
    """The PKCE S256 code challenge for `verifier` (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_verifier() -> str:
    """A fresh PKCE code verifier (43+ unreserved characters)."""
    return secrets.token_urlsafe(48)


@dataclass
class Launch:
    patient: str
    encounter: str | None
    fhir_user: str | None


@dataclass
class Grant:
    """What one authorization code, and every token issued from it, stands for."""

    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    launch: Launch
    nonce: str | None
    issued: float
    used: bool = False
    access_tokens: list[str] = field(default_factory=list)
    refresh_tokens: list[str] = field(default_factory=list)


@dataclass
class AccessToken:
    grant: Grant
    scope: str
    expires: float
    revoked: bool = False


class TokenError(Exception):
    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


class _SmartFhir(FhirTestServer):
    """FhirTestServer on the SmartServer's one origin: OAuth routes and the token check first,
    then the canned FHIR answers (and the patient charts)."""

    def __init__(self, smart: SmartServer, host: str):
        self._smart = smart
        super().__init__(host=host, base_path="/fhir")

    def _find(self, path: str, query: tuple) -> Route | None:
        chart = self._smart._chart_answer(path, query)
        return chart if chart is not None else super()._find(path, query)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        base = super()._handler_class()
        smart = self._smart

        class Handler(base):  # type: ignore[misc, valid-type]
            def _handle(self) -> None:
                parts = urlsplit(self.path)
                try:
                    if parts.path == "/fhir/.well-known/smart-configuration":
                        return self._json(200, smart._discovery())
                    if parts.path == "/oauth/authorize" and self.command == "GET":
                        return self._authorize(parts.query)
                    if parts.path == "/oauth/token" and self.command == "POST":
                        return self._token()
                    if parts.path == "/oauth/jwks" and self.command == "GET":
                        return self._json(200, smart.jwks())
                    if parts.path == "/fhir/metadata":
                        return super()._handle()  # the CapabilityStatement is public
                    if parts.path == "/fhir" or parts.path.startswith("/fhir/"):
                        refusal = smart._check_bearer(
                            self.headers.get("Authorization"), parts.path, parts.query)
                        if refusal is not None:
                            return self._refuse(parts, *refusal)
                    return super()._handle()
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def _body(self) -> str:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length).decode() if length else ""

            def _json(self, status: int, body: Any, headers: dict | None = None,
                      content_type: str = "application/json") -> None:
                self._body()
                self._send(status, json.dumps(body).encode(),
                           {"Content-Type": content_type, "Cache-Control": "no-store",
                            **(headers or {})})

            def _authorize(self, query: str) -> None:
                status, location, page = smart._authorize(query)
                if location is not None:
                    self._send(302, b"", {"Location": location, "Cache-Control": "no-store"})
                else:
                    self._send(status, page.encode(), {"Content-Type": "text/html; charset=utf-8"})

            def _token(self) -> None:
                form = dict(parse_qsl(self._body(), keep_blank_values=True))
                status, body = smart._token(form)
                self._send(status, json.dumps(body).encode(),
                           {"Content-Type": "application/json", "Cache-Control": "no-store",
                            "Pragma": "no-cache"})

            def _refuse(self, parts: Any, status: int, code: str, reason: str) -> None:
                self._body()
                now = time.monotonic()
                relative = parts.path[len("/fhir"):].strip("/")
                record = RecordedRequest(
                    method=self.command, path=relative, raw_path=parts.path,
                    query_string=parts.query, query=parse_qs(parts.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    started=now, finished=now)
                with smart._lock:
                    smart.fhir.requests.append(record)
                    smart.denied.append({"path": relative, "query": parts.query,
                                         "status": status, "reason": reason})
                error = "invalid_token" if status == 401 else "insufficient_scope"
                self._send(status, json.dumps(
                    operation_outcome(code=code, text=reason)).encode(),
                    {"Content-Type": FHIR_JSON,
                     "WWW-Authenticate": f'Bearer error="{error}"'})

        return Handler


class SmartServer:
    """See the module docstring."""

    def __init__(self, *, client_id: str = "cds-kidney-app",
                 redirect_uris: Iterable[str] = (), host: str = "127.0.0.1"):
        self.client_id = client_id
        self.redirect_uris: list[str] = list(redirect_uris)
        self.capabilities: list[str] = list(DEFAULT_CAPABILITIES)
        self.client_jwks: dict | None = None  # set: a confidential client (private_key_jwt)
        self.expires_in = 300  # access token lifetime, seconds
        self.code_lifetime = 60.0  # seconds an authorization code may wait for its exchange
        self.rotate_refresh = False  # a refresh answers a new refresh token, the old one dies
        self.grant_refresh_tokens = True  # False: never a refresh token (a health system's choice)
        self.enforce_scopes = True  # FHIR reads need a patient/ scope for the resource type
        self.deny_authorization: str | None = None  # e.g. "access_denied": the user said no
        self.discovery_hits = 0
        self.authorize_requests: list[dict] = []
        self.token_requests: list[dict] = []
        self.denied: list[dict] = []
        self.issued_access_tokens: list[str] = []
        self.issued_refresh_tokens: list[str] = []
        self.charts: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._launches: dict[str, Launch] = {}
        self._codes: dict[str, Grant] = {}
        self._access: dict[str, AccessToken] = {}
        self._refresh: dict[str, Grant] = {}
        self._seen_jti: set[str] = set()
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_urlsafe(12)
        self.fhir = _SmartFhir(self, host)
        self.fhir.add("metadata", json=self._capability_statement())

    # -- addresses ----------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return self.fhir.origin

    @property
    def iss(self) -> str:
        return self.fhir.url

    @property
    def authorize_url(self) -> str:
        return f"{self.origin}/oauth/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/oauth/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.origin}/oauth/jwks"

    # -- set-up -------------------------------------------------------------------------------

    def new_launch(self, patient: str = "p1", encounter: str | None = "e1",
                   fhir_user: str | None = "Practitioner/dr1") -> str:
        """An opaque `launch` value for an EHR launch in this patient's (and encounter's)
        context, by this user, as the EHR puts on the launch URL."""
        launch = secrets.token_urlsafe(16)
        with self._lock:
            self._launches[launch] = Launch(patient, encounter, fhir_user)
        return launch

    def add_patient_chart(self, patient_id: str, *, patient: dict | None = None,
                          observations: Iterable[dict] = (), conditions: Iterable[dict] = (),
                          medication_requests: Iterable[dict] = (),
                          medications: Iterable[dict] = (), encounter: dict | None = None
                          ) -> None:
        """Answer `Patient/<id>`, and Observation / Condition / MedicationRequest searches whose
        `patient` (or `subject`) is this patient: every resource of that type with one of the
        search's `code`s (any, without a `code`), whatever the other parameters (`category`,
        `_count`…). `medications`
        answer `Medication/<id>` reads (and `_include=MedicationRequest:medication`)."""
        chart = {
            "patient": patient or {"resourceType": "Patient", "id": patient_id},
            "observations": list(observations),
            "conditions": list(conditions),
            "medication_requests": list(medication_requests),
            "medications": list(medications),
        }
        with self._lock:
            self.charts[patient_id] = chart
        self.fhir.add(f"Patient/{patient_id}", json=chart["patient"])
        for medication in chart["medications"]:
            self.fhir.add(f"Medication/{medication['id']}", json=medication)
        if encounter is not None:
            self.fhir.add(f"Encounter/{encounter['id']}", json=encounter)

    def expire_access_tokens(self) -> None:
        """Every access token issued so far is now expired (refresh tokens stay valid)."""
        with self._lock:
            for token in self._access.values():
                token.expires = time.time() - 1

    def revoke_all(self) -> None:
        """Every access and refresh token issued so far is now invalid."""
        with self._lock:
            for token in self._access.values():
                token.revoked = True
            self._refresh.clear()

    def access_token_valid(self, token: str) -> bool:
        with self._lock:
            found = self._access.get(token)
            return found is not None and not found.revoked and found.expires > time.time()

    def jwks(self) -> dict:
        jwk = json.loads(RSAAlgorithm.to_jwk(self._signing_key.public_key()))
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        return {"keys": [jwk]}

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        self.fhir.close()

    def __enter__(self) -> SmartServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- discovery ----------------------------------------------------------------------------

    def _discovery(self) -> dict:
        with self._lock:
            self.discovery_hits += 1
            capabilities = list(self.capabilities)
        scopes = ["openid", "fhirUser", "launch", "offline_access", "online_access"]
        if "permission-v2" in capabilities:
            scopes += ["patient/*.rs"]
        if "permission-v1" in capabilities:
            scopes += ["patient/*.read"]
        return {
            "issuer": self.iss,
            "jwks_uri": self.jwks_url,
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": scopes,
            "capabilities": capabilities,
        }

    def _capability_statement(self) -> dict:
        return {
            "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
            "fhirVersion": "4.0.1", "format": ["json"],
            "rest": [{"mode": "server", "security": {"extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "authorize", "valueUri": self.authorize_url},
                              {"url": "token", "valueUri": self.token_url}]}]}}],
        }

    # -- authorize ----------------------------------------------------------------------------

    def _authorize(self, query: str) -> tuple[int, str | None, str]:
        """(status, Location or None, page)."""
        params = dict(parse_qsl(query, keep_blank_values=True))
        record: dict[str, Any] = {"query": params}
        with self._lock:
            self.authorize_requests.append(record)
        redirect_uri = params.get("redirect_uri", "")
        if params.get("client_id") != self.client_id:
            record["outcome"] = "unknown client_id"
            return 400, None, _page("Unknown client_id")
        if redirect_uri not in self.redirect_uris:
            record["outcome"] = "unregistered redirect_uri"
            return 400, None, _page("This redirect_uri is not registered for this client")
        state = params.get("state")
        problem = self._authorize_problem(params)
        if problem is not None:
            record["outcome"] = problem
            return 302, _with_query(redirect_uri, error="invalid_request",
                                    error_description=problem, state=state), ""
        if self.deny_authorization:
            record["outcome"] = self.deny_authorization
            return 302, _with_query(redirect_uri, error=self.deny_authorization,
                                    state=state), ""
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = Grant(
                client_id=params["client_id"], redirect_uri=redirect_uri,
                scope=self._granted_scope(params["scope"]),
                code_challenge=params["code_challenge"],
                launch=self._launches[params["launch"]], nonce=params.get("nonce"),
                issued=time.time())
        record["outcome"] = "code"
        record["code"] = code
        return 302, _with_query(redirect_uri, code=code, state=state), ""

    def _authorize_problem(self, params: dict[str, str]) -> str | None:
        if params.get("response_type") != "code":
            return "response_type must be code"
        if not params.get("state"):
            return "state is missing"
        if "launch" not in params.get("scope", "").split():
            return "an EHR launch needs the launch scope"
        with self._lock:
            known = params.get("launch") in self._launches
        if not known:
            return "unknown launch"
        if params.get("aud") != self.iss:
            return "aud is not this FHIR server"
        if params.get("code_challenge_method") != "S256":
            return "code_challenge_method must be S256"
        if not _PKCE_CHALLENGE.match(params.get("code_challenge", "")):
            return "code_challenge missing or not base64url of 43+ characters"
        return None

    def _granted_scope(self, requested: str) -> str:
        """What the server grants: the requested scopes it supports (SMART v2 `.rs` scopes only
        with permission-v2, v1 `.read`/`.write` only with permission-v1; no refresh scope when
        the health system grants no refresh tokens)."""
        with self._lock:
            capabilities = set(self.capabilities)
        granted = []
        for scope in requested.split():
            if "/" in scope:
                v1 = scope.endswith((".read", ".write", ".*"))
                if v1 and "permission-v1" not in capabilities:
                    continue
                if not v1 and "permission-v2" not in capabilities:
                    continue
            if scope in ("offline_access", "online_access") and not self.grant_refresh_tokens:
                continue
            granted.append(scope)
        return " ".join(granted)

    # -- token --------------------------------------------------------------------------------

    def _token(self, form: dict[str, str]) -> tuple[int, dict]:
        record: dict[str, Any] = {"form": dict(form), "grant_type": form.get("grant_type"),
                                  "client_auth": None, "pkce_ok": None, "status": None,
                                  "error": None}
        with self._lock:
            self.token_requests.append(record)
        try:
            record["client_auth"] = self._authenticate_client(form, record)
            if form.get("grant_type") == "authorization_code":
                body = self._exchange_code(form, record)
            elif form.get("grant_type") == "refresh_token":
                body = self._refresh_grant(form)
            else:
                raise TokenError("unsupported_grant_type", "authorization_code or refresh_token")
        except TokenError as exc:
            record.update(status=exc.status, error=exc.error, error_description=exc.description)
            return exc.status, {"error": exc.error, "error_description": exc.description}
        record["status"] = 200
        return 200, body

    def _authenticate_client(self, form: dict[str, str], record: dict) -> str:
        if self.client_jwks is None:
            if form.get("client_id") != self.client_id:
                raise TokenError("invalid_client", "client_id missing or unknown", 401)
            if "client_assertion" in form or "client_secret" in form:
                raise TokenError("invalid_client", "a public client sends no credentials", 401)
            return "public"
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise TokenError("invalid_client", "client_assertion_type missing or wrong", 401)
        try:
            record["assertion"] = self._verify_assertion(form.get("client_assertion", ""))
        except ValueError as exc:
            raise TokenError("invalid_client", str(exc), 401) from exc
        if form.get("client_id") not in (None, self.client_id):
            raise TokenError("invalid_client", "client_id is not the assertion's", 401)
        return "private_key_jwt"

    def _verify_assertion(self, assertion: str) -> dict:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise ValueError(f"assertion unreadable: {exc}") from exc
        if header.get("alg") not in ASSERTION_ALGORITHMS:
            raise ValueError(f"alg {header.get('alg')!r} not in {ASSERTION_ALGORITHMS}")
        keys = [k for k in (self.client_jwks or {}).get("keys", [])
                if k.get("kid") == header.get("kid")]
        if not header.get("kid") or not keys:
            raise ValueError(f"unknown kid {header.get('kid')!r}")
        try:
            key = jwt.PyJWK(keys[0], algorithm=header["alg"]).key
        except jwt.PyJWTError as exc:
            raise ValueError(f"assertion refused: {exc}") from exc
        claims = check_assertion(assertion, key, header["alg"], token_url=self.token_url,
                                 client_id=self.client_id, seen_jti=self._seen_jti,
                                 lock=self._lock)
        return {"header": header, "claims": claims}

    def _exchange_code(self, form: dict[str, str], record: dict) -> dict:
        code = form.get("code", "")
        with self._lock:
            grant = self._codes.get(code)
            if grant is None:
                raise TokenError("invalid_grant", "unknown code")
            if grant.used:
                for token in grant.access_tokens:  # RFC 6749 §4.1.2: SHOULD revoke
                    self._access[token].revoked = True
                for token in grant.refresh_tokens:
                    self._refresh.pop(token, None)
                raise TokenError("invalid_grant", "code already used; its tokens are revoked")
            grant.used = True
        if time.time() - grant.issued > self.code_lifetime:
            raise TokenError("invalid_grant", "code expired")
        if grant.client_id != (form.get("client_id") or self.client_id):
            raise TokenError("invalid_grant", "code issued to another client")
        if form.get("redirect_uri") != grant.redirect_uri:
            raise TokenError("invalid_grant", "redirect_uri differs from the authorize request")
        verifier = form.get("code_verifier", "")
        record["pkce_ok"] = bool(verifier) and secrets.compare_digest(
            s256(verifier), grant.code_challenge)
        if not record["pkce_ok"]:
            raise TokenError("invalid_grant", "code_verifier does not match the code_challenge")
        body = self._issue(grant, grant.scope)
        if "openid" in grant.scope.split():
            body["id_token"] = self._id_token(grant)
        if self.grant_refresh_tokens and {"offline_access", "online_access"} & set(
                grant.scope.split()):
            body["refresh_token"] = self._new_refresh(grant)
        return body

    def _refresh_grant(self, form: dict[str, str]) -> dict:
        old = form.get("refresh_token", "")
        with self._lock:
            grant = self._refresh.get(old)
            if grant is None:
                raise TokenError("invalid_grant", "unknown or revoked refresh token")
            if self.rotate_refresh:
                del self._refresh[old]
        scope = grant.scope
        if form.get("scope"):
            if not set(form["scope"].split()) <= set(grant.scope.split()):
                raise TokenError("invalid_scope", "more than the original grant")
            scope = form["scope"]
        body = self._issue(grant, scope)
        if self.rotate_refresh:
            body["refresh_token"] = self._new_refresh(grant)
        return body

    def _issue(self, grant: Grant, scope: str) -> dict:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._access[token] = AccessToken(grant, scope, time.time() + self.expires_in)
            grant.access_tokens.append(token)
            self.issued_access_tokens.append(token)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                "expires_in": self.expires_in, "scope": scope,
                                "patient": grant.launch.patient,
                                "need_patient_banner": False}  # Epic shows its own banner
        if grant.launch.encounter:
            body["encounter"] = grant.launch.encounter
        return body

    def _new_refresh(self, grant: Grant) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._refresh[token] = grant
            grant.refresh_tokens.append(token)
            self.issued_refresh_tokens.append(token)
        return token

    def _id_token(self, grant: Grant) -> str:
        now = int(time.time())
        user = grant.launch.fhir_user or "Practitioner/unknown"
        claims: dict[str, Any] = {"iss": self.iss, "aud": grant.client_id,
                                  "sub": user.rsplit("/", 1)[-1], "iat": now,
                                  "exp": now + self.expires_in}
        if grant.launch.fhir_user and "fhirUser" in grant.scope.split():
            claims["fhirUser"] = f"{self.iss}/{grant.launch.fhir_user}"
        if grant.nonce:
            claims["nonce"] = grant.nonce
        return jwt.encode(claims, self._signing_key, algorithm="RS256",
                          headers={"kid": self.kid})

    # -- FHIR ---------------------------------------------------------------------------------

    def _check_bearer(self, authorization: str | None, path: str,
                      query: str) -> tuple[int, str, str] | None:
        """None when the request may be answered, else (status, issue code, reason)."""
        if not authorization or not authorization.startswith("Bearer "):
            return 401, "login", "no bearer token"
        with self._lock:
            token = self._access.get(authorization[len("Bearer "):])
        if token is None or token.revoked:
            return 401, "login", "unknown or revoked access token"
        if token.expires <= time.time():
            return 401, "expired", "access token expired"
        relative = path[len("/fhir"):].strip("/")
        resource_type, _, rest = relative.partition("/")
        patient = _patient_of(resource_type, rest, parse_qs(query))
        if resource_type in (*CHART_SEARCHES, "Patient") and patient is None:
            return 403, "forbidden", "a patient-context token reads one patient only"
        if patient is not None and patient != token.grant.launch.patient:
            return 403, "forbidden", "the token was issued for another patient"
        if self.enforce_scopes and resource_type and not _scope_allows(
                token.scope, resource_type, "r" if rest else "s"):
            return 403, "forbidden", f"no scope reads {resource_type}"
        return None

    def _chart_answer(self, path: str, query: tuple) -> Route | None:
        if path not in CHART_SEARCHES:
            return None
        params: dict[str, list[str]] = {}
        for name, value in query:
            params.setdefault(name, []).append(value)
        patient = _patient_of(path, "", params)
        with self._lock:
            chart = self.charts.get(patient or "")
        if chart is None:
            return None
        entries = [{"fullUrl": self.fhir.url_for(f"{r['resourceType']}/{r.get('id', '')}"),
                    "resource": r, "search": {"mode": "match"}}
                   for r in chart[CHART_SEARCHES[path]] if _has_code(r, params.get("code"))]
        included = [{"fullUrl": self.fhir.url_for(f"Medication/{m.get('id', '')}"),
                     "resource": m, "search": {"mode": "include"}}
                    for m in chart["medications"]
                    if path == "MedicationRequest"
                    and any("medication" in v for v in params.get("_include", []))]
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
                  "link": [{"relation": "self", "url": self.fhir.url_for(path)}],
                  "entry": entries + included}
        return Route(path=path, query=None, body=json.dumps(bundle).encode(),
                     headers={"Content-Type": FHIR_JSON})


def _has_code(resource: dict, wanted: list[str] | None) -> bool:
    """FHIR token search on `code` (`system|code` or a bare code, comma = or); no `code`
    parameter matches everything."""
    if not wanted:
        return True
    tokens = {t for value in wanted for t in value.split(",")}
    for coding in (resource.get("code") or {}).get("coding") or []:
        if (f"{coding.get('system')}|{coding.get('code')}" in tokens
                or coding.get("code") in tokens):
            return True
    return False


def _patient_of(resource_type: str, rest: str, query: dict[str, list[str]]) -> str | None:
    """The patient a FHIR request is about: `Patient/<id>`, or a `patient` / `subject` search
    parameter (`p1`, `Patient/p1`); None when it names none."""
    if resource_type == "Patient" and rest:
        return rest.split("/", 1)[0]
    names = ["patient", "subject", "subject:Patient"] + (["_id"] if resource_type == "Patient"
                                                         else [])
    for name in names:
        values = query.get(name)
        if values:
            return values[0].rsplit("/", 1)[-1]
    return None


def _scope_allows(scope: str, resource_type: str, action: str) -> bool:
    """Whether SMART scopes (v2 `patient/X.rs`, v1 `patient/X.read`, `*` wildcards) allow
    reading (`r`) or searching (`s`) `resource_type` in patient context."""
    for item in scope.split():
        context, _, permission = item.partition("/")
        if context not in ("patient", "user") or "." not in permission:
            continue
        kind, _, rights = permission.partition(".")
        if kind not in (resource_type, "*"):
            continue
        if rights in ("read", "*"):
            return True
        rights = rights.split("?", 1)[0]
        if re.fullmatch(r"c?r?u?d?s?", rights) and action in rights:
            return True
    return False


def _with_query(url: str, **params: str | None) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _page(message: str) -> str:
    return (f"<!doctype html><title>Authorization error</title>"
            f"<h1>Authorization error</h1><p>{html.escape(message)}</p>")


@pytest.fixture
def smart_server() -> Iterator[SmartServer]:
    """A running `SmartServer`: client "cds-kidney-app", no redirect URI registered yet (set
    `smart_server.redirect_uris`), a public client until `client_jwks` is set."""
    with SmartServer() as server:
        yield server
