"""The C allocator, tuned for large requests, and a large body's objects freed after its answer.

A 1 MB prefetch passes through several buffers of its own size on the way in (gunicorn's socket
reads, the body's bytes, its text) and becomes about a hundred thousand Python objects. With
glibc's defaults each such buffer is mapped from the kernel when allocated and handed back when
freed (mmap, or the trimmed top of a thread's arena), so every large call faulted its pages in
afresh: about 1,650 minor page faults per 1.1 MB call at ~1.8 µs each on the benchmark VM, some
3 ms of a 20 ms call (issue 20). `tune_allocator` (mallopt(3), in gunicorn's master before it
forks; the workers inherit it) keeps that memory in the process instead:

- one arena (`M_ARENA_MAX`): gunicorn's request threads would each get their own, and a worker
  would keep the peak of a large call once per thread that served one (about 27 MB with four
  threads); shared, it keeps one. The GIL already serialises the threads' Python allocations;
- buffers below 32 MiB (`M_MMAP_THRESHOLD`, glibc's largest; bodies stop at
  MAX_CONTENT_LENGTH, 5 MB by default) come from that arena, not from a mapping of their own;
- free memory at the top of the arena goes back to the kernel past 64 MiB (`M_TRIM_THRESHOLD`),
  and after a large call `malloc_trim(0)` returns free pages anywhere in it once more than
  64 MiB are free in all (`mallinfo2`, glibc 2.33 and later; before, only the top is
  returned): a worker keeps what a large call needs, not what a burst of them needed.

Side by side (one worker pinned to one core, 1.1 MB patient-view): page faults per call
1,679 -> 0, server-side p50 20.6 -> 18.3 ms; worker RSS after the calls 185 MB either way.

Freeing the objects is itself work: about 2.5 ms for a 1.1 MB prefetch, paid where the view
returns, i.e. before the answer leaves. A large body's decoded JSON is therefore held (`hold`)
until the response has been sent and released then (`call_on_close`), so the answer no longer
waits on the deallocation. The CPU is the same: a call that arrives meanwhile shares it with the
freeing (issue 20: server-side p50 31.4 -> 26.4 ms side by side, a back-to-back client's p50
unchanged).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

from flask import Flask, Response, g, request

log = logging.getLogger(__name__)

# Bodies from this size on are held until sent, then checked for memory to return.
LARGE_BODY_BYTES = 256 * 1024
# mallopt(3) parameters (glibc <malloc.h>) and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
ARENAS = 1
MMAP_THRESHOLD = 32 * 1024 * 1024   # glibc refuses more than HEAP_MAX_SIZE / 2 (32 MiB)
KEEP_FREE_BYTES = 64 * 1024 * 1024


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
except OSError:
    _LIBC = None


def _glibc(name: str, argtypes: list, restype: Any) -> Any:
    function = getattr(_LIBC, name, None)
    if function is None:  # not glibc (musl, macOS), or older than 2.33 (mallinfo2)
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_TRIM = _glibc("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_MALLOPT = _glibc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
_MALLINFO2 = _glibc("mallinfo2", [], _Mallinfo2)


def tune_allocator() -> bool:
    """Set the allocator up for large requests (see the module docstring). Whether glibc took
    every setting; elsewhere nothing is changed."""
    if _MALLOPT is None:
        log.debug("mallopt unavailable: the C allocator keeps its defaults")
        return False
    return all([_MALLOPT(_M_ARENA_MAX, ARENAS), _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                _MALLOPT(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES)])


def _free_bytes() -> int:
    """Bytes glibc holds free in its arenas (every arena: `mallinfo2` sums them)."""
    return _MALLINFO2().fordblks if _MALLINFO2 is not None else 0


def hold(body: bytes, decoded: Any) -> None:
    """Keep a large request body's `decoded` JSON alive until its response has been sent."""
    if len(body) >= LARGE_BODY_BYTES:
        g.setdefault("_held_until_sent", []).append(decoded)


def init_app(app: Flask) -> None:
    @app.after_request
    def _after_large_bodies(response: Response) -> Response:
        held = g.pop("_held_until_sent", None)
        if held is not None or (request.content_length or 0) >= LARGE_BODY_BYTES:
            response.call_on_close(lambda: _release(held))
        return response


def _release(held: list | None) -> None:
    if held is not None:
        held.clear()  # the decoded body's objects are freed here, after the answer went out
    if _TRIM is not None and _free_bytes() > KEEP_FREE_BYTES:
        _TRIM(0)
