"""A bounded HTTP/1.1 load generator: a fixed number of requests over keep-alive connections.

Each connection is one `http.client.HTTPConnection` that sends its share of the requests one
after another (request *i* goes to connection *i* mod *C*), reusing the connection (keep-alive),
with a timeout on every request. A request that fails (timeout, reset) counts with status 0 and
the connection is opened again; nothing retries, and the run always ends after the fixed count.

Connections run in one thread each (``threads``) or one process each (``processes``, forked).
A thread's Python work (writing the request, reading the response) holds the GIL, so threads
cap the client at one core; processes do not, but cost more CPU per request, and the client
shares the machine's cores with the server. Measured on the 2-core machine of
`bench/results/service.md` against the floor app (2 workers, 16 connections, 3,000 requests):
threads used 0.24-0.29 ms of client CPU per request, processes 0.39-0.47 ms, and the floor went
as fast or faster with threads (1,200-1,500 vs 970-1,290 requests/s, with other jobs running).
At 0.3 ms a request, a threaded client's ceiling is about 3,500 requests/s, above anything the
floor reaches here: the runner's default is threads (`--client processes` to compare).

Per request it records the client latency (`time.perf_counter_ns` around writing the request and
reading the whole response; the body is built before), the status, the response size and its
`Server-Timing` header. The run's wall time is from the first connection starting its measured
requests to the last one finishing (after warm-up requests on every connection, which are not
recorded); CLOCK_MONOTONIC is shared by all processes of the machine, so clocks compare.
"""

from __future__ import annotations

import http.client
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# (path, headers, body): one request, built just before it is sent.
Request = tuple[str, dict[str, str], bytes]
BuildRequest = Callable[[int], Request]

MODES = ("threads", "processes")


@dataclass(frozen=True)
class Sample:
    latency_ns: int
    status: int                 # 0: no HTTP response (timeout, connection error)
    response_bytes: int
    server_timing: str | None
    error: str | None = None


@dataclass
class Result:
    samples: list[Sample] = field(default_factory=list)
    elapsed_s: float = 0.0
    connections: int = 1
    mode: str = "threads"


@dataclass(frozen=True)
class _Share:
    """What one connection sends: measured indices, then how many warm-up requests first."""

    indices: range
    warmup: range


def _shares(count: int, warmup: int, connections: int) -> list[_Share]:
    return [_Share(range(k, count, connections), range(k, warmup, connections))
            for k in range(connections)]


class _Connection:
    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def send(self, request: Request) -> Sample:
        path, headers, body = request
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        started = time.perf_counter_ns()
        try:
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            elapsed = time.perf_counter_ns() - started
            self.close()
            return Sample(elapsed, 0, 0, None, type(exc).__name__)
        elapsed = time.perf_counter_ns() - started
        if response.will_close:
            self.close()
        return Sample(elapsed, response.status, len(data), response.getheader("Server-Timing"))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# How long each connection waits for the others to finish warming up before the measured
# requests start together. Not the request timeout: a warm-up request may itself take that
# long, and a forked process on a loaded machine takes a while to start.
START_TIMEOUT_S = 60.0


def _run_share(host: str, port: int, timeout: float, build: BuildRequest, warmup: BuildRequest,
               share: _Share, start: Callable[[], None]) -> tuple[list[Sample], int, int]:
    connection = _Connection(host, port, timeout)
    try:
        for i in share.warmup:
            connection.send(warmup(i))
        start()
        samples = []
        first = time.perf_counter_ns()
        for i in share.indices:
            request = build(i)
            samples.append(connection.send(request))
        return samples, first, time.perf_counter_ns()
    finally:
        connection.close()


def _process_main(pipe, host, port, timeout, build, warmup, share, barrier) -> None:
    try:
        result = _run_share(host, port, timeout, build, warmup, share,
                            lambda: barrier.wait(START_TIMEOUT_S))
        pipe.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


def run(host: str, port: int, build: BuildRequest, count: int, *, connections: int = 1,
        warmup: BuildRequest | None = None, warmup_count: int = 0, mode: str = "threads",
        timeout: float = 30.0) -> Result:
    """Send `count` requests `build(0..count-1)` over `connections` keep-alive connections.

    `warmup(0..warmup_count-1)` are sent first, spread over the connections the same way, and
    not recorded. Raises `RuntimeError` if a connection's worker itself fails (not a request:
    a failed request is a sample with status 0).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if count < 1 or connections < 1 or warmup_count < 0:
        raise ValueError("count and connections must be >= 1, warmup_count >= 0")
    connections = min(connections, count)
    warmup = warmup or build
    shares = _shares(count, warmup_count, connections)
    if connections == 1:
        samples, first, last = _run_share(host, port, timeout, build, warmup, shares[0],
                                          lambda: None)
        return Result(samples, (last - first) / 1e9, 1, "sequential")
    runner = _run_processes if mode == "processes" else _run_threads
    parts = runner(host, port, timeout, build, warmup, shares)
    samples = [s for part, _, _ in parts for s in part]
    elapsed = (max(p[2] for p in parts) - min(p[1] for p in parts)) / 1e9
    return Result(samples, elapsed, connections, mode)


def _run_threads(host, port, timeout, build, warmup, shares):
    barrier = threading.Barrier(len(shares))
    parts: list = [None] * len(shares)
    errors: list[str] = []

    def work(k: int) -> None:
        try:
            parts[k] = _run_share(host, port, timeout, build, warmup, shares[k],
                                  lambda: barrier.wait(START_TIMEOUT_S))
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(shares))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"load generator thread failed: {errors[0]}")
    return parts


def _run_processes(host, port, timeout, build, warmup, shares):
    # fork: children inherit `build` (closures over pre-signed tokens) without pickling.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(shares))
    children = []
    for share in shares:
        parent_end, child_end = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_process_main, daemon=True,
                              args=(child_end, host, port, timeout, build, warmup, share,
                                    barrier))
        process.start()
        child_end.close()
        children.append((process, parent_end))
    parts, errors = [], []
    for process, pipe in children:
        try:
            status, value = pipe.recv()
        except EOFError:
            status, value = "error", f"worker exited with code {process.exitcode}"
        (parts if status == "ok" else errors).append(value)
        process.join(timeout)
    for process, _ in children:
        if process.is_alive():
            process.kill()
    if errors:
        raise RuntimeError(f"load generator process failed: {errors[0]}")
    return parts


def fetch(host: str, port: int, request: Request, timeout: float) -> tuple[int, bytes]:
    """One request on a new connection: (status, body); status 0 when there is no answer."""
    path, headers, body = request
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}".encode()
    finally:
        conn.close()


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`auth;dur=0.12, total;dur=0.9` → {"auth": 0.12, "total": 0.9} (ms); bad parts skipped."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..100)."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]
