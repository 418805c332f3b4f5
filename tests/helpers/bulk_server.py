"""A Bulk Data server on loopback for export tests: SMART discovery, a token endpoint that
verifies client assertions for real, Group `$export`, status polling, file downloads, reads.

    server = BulkDataServer(client_id="app", public_key=key.public_key(), kid="k1")
    server.files["Patient.ndjson"] = ("Patient", [patient, ...])   # manifest `output`, in order
    server.medications["med1"] = {...}                              # GET Medication/med1
    server.status_script = [(429, {"Retry-After": "0"}),            # answers before the manifest
                            (202, {"Retry-After": "0", "X-Progress": "50%"})]
    server.expires_in = 2               # access token lifetime, seconds
    server.requires_access_token = False                          # pre-signed file URLs
    server.broken_files = {"Observation.ndjson"}                  # 403 until removed
    server.file_script["Patient.ndjson"] = [(503, {"Retry-After": "0"})]   # then the file
    server.token_script = [(429, {"Retry-After": "0"})]           # then a real token answer
    server.truncate_once.add("Patient.ndjson")   # connection drops mid-file, once
    server.revoke_tokens()              # every token issued so far now gets 401

What arrived is recorded: `kickoffs` (query and headers), `assertions` (verified claims and
header), `rejected` (why a token request was refused), `unauthorized` (401s sent),
`file_requests` (name, Authorization sent?), `deletes`, `medication_reads`.

Token requests are checked as SMART Backend Services requires: grant_type, assertion type,
signature with the registered public key, `kid`, `alg`, iss = sub = client_id, aud = the token
URL, exp at most five minutes ahead, a jti never seen before.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt

from tests.helpers.client_assertion import check_assertion
from tests.helpers.loopback import LoopbackHTTPServer

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class BulkDataServer:
    """See the module docstring."""

    def __init__(self, *, client_id: str, public_key: Any, kid: str, alg: str = "RS384",
                 capabilities: tuple[str, ...] = ("client-confidential-asymmetric",
                                                  "permission-v1")):
        self.client_id = client_id
        self.public_key = public_key
        self.kid = kid
        self.alg = alg
        self.capabilities = list(capabilities)
        self.expires_in = 300
        self.requires_access_token = True
        self.files: dict[str, tuple[str, list[dict]]] = {}
        self.errors: list[dict] = []  # OperationOutcomes for the manifest's `error` file
        self.medications: dict[str, dict] = {}
        self.status_script: list[tuple[int, dict[str, str]]] = []
        self.broken_files: set[str] = set()
        self.file_script: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.token_script: list[tuple[int, dict[str, str]]] = []
        self.truncate_once: set[str] = set()
        self.lock = threading.Lock()
        self.tokens: dict[str, float] = {}  # token → expiry (time.time())
        self.seen_jti: set[str] = set()
        self.assertions: list[dict] = []
        self.rejected: list[str] = []
        self.kickoffs: list[dict] = []
        self.unauthorized = 0
        self.file_requests: list[tuple[str, bool]] = []
        self.medication_reads: list[str] = []
        self.deletes: list[str] = []
        self.status_polls = 0
        self._server = LoopbackHTTPServer(("127.0.0.1", 0), self._handler())
        self.root = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.url = f"{self.root}/fhir"
        self.token_url = f"{self.root}/auth/token"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    # -- token endpoint ------------------------------------------------------------------

    def issue_token(self, form: dict[str, str]) -> tuple[int, dict]:
        try:
            claims = self._verify(form)
        except ValueError as exc:
            with self.lock:
                self.rejected.append(str(exc))
            return 400, {"error": "invalid_client", "error_description": str(exc)}
        token = secrets.token_urlsafe(24)
        with self.lock:
            self.tokens[token] = time.time() + self.expires_in
            self.assertions.append(claims)
        return 200, {"access_token": token, "token_type": "bearer",
                     "expires_in": self.expires_in, "scope": form.get("scope", "")}

    def _verify(self, form: dict[str, str]) -> dict:
        if form.get("grant_type") != "client_credentials":
            raise ValueError("grant_type must be client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise ValueError("wrong client_assertion_type")
        assertion = form.get("client_assertion", "")
        header = jwt.get_unverified_header(assertion)
        if header.get("kid") != self.kid:
            raise ValueError(f"unknown kid {header.get('kid')!r}")
        if header.get("alg") != self.alg:
            raise ValueError(f"alg {header.get('alg')!r} is not the registered {self.alg}")
        claims = check_assertion(assertion, self.public_key, self.alg, token_url=self.token_url,
                                 client_id=self.client_id, seen_jti=self.seen_jti,
                                 lock=self.lock)
        return {"header": header, "claims": claims, "scope": form.get("scope")}

    def authorized(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        with self.lock:
            expiry = self.tokens.get(authorization[len("Bearer "):])
        return expiry is not None and expiry > time.time()

    # -- FHIR side -----------------------------------------------------------------------

    def manifest(self) -> dict:
        output = [{"type": rtype, "url": f"{self.root}/files/{name}"}
                  for name, (rtype, _) in self.files.items()]
        errors = ([{"type": "OperationOutcome", "url": f"{self.root}/files/errors.ndjson"}]
                  if self.errors else [])
        return {"transactionTime": "2025-01-02T03:04:05Z", "request": "…",
                "requiresAccessToken": self.requires_access_token, "output": output,
                "error": errors}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def send(self, status: int, body: Any = None, headers: dict | None = None,
                     content_type: str = "application/fhir+json") -> None:
                data = b"" if body is None else (
                    body if isinstance(body, bytes) else json.dumps(body).encode())
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def require_token(self) -> bool:
                if server.authorized(self.headers.get("Authorization")):
                    return True
                with server.lock:
                    server.unauthorized += 1
                self.send(401, {"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "login", "diagnostics": "token expired"}]})
                return False

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in
                        parse_qs(self.rfile.read(length).decode()).items()}
                if urlsplit(self.path).path != "/auth/token":
                    return self.send(404)
                with server.lock:
                    step = server.token_script.pop(0) if server.token_script else None
                if step:
                    return self.send(step[0], {"error": "temporarily_unavailable"}, step[1],
                                     content_type="application/json")
                status, body = server.issue_token(form)
                self.send(status, body, content_type="application/json")

            def do_DELETE(self) -> None:
                if not self.require_token():
                    return
                server.deletes.append(self.path)
                self.send(202)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = parts.path
                if path == "/fhir/.well-known/smart-configuration":
                    return self.send(200, {
                        "token_endpoint": server.token_url,
                        "capabilities": server.capabilities,
                        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                        "token_endpoint_auth_signing_alg_values_supported": [server.alg]},
                        content_type="application/json")
                if path.startswith("/files/"):
                    return self.file(path[len("/files/"):])
                if not self.require_token():
                    return
                if path.startswith("/fhir/Group/") and path.endswith("/$export"):
                    with server.lock:
                        server.kickoffs.append({"path": path, "query": parse_qs(parts.query),
                                                "prefer": self.headers.get("Prefer"),
                                                "accept": self.headers.get("Accept")})
                        job = len(server.kickoffs)
                    if self.headers.get("Prefer") != "respond-async":
                        return self.send(400)
                    return self.send(202, headers={"Content-Location":
                                                   f"{server.root}/status/job{job}"})
                if path.startswith("/status/"):
                    with server.lock:
                        server.status_polls += 1
                        step = server.status_script.pop(0) if server.status_script else None
                    if step:
                        return self.send(step[0], headers=step[1])
                    return self.send(200, server.manifest(), content_type="application/json")
                if path.startswith("/fhir/Medication/"):
                    med = path[len("/fhir/Medication/"):]
                    server.medication_reads.append(med)
                    if med in server.medications:
                        return self.send(200, server.medications[med])
                    return self.send(404, {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "not-found"}]})
                self.send(404)

            def file(self, name: str) -> None:
                with server.lock:
                    server.file_requests.append((name, "Authorization" in self.headers))
                if server.requires_access_token and not self.require_token():
                    return
                if name in server.broken_files:
                    return self.send(403)
                with server.lock:
                    script = server.file_script.get(name)
                    step = script.pop(0) if script else None
                if step:
                    return self.send(step[0], headers=step[1])
                if name == "errors.ndjson":
                    resources = server.errors
                elif name in server.files:
                    resources = server.files[name][1]
                else:
                    return self.send(404)
                body = "".join(json.dumps(r) + "\n" for r in resources).encode()
                with server.lock:
                    truncate = name in server.truncate_once
                    server.truncate_once.discard(name)
                if truncate:  # promise more than is sent, then hang up
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.send(200, body, content_type="application/fhir+ndjson")

        return Handler
