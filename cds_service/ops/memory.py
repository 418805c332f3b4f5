"""Freed memory handed back to the operating system after a large request.

A 1 MB prefetch becomes about a hundred thousand Python objects; the larger ones come from
glibc's malloc, which keeps the freed pages in the arena of the thread that made them. gunicorn's
request threads each keep their own arena, so a worker's RSS grew by the peak of a large call in
every thread that served one (about 27 MB with four threads, issue 20's RSS target) and stayed
there. `malloc_trim(0)` returns the free pages of every arena (glibc malloc(3)); it runs once the
response has been sent (`call_on_close`), and only after calls whose body was large.

Freeing those objects is itself work: about 2.5 ms for a 1.1 MB prefetch, paid where the view
returns, i.e. before the answer leaves. A large body's decoded JSON is therefore held (`hold`)
until the response has been sent and released just before the trim, so the answer no longer
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

# Bodies from this size on: a 3 KB patient-view never pays for a trim (about 0.2 to 1 ms).
LARGE_BODY_BYTES = 256 * 1024


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def hold(body: bytes, decoded: Any) -> None:
    """Keep a large request body's `decoded` JSON alive until its response has been sent."""
    if len(body) >= LARGE_BODY_BYTES:
        g.setdefault("_held_until_sent", []).append(decoded)


def init_app(app: Flask) -> None:
    if _TRIM is None:
        log.debug("malloc_trim unavailable: freed memory stays with the allocator")

    @app.after_request
    def _after_large_bodies(response: Response) -> Response:
        held = g.pop("_held_until_sent", None)
        if held is not None or (request.content_length or 0) >= LARGE_BODY_BYTES:
            response.call_on_close(lambda: _release(held))
        return response


def _release(held: list | None) -> None:
    if held is not None:
        held.clear()  # the decoded body's objects are freed here, after the answer went out
    if _TRIM is not None:
        _TRIM(0)
