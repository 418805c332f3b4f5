"""The in-memory writer of call records (`Recorder`): a background thread writing many calls
per transaction, for processes without a spool (CLI tools, tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from cds_service.records.call import Call

log = logging.getLogger(__name__)


class Recorder:
    """Writes calls' records on a background thread, many calls per transaction: in processes
    without a spool (CLI tools, tests). A serving worker spools them first
    (`cds_service.records.spool.SpoolRecorder`), so neither a crash nor an outage loses them.

    A call's audit record, issued cards and predictions used to cost three committed
    transactions (three fsyncs on SQLite) before the answer left; Epic waits for that answer.
    Now the answer leaves first and a writer thread commits whatever has queued meanwhile in one
    transaction. What this trades: records of calls answered in the last moments before a hard
    kill (SIGKILL, power loss) can be lost; a graceful stop (SIGTERM, reload, worker recycling)
    writes everything first (`close`). Feedback is not queued: it is committed before its 200.

    Reads that must see this process's own calls (`iter_audit`, `list_overrides`, purge,
    storing feedback, so that a card is on record before an override of it) call `flush()`
    first. The queue is bounded: a writer that cannot keep up slows callers down instead of
    growing without limit. A failed write is logged and counted
    (`cds_store_write_failures_total`); the calls are not retried.
    """

    MAX_QUEUED = 10_000
    # After waking, the writer waits this long for more calls, so that even sequential traffic
    # shares transactions (a commit costs more than a row). Bounds what a hard kill can lose.
    LINGER_S = 0.01

    def __init__(self, write: Callable[[Sequence[Call]], None]):
        self._write = write
        self._queue: list[Call] = []
        self._unwritten = 0  # queued or being written
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._closed = False

    def submit(self, call: Call) -> None:
        with self._cond:
            if self._closed:
                self._write_now([call])
                return
            self._start()
            self._cond.wait_for(lambda: len(self._queue) < self.MAX_QUEUED)
            self._queue.append(call)
            self._unwritten += 1
            if len(self._queue) == 1:  # the writer waits for the first call only
                self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every call submitted is written (or `timeout`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._unwritten == 0, timeout):
                log.error("store writer: %d call record(s) still unwritten after %.0f s",
                          self._unwritten, timeout)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _start(self) -> None:
        # Threads do not survive a fork: a worker forked from a process that wrote starts its own.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._queue, self._unwritten, self._pid = [], 0, os.getpid()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                closing = self._closed
            if not closing:
                # Not a wait on the condition: every call queued meanwhile would cut it short,
                # and waking the writer (and handing it the GIL) per call costs the callers.
                time.sleep(self.LINGER_S)
            with self._cond:
                batch, self._queue = self._queue, []
                self._cond.notify_all()  # room in the queue again
            self._write_now(batch)
            with self._cond:
                self._unwritten -= len(batch)
                self._cond.notify_all()

    def _write_now(self, batch: list[Call]) -> None:
        try:
            self._write(batch)
        except Exception:  # noqa: BLE001 - a lost record is logged and counted, never raised
            from cds_service.ops import metrics

            metrics.STORE_WRITE_FAILURES.inc(len(batch))
            log.exception("store writer: %d call record(s) not written", len(batch))
