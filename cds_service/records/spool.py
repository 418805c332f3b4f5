"""The call-record spool: every call's records reach local disk before its answer leaves, and the
shared store when it can take them.

A call's audit record, issued cards and predictions (`call.Call`) are appended as one JSON line
to this worker's segment file in `SPOOL_DIR` (`calls-<host>-<pid>-<random>.jsonl`) with a plain
`write()`: once it returns the line is in the kernel's page cache, so a SIGKILL or OOM kill of
the worker loses nothing; a thread `fsync`s the segment every second, which bounds what a power
loss or kernel crash can take. A shipper thread writes the lines to the store in batches, in
order, retrying with back-off while the store is down (connection refused, no answer, locked);
the answer never waits on the database. Storing is idempotent by the call's id
(`tables.call_records_table`), so a line written twice (a crash between commit and bookkeeping, a
replay) is stored once.

A segment is `flock`ed by the process that writes it for as long as it lives. Each shipper
scans the directory every `SCAN_S` seconds for segments nobody holds (a worker killed, a pod
restarted on the same volume, a graceful stop while the store was down), takes the lock, replays
the file and deletes it; the lock means two workers never replay the same file. A line the store
refuses for good (not an outage: a constraint, a value it cannot hold) is moved to `rejected/`
beside the segments, logged and counted (`cds_spool_rejected_total`), never retried in a loop.

A segment whose lines are all stored is replaced by a fresh one once it passes `ROTATE_BYTES`,
and deleted at a graceful stop; its size is the outage backlog (about 2 kB per call).

The shipper runs at a lower CPU priority than the request threads (`SHIPPER_NICE`; on Linux
the nice value is per thread). A batch is tens of milliseconds of CPU in one burst every
`LINGER_S`, and a call answered meanwhile on the same core shared the CPU with it: that is the
slowest 1 % of calls (issue 20: without the shipper, a 3 KB patient-view's server-side p99 on
one pinned core fell from ~10 to 5 ms). At a lower priority the request threads come first and
the shipper takes the gaps between calls. Side by side at +10: p99 9.77 -> 8.66 ms over 12
rounds (bench/results/compare-shipper.md), 10.1 -> 6.5 and 9.6 -> 8.3 in shorter runs; at +19
5.0 and 4.4 (p50 about 3 ms on that machine). Under sustained full load the shipper
gets only the share its nice value leaves it and falls behind; the records wait in the spool,
safe, and are stored once the load eases. 16 connections for 30 s: 1,776 of 6,000 calls still
spooled at the end, all stored 0.8 s later, at +10; 5,432 and 2 s at +19, and +15 was no
better. +10 is the compromise: under full load the store still takes about 70 % of the calls
as they come (10 % at +19), and the backlog (`cds_spool_backlog`) grows only with the rest. On
a machine of usual speed the p99 was already 1.55 ms at +10, and +19 gained nothing (0.948 x
the requests/s, README "Benchmark").
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from cds_service.ops import metrics
from cds_service.protocol.errors import ConfigError
from cds_service.records.audit import AUDIT_FIELDS, AuditRecord
from cds_service.records.call import Call
from cds_service.records.database import StoreUnavailable

log = logging.getLogger(__name__)

SEGMENT_GLOB = "calls-*.jsonl"
REJECTED = "rejected"


def default_directory(database_url: str) -> Path:
    """`spool/` beside a SQLite store's file; `var/spool` (the data directory) otherwise."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        return Path(url.database).expanduser().parent / "spool"
    return Path("var/spool")


def encode(call: Call) -> bytes:
    """One spool line: the call as JSON (datetimes as ISO 8601 text), newline-terminated.

    msgspec writes it (UTF-8, datetimes in RFC 3339 with `Z`: a tenth of the standard library's
    time on the request thread, issue 20); what msgspec refuses (a lone surrogate, a type it
    does not know) is written by `json` as before, ASCII-escaped. Either reads back the same."""
    audit = None
    if call.audit is not None:
        audit = {name: getattr(call.audit, name) for name in AUDIT_FIELDS}
    data = {"id": call.id, "audit": audit, "issued_cards": list(call.issued_cards),
            "predictions": list(call.predictions)}
    try:
        return _ENCODER.encode(data) + b"\n"
    except (TypeError, ValueError, msgspec.EncodeError):  # UnicodeEncodeError: a ValueError
        return (_JSON_ENCODER.encode(data) + "\n").encode("ascii")


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} in a call record")


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()
# Built once: `json.dumps` with any option builds an encoder per call.
_JSON_ENCODER = json.JSONEncoder(default=_iso, ensure_ascii=True, separators=(",", ":"))


