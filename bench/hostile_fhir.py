"""Misbehaving loopback HTTP servers, for the FHIR read bounds (tests and `bench.fhir_bounds`).

    with HostileFhirServer(size=50 * MIB) as big: ...       # 50 MB answer, streamed, no length
    with HostileFhirServer(drip=0.5) as slow: ...           # headers, then a byte every 0.5 s
    with HostileFhirServer(drip=0.5, drip_in="headers"): ...  # the status line, then a header
    with HostileFhirServer(body=json_bytes) as healthy: ... # that answer, promptly
    with ConnectionCounter() as port: ...                   # accepts, counts, hangs up

Every server counts the connections it accepted and the bytes it wrote, and notes when the client
hung up (`hangups`, `time.monotonic()` instants): a client that stops reading at its deadline
shows up there, one that keeps a thread stuck does not. Waits end when `close()` is called.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MIB = 1024 * 1024
_CHUNK = 64 * 1024
_PREFIX = b'{"resourceType":"Bundle","type":"searchset","entry":['
_SUFFIX = b"]}"


def bundle_bytes(size: int) -> Iterator[bytes]:
    """A searchset Bundle with no entries, padded with JSON whitespace to `size` bytes."""
    padding = size - len(_PREFIX) - len(_SUFFIX)
    yield _PREFIX
    blank = b" " * _CHUNK
    while padding > 0:
        yield blank[: min(padding, _CHUNK)]
        padding -= _CHUNK
    yield _SUFFIX


class HostileFhirServer:
    """Answers every GET with a `size`-byte Bundle streamed as fast as the client reads it
    (`declare_length`: with a Content-Length; `gzip`: gzip-encoded, length declared), or, with
    `drip` seconds, one byte per interval, in the body or (`drip_in="headers"`) in a header line,
    for as long as the client listens; or, with `body`, those bytes (a healthy server)."""

    def __init__(self, *, size: int = 50 * MIB, declare_length: bool = False,
                 gzip_body: bool = False, drip: float | None = None, drip_in: str = "body",
                 body: bytes | None = None):
        self.body = body
        self.size = size
        self.declare_length = declare_length
        self.drip = drip
        self.drip_in = drip_in
        self._gzipped = gzip.compress(b"".join(bundle_bytes(size)), 6) if gzip_body else None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.connections = 0
        self.bytes_sent = 0
        self.hangups: list[float] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def close(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HostileFhirServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, wfile: Any, data: bytes) -> None:
        wfile.write(data)
        wfile.flush()
        with self._lock:
            self.bytes_sent += len(data)

    def _answer(self, wfile: Any) -> None:
        if self.drip is not None:
            head = b"HTTP/1.1 200 OK\r\n"
            if self.drip_in == "body":
                head += (b"Content-Type: application/fhir+json\r\n"
                         b"Content-Length: 1000000\r\n\r\n")
            else:
                head += b"X-Slow: "
            self._write(wfile, head)
            while not self._stop.wait(self.drip):
                self._write(wfile, b" " if self.drip_in == "body" else b"a")
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nConnection: close\r\n"
        if self.body is not None:
            self._write(wfile, head + b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body)
            return
        if self._gzipped is not None:
            head += b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(self._gzipped)
            self._write(wfile, head + b"\r\n")
            for start in range(0, len(self._gzipped), _CHUNK):
                self._write(wfile, self._gzipped[start:start + _CHUNK])
            return
        if self.declare_length:
            head += b"Content-Length: %d\r\n" % self.size
        self._write(wfile, head + b"\r\n")
        for chunk in bundle_bytes(self.size):
            if self._stop.is_set():
                return
            self._write(wfile, chunk)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with server._lock:
                    server.connections += 1
                try:
                    server._answer(self.wfile)
                except OSError:  # the client hung up (BrokenPipe, ConnectionReset)
                    with server._lock:
                        server.hangups.append(time.monotonic())
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class ConnectionCounter:
    """A loopback TCP listener that counts the connections it accepts and closes them at once:
    what must see nothing when a request names it as fhirServer."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with suppress(OSError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> ConnectionCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
