"""A real local HTTP FHIR server for tests: canned answers per path + query, every request recorded.

    server.add("Patient/1", json={"resourceType": "Patient", "id": "1"})
    server.add("Condition", query="patient=1", json=bundle)          # exact query (any order)
    server.add("Patient/1", status=429, headers={"Retry-After": "0"}, times=1)  # once, then next
    server.add("Patient/1", delay=0.5, json=...)                      # answer late
    server.redirect("Patient/1", other.url_for("Patient/1"))          # 302 elsewhere
    server.add_searchset("Observation", "patient=1", resources, page_size=2)   # `next` links

Routes are matched newest first; a route with `times=n` is used n times and then skipped.
Anything unmatched gets 404 with an OperationOutcome. `server.requests` lists what arrived
(method, path relative to the base, query, headers, start/end times) for assertions.

Listens on 127.0.0.1 (or another loopback address) on a random port, one thread per request.
Delays wait on an event that `close()` sets, so teardown never hangs on a slow route.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from tests.helpers.loopback import LoopbackHTTPServer

FHIR_JSON = "application/fhir+json"


def _query_key(query: str | Mapping[str, Any] | None) -> tuple | None:
    if query is None:
        return None
    if isinstance(query, str):
        pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True)
    else:
        pairs = []
        for name, value in query.items():
            values = value if isinstance(value, list | tuple) else [value]
            pairs.extend((name, str(v)) for v in values)
    return tuple(sorted(pairs))


@dataclass
class Route:
    path: str
    query: tuple | None
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    times: int | None = None

    def matches(self, path: str, query: tuple) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        return self.path == path and (self.query is None or self.query == query)


@dataclass
class RecordedRequest:
    method: str
    path: str  # relative to the server's base, without a leading slash
    raw_path: str  # as sent, including the base path
    query_string: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    started: float
    finished: float | None = None  # set once the (possibly delayed) answer is about to be sent

    @property
    def relative_url(self) -> str:
        return f"{self.path}?{self.query_string}" if self.query_string else self.path


class FhirTestServer:
    """See the module docstring."""

    def __init__(self, host: str = "127.0.0.1", base_path: str = "/fhir"):
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self._routes: list[Route] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests: list[RecordedRequest] = []
        self._httpd = LoopbackHTTPServer((host, 0), self._handler_class())
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    # -- addresses --------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The FHIR base URL, e.g. http://127.0.0.1:54321/fhir."""
        return self.origin + self.base_path

    def url_for(self, relative: str) -> str:
        return f"{self.url}/{relative.lstrip('/')}"

    # -- configuration ----------------------------------------------------------------------

    def add(
        self,
        path: str,
        *,
        query: str | Mapping[str, Any] | None = None,
        status: int = 200,
        json: Any = None,  # mirrors requests' keyword
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
        times: int | None = None,
    ) -> Route:
        """Answer GETs (and anything else) to `path` (relative to the base) and `query`
        (None = any query; otherwise the exact set of parameters, in any order)."""
        if json is not None:
            payload = _json_bytes(json)
            content_type = FHIR_JSON
        else:
            payload = body.encode() if isinstance(body, str) else (body or b"")
            content_type = "text/plain"
        route = Route(
            path=path.strip("/"),
            query=_query_key(query),
            status=status,
            body=payload,
            headers={"Content-Type": content_type, **dict(headers or {})},
            delay=delay,
            times=times,
        )
        with self._lock:
            self._routes.insert(0, route)
        return route

    def redirect(
        self, path: str, location: str, *, status: int = 302, query: str | None = None
    ) -> Route:
        return self.add(path, query=query, status=status, headers={"Location": location})

    def add_searchset(
        self,
        path: str,
        query: str,
        resources: list[dict],
        *,
        page_size: int,
        delay: float = 0.0,
    ) -> list[str]:
        """Serve `resources` as searchset pages linked by absolute `next` URLs on this server.

        Page 1 answers `path?query`; page n answers `path?query&_page=n`. Returns the relative
        URLs of all pages in order.
        """
        chunks = [resources[i : i + page_size] for i in range(0, len(resources), page_size)] or [[]]
        urls = [f"{path}?{query}"] + [
            f"{path}?{query}&_page={n}" for n in range(2, len(chunks) + 1)
        ]
        for n, chunk in enumerate(chunks):
            links = [{"relation": "self", "url": self.url_for(urls[n])}]
            if n + 1 < len(chunks):
                links.append({"relation": "next", "url": self.url_for(urls[n + 1])})
            bundle = {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(resources),
                "link": links,
                "entry": [
                    {
                        "fullUrl": self.url_for(f"{r['resourceType']}/{r.get('id', '')}"),
                        "resource": r,
                        "search": {"mode": "match"},
                    }
                    for r in chunk
                ],
            }
            page_path, _, page_query = urls[n].partition("?")
            self.add(page_path, query=page_query, json=bundle, delay=delay)
        return urls

    def reset(self) -> None:
        with self._lock:
            self._routes.clear()
            self.requests.clear()

    # -- inspection -------------------------------------------------------------------------

    def requests_for(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path.strip("/")]

    @property
    def methods(self) -> set[str]:
        return {r.method for r in self.requests}

    def max_concurrency(self) -> int:
        """Most requests that were being handled at the same instant."""
        done = [r for r in self.requests if r.finished is not None]
        events = sorted(
            [(r.started, 1) for r in done] + [(r.finished, -1) for r in done],
            key=lambda e: (e[0], e[1]),
        )
        best = current = 0
        for _, step in events:
            current += step
            best = max(best, current)
        return best

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FhirTestServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _find(self, path: str, query: tuple) -> Route | None:
        with self._lock:
            for route in self._routes:
                if route.matches(path, query):
                    if route.times is not None:
                        route.times -= 1
                    return route
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # idle keep-alive connections end on their own

            def _handle(self) -> None:
                started = time.monotonic()
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                relative = parts.path
                if server.base_path and (
                    relative == server.base_path or relative.startswith(server.base_path + "/")
                ):
                    relative = relative[len(server.base_path) :]
                relative = relative.strip("/")
                pairs = parse_qsl(parts.query, keep_blank_values=True)
                query: dict[str, list[str]] = {}
                for name, value in pairs:
                    query.setdefault(name, []).append(value)
                record = RecordedRequest(
                    method=self.command,
                    path=relative,
                    raw_path=parts.path,
                    query_string=parts.query,
                    query=query,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    started=started,
                )
                with server._lock:
                    server.requests.append(record)
                route = server._find(relative, tuple(sorted(pairs)))
                if route is not None and route.delay:
                    server._stop.wait(route.delay)
                record.finished = time.monotonic()
                try:
                    if route is None:
                        self._send(404, _json_bytes(_not_found()), {"Content-Type": FHIR_JSON})
                    else:
                        self._send(route.status, route.body, route.headers)
                except (TimeoutError, BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def _not_found() -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-found", "diagnostics": "no canned answer"}],
    }


def operation_outcome(severity: str = "error", code: str = "processing", text: str = "") -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text or code}],
    }


def searchset(*resources: dict, next_url: str | None = None, total: int | None = None) -> dict:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources) if total is None else total,
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def query_string(**params: str) -> str:
    return urlencode(params)


@pytest.fixture
def fhir_server_factory() -> Iterator[Callable[..., FhirTestServer]]:
    """Start extra servers (e.g. a second origin for redirect tests); all closed at teardown."""
    servers: list[FhirTestServer] = []

    def start(host: str = "127.0.0.1", base_path: str = "/fhir") -> FhirTestServer:
        server = FhirTestServer(host=host, base_path=base_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def fhir_server() -> Iterator[FhirTestServer]:
    """A running `FhirTestServer` at http://127.0.0.1:<random>/fhir."""
    with FhirTestServer() as server:
        yield server
