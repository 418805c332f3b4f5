"""The store's background writer (`recorder.Recorder`): calls' audit records, issued cards and
predictions are written after the answer, many per transaction, and none is lost on a graceful
stop."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from prometheus_client import REGISTRY

from cds_service.records.audit import AuditRecord
from cds_service.records.call import Call
from cds_service.records.recorder import Recorder
from cds_service.records.store import Store

NOW = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)


def call(n: int) -> Call:
    audit = AuditRecord(kind="invoke", time=NOW, status=200, site="s", service_id="svc",
                        hook="patient-view", hook_instance=f"hi-{n}", outcome="cards=1")
    card = {"time": NOW, "site": "s", "service_id": "svc", "hook_instance": f"hi-{n}",
            "card_uuid": f"card-{n}", "user_id": "u", "patient_id": f"p{n}",
            "topic_system": "t", "topic_code": "kidneyfunction", "indicator": "warning"}
    return Call(audit=audit, issued_cards=[card])


def test_queued_calls_are_written_in_batches_and_read_back_after_a_flush(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'cds.sqlite3'}")
    batches, gate = [], threading.Event()
    store.recorder._write = lambda calls: (gate.wait(5), batches.append(len(calls)),
                                           store.add_calls(calls))
    for n in range(50):
        store.record(call(n))
    gate.set()
    rows = list(store.iter_audit(kind="invoke"))  # flushes first
    assert [r["hook_instance"] for r in rows] == [f"hi-{n}" for n in range(50)]
    assert sum(batches) == 50 and len(batches) < 50  # several calls per transaction
    assert store.card_topics("s", "svc", {"card-7"}) == {"card-7": "kidneyfunction"}
    store.dispose()


def test_dispose_writes_what_is_queued(tmp_path):
    url = f"sqlite:///{tmp_path / 'cds.sqlite3'}"
    store = Store(url)
    gate = threading.Event()
    write = store.recorder._write
    store.recorder._write = lambda calls: (gate.wait(5), write(calls))
    for n in range(20):
        store.record(call(n))
    threading.Timer(0.2, gate.set).start()
    store.dispose()  # a graceful stop (gunicorn worker_exit → runtime.close)
    with Store(url) as again:
        assert len(list(again.iter_audit())) == 20
    store.record(call(99))  # after close: written at once, not queued
    with Store(url) as again:
        assert len(list(again.iter_audit())) == 21


def test_a_failed_write_is_logged_and_counted_never_raised(tmp_path, caplog):
    store = Store(f"sqlite:///{tmp_path / 'cds.sqlite3'}")

    def broken(calls):
        raise RuntimeError("disk full")

    store.recorder._write = broken
    before = REGISTRY.get_sample_value("cds_store_write_failures_total") or 0
    store.record(call(1))
    store.record(call(2))
    store.recorder.flush()
    assert REGISTRY.get_sample_value("cds_store_write_failures_total") == before + 2
    assert "not written" in caplog.text
    store.dispose()


def test_the_queue_is_bounded(monkeypatch):
    written = []
    gate = threading.Event()
    recorder = Recorder(lambda calls: (gate.wait(5), written.extend(calls)))
    monkeypatch.setattr(Recorder, "MAX_QUEUED", 3)
    done = threading.Event()

    def produce():
        for n in range(10):
            recorder.submit(n)
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert not done.wait(0.3)  # the producer waits for room instead of queueing without limit
    gate.set()
    assert done.wait(5)
    recorder.close()
    assert written == list(range(10))
