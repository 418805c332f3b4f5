"""Random ids: the text `uuid.uuid4()` gives, version 4 and RFC variant, never repeated."""

from __future__ import annotations

import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from cds_service import ids
from cds_service.ids import uuid4_hex, uuid4_text

TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_uuid4_text_is_a_version_4_uuid_in_its_canonical_form():
    for _ in range(2000):
        text = uuid4_text()
        assert TEXT.fullmatch(text)
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text


def test_uuid4_hex_is_the_same_uuid_without_dashes():
    for _ in range(2000):
        value = uuid4_hex()
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value and (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


def test_ids_do_not_repeat_and_use_every_random_bit():
    ids = [uuid.UUID(uuid4_text()).int for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    fixed = (0xF << 76) | (0x3 << 62)  # the version and variant bits
    varying = 0
    for value in ids:
        varying |= value ^ ids[0]
    assert varying == ((1 << 128) - 1) & ~fixed


def test_ids_are_read_from_the_kernel_a_buffer_at_a_time(monkeypatch):
    reads, real = [], os.urandom

    def urandom(n):
        reads.append(n)
        return real(n)

    monkeypatch.setattr(ids, "_buffer", b"")
    monkeypatch.setattr(ids.os, "urandom", urandom)
    made = {uuid4_hex() for _ in range(600)}
    assert len(made) == 600
    # 600 ids of 16 bytes from 4,096-byte reads: three reads, not six hundred.
    assert reads == [4096, 4096, 4096]


def test_threads_never_share_an_id():
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: [uuid4_hex() for _ in range(3000)], range(8)))
    made = [value for batch in batches for value in batch]
    assert len(set(made)) == len(made)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_forked_child_does_not_repeat_its_parents_ids():
    # The child's first id would be the parent's next one if it kept the parent's buffer.
    uuid4_hex()  # the buffer now holds the parent's next ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, straight out with os._exit
        try:
            os.write(write, uuid4_hex().encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    assert len(child) == 32
    assert child != uuid4_hex()
