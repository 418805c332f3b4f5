"""The JWK Set cache shared through Redis: two `JwksCache`s stand for two hosts (or workers), on
the local Redis, against a real JWK Set server on loopback that counts the fetches it answers."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import redis

from cds_service.protocol.errors import ConfigError
from cds_service.trust.auth import TokenVerifier
from cds_service.trust.errors import AuthError
from cds_service.trust.issuers import TrustedIssuer
from cds_service.trust.jwks import JwksCache
from cds_service.trust.jwks_shared import SHARED_JWKS_PREFIX, RedisJwksStore
from cds_service.trust.replay import MemoryReplayCache
from cds_service.trust.settings import AuthSettings
from tests.helpers.jwks import (
    AUD,
    ISS,
    FakeClock,
    JwksServer,
    TestKey,
    jwks,
    make_jwt,
    rsa_key,
)
from tests.helpers.storage import REDIS_URL

CLOSED_PORT_URL = "redis://:s3cret-pass@127.0.0.1:1/0"  # nothing listens on port 1
SETTINGS = AuthSettings(allow_http_loopback_jku=True)
TTL = SETTINGS.jwks_ttl_s


@pytest.fixture(scope="module")
def rs() -> TestKey:
    return rsa_key()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)  # wall clock: the shared level stores epoch seconds


@pytest.fixture
def raw_redis():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


class Host:
    """One host's verifier: its own in-process JWK Set cache over the shared Redis store."""

    def __init__(self, server: JwksServer, clock: FakeClock, prefix: str, url: str = REDIS_URL):
        self.store = RedisJwksStore(url, prefix=prefix, clock=clock, socket_timeout_s=0.5)
        self.redis_reads = 0
        read = self.store.get

        def counting_get(jku):
            self.redis_reads += 1
            return read(jku)

        self.store.get = counting_get
        self.cache = JwksCache(SETTINGS, clock=clock, shared=self.store)
        issuer = TrustedIssuer(iss=ISS, site_id="hospital-a", jku=(server.url,))
        self.verifier = TokenVerifier([issuer], MemoryReplayCache(), SETTINGS, self.cache)
        self.jku = server.url

    def verify(self, key: TestKey) -> str:
        """The verified kid, or the refusal reason."""
        token = make_jwt(key, headers={"jku": self.jku})
        try:
            return self.verifier.verify(f"Bearer {token}", AUD).kid
        except AuthError as exc:
            return exc.reason


@pytest.fixture
def hosts(jwks_server, clock, redis_prefix):
    made: list[Host] = []

    def _make(n: int = 2, url: str = REDIS_URL) -> list[Host]:
        made.extend(Host(jwks_server, clock, redis_prefix, url) for _ in range(n))
        return made[-n:]

    yield _make
    for host in made:
        host.cache.close()


def test_a_set_fetched_by_one_host_is_used_by_the_others(rs, jwks_server, hosts):
    jwks_server.publish(rs)
    a, b = hosts()
    assert a.verify(rs) == rs.kid
    assert b.verify(rs) == rs.kid
    assert jwks_server.count == 1
    assert b.redis_reads == 1

    # A warm worker answers from memory: no Redis round trip per request.
    for _ in range(5):
        assert a.verify(rs) == b.verify(rs) == rs.kid
    assert (a.redis_reads, b.redis_reads, jwks_server.count) == (1, 1, 1)


def test_a_rotation_seen_by_one_host_is_seen_by_the_other_without_a_second_fetch(
        rs, jwks_server, hosts, clock):
    jwks_server.publish(rs)
    a, b = hosts()
    assert a.verify(rs) == b.verify(rs) == rs.kid
    assert jwks_server.count == 1

    new = rsa_key()
    jwks_server.publish(new)  # the EHR rotates: only the new key is published
    clock.advance(61)  # past the minimum refetch interval
    assert a.verify(new) == new.kid  # unknown kid: A refetches and publishes
    assert jwks_server.count == 2
    assert b.verify(new) == new.kid  # B finds it in Redis
    assert jwks_server.count == 2
    # The old key is gone for B too, and the fresh shared set counts as B's refetch attempt.
    assert b.verify(rs) == "kid"
    assert jwks_server.count == 2


def test_unknown_kids_are_refused_without_each_host_asking_the_ehr(rs, jwks_server, hosts,
                                                                   clock):
    jwks_server.publish(rs)
    a, b, c = hosts(3)
    assert a.verify(rs) == rs.kid
    clock.advance(61)
    assert a.verify(rsa_key()) == "kid"  # one refetch on the unknown kid
    assert jwks_server.count == 2
    clock.advance(30)
    assert b.verify(rsa_key()) == c.verify(rsa_key()) == "kid"  # a set 30 s old is answer enough
    assert jwks_server.count == 2
    assert b.verify(rs) == c.verify(rs) == rs.kid


def test_after_the_ttl_one_host_refetches_for_all(rs, jwks_server, hosts, clock):
    jwks_server.publish(rs)
    a, b = hosts()
    assert a.verify(rs) == b.verify(rs) == rs.kid
    clock.advance(TTL + 1)
    assert a.verify(rs) == rs.kid
    assert jwks_server.count == 2
    assert b.verify(rs) == rs.kid
    assert jwks_server.count == 2


def test_the_last_good_set_survives_a_jku_outage_for_a_host_that_never_fetched(
        rs, jwks_server, hosts, clock):
    jwks_server.publish(rs)
    [a] = hosts(1)
    assert a.verify(rs) == rs.kid
    jwks_server.answer(JwksServer.DEFAULT_PATH, status=503)
    clock.advance(TTL + 1)
    [b] = hosts(1)  # a new pod, started during the outage
    assert b.verify(rs) == rs.kid  # stale shared set: the refetch failed
    assert jwks_server.count == 2
    clock.advance(TTL)
    assert b.verify(rs) == "jku-fetch"  # beyond two TTLs nothing stale is used


