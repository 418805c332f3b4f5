"""Shared fixtures: app and client from the factory, example payloads, databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cds_service import create_app
from tests.services import TEST_SERVICES

ROOT = Path(__file__).resolve().parents[1]
# ../shared/reference beside the project root (DEVELOPERS.md).
EXAMPLES = ROOT.parent / "shared" / "reference" / "cds-hooks-examples"


def example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


@pytest.fixture
def make_app(tmp_path):
    apps = []

    def _make(**config):
        config.setdefault("DATABASE_URL", f"sqlite:///{tmp_path / 'cds.sqlite3'}")
        config.setdefault("SERVICES", TEST_SERVICES)
        app = create_app(config)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield _make
    for app in apps:
        app.extensions["cds"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
