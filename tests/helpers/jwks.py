"""Signing keys, JWTs and a JWK Set server for auth tests. Keys are generated here, per run.

    key = rsa_key()                                   # RS384, random standard-base64 kid
    token = make_jwt(key, aud=URL, headers={"jku": server.url})
    make_jwt(key, exp=None)                           # a claim or header set to None is left out
    make_jwt(b"secret", headers={"alg": "HS256"})     # bytes: HMAC secret
    make_jwt(None)                                    # alg none, empty signature

    jwks_server.publish(key)                          # serve {"keys": [key.public_jwk]}
    jwks_server.count                                 # requests received so far

Tokens are assembled by hand (not with `jwt.encode`), so tests can send what PyJWT refuses to
produce: `alg: none`, HS256 keyed with a PEM public key, odd headers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import get_default_algorithms

from tests.helpers.loopback import LoopbackHTTPServer

ISS = "https://ehr.example.org/interconnect-fhir-oauth/api/FHIR/R4"
AUD = "https://cds.example.org/cds-services/kidney-risk"
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


class FakeClock:
    """A settable clock for caches and verifiers (monotonic or wall-clock seconds)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def epic_style_kid() -> str:
    """Epic kids are standard base64 (with `+`, `/` and `=`), e.g. d3bmo5…VU4eLY0=."""
    while True:
        kid = base64.b64encode(os.urandom(32)).decode()
        if "+" in kid or "/" in kid:
            return kid


@dataclass(frozen=True)
class TestKey:
    __test__ = False  # not a pytest class

    private: Any
    kid: str
    alg: str

    @property
    def public_jwk(self) -> dict:
        algorithm = get_default_algorithms()[self.alg]
        data = json.loads(algorithm.to_jwk(self.private.public_key()))
        data.update(kid=self.kid, alg=self.alg, use="sig")
        return data

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def with_kid(self, kid: str) -> TestKey:
        return TestKey(self.private, kid, self.alg)


def rsa_key(kid: str | None = None, alg: str = "RS384", bits: int = 2048) -> TestKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return TestKey(private, kid or epic_style_kid(), alg)


def ec_key(kid: str | None = None, alg: str = "ES384") -> TestKey:
    return TestKey(ec.generate_private_key(_CURVES[alg]()), kid or epic_style_kid(), alg)


def jwks(*keys: TestKey | Mapping) -> dict:
    return {"keys": [k.public_jwk if isinstance(k, TestKey) else dict(k) for k in keys]}


def make_jwt(
    key: TestKey | bytes | None,
    *,
    headers: Mapping[str, Any] | None = None,
    now: float | None = None,
    **claims: Any,
) -> str:
    """A compact JWS. Defaults: header {alg, typ: JWT, kid}; claims iss=ISS, aud=AUD, iat=now,
    exp=now+300, jti=uuid4. Overrides replace defaults; a None value removes the entry. The
    signing algorithm is the header's `alg`."""
    now = time.time() if now is None else now
    default_alg = key.alg if isinstance(key, TestKey) else "HS256" if key else "none"
    header: dict[str, Any] = {"alg": default_alg, "typ": "JWT"}
    if isinstance(key, TestKey):
        header["kid"] = key.kid
    header.update(headers or {})
    payload: dict[str, Any] = {
        "iss": ISS, "aud": AUD, "iat": int(now), "exp": int(now) + 300, "jti": str(uuid.uuid4()),
    }
    payload.update(claims)
    header = {k: v for k, v in header.items() if v is not None}
    payload = {k: v for k, v in payload.items() if v is not None}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(payload, separators=(",", ":")).encode())
    ).encode()
    alg = header.get("alg") or default_alg  # a header without alg: sign with the default
    if key is None:
        signature = b""
    elif isinstance(key, bytes):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
        signature = hmac.new(key, signing_input, digest[alg]).digest()
    else:
        signature = get_default_algorithms()[alg].sign(signing_input, key.private)
    return signing_input.decode() + "." + b64url(signature)


def signature_segment(token: str) -> str:
    return token.rsplit(".", 1)[1]


# -- a real JWK Set server on loopback --------------------------------------------------------


@dataclass
class _Answer:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] | None = None
    delay: float = 0.0


class JwksServer:
    """Serves JWK Sets on 127.0.0.1 at paths you choose; swap them at runtime; counts requests.

    Unconfigured paths answer 404. `requests` lists the paths requested, in order.
    """

    DEFAULT_PATH = "/api/epic/2019/Security/Open/PublicKeys/530013/530013"

    def __init__(self) -> None:
        self._answers: dict[str, _Answer] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests: list[str] = []
        self._httpd = LoopbackHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return self.url_for(self.DEFAULT_PATH)

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def publish(self, *keys: TestKey | Mapping, path: str = DEFAULT_PATH) -> None:
        """Serve a JWK Set of these public keys at `path` (replacing what was there)."""
        self.answer(path, body=json.dumps(jwks(*keys)).encode(),
                    headers={"Content-Type": "application/json"})

    def answer(self, path: str, *, status: int = 200, body: bytes = b"",
               headers: Mapping[str, str] | None = None, delay: float = 0.0) -> None:
        with self._lock:
            self._answers[path] = _Answer(status, body, headers, delay)

    def close(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests.append(path)
                    answer = server._answers.get(path) or _Answer(404, b"not found")
                if answer.delay:
                    server._stop.wait(answer.delay)
                try:
                    self.send_response(answer.status)
                    for name, value in (answer.headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


# -- transport-level recording, for "nothing was sent" --------------------------------------


class RecordingAdapter(requests.adapters.BaseAdapter):
    """A requests transport that never touches the network: it records each request and answers
    from `responses` (URL → JSON document), else 404."""

    def __init__(self, responses: Mapping[str, Any] | None = None):
        super().__init__()
        self.responses = dict(responses or {})
        self.sent: list[str] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append(request.url)
        response = requests.Response()
        response.request = request
        response.url = request.url
        if request.url in self.responses:
            response.status_code = 200
            response.raw = _BytesRaw(json.dumps(self.responses[request.url]).encode())
        else:
            response.status_code = 404
            response.raw = _BytesRaw(b"")
        return response

    def close(self) -> None:
        pass


class _BytesRaw:
    def __init__(self, data: bytes):
        self._data = data

    def stream(self, chunk_size: int, decode_content: bool = True) -> Iterator[bytes]:
        for i in range(0, len(self._data), chunk_size):
            yield self._data[i : i + chunk_size]

    def read(self, amt: int | None = None, **kwargs: Any) -> bytes:
        data, self._data = (self._data, b"") if amt is None else (self._data[:amt],
                                                                   self._data[amt:])
        return data

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def recording_session(responses: Mapping[str, Any] | None = None) -> tuple[requests.Session,
                                                                             RecordingAdapter]:
    """A session whose every http(s) request goes to a RecordingAdapter."""
    session = requests.Session()
    adapter = RecordingAdapter(responses)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session, adapter