def decode(line: bytes) -> Call:
    """The `Call` a spool line holds; ValueError (or TypeError) when it holds none."""
    try:
        data = _DECODER.decode(line)
    except msgspec.DecodeError:  # not JSON, or `json`'s fallback line (a lone surrogate)
        data = json.loads(line)
    audit = data["audit"]
    if audit is not None:
        audit = AuditRecord(**{**audit, "time": datetime.fromisoformat(audit["time"])})
    rows = ([{**row, "time": datetime.fromisoformat(row["time"])} for row in data[key]]
            for key in ("issued_cards", "predictions"))
    return Call(audit, *rows, id=data["id"])


class Segment:
    """One spool file, open and `flock`ed (exclusively) by this process."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def create(cls, directory: Path) -> Segment:
        name = f"calls-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, fd)

    @classmethod
    def claim(cls, path: Path) -> Segment | None:
        """The segment at `path` if no live process holds it (its writer died or stopped)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0:  # replayed and deleted by another worker meanwhile
            os.close(fd)
            return None
        return cls(path, fd)

    def read(self, start: int, end: int) -> bytes:
        return os.pread(self.fd, end - start, start)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def lines(self) -> Iterator[bytes]:
        with os.fdopen(os.dup(self.fd), "rb") as file:
            file.seek(0)
            yield from file

    def release(self, *, delete: bool = False) -> None:
        if delete:
            self.path.unlink(missing_ok=True)  # while locked: nobody else replays it
        os.close(self.fd)


