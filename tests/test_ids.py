"""Random ids: the text `uuid.uuid4()` gives, version 4 and RFC variant, never repeated."""

from __future__ import annotations

import re
import uuid

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
