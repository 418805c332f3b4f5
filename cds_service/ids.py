"""Random (version 4) UUIDs for card, suggestion, call and request ids.

The same 122 random bits from `os.urandom` and the same text as `uuid.uuid4()`, without building
a `uuid.UUID` on the way: a patient-view makes four, and the object was most of their cost
(2.0 against 0.9 us each on the benchmark machine, issue 20). RFC 9562 §5.4: version 4 is the
four bits 0100 at the top of octet 6, and the variant the two bits 10 at the top of octet 8.
"""

from __future__ import annotations

import os


def uuid4_hex() -> str:
    """32 lowercase hex digits, as `uuid.uuid4().hex`."""
    octets = bytearray(os.urandom(16))
    octets[6] = octets[6] & 0x0F | 0x40
    octets[8] = octets[8] & 0x3F | 0x80
    return octets.hex()


def uuid4_text() -> str:
    """The 8-4-4-4-12 form, as `str(uuid.uuid4())`."""
    h = uuid4_hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
