"""The allocator keeps what a large call needs (ops/memory.py); a large body's objects are freed
once its answer is sent, and free memory past a bound goes back to the OS then."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from cds_service.ops import memory
from tests.conftest import ROOT
from tests.helpers.http import PATIENT_VIEW, post
from tests.helpers.servers import request, worker_pids

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")


@pytest.fixture
def trims(monkeypatch):
    if memory._TRIM is None:
        pytest.skip("no glibc malloc_trim here")
    calls = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(pad) or 1)
    return calls


def test_a_large_body_trims_after_its_response_is_closed_when_much_is_free(
        client, trims, monkeypatch):
    monkeypatch.setattr(memory, "_free_bytes", lambda: memory.KEEP_FREE_BYTES + 1)
    body = {**PATIENT_VIEW, "extension": {"padding": "x" * memory.LARGE_BODY_BYTES}}
    assert len(json.dumps(body)) >= memory.LARGE_BODY_BYTES
    response = post(client, "/cds-services/echo", body)
    assert response.status_code == 200
    assert trims == []  # not before the answer has gone out
    response.close()
    assert trims == [0]


def test_a_large_body_keeps_free_memory_up_to_the_bound(client, trims, monkeypatch):
    # What the next large call will need again stays with the allocator.
    monkeypatch.setattr(memory, "_free_bytes", lambda: memory.KEEP_FREE_BYTES)
    body = {**PATIENT_VIEW, "extension": {"padding": "x" * memory.LARGE_BODY_BYTES}}
    response = post(client, "/cds-services/echo", body)
    response.close()
    assert response.status_code == 200 and trims == []


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


@glibc
def test_the_allocator_functions_are_found_on_glibc():
    assert memory._TRIM is not None and memory._TRIM(0) in (0, 1)
    assert memory._MALLOPT is not None and memory._MALLINFO2 is not None
    assert memory._free_bytes() > 0


# Calls on a pool of request threads, as gunicorn's gthread worker makes them: each builds and
# drops buffers the size of a 1.1 MB body (its bytes, its text, a copy), then the after-response
# release runs. What the minor page faults of the later calls are, in a fresh interpreter.
_FAULTS = textwrap.dedent("""
    import resource, sys
    from concurrent.futures import ThreadPoolExecutor
    from cds_service.ops import memory

    assert memory.tune_allocator()

    def call(i):
        body = b"x" * (1_100_000 + i)
        text = body.decode("ascii")
        copy = bytearray(body)
        del body, text, copy
        memory._release(None)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, range(16)))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        list(pool.map(call, range(64)))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@glibc
def test_a_tuned_allocator_reuses_large_buffers_in_every_thread():
    # glibc's defaults fault each buffer in afresh: ~49,500 faults for these 64 calls here.
    done = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) < 64  # fewer than one page per call


@glibc
def test_a_worker_answers_large_prefetches_from_memory_it_keeps(serve):
    from bench.payloads import build, new_hook_instance
    from bench.service_bench import stat_fields

    server = serve("--workers", "1", "--site-config", str(ROOT / "site_config"))
    [worker] = worker_pids(server)
    body = json.loads(build()["pv-1000obs"].body(new_hook_instance()))
    url = server.base + "/cds-services/kidney-risk"
    faults = []
    for _ in range(8):
        before = int(stat_fields(worker)[7])
        status, answer = request(url, {**body, "hookInstance": new_hook_instance()})
        faults.append(int(stat_fields(worker)[7]) - before)
        assert status == 200 and len(answer["cards"]) == 1, answer
    # With glibc's defaults each 1.1 MB call faulted ~1,650 pages in again (issue 20).
    assert sorted(faults[3:])[2] < 100, faults