class SpoolRecorder:
    """The store's writer of call records through the spool (module docstring). Same interface
    as `recorder.Recorder`: `submit`, `flush`, `close`."""

    BATCH = 500  # calls per transaction
    ROTATE_BYTES = 4 * 1024 * 1024
    FSYNC_S = 1.0
    SCAN_S = 5.0
    # Let calls queue up into one transaction. A transaction's fixed cost dominates: storing
    # the records of 1, 4, 16 and 64 patient-views per transaction cost 1.26, 0.37, 0.15 and
    # 0.11 ms of CPU per call on the bench machine, taken from the worker that answers (issue
    # 20; measured again later: ~3.2 ms per transaction plus ~0.13 ms per call on a slower
    # day). At 300 calls/s, 200 ms gathers ~60 calls. Records reach the store that much later
    # (the spool already holds them); `flush` and `close` cut the wait short. Lines written
    # while a batch is being stored wait for the next linger, not a transaction of their own.
    LINGER_S = 0.2
    SHIPPER_NICE = 10  # added to the worker's nice value for the shipper thread (docstring)
    RETRY_S = (0.25, 5.0)  # first and longest wait before writing again after a failure
    CLOSE_S = 20.0  # a graceful stop writes what it can in this long (gunicorn allows 30 s)

    def __init__(self, write: Callable[[Sequence[Call]], Any], probe: Callable[[], None],
                 directory: str | Path):
        self._write, self._probe = write, probe
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"SPOOL_DIR: cannot create {directory}: {exc.strerror}") from exc
        self._cond = threading.Condition()
        self._segment: Segment | None = None
        self._written = self._shipped = 0  # byte offsets in the segment
        self._pending = self._orphans = 0  # records not yet stored: ours, dead workers'
        self._unspooled: list[Call] = []  # the spool could not be written (disk full)
        self._dirty = False
        self.store_ok = True
        self.write_error: str | None = None
        self._closing = False
        self._closed = False
        self._flushers = 0  # threads waiting in `flush`
        self._pid: int | None = None
        self._threads: list[threading.Thread] = []
        self._start()

    @property
    def backlog(self) -> int:
        return self._pending + self._orphans + len(self._unspooled)

    def writable(self) -> bool:
        """The spool can take records: its directory is writable and the last append worked."""
        return self.write_error is None and os.access(self.directory, os.W_OK | os.X_OK)

    def submit(self, call: Call) -> None:
        line = encode(call)
        with self._cond:
            if self._closed:
                self._store([call], "after close")
                return
            self._start()
            try:
                os.write(self._segment.fd, line)
            except OSError as exc:
                # Disk full or gone: the records wait in memory (lost on a crash) and /readyz
                # takes this pod out of the Service until the spool is writable again.
                if self.write_error is None:
                    log.error("spool %s not writable (%s): records kept in memory",
                              self._segment.path, exc.strerror)
                self.write_error = exc.strerror or type(exc).__name__
                self._unspooled.append(call)
            else:
                self.write_error = None
                self._written += len(line)
                self._pending += 1
                self._dirty = True
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until this worker's records are stored (or `timeout`); at once while the store
        is down: they are safe in the spool, and the caller should not wait on the outage."""
        with self._cond:
            self._flushers += 1  # the writer does not linger for more calls meanwhile
            self._hurry.set()
            try:
                if not self._cond.wait_for(
                        lambda: not self._pending and not self._unspooled or not self.store_ok,
                        timeout):
                    log.warning("spool: %d call record(s) not yet stored after %.1f s",
                                self._pending, timeout)
            finally:
                self._flushers -= 1

    def close(self) -> None:
        """Store what is spooled (for up to CLOSE_S), then stop; a segment not fully stored is
        left for another worker to replay."""
        with self._cond:
            if self._closed or self._pid != os.getpid():
                self._closed = True
                return
            self._closing = True
            self._stopping.set()
            self._hurry.set()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(self.CLOSE_S)
        with self._cond:
            self._closed = True
            segment, self._segment = self._segment, None
            if segment is not None:
                done = self._shipped == self._written and not self._unspooled
                if not done:
                    log.warning("spool: %d call record(s) left in %s for replay",
                                self._pending, segment.path)
                    os.fsync(segment.fd)
                segment.release(delete=done)

    # --- the threads --------------------------------------------------------------------------

    def _start(self) -> None:
        # Threads and locks do not survive a fork: a worker forked from a process that spooled
        # starts its own segment and threads.
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._segment = Segment.create(self.directory)
        self._written = self._shipped = self._pending = 0
        self._stopping = threading.Event()
        self._hurry = threading.Event()  # a flush or close waits: stop lingering
        self._threads = [threading.Thread(target=self._ship_forever, name="spool-shipper",
                                          daemon=True),
                         threading.Thread(target=self._fsync_forever, name="spool-fsync",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def _fsync_forever(self) -> None:
        # Its own event, not `_cond`: every `submit` notifies `_cond`, and waking this thread
        # (and handing it the GIL) on every call cost the request threads for nothing.
        while not self._stopping.wait(self.FSYNC_S):
            with self._cond:
                if self._segment is None:
                    return
                fd, dirty, self._dirty = self._segment.fd, self._dirty, False
            if dirty:
                try:
                    os.fsync(fd)
                except OSError as exc:  # rotated and closed meanwhile: its lines are stored
                    log.debug("spool fsync: %s", exc)

    def _ship_forever(self) -> None:
        _lower_priority(self.SHIPPER_NICE)
        retry, next_scan, deadline = 0.0, 0.0, None
        while True:
            with self._cond:
                if not self._closing and retry:
                    self._cond.wait_for(lambda: self._closing, retry)
                elif not self._closing:
                    self._cond.wait_for(
                        lambda: self._written > self._shipped or self._unspooled
                        or self._closing, max(0.0, next_scan - time.monotonic()))
                closing = self._closing
            if closing and deadline is None:
                deadline = time.monotonic() + self.CLOSE_S
            if not closing and not retry and not self._flushers:
                # Its own event, not `_cond`, which every `submit` notifies (see _fsync_forever).
                self._hurry.wait(self.LINGER_S)
                self._hurry.clear()
            ok = self._ship_own()
            if ok and not closing and time.monotonic() >= next_scan:
                ok = self._replay_orphans()
                next_scan = time.monotonic() + self.SCAN_S
            if ok and not self.store_ok:  # nothing of ours was waiting: is the store back?
                ok = self._store([], "probe")
            metrics.spool_backlog(self.backlog)
            if closing:
                if ok and self._drained() or time.monotonic() >= deadline:
                    return
                if not ok:
                    time.sleep(self.RETRY_S[0])
                continue
            retry = 0.0 if ok else min(max(retry * 2, self.RETRY_S[0]), self.RETRY_S[1])

    def _ship_own(self) -> bool:
        """Store the lines this worker had written when called, oldest first; False when the
        store failed. Lines written meanwhile are the next round's: chasing them here stored
        the calls answered during each transaction in a transaction of their own (146
        transactions for 3,173 patient-views at 667/s, against 23 lingers), each paying the
        fixed cost `LINGER_S` is there to share."""
        with self._cond:
            unspooled, self._unspooled = self._unspooled, []
        if unspooled and not self._store(unspooled, "memory"):
            with self._cond:
                self._unspooled[:0] = unspooled
            return False
        with self._cond:
            segment, start, end = self._segment, self._shipped, self._written
        if segment is None:  # closed meanwhile
            return True
        lines = segment.read(start, end).splitlines(keepends=True) if end > start else []
        for first in range(0, len(lines), self.BATCH):
            chunk = lines[first:first + self.BATCH]
            if not self._store_lines(chunk, segment):
                return False
            with self._cond:
                self._shipped += sum(len(line) for line in chunk)
                self._pending -= len(chunk)
                self._cond.notify_all()
        self._rotate()
        return True

    def _drained(self) -> bool:
        with self._cond:
            return self._shipped == self._written and not self._unspooled

    def _rotate(self) -> None:
        with self._cond:
            if (self._segment is None or self._written < self.ROTATE_BYTES
                    or self._shipped != self._written):
                return
            old, self._segment = self._segment, Segment.create(self.directory)
            self._written = self._shipped = 0
        old.release(delete=True)

    def _replay_orphans(self) -> bool:
        """Replay every segment no live process holds; False when the store failed."""
        own = self._segment.path if self._segment is not None else None
        for path in sorted(self.directory.glob(SEGMENT_GLOB)):
            if path == own:
                continue
            segment = Segment.claim(path)
            if segment is None:
                continue
            done = False
            try:
                lines = list(segment.lines())
                self._orphans = len(lines)
                log.info("spool: replaying %d call record(s) from %s", len(lines), path.name)
                for first in range(0, len(lines), self.BATCH):
                    chunk = lines[first:first + self.BATCH]
                    if not self._store_lines(chunk, segment):
                        return False
                    self._orphans -= len(chunk)
                done = True
            finally:
                self._orphans = 0
                segment.release(delete=done)
        return True

    def _store_lines(self, lines: Sequence[bytes], segment: Segment) -> bool:
        calls = []
        for line in lines:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("incomplete line")  # the writer died mid-line
                calls.append(decode(line))
            except (ValueError, TypeError, KeyError) as exc:
                self._reject(segment, [line], exc)
        return self._store(calls, segment.path.name, segment)

    def _store(self, calls: Sequence[Call], source: str, segment: Segment | None = None) -> bool:
        """Write `calls` to the store; True when done (or rejected for good), False on an outage
        (nothing rejected: the caller retries the same calls later)."""
        try:
            if calls:
                self._write(calls)
            else:
                self._probe()
        except StoreUnavailable as exc:
            if self.store_ok:
                log.warning("spool: store unavailable, %d call record(s) kept for retry: %s",
                            self.backlog, exc)
            self._set_store_ok(False)
            return False
        except Exception as exc:  # noqa: BLE001 - anything else is this data, not an outage
            if len(calls) > 1:  # find the call at fault: store the others
                return all(self._store([call], source, segment) for call in calls)
            self._reject(segment, [encode(c) for c in calls], exc)
            return True
        if not self.store_ok:
            log.info("spool: store available again")
        self._set_store_ok(True)
        return True

    def _set_store_ok(self, ok: bool) -> None:
        with self._cond:
            self.store_ok = ok
            self._cond.notify_all()  # flush() waiters stop waiting on an outage
        metrics.store_up(ok)

    def _reject(self, segment: Segment | None, lines: Sequence[bytes], exc: Exception) -> None:
        name = segment.path.name if segment is not None else "memory.jsonl"
        target = self.directory / REJECTED / name
        target.parent.mkdir(exist_ok=True)
        with target.open("ab") as file:
            file.writelines(line if line.endswith(b"\n") else line + b"\n" for line in lines)
        metrics.SPOOL_REJECTED.inc(len(lines))
        # The exception's class only: its text may quote the values (PHI).
        log.error("spool: %d call record(s) refused by the store (%s), moved to %s",
                  len(lines), type(exc).__name__, target)


def _lower_priority(increment: int) -> None:
    """Raise the calling thread's nice value by `increment` (capped at 19 by the kernel). Linux
    only: there setpriority(2) with a thread id sets that thread's nice value, elsewhere it would
    name a process."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError as exc:  # a sandbox that forbids it: the shipper runs as before
        log.debug("spool shipper priority unchanged: %s", exc)
