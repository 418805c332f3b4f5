"""Random (version 4) UUIDs for card, suggestion, call and request ids.

The same 122 random bits from `os.urandom` and the same text as `uuid.uuid4()`, without building
a `uuid.UUID` on the way: a patient-view makes four, and the object was most of their cost
(2.0 against 0.9 us each on the benchmark machine, issue 20). RFC 9562 §5.4: version 4 is the
four bits 0100 at the top of octet 6, and the variant the two bits 10 at the top of octet 8.

The bytes are read from the kernel 4 KiB at a time (256 ids per `getrandom()`), not 16 at a
time: each `os.urandom` call is a system call that lets go of the GIL, four per patient-view. A
forked child starts with an empty buffer, so no two processes ever hand out the same bytes.
"""

from __future__ import annotations

import os
import threading

_BUFFER_BYTES = 4096
_lock = threading.Lock()
_buffer = b""
_next = 0


def _forget_buffer() -> None:
    # In a forked child: the parent's bytes are the parent's, and a lock held by one of its
    # threads at the fork would never be released here.
    global _buffer, _next, _lock  # noqa: PLW0603 - per-process state, reset only after a fork
    _buffer, _next, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_buffer)


def _random16() -> bytearray:
    global _buffer, _next  # noqa: PLW0603 - the buffer is this module's own
    with _lock:
        start = _next
        if start + 16 > len(_buffer):
            _buffer, start = os.urandom(_BUFFER_BYTES), 0
        _next = start + 16
        return bytearray(_buffer[start:start + 16])


def uuid4_hex() -> str:
    """32 lowercase hex digits, as `uuid.uuid4().hex`."""
    octets = _random16()
    octets[6] = octets[6] & 0x0F | 0x40
    octets[8] = octets[8] & 0x3F | 0x80
    return octets.hex()


def uuid4_text() -> str:
    """The 8-4-4-4-12 form, as `str(uuid.uuid4())`."""
    h = uuid4_hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
