"""Scale-out: two `cds-service serve` instances (two hosts behind one load balancer, as far as
each can tell) share one PostgreSQL schema and the local Redis. A token used on one is a replay
on the other, feedback sent to one silences the card the other issued, both write one audit log,
and the EHR's JWK Set is fetched once for both.

Both instances start at the same moment against an empty schema: their four workers race to
create the tables (`Store._ensure_schema` serialises that with a PostgreSQL advisory lock).
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from cds_service.records.store import Store
from cds_service.records.suppression import WITHHELD_EXTENSION
from cds_service.records.tables import metadata
from cds_service.trust.jwks_shared import RedisJwksStore
from tests.helpers.golden import DATA, DATE_KEYS, FROZEN_NOW, GOLDEN_SITE, load
from tests.helpers.jwks import ISS, make_jwt, rsa_key
from tests.helpers.servers import Server, request
from tests.helpers.store_queries import list_feedback

REDIS_URL = "redis://127.0.0.1:6379/0"
KIDNEY = DATA / "kidney-risk" / "egfr-28-g4-warning"
# Behind a load balancer every host is reached at one public URL: that is the `aud` Epic sends.
PUBLIC = "https://cds.example.org/cds-services/kidney-risk"


class Instance(Server):
    """`Server`, registered before it waits for /healthz, so a failed start is still stopped."""

    def __init__(self, started: list[Server], tmp_path: Path, *args: str, env: dict):
        started.append(self)
        super().__init__(tmp_path, *args, env=env)


@pytest.fixture
def pg_url(postgresql_store_url):
    """A fresh, empty PostgreSQL schema (dropped afterwards)."""
    return postgresql_store_url


@pytest.fixture
def start_instances(tmp_path, pg_url, jwks_server):
    """Start n instances at once; every one is stopped afterwards, whatever happened."""
    started: list[Server] = []
    jku_key = RedisJwksStore(REDIS_URL).key(jwks_server.url)
    shared = redis.Redis.from_url(REDIS_URL)
    shared.delete(jku_key)  # a cold shared JWK Set cache, whatever an earlier run left

    def _start(site_file: Path, n: int = 2) -> list[Server]:
        def one(name: str) -> Server:
            env = {"CDS_DATABASE_URL": pg_url, "CDS_REPLAY_CACHE_URL": REDIS_URL,
                   "CDS_JWKS_CACHE_URL": REDIS_URL,
                   "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{name}")}
            return Instance(started, tmp_path, "--workers", "2", "--site-config", str(site_file),
                            env=env)

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, [f"instance-{i}" for i in range(n)]))

    yield _start
    for server in started:
        if getattr(server, "process", None) is not None and server.process.poll() is None:
            server.stop()
    shared.delete(jku_key)
    shared.close()


def site_yaml(tmp_path: Path, jku: str) -> Path:
    """The golden site, trusting an EHR that publishes its keys at `jku` (as Epic does)."""
    path = tmp_path / "scale-out.yaml"
    path.write_text(
        f"site: scale-out\nissuers:\n  - iss: {ISS}\n    jku: [{jku}]\n"
        f"audiences: [{PUBLIC}]\njwt:\n  allow_http_loopback_jku: true\n" + GOLDEN_SITE,
        encoding="utf-8")
    return path


def golden_request() -> dict:
    """The G4 warning scenario with a fresh hookInstance, its dates moved by as many days as
    today is past the scenario's frozen date, so the services see it as the golden test does."""
    body = copy.deepcopy(load(KIDNEY / "request.json"))
    body["hookInstance"] = str(uuid.uuid4())
    shift = date.today() - FROZEN_NOW.date()

    def move(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in (*DATE_KEYS, "birthDate") and isinstance(value, str):
                    moved = date.fromisoformat(value[:10]) + shift
                    node[key] = moved.isoformat() + value[10:]
                else:
                    move(value)
        elif isinstance(node, list):
            for item in node:
                move(item)

    move(body)
    return body


def test_two_instances_share_replay_feedback_suppression_audit_and_jwks(
        tmp_path, pg_url, jwks_server, start_instances):
    key = rsa_key()
    jwks_server.publish(key)

    def token(aud: str) -> str:
        return make_jwt(key, headers={"jku": jwks_server.url}, aud=aud)

    a, b = start_instances(site_yaml(tmp_path, jwks_server.url))
    kidney_a, kidney_b = (s.base + "/cds-services/kidney-risk" for s in (a, b))

    # (a) One token, two hosts: accepted by A, refused by B as a replay.
    issued = golden_request()
    used = token(PUBLIC)
    status, body = request(kidney_a, issued, token=used)
    assert status == 200, body
    [card] = body["cards"]
    assert card["indicator"] == "warning" and card["source"]["topic"]["code"] == "kidneyfunction"
    status, body = request(kidney_b, golden_request(), token=used)
    assert status == 401 and body["issue"][0]["diagnostics"] == "Authentication required."
    refusals = [r["message"] for r in log_records(b) if r["message"].startswith("JWT refused")]
    assert len(refusals) == 1 and refusals[0].startswith("JWT refused: reason=replay "), refusals
    # B accepts the same audience with a fresh token: the 401 was the replay, nothing else.
    on_b = golden_request()
    status, body = request(kidney_b, on_b, token=token(PUBLIC))
    assert status == 200 and len(body["cards"]) == 1, body

    # (b) The clinician overrides A's card; Epic's feedback call lands on B.
    reason = card["overrideReasons"][0]
    at = datetime.now(UTC) - timedelta(minutes=1)
    feedback = {"feedback": [{
        "card": card["uuid"], "outcome": "overridden",
        "overrideReason": {"reason": {"code": reason["code"], "system": reason["system"]},
                           "userComment": "followed by nephrology"},
        "outcomeTimestamp": at.strftime("%Y-%m-%dT%H:%M:%SZ")}]}
    assert request(kidney_b + "/feedback", feedback, token=token(kidney_b + "/feedback")) == (
        200, {"received": 1, "stored": 1})
    with Store(pg_url) as store:
        [stored] = list_feedback(store, card=card["uuid"])
        # A's writer stores the card it issued up to LINGER_S after answering (spool.py),
        # possibly after B took the feedback: whichever is stored second records the override,
        # and suppression acts from then on.
        deadline = time.monotonic() + 10
        while (not store.list_overrides(since=at - timedelta(minutes=5))
               and time.monotonic() < deadline):
            time.sleep(0.05)
    assert (stored["site"], stored["outcome"], stored["override_code"]) == (
        "scale-out", "overridden", reason["code"])

    # (c) Same clinician, same patient, on A again (and on B): suppressed from the shared store.
    again_a, again_b = golden_request(), golden_request()
    for url, again in ((kidney_a, again_a), (kidney_b, again_b)):
        status, body = request(url, again, token=token(url))
        assert status == 200 and body["cards"] == [], body
        [withheld] = body["extension"][WITHHELD_EXTENSION]
        assert withheld["overriddenCard"] == card["uuid"]

    # (d) One audit log: each instance's calls, by the hookInstances sent only to it. Call
    # records are written by each worker's background writer just after the answer, so another
    # process sees them a few milliseconds later (docs/operations.md, What the store writes).
    wanted = {r["hookInstance"] for r in (issued, on_b, again_a, again_b)}
    deadline = time.monotonic() + 10
    while True:
        with Store(pg_url) as store:
            audit = list(store.iter_audit())
        by_hook = {r["hook_instance"]: r for r in audit if r["kind"] == "invoke"}
        if wanted <= set(by_hook) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert by_hook[issued["hookInstance"]]["card_uuids"] == (card["uuid"],)  # A
    assert by_hook[on_b["hookInstance"]]["status"] == 200  # B
    for suppressed in (again_a, again_b):  # A, then B
        row = by_hook[suppressed["hookInstance"]]
        assert row["outcome"] == "cards=0 suppressed=1"
        assert row["detail"].startswith(f"suppressed kidneyfunction: same user overrode card "
                                        f"{card['uuid']} at ")
    assert [r["feedback_cards"] for r in audit if r["kind"] == "feedback"] == [(card["uuid"],)]

    # One JWK Set fetch served every worker of both instances (the rest read Redis).
    assert jwks_server.count == 1

    # The race to create the tables on the empty schema was won once and lost by nobody.
    assert set(tables_in(pg_url)) == set(metadata.tables)
    for server in (a, b):
        output = server.output()
        assert "Traceback" not in output and "tables will be created" not in output, output


def test_stores_starting_together_on_an_empty_schema_create_the_tables_once(pg_url):
    """The same race in one process, tighter: eight stores released at once by a barrier. Without
    the advisory lock PostgreSQL refuses the losers' CREATE TABLE (pg_class unique violation)."""
    barrier = threading.Barrier(8)
    stores: list[Store] = []

    def open_store(_) -> None:
        barrier.wait(timeout=30)
        stores.append(Store(pg_url))

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(open_store, range(8)))
        for store in stores:
            store.ping()
        assert set(tables_in(pg_url)) == set(metadata.tables)
    finally:
        for store in stores:
            store.dispose()


def log_records(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]


def tables_in(url: str) -> list[str]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1),
                              poolclass=NullPool)
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
