"""No call record is lost to a store outage or a crash, for real: PostgreSQL behind a loopback
proxy that refuses or blackholes connections (`bench.tcp_proxy`), gunicorn workers killed with
SIGKILL under load, and spool segments left by dead workers."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from bench.tcp_proxy import TcpProxy
from cds_service.records.audit import AUDIT_FIELDS, AuditRecord, lenient_record
from cds_service.records.call import Call
from cds_service.records.spool import SpoolRecorder, decode, encode
from cds_service.records.store import Store
from hooks import SERVICES
from tests.conftest import ROOT
from tests.helpers.golden import DATA, FROZEN_NOW, GOLDEN_SITE, load
from tests.helpers.http import post
from tests.helpers.servers import request, worker_pids

KIDNEY = DATA / "kidney-risk" / "egfr-28-g4-warning"
NOW = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def count(url: str, table: str, where: str = "") -> int:
    engine = sa.create_engine(make_url(url).set(drivername=make_url(url).drivername),
                              poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT count(*) FROM {table} {where}")).scalar_one()  # noqa: S608 - test tables
    finally:
        engine.dispose()


@pytest.fixture
def pg_behind_proxy(postgresql_store_url):
    """(URL straight to a fresh schema, URL to it through a proxy, the proxy)."""
    url = make_url(postgresql_store_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    proxied = url.set(port=proxy.port).update_query_dict({"connect_timeout": "2"})
    try:
        yield postgresql_store_url, proxied.render_as_string(hide_password=False), proxy
    finally:
        proxy.close()


def kidney_request() -> dict:
    body = copy.deepcopy(load(KIDNEY / "request.json"))
    body["hookInstance"] = str(uuid.uuid4())
    return body


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_calls_answer_quickly_through_an_outage_and_every_record_arrives(make_app,
                                                                        pg_behind_proxy, mode):
    direct, proxied, proxy = pg_behind_proxy
    app = make_app(SERVICES=SERVICES, CLOCK=lambda: FROZEN_NOW, DATABASE_URL=proxied,
                   SITE_YAML=GOLDEN_SITE)
    client = app.test_client()
    assert post(client, "/cds-services/kidney-risk", kidney_request()).status_code == 200
    wait_for(lambda: count(direct, "audit_log") == 1, 10, "the first call's record")
    fail_open = REGISTRY.get_sample_value(
        "cds_suppression_fail_open_total", {"site": "test-site", "service": "kidney-risk"}) or 0

    proxy.set_mode(mode)
    elapsed = []
    for _ in range(20):
        started = time.monotonic()
        response = post(client, "/cds-services/kidney-risk", kidney_request())
        elapsed.append(time.monotonic() - started)
        assert response.status_code == 200 and len(response.get_json()["cards"]) == 1
    # The override lookup gives up after 250 ms (then at once, while 8 lookups wait).
    assert statistics.median(elapsed) < 0.3 and max(elapsed) < 1.0, elapsed
    assert REGISTRY.get_sample_value("cds_suppression_fail_open_total", {
        "site": "test-site", "service": "kidney-risk"}) == fail_open + 20
    assert client.get("/readyz").status_code == 200
    detail = client.get("/healthz/detail").get_json()
    assert detail["status"] == "degraded" and detail["checks"]["store"]["status"] == "fail"

    started = time.monotonic()
    feedback = post(client, "/cds-services/kidney-risk/feedback", {"feedback": [{
        "card": str(uuid.uuid4()), "outcome": "overridden",
        "outcomeTimestamp": FROZEN_NOW.strftime("%Y-%m-%dT%H:%M:%SZ")}]})
    assert feedback.status_code == 503 and time.monotonic() - started < 3.5
    assert feedback.get_json()["resourceType"] == "OperationOutcome"
    assert count(direct, "audit_log") == 1  # the rest wait in the spool

    proxy.set_mode("pass")
    wait_for(lambda: count(direct, "audit_log") == 22, 30, "the spooled records")
    assert count(direct, "issued_cards") == 21
    assert count(direct, "call_records") == 22
    assert count(direct, "audit_log", "WHERE status = 503") == 1
    wait_for(lambda: app.extensions["cds"].store.recorder.backlog == 0, 10, "an empty backlog")


def call(n: int) -> Call:
    audit = AuditRecord(kind="invoke", time=NOW, status=200, site="s", service_id="svc",
                        hook="patient-view", hook_instance=f"hi-{n}", outcome="cards=0")
    return Call(audit=audit)


def test_a_dead_workers_segment_is_replayed_once_and_a_live_ones_never(tmp_path, monkeypatch):
    monkeypatch.setattr(SpoolRecorder, "SCAN_S", 0.2)
    url, spool = f"sqlite:///{tmp_path / 'cds.sqlite3'}", tmp_path / "spool"
    spool.mkdir()
    calls = [call(n) for n in range(6)]
    with Store(url) as store:
        store.add_calls(calls[:2])  # stored before the crash: the replay must not double them
    dead = spool / "calls-host-1-dead.jsonl"
    dead.write_bytes(b"".join(encode(c) for c in calls[:5]))
    live = spool / "calls-host-2-live.jsonl"
    live.write_bytes(encode(calls[5]))
    holder = os.open(live, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live worker holds its segment

    store = Store(url, spool_dir=spool)
    try:
        wait_for(lambda: not dead.exists(), 10, "the dead segment's replay")
        assert len(list(store.iter_audit())) == 5
        time.sleep(0.5)
        assert live.exists() and len(list(store.iter_audit())) == 5
        os.close(holder)  # that worker dies
        wait_for(lambda: not live.exists(), 10, "the second replay")
        assert [r["hook_instance"] for r in store.iter_audit()] == [f"hi-{n}" for n in range(6)]
    finally:
        store.dispose()


def test_records_the_store_refuses_go_to_rejected_and_the_rest_are_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(SpoolRecorder, "SCAN_S", 0.2)
    url, spool = f"sqlite:///{tmp_path / 'cds.sqlite3'}", tmp_path / "spool"
    spool.mkdir()
    bad = Call(audit=None, predictions=[{"time": NOW, "site": "s"}])  # NOT NULL columns missing
    lines = [encode(call(1)), b'{"not": "a call"}\n', encode(bad), encode(call(2)), b'{"trunc']
    (spool / "calls-host-1-dead.jsonl").write_bytes(b"".join(lines))
    before = REGISTRY.get_sample_value("cds_spool_rejected_total") or 0

    store = Store(url, spool_dir=spool)
    try:
        wait_for(lambda: not (spool / "calls-host-1-dead.jsonl").exists(), 10, "the replay")
        assert [r["hook_instance"] for r in store.iter_audit()] == ["hi-1", "hi-2"]
        rejected = (spool / "rejected" / "calls-host-1-dead.jsonl").read_bytes().splitlines()
        assert sorted(rejected) == sorted(line.rstrip(b"\n") for line in lines[1:3] + lines[4:])
        assert REGISTRY.get_sample_value("cds_spool_rejected_total") == before + 3
    finally:
        store.dispose()


def test_kill_9_of_a_worker_under_load_loses_no_record(serve, tmp_path):
    database = tmp_path / "serve.sqlite3"
    server = serve("--workers", "2", "--threads", "4", "--site-config",
                   str(ROOT / "site_config"), env={"CDS_SPOOL_DIR": str(tmp_path / "spool")})
    answered: list[str] = []
    statuses: list[int] = []
    stop = threading.Event()
    body = json.loads((ROOT / "tests/data/kidney-risk/egfr-28-g4-warning/request.json")
                      .read_text(encoding="utf-8"))

    def load_loop():
        while not stop.is_set():
            payload = {**body, "hookInstance": str(uuid.uuid4())}
            try:
                status, _ = request(server.base + "/cds-services/kidney-risk", payload)
            except OSError:  # the killed worker's connections
                continue
            statuses.append(status)
            if status == 200:
                answered.append(payload["hookInstance"])

    threads = [threading.Thread(target=load_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    victim = min(worker_pids(server))
    os.kill(victim, signal.SIGKILL)
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(15)
    assert len(answered) > 10 and set(statuses) == {200}, statuses

    url = f"sqlite:///{database}"

    def stored() -> list[str]:
        with Store(url) as store:
            return [r["hook_instance"] for r in store.iter_audit(kind="invoke")]

    wait_for(lambda: set(answered) <= set(stored()), 30, "every answered call's audit record")
    rows = stored()
    assert len(rows) == len(set(rows))  # none twice
    assert victim not in worker_pids(server)


def test_calls_answered_while_a_batch_is_stored_wait_for_the_next_linger(tmp_path, monkeypatch):
    """A transaction's fixed cost is why the writer lingers (SpoolRecorder.LINGER_S): the calls
    answered while one batch is being stored join the calls of the next linger, not a
    transaction of their own straight after."""
    monkeypatch.setattr(SpoolRecorder, "LINGER_S", 0.5)
    batches, storing, release = [], threading.Event(), threading.Event()

    def write(calls):
        batches.append([c.audit.hook_instance for c in calls])
        if len(batches) == 1:
            storing.set()
            assert release.wait(10)

    recorder = SpoolRecorder(write, lambda: None, tmp_path / "spool")
    try:
        recorder.submit(call(1))
        assert storing.wait(10)
        recorder.submit(call(2))
        recorder.submit(call(3))
        release.set()
        time.sleep(0.05)  # well inside the next linger
        recorder.submit(call(4))
        recorder.flush(10)
        assert batches == [["hi-1"], ["hi-2", "hi-3", "hi-4"]]
    finally:
        recorder.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="per-thread nice values are Linux's (spool._lower_priority)")
def test_the_shipper_gives_way_to_the_request_threads(tmp_path):
    """The shipper stores at a lower CPU priority than the threads answering calls (the spool
    module's docstring): its nice value is theirs plus SHIPPER_NICE, theirs unchanged."""
    seen = []

    def write(calls):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    recorder = SpoolRecorder(write, lambda: None, tmp_path / "spool")
    try:
        recorder.submit(call(1))
        recorder.flush(10)
    finally:
        recorder.close()
    assert seen == [min(19, own + SpoolRecorder.SHIPPER_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    assert SpoolRecorder.SHIPPER_NICE > 0


def test_a_spool_line_holds_the_audit_records_fields_and_reads_back_as_it_was():
    record = lenient_record(kind="invoke", time=NOW, status=200, site="s", hook="patient-view",
                            iss="https://ehr.example/oauth2", card_uuids=["c-1"])
    line = encode(Call(audit=record))
    assert set(json.loads(line)["audit"]) == set(AUDIT_FIELDS)
    assert decode(line).audit == record


def test_spool_lines_read_back_whichever_encoder_wrote_them():
    record = lenient_record(kind="invoke", time=NOW, status=200, detail="eGFR ≥ 60 mL/min/1.73 m²")
    utf8 = Call(audit=record, issued_cards=[{"card_uuid": "c-1", "time": NOW, "topic_code": "é"}],
                predictions=[])
    # A lone surrogate (msgspec refuses to write it) takes the standard library's ASCII line.
    odd = Call(audit=record, issued_cards=[{"card_uuid": "c-2", "time": NOW,
                                            "topic_code": "x\ud800"}], predictions=[])
    assert b"\xc2\xb2" in encode(utf8) and b"\\ud800" in encode(odd)
    for call_ in (utf8, odd):
        line = encode(call_)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode(line) == call_
    # A line written before msgspec wrote them (ASCII, +00:00 offsets) still reads back.
    old = json.dumps({"id": utf8.id, "audit": {**{name: getattr(record, name)
                                                   for name in AUDIT_FIELDS},
                                                "time": NOW.isoformat()},
                      "issued_cards": [{**utf8.issued_cards[0], "time": NOW.isoformat()}],
                      "predictions": []}, ensure_ascii=True, default=list)
    assert decode(old.encode() + b"\n") == utf8
