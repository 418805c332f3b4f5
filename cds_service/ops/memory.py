"""Freed memory handed back to the operating system after a large request.

A 1 MB prefetch becomes about a hundred thousand Python objects; the larger ones come from
glibc's malloc, which keeps the freed pages in the arena of the thread that made them. gunicorn's
request threads each keep their own arena, so a worker's RSS grew by the peak of a large call in
every thread that served one (about 27 MB with four threads, issue 20's RSS target) and stayed
there. `malloc_trim(0)` returns the free pages of every arena (glibc malloc(3)); it runs once the
response has been sent (`call_on_close`), and only after calls whose body was large.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from flask import Flask, Response, request

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


def init_app(app: Flask) -> None:
    if _TRIM is None:
        log.debug("malloc_trim unavailable: freed memory stays with the allocator")
        return

    @app.after_request
    def _trim_after_large_bodies(response: Response) -> Response:
        if (request.content_length or 0) >= LARGE_BODY_BYTES:
            response.call_on_close(lambda: _TRIM(0))
        return response
