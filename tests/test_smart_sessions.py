"""The SMART app's server-side sessions (cds_service/smart/sessions.py) on each real store:
records shared across processes and hosts, one-use `take`, expiry, and nothing usable at rest."""

from __future__ import annotations

import multiprocessing
import time
import uuid

import pytest
import redis

from cds_service.smart.sessions import (
    SESSION_ID,
    MemoryKv,
    RedisKv,
    Sessions,
    SqliteKv,
    kv_from_url,
    new_id,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def kv(request, tmp_path):
    if request.param == "memory":
        yield MemoryKv()
        return
    if request.param == "sqlite":
        yield SqliteKv(tmp_path / "sessions.sqlite3")
        return
    store = RedisKv(REDIS_URL, prefix=f"cds-test-smart-{uuid.uuid4().hex}:")
    yield store
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(store.prefix + "*"):
        client.delete(key)


def test_a_record_round_trips_and_take_is_one_use(kv):
    sessions, sid = Sessions(kv), new_id()
    sessions.put(sid, "launch:abc", {"verifier": "v" * 64}, 60)
    assert sessions.get(sid, "launch:abc") == {"verifier": "v" * 64}
    assert sessions.take(sid, "launch:abc") == {"verifier": "v" * 64}
    assert sessions.take(sid, "launch:abc") is None
    assert sessions.get(sid, "launch:abc") is None


def test_another_session_id_reads_nothing(kv):
    sessions = Sessions(kv)
    sid = new_id()
    sessions.put(sid, "context:1", {"patient": "p1"}, 60)
    assert sessions.get(new_id(), "context:1") is None
    assert sessions.take(new_id(), "context:1") is None
    assert sessions.get(sid, "context:1") == {"patient": "p1"}


def test_records_expire(kv):
    sessions, sid = Sessions(kv), new_id()
    sessions.put(sid, "launch:x", {"a": 1}, 1.0)
    time.sleep(1.2)
    assert sessions.get(sid, "launch:x") is None
    assert sessions.take(sid, "launch:x") is None


def test_neither_the_session_id_nor_a_token_is_stored_in_the_clear(tmp_path):
    kv = SqliteKv(tmp_path / "s.sqlite3")
    sid, token = new_id(), "ACCESS-TOKEN-" + uuid.uuid4().hex
    Sessions(kv).put(sid, "context:c", {"access_token": token}, 60)
    raw = (tmp_path / "s.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("s.sqlite3-*"))
    assert sid.encode() not in raw
    assert token.encode() not in raw
    assert b"access_token" not in raw


def test_a_tampered_record_reads_as_none():
    kv = MemoryKv()
    sessions, sid = Sessions(kv), new_id()
    sessions.put(sid, "context:c", {"patient": "p1"}, 60)
    key = Sessions._key(sid, "context:c")
    value, expires = kv._data[key]
    kv._data[key] = (value[:-1] + bytes([value[-1] ^ 1]), expires)
    assert sessions.get(sid, "context:c") is None


def _take_in_child(path: str, sid: str, queue) -> None:
    queue.put(Sessions(SqliteKv(path)).take(sid, "launch:s"))


def test_another_process_sees_the_record_and_only_one_take_wins(tmp_path):
    path = str(tmp_path / "shared.sqlite3")
    sid = new_id()
    Sessions(SqliteKv(path)).put(sid, "launch:s", {"n": 1}, 60)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    children = [ctx.Process(target=_take_in_child, args=(path, sid, queue)) for _ in range(4)]
    for child in children:
        child.start()
    results = [queue.get(timeout=30) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert results.count({"n": 1}) == 1
    assert results.count(None) == 3


def test_session_ids_are_256_bit_and_distinct():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(SESSION_ID.fullmatch(i) for i in ids)


def test_the_store_follows_the_replay_cache(tmp_path):
    assert isinstance(kv_from_url(None, REDIS_URL, tmp_path / "x.sqlite3"), RedisKv)
    assert isinstance(kv_from_url(None, "sqlite:///x", tmp_path / "x.sqlite3"), SqliteKv)
    assert isinstance(kv_from_url(f"sqlite:///{tmp_path}/y.sqlite3", REDIS_URL, "z"), SqliteKv)
    with pytest.raises(ValueError, match="unsupported"):
        kv_from_url("memcached://x", None, tmp_path / "x.sqlite3")
