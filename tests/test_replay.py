"""jti replay caches (rule 126): one winner per (iss, jti), across threads, processes and hosts."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
import uuid
from collections import Counter

import pytest
import redis

from cds_service.trust.auth import TokenVerifier
from cds_service.trust.errors import AuthError
from cds_service.trust.issuers import TrustedIssuer
from cds_service.trust.replay import (
    MemoryReplayCache,
    RedisReplayCache,
    ReplayCacheError,
    SqliteReplayCache,
    replay_cache_from_url,
)
from cds_service.trust.settings import AuthSettings
from tests.helpers.jwks import AUD, ISS, jwks, make_jwt, rsa_key
from tests.helpers.storage import REDIS_URL

SPAWN = multiprocessing.get_context("spawn")  # no fork of a threaded pytest process


@pytest.fixture
def sqlite_cache(tmp_path):
    cache = SqliteReplayCache(tmp_path / "replay" / "jti.sqlite3")
    yield cache
    cache.close()


@pytest.fixture
def redis_cache(redis_prefix):
    cache = RedisReplayCache(REDIS_URL, prefix=redis_prefix)
    yield cache
    cache.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def cache(request):
    if request.param == "memory":
        return MemoryReplayCache()
    return request.getfixturevalue(f"{request.param}_cache")


def test_first_use_then_replay(cache):
    exp = time.time() + 900
    assert cache.first_use(ISS, "jti-1", exp) is True
    assert cache.first_use(ISS, "jti-1", exp) is False
    assert cache.first_use(ISS, "jti-2", exp) is True
    # The same jti from another issuer is another token.
    assert cache.first_use("https://other.example.org", "jti-1", exp) is True


def test_an_expired_entry_no_longer_counts(cache):
    assert cache.first_use(ISS, "jti-old", time.time() + 0.2) is True
    time.sleep(0.3)
    assert cache.first_use(ISS, "jti-old", time.time() + 900) is True
    assert cache.first_use(ISS, "jti-old", time.time() + 900) is False


def test_iss_and_jti_boundaries_do_not_collide(cache):
    exp = time.time() + 900
    assert cache.first_use("https://a.example/x", "y", exp) is True
    assert cache.first_use("https://a.example/", "xy", exp) is True


def test_racing_threads_have_one_winner(cache):
    if isinstance(cache, RedisReplayCache):  # one client per worker, as in production
        caches = [RedisReplayCache(REDIS_URL, prefix=cache.prefix) for _ in range(16)]
    else:  # SQLite: one connection per thread inside
        caches = [cache] * 16
    barrier = threading.Barrier(16)
    wins: list[bool] = []

    def claim(c):
        barrier.wait()
        wins.append(c.first_use(ISS, "contested", time.time() + 900))

    threads = [threading.Thread(target=claim, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(wins) == [False] * 15 + [True]
    for c in caches:
        if c is not cache:
            c.close()


# -- SQLite ---------------------------------------------------------------------------------


def test_sqlite_uses_wal_and_purges_expired_rows(sqlite_cache):
    sqlite_cache.first_use(ISS, "expired", time.time() - 1)
    sqlite_cache.first_use(ISS, "live", time.time() + 900)
    sqlite_cache._next_purge = 0.0  # next call purges
    sqlite_cache.first_use(ISS, "another", time.time() + 900)
    with sqlite3.connect(sqlite_cache.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = {r[0] for r in conn.execute("SELECT jti FROM jti_seen")}
    conn.close()
    assert rows == {"live", "another"}


def _claim_all(path: str, jtis: list[str], barrier, results) -> None:
    cache = SqliteReplayCache(path)
    barrier.wait()
    results.put([jti for jti in jtis if cache.first_use(ISS, jti, time.time() + 900)])
    cache.close()


def test_sqlite_worker_processes_share_one_set(tmp_path):
    path = str(tmp_path / "jti.sqlite3")
    jtis = [str(uuid.uuid4()) for _ in range(200)]
    barrier, results = SPAWN.Barrier(4), SPAWN.Queue()
    workers = [SPAWN.Process(target=_claim_all, args=(path, jtis, barrier, results))
               for _ in range(4)]
    for w in workers:
        w.start()
    won = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    wins = Counter(jti for batch in won for jti in batch)
    assert sorted(wins) == sorted(jtis)
    assert set(wins.values()) == {1}


# -- through the verifier, across processes -------------------------------------------------


def _verify_once(jwk_set: dict, token: str, backend: str, location: str) -> str:
    """One worker process: its own verifier and its own connection to the shared cache."""
    if backend == "sqlite":
        replay = SqliteReplayCache(location)
    else:
        replay = RedisReplayCache(REDIS_URL, prefix=location)
    verifier = TokenVerifier([TrustedIssuer(ISS, "site", jwks=jwk_set)], replay, AuthSettings())
    try:
        verifier.verify(f"Bearer {token}", AUD)
    except AuthError as exc:
        return exc.reason
    finally:
        replay.close()
    return "ok"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_token_used_in_one_worker_is_refused_in_another(tmp_path, redis_prefix, backend):
    key = rsa_key()
    token, fresh = make_jwt(key), make_jwt(key)
    location = str(tmp_path / "jti.sqlite3") if backend == "sqlite" else redis_prefix
    assert _verify_once(jwks(key), token, backend, location) == "ok"
    with SPAWN.Pool(1) as pool:
        assert pool.apply(_verify_once, (jwks(key), token, backend, location)) == "replay"
        assert pool.apply(_verify_once, (jwks(key), fresh, backend, location)) == "ok"
    assert _verify_once(jwks(key), fresh, backend, location) == "replay"


def test_replay_through_the_verifier_on_every_backend(cache):
    key = rsa_key()
    verifier = TokenVerifier([TrustedIssuer(ISS, "site", jwks=jwks(key))], cache)
    token = make_jwt(key)
    assert verifier.verify(f"Bearer {token}", AUD).site_id == "site"
    with pytest.raises(AuthError) as info:
        verifier.verify(f"Bearer {token}", AUD)
    assert info.value.reason == "replay"


# -- Redis ----------------------------------------------------------------------------------


def test_redis_keys_are_namespaced_bounded_and_expire(redis_cache, redis_prefix):
    exp = time.time() + 900
    assert redis_cache.first_use(ISS, "j" * 10_000, exp)
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=redis_prefix + "*"))
    assert len(keys) == 1 and len(keys[0]) == len(redis_prefix) + 64
    assert 899_000 < client.pttl(keys[0]) <= 900_000
    client.close()


def test_redis_two_hosts_share_the_set(redis_prefix):
    host_a = RedisReplayCache(REDIS_URL, prefix=redis_prefix)
    host_b = RedisReplayCache(REDIS_URL, prefix=redis_prefix)
    assert host_a.first_use(ISS, "shared", time.time() + 60)
    assert not host_b.first_use(ISS, "shared", time.time() + 60)
    host_a.close()
    host_b.close()


def test_redis_down_fails_closed_without_leaking_the_url():
    cache = RedisReplayCache("redis://:s3cret-pass@127.0.0.1:1/0", socket_timeout_s=0.5)
    with pytest.raises(ReplayCacheError) as info:
        cache.first_use(ISS, "x", time.time() + 60)
    assert "s3cret" not in str(info.value)
    cache.close()


def test_verifier_does_not_turn_a_replay_store_outage_into_an_accept():
    key = rsa_key()
    cache = RedisReplayCache("redis://127.0.0.1:1/0", socket_timeout_s=0.5)
    verifier = TokenVerifier([TrustedIssuer(ISS, "site", jwks=jwks(key))], cache)
    with pytest.raises(ReplayCacheError):
        verifier.verify(f"Bearer {make_jwt(key)}", AUD)
    cache.close()


# -- URLs -----------------------------------------------------------------------------------


def test_replay_cache_from_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = replay_cache_from_url(None, "var/default.sqlite3")
    assert isinstance(default, SqliteReplayCache) and (tmp_path / "var/default.sqlite3").exists()
    relative = replay_cache_from_url("sqlite:///var/rel.sqlite3", "unused")
    assert relative.path.resolve() == tmp_path / "var" / "rel.sqlite3"
    absolute = replay_cache_from_url(f"sqlite:///{tmp_path}/abs.sqlite3", "unused")
    assert absolute.path == tmp_path / "abs.sqlite3"
    for c in (default, relative, absolute):
        c.close()
    remote = replay_cache_from_url(REDIS_URL, "unused")
    assert isinstance(remote, RedisReplayCache)
    remote.close()
    assert isinstance(replay_cache_from_url("rediss://cache.example.org:6380/0", "x"),
                      RedisReplayCache)


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///:memory:", "sqlite:///x.db?mode=ro",
            "postgresql://cds:s3cret@db/cds", "memory://"],
)
def test_replay_cache_from_url_refuses(url):
    with pytest.raises(ValueError) as info:
        replay_cache_from_url(url, "unused")
    assert "s3cret" not in str(info.value)
