"""The suite reads nothing beside the checkout: a clone in an empty folder passes."""

from __future__ import annotations

import pytest

from tests.conftest import EXAMPLES, ROOT


def test_reading_a_file_beside_the_checkout_fails_the_test():
    if ROOT.parent == ROOT.parent.parent:
        pytest.skip("checked out at the filesystem root")
    with pytest.raises(PermissionError, match="outside the repository"):
        (ROOT.parent / "beside-the-checkout.json").read_text()  # refused before any lookup


def test_the_example_payloads_are_in_the_repository_with_their_sources():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    names = sorted(path.name for path in EXAMPLES.glob("*.json"))
    assert names
    assert [name for name in names if f"`{name}`" not in readme] == []
    assert EXAMPLES.is_relative_to(ROOT)
