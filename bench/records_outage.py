"""Call records through a PostgreSQL outage and a worker crash, measured on the real service.

    python -m bench.records_outage                 # about 4 minutes: 60 s per outage
    python -m bench.records_outage --seconds 10    # shorter outages (a smoke run)

`cds-service serve --workers 2 --threads 4` with the demo site, its store a fresh schema of the
local PostgreSQL (`CDS_TEST_POSTGRES_URL`, default postgres@127.0.0.1:5432/test) reached through
`bench.tcp_proxy`, its spool in a temporary directory. Four client threads send patient-view
calls (`bench.payloads` pv-3kb, a fresh signed token and hookInstance each) the whole time.

Scenarios, one after the other on the same server:

- refuse: 10 s normal, `--seconds` with the proxy refusing connections (PostgreSQL down), then
  the proxy passes again and the load goes on for 10 s.
- blackhole: the same with the proxy accepting connections and delivering nothing (a network
  dropping packets).
- kill: 20 s of load, one worker SIGKILLed after 10 s.

After each, the load stops and the bench waits (up to 180 s) until the store holds an audit
record for every call that got an answer. Figures: calls sent and answered, answers by status,
audit records expected (one per answered call) and stored, issued cards expected (cards in the
200 answers) and stored, duplicates, the time the backlog took to drain, and client latency
p50/p95 before and during the outage. Writes bench/results/records_outage.json and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from bench.payloads import pv_3kb
from bench.service_bench import CLI, SITE_CONFIG, Signer, _git, _headers, _jwks_file
from bench.tcp_proxy import TcpProxy

POSTGRES_URL = os.environ.get(
    "CDS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = 4


@dataclass
class Sample:
    started: float
    seconds: float
    status: int  # 0: no answer (connection error)
    hook_instance: str
    cards: int


@dataclass
class Load:
    """Client threads sending calls until stopped; every sample kept."""

    port: int
    signer: Signer
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self.payload = pv_3kb(datetime.now(UTC))
        self.audience = f"http://127.0.0.1:{self.port}{self.payload.path}"
        for _ in range(CLIENTS):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.samples

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            hook_instance = str(uuid.uuid4())
            headers = _headers(self.signer.token(self.audience))
            started = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("POST", self.payload.path, self.payload.body(hook_instance),
                             headers)
                response = conn.getresponse()
                body = response.read()
                status = response.status
                cards = len(json.loads(body).get("cards", ())) if status == 200 else 0
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status, cards = 0, 0
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
            self.samples.append(Sample(started, time.monotonic() - started, status,
                                       hook_instance, cards))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latency_ms(samples: list[Sample]) -> dict:
    times = [s.seconds * 1000 for s in samples if s.status]
    return {"calls": len(samples), "p50": _round(percentile(times, 0.5)),
            "p95": _round(percentile(times, 0.95))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class Database:
    def __init__(self, base_url: str):
        self.schema = f"bench_records_{uuid.uuid4().hex[:12]}"
        self.admin = sa.create_engine(make_url(base_url), poolclass=NullPool)
        with self.admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
        self.url = make_url(base_url).update_query_dict({"options": f"-csearch_path={self.schema}"})
        self.engine = sa.create_engine(self.url, poolclass=NullPool)

    def stored(self, hook_instances: list[str]) -> dict:
        with self.engine.connect() as conn:
            counts = {}
            for table in ("audit_log", "issued_cards"):
                row = conn.execute(sa.text(
                    f"SELECT count(*), count(DISTINCT hook_instance) FROM {table} "  # noqa: S608
                    "WHERE hook_instance = ANY(:ids)"), {"ids": hook_instances}).one()
                counts[table] = row
        return {"audit": counts["audit_log"][0],
                "audit_duplicates": counts["audit_log"][0] - counts["audit_log"][1],
                "cards": counts["issued_cards"][0]}

    def drop(self) -> None:
        self.engine.dispose()
        with self.admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        self.admin.dispose()


class Server:
    def __init__(self, tmp: Path, database_url: str):
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
        env.update(CDS_DATABASE_URL=database_url, CDS_SPOOL_DIR=str(tmp / "spool"),
                   CDS_REPLAY_CACHE_URL=f"sqlite:///{tmp / 'replay.sqlite3'}",
                   CDS_SITE_CONFIG=str(SITE_CONFIG), CDS_LOG_LEVEL="WARNING",
                   PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"))
        self.log = (tmp / "serve.log").open("w")
        self.process = subprocess.Popen(  # noqa: S603 - our own command, no shell
            [str(CLI), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
             "2", "--threads", "4", "--pidfile", str(tmp / "serve.pid")],
            env=env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"server did not start; see {self.log.name}")

    def workers(self) -> list[int]:
        pid = self.process.pid
        return sorted(int(p) for p in
                      Path(f"/proc/{pid}/task/{pid}/children").read_text().split())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drain(database: Database, samples: list[Sample], timeout: float = 180) -> dict:
    answered = [s for s in samples if s.status]
    ids = [s.hook_instance for s in answered]
    expected = {"audit": len(answered), "cards": sum(s.cards for s in answered)}
    started = time.monotonic()
    while True:
        stored = database.stored(ids)
        if stored["audit"] >= expected["audit"] or time.monotonic() - started > timeout:
            break
        time.sleep(0.5)
    statuses: dict[str, int] = {}
    for sample in samples:
        statuses[str(sample.status or "no answer")] = statuses.get(
            str(sample.status or "no answer"), 0) + 1
    return {"calls_sent": len(samples), "answered": len(answered), "statuses": statuses,
            "audit_expected": expected["audit"], "audit_stored": stored["audit"],
            "audit_duplicates": stored["audit_duplicates"],
            "cards_expected": expected["cards"], "cards_stored": stored["cards"],
            "drain_seconds": round(time.monotonic() - started, 1)}


def outage(server: Server, database: Database, proxy: TcpProxy, signer: Signer, mode: str,
           seconds: float) -> dict:
    load = Load(server.port, signer).start()
    time.sleep(10)
    began = time.monotonic()
    proxy.set_mode(mode)
    time.sleep(seconds)
    proxy.set_mode("pass")
    ended = time.monotonic()
    time.sleep(10)
    samples = load.stop()
    result = {"scenario": mode, "outage_seconds": seconds,
              "latency_before_ms": latency_ms([s for s in samples if s.started < began]),
              "latency_during_ms": latency_ms([s for s in samples
                                               if began <= s.started < ended]),
              "latency_after_ms": latency_ms([s for s in samples if s.started >= ended])}
    result.update(drain(database, samples))
    return result


def kill(server: Server, database: Database, signer: Signer) -> dict:
    load = Load(server.port, signer).start()
    time.sleep(10)
    victim = server.workers()[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(10)
    samples = load.stop()
    result = {"scenario": "kill -9", "killed_worker": victim,
              "latency_ms": latency_ms(samples)}
    result.update(drain(database, samples))
    return result


def markdown(report: dict) -> str:
    lines = [
        "# Call records through a store outage and a worker crash",
        "",
        f"`python -m bench.records_outage --seconds {report['seconds']:g}`, {report['date']}, "
        f"commit {report['commit']}: `cds-service serve --workers 2 --threads 4` (demo site), "
        f"PostgreSQL through `bench.tcp_proxy`, {CLIENTS} client threads of pv-3kb calls. "
        "Expected audit records: one per answered call; expected cards: the cards in the 200 "
        "answers. Drain: from the end of the load until every expected audit record was stored.",
        "",
        "| scenario | calls sent | answered | statuses | audit expected / stored (dupl.) "
        "| cards expected / stored | drain s | p50 before / during ms | p95 before / during ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["scenarios"]:
        before = r.get("latency_before_ms") or r.get("latency_ms")
        during = r.get("latency_during_ms") or r.get("latency_ms")
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(
            f"| {r['scenario']} | {r['calls_sent']} | {r['answered']} | {statuses} | "
            f"{r['audit_expected']} / {r['audit_stored']} ({r['audit_duplicates']}) | "
            f"{r['cards_expected']} / {r['cards_stored']} | {r['drain_seconds']} | "
            f"{before['p50']} / {during['p50']} | {before['p95']} / {during['p95']} |")
    lines += ["", "kill -9: latency over the whole run (the kill at 10 s of 20 s).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each outage")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    database = Database(POSTGRES_URL)
    direct = make_url(POSTGRES_URL)
    proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432)).start()
    proxied = database.url.set(port=proxy.port).update_query_dict({"connect_timeout": "2"})
    signer = Signer(_jwks_file())
    scenarios = []
    with tempfile.TemporaryDirectory(prefix="records-outage-") as tmp:
        server = Server(Path(tmp), proxied.render_as_string(hide_password=False))
        try:
            for mode in ("refuse", "blackhole"):
                scenarios.append(outage(server, database, proxy, signer, mode, args.seconds))
                print(json.dumps(scenarios[-1]), flush=True)  # noqa: T201
            scenarios.append(kill(server, database, signer))
            print(json.dumps(scenarios[-1]), flush=True)  # noqa: T201
        finally:
            server.stop()
            proxy.close()
            database.drop()
    git = _git()
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "commit": (git.get("commit") or "unknown")[:10], "seconds": args.seconds,
              "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
              "scenarios": scenarios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "records_outage.json").write_text(json.dumps(report, indent=2) + "\n",
                                                  encoding="utf-8")
    text = markdown(report)
    (args.out / "records_outage.md").write_text(text, encoding="utf-8")
    print(text)  # noqa: T201
    lost = any(r["audit_stored"] < r["audit_expected"] or r["audit_duplicates"]
               for r in scenarios)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