def test_shared_values_are_namespaced_public_and_expire(rs, jwks_server, hosts, redis_prefix,
                                                        raw_redis):
    jwks_server.publish(rs)
    [a] = hosts(1)
    assert a.verify(rs) == rs.kid
    key = redis_prefix + hashlib.sha256(jwks_server.url.encode()).hexdigest()
    assert [k.decode() for k in raw_redis.scan_iter(match=redis_prefix + "*")] == [key]
    value = json.loads(raw_redis.get(key))
    assert value == {"jku": jwks_server.url, "fetched_at": 1_800_000_000.0,
                     "jwks": jwks(rs)}
    assert 0 < raw_redis.pttl(key) <= 2 * TTL * 1000
    assert RedisJwksStore(REDIS_URL).key(jwks_server.url).startswith(SHARED_JWKS_PREFIX)


def _entry(jku: str, keys: list, fetched_at: float = 1_800_000_000.0) -> bytes:
    return json.dumps({"jku": jku, "fetched_at": fetched_at, "jwks": {"keys": keys}}).encode()


GARBAGE = {
    "not-json": lambda jku, rs, planted: b"\x00\xffnot json",
    "not-an-object": lambda jku, rs, planted: b"[1, 2, 3]",
    "other-jku": lambda jku, rs, planted: _entry("https://attacker.example.org/jwks",
                                                 [planted.public_jwk]),
    "private-key": lambda jku, rs, planted: _entry(jku, [rs.public_jwk | {"d": "AQAB"}]),
    "symmetric-key": lambda jku, rs, planted: _entry(
        jku, [{"kty": "oct", "kid": rs.kid, "k": "c2VjcmV0"}]),
    "hmac-alg": lambda jku, rs, planted: _entry(jku, [rs.public_jwk | {"alg": "HS256"}]),
    "duplicate-kid": lambda jku, rs, planted: _entry(
        jku, [rs.public_jwk, planted.with_kid(rs.kid).public_jwk]),
    "no-keys": lambda jku, rs, planted: _entry(jku, []),
    "fetched-at-string": lambda jku, rs, planted: json.dumps(
        {"jku": jku, "fetched_at": "now", "jwks": jwks(rs)}).encode(),
    "fetched-at-future": lambda jku, rs, planted: _entry(jku, [rs.public_jwk], 1_900_000_000.0),
    "too-large": lambda jku, rs, planted: b'{"pad": "' + b"x" * 600_000 + b'"}',
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_in_redis_is_ignored_and_replaced_by_a_fetch(rs, jwks_server, hosts,
                                                             raw_redis, caplog, garbage):
    jwks_server.publish(rs)
    [a] = hosts(1)
    planted = rsa_key()
    raw_redis.set(a.store.key(a.jku), garbage(a.jku, rs, planted), px=60_000)

    with caplog.at_level(logging.WARNING, logger="cds_service.trust.auth"):
        assert a.verify(rs) == rs.kid
    assert jwks_server.count == 1
    assert "shared JWK Set for" in caplog.text and "ignored" in caplog.text
    # The fetch replaced the garbage: another host reads a good set and does not fetch.
    [b] = hosts(1)
    assert b.verify(rs) == rs.kid
    assert b.verify(planted) == "kid"
    assert jwks_server.count == 1


def test_redis_down_verifies_from_the_jku_and_warns_once(rs, jwks_server, hosts, clock, caplog):
    jwks_server.publish(rs)
    a, b = hosts(2, url=CLOSED_PORT_URL)
    with caplog.at_level(logging.WARNING, logger="cds_service.trust.auth"):
        assert a.verify(rs) == rs.kid
        assert b.verify(rs) == rs.kid
        clock.advance(TTL + 1)
        assert a.verify(rs) == rs.kid
    assert jwks_server.count == 3  # in-process only: each host fetches for itself
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 2  # one per host (process), not one per lookup
    assert "ConnectionError" in warnings[0].getMessage()
    assert "s3cret-pass" not in caplog.text


def test_redis_down_keeps_in_process_semantics(rs, jwks_server, hosts, clock):
    jwks_server.publish(rs)
    [a] = hosts(1, url=CLOSED_PORT_URL)
    assert a.verify(rs) == rs.kid
    clock.advance(30)
    assert a.verify(rsa_key()) == "kid"  # within the minimum interval: no refetch
    assert jwks_server.count == 1


@pytest.mark.parametrize("url", ["memcached://127.0.0.1:11211", "sqlite:///var/jwks.sqlite3",
                                 "http://user:s3cret@cache.example.org"])
def test_a_jwks_cache_url_that_is_not_redis_stops_start_up(make_app, url):
    with pytest.raises(ConfigError) as info:
        make_app(JWKS_CACHE_URL=url)
    assert str(info.value).startswith("JWKS_CACHE_URL: unsupported JWKS cache URL scheme")
    assert "s3cret" not in str(info.value)


def test_the_app_shares_jwks_only_when_configured(make_app):
    verifier = make_app().extensions["cds"].verifier
    assert verifier.jwks_cache.shared is None
    verifier = make_app(JWKS_CACHE_URL="rediss://cache.example.org:6380/2").extensions[
        "cds"].verifier
    assert isinstance(verifier.jwks_cache.shared, RedisJwksStore)
    verifier.jwks_cache.close()
