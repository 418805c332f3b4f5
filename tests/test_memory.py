"""Freed memory is handed back to the OS after large calls only, once their answer is sent."""

from __future__ import annotations

import json

import pytest

from cds_service.ops import memory
from tests.helpers.http import PATIENT_VIEW, post


@pytest.fixture
def trims(monkeypatch):
    if memory._TRIM is None:
        pytest.skip("no glibc malloc_trim here")
    calls = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(pad) or 1)
    return calls


def test_a_large_body_trims_after_its_response_is_closed(client, trims):
    body = {**PATIENT_VIEW, "extension": {"padding": "x" * memory.LARGE_BODY_BYTES}}
    assert len(json.dumps(body)) >= memory.LARGE_BODY_BYTES
    response = post(client, "/cds-services/echo", body)
    assert response.status_code == 200
    assert trims == []  # not before the answer has gone out
    response.close()
    assert trims == [0]


def test_a_large_body_is_freed_only_once_its_response_is_sent(client, monkeypatch):
    # Freeing a 1 MB prefetch's objects takes milliseconds: the EHR should not wait on it.
    released = []
    monkeypatch.setattr(memory, "_release", lambda held: released.append(list(held or [])))
    padding = "y" * memory.LARGE_BODY_BYTES
    response = post(client, "/cds-services/echo", {**PATIENT_VIEW, "extension": {"pad": padding}})
    assert response.status_code == 200
    assert released == []
    response.close()
    [[decoded]] = released
    assert decoded["hookInstance"] == PATIENT_VIEW["hookInstance"]
    assert decoded["extension"]["pad"] == padding


def test_a_small_body_is_not_held(client, monkeypatch):
    released = []
    monkeypatch.setattr(memory, "_release", released.append)
    response = post(client, "/cds-services/echo", PATIENT_VIEW)
    response.close()
    assert response.status_code == 200 and released == []


def test_a_small_body_never_trims(client, trims):
    response = post(client, "/cds-services/echo", PATIENT_VIEW)
    response.close()
    assert response.status_code == 200 and trims == []


def test_malloc_trim_is_found_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert memory._TRIM is not None and memory._TRIM(0) in (0, 1)
