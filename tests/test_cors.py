"""CORS: off by default; exact per-site origins; never `*`, never credentials (rule 135)."""

from __future__ import annotations

import pytest

from tests.helpers.http import PATIENT_VIEW

SANDBOX = "https://sandbox.cds-hooks.org"


@pytest.fixture
def cors_client(make_app):
    return make_app(SITE_YAML=f"cors:\n  origins: [{SANDBOX}]\n").test_client()


def test_cors_is_off_by_default(client):
    response = client.get("/cds-services", headers={"Origin": SANDBOX})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = client.options("/cds-services/echo", headers={
        "Origin": SANDBOX, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_preflight_from_an_allowed_origin(cors_client):
    response = cors_client.options("/cds-services/echo", headers={
        "Origin": SANDBOX, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
        "Authorization": None})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in response.headers["Vary"]


def test_actual_request_from_allowed_and_other_origins(cors_client):
    ok = cors_client.post("/cds-services/echo", json=PATIENT_VIEW, headers={"Origin": SANDBOX})
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == SANDBOX
    other = cors_client.post("/cds-services/echo", json=PATIENT_VIEW,
                             headers={"Origin": "https://evil.example"})
    assert other.status_code == 200  # CORS is the browser's check; the JWT is ours
    assert "Access-Control-Allow-Origin" not in other.headers


def test_wildcard_origin_is_refused_in_configuration(make_app):
    from cds_service.protocol.errors import ConfigError

    with pytest.raises(ConfigError, match="cors.origins"):
        make_app(SITE_YAML='cors:\n  origins: ["*"]\n')
