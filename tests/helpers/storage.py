"""Database fixtures: a SQLite file per test and a throwaway PostgreSQL schema per test.

`store_url` is parametrized over both backends, `store` is an open `Store` on it. PostgreSQL is
exercised for real: when it is unreachable the test fails (never skips) with a message saying
where it looked. Set `CDS_TEST_POSTGRES_URL` to use another server than the local default.

Isolation: each test gets its own schema (`test_store_<uuid4>`), selected through the libpq
`options=-csearch_path=...` URL parameter, and dropped afterwards; parallel runs never share one.
tests/conftest.py loads these fixtures for every test module (`pytest_plugins`).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from cds_service.records.database import redacted_url
from cds_service.records.store import Store

POSTGRES_URL = os.environ.get(
    "CDS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def postgres_schema_url(base_url: str = POSTGRES_URL) -> Iterator[str]:
    """Create a uniquely named schema, yield a URL whose search_path is that schema, drop it."""
    schema = f"test_store_{uuid.uuid4().hex}"
    admin = sa.create_engine(
        make_url(base_url).set(drivername="postgresql+psycopg"),
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL at {redacted_url(base_url)} is unreachable ({exc.orig}). The store tests "
            "need a real server: start it or set CDS_TEST_POSTGRES_URL.",
            pytrace=False,
        )
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        # A store still open on the schema (a background writer finishing its last batch) can
        # deadlock with the DROP; PostgreSQL aborts one of the two, and the DROP is retried.
        for attempt in range(5):
            try:
                with admin.begin() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                break
            except sa.exc.OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.2)
        admin.dispose()


@pytest.fixture
def sqlite_store_url(tmp_path) -> str:
    # A missing parent directory on purpose: Store must create it.
    return f"sqlite:///{tmp_path / 'var' / 'cds.sqlite3'}"


@pytest.fixture
def postgresql_store_url() -> Iterator[str]:
    with postgres_schema_url() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_store_url")


@pytest.fixture
def store(store_url) -> Iterator[Store]:
    with Store(store_url) as opened:
        yield opened


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key namespace of its own on the local Redis, removed afterwards."""
    prefix = f"cds-service-test:{uuid.uuid4()}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()
