"""A JWT's `aud` is checked against configuration only: `<PUBLIC_URL>/<route invoked>` and the
site's `audiences`. Never against the URL the request's headers describe (Host,
X-Forwarded-Host, X-Forwarded-Proto): a caller chooses those, and would use them to replay a token
minted for another vendor's endpoint (CDS Hooks 2.0 §Trusting CDS Clients: aud is "the CDS
Service endpoint")."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest

from cds_service import create_app
from cds_service.protocol.errors import ConfigError
from tests.conftest import ROOT, make_jwt
from tests.helpers.servers import CLI, Server, free_port, request, token_for

PUBLIC = "https://cds.example.org"
SITE_AUDIENCE = "https://cds.hospital.example.org/cds-services"
BODY = {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/1", "patientId": "p1"}}


@pytest.fixture
def client(make_app):
    app = make_app(PUBLIC_URL=PUBLIC, SITE_YAML=f"audiences: [{SITE_AUDIENCE}]\n")
    return app.test_client()


def call(client, aud: str, path: str = "/cds-services/echo", **headers):
    headers["Authorization"] = f"Bearer {make_jwt(aud)}"
    return client.post(path, json=BODY, headers=headers)


def refusal(caplog) -> str:
    [line] = [r.getMessage() for r in caplog.records if r.name == "cds_service.trust.auth"]
    return line.split("reason=")[1].split()[0]


@pytest.mark.parametrize("aud", [
    f"{PUBLIC}/cds-services/echo",
    f"{PUBLIC}/cds-services/echo/",  # a trailing slash is the same URL
    [f"{PUBLIC}/cds-services/echo", "https://elsewhere.example/x"],  # any one of an array
    SITE_AUDIENCE,  # what the hospital typed into Epic
])
def test_the_configured_endpoint_url_and_the_sites_audiences_are_accepted(client, aud):
    assert call(client, aud).status_code == 200


@pytest.mark.parametrize(("aud", "headers"), [
    # The Host header names the other vendor's host, and the token was minted for it.
    ("https://other-vendor.example/cds-services/echo", {"Host": "other-vendor.example"}),
    ("http://other-vendor.example/cds-services/echo", {"Host": "other-vendor.example"}),
    # Forwarded-style headers, as a loopback proxy (or anyone) might send them.
    ("https://other-vendor.example/cds-services/echo",
     {"X-Forwarded-Host": "other-vendor.example", "X-Forwarded-Proto": "https"}),
    ("https://other-vendor.example/cds-services/echo",
     {"Forwarded": "host=other-vendor.example;proto=https"}),
    # The request's own URL is not configuration either.
    ("http://localhost/cds-services/echo", {}),
    # Our host, another scheme.
    ("http://cds.example.org/cds-services/echo", {"X-Forwarded-Proto": "http"}),
    # Our public URL, another endpoint: a token for one service is not one for the next.
    (f"{PUBLIC}/cds-services/greeter", {}),
    (f"{PUBLIC}/cds-services", {}),
    (f"{PUBLIC}/cds-services/echo/feedback", {}),
])
def test_an_audience_only_the_request_headers_vouch_for_is_refused(client, caplog, aud, headers):
    caplog.set_level(logging.WARNING, "cds_service.trust.auth")
    assert call(client, aud, **headers).status_code == 401
    assert refusal(caplog) == "aud"


def test_the_feedback_endpoint_is_its_own_audience(client):
    response = client.post("/cds-services/echo/feedback", json={"feedback": []}, headers={
        "Authorization": f"Bearer {make_jwt(f'{PUBLIC}/cds-services/echo/feedback')}"})
    assert response.status_code != 401


def test_a_token_with_a_critical_extension_is_refused_over_http(client, caplog):
    caplog.set_level(logging.WARNING, "cds_service.trust.auth")
    token = make_jwt(f"{PUBLIC}/cds-services/echo",
                     headers={"crit": ["urn:example:ext"], "urn:example:ext": True})
    response = client.post("/cds-services/echo", json=BODY,
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert refusal(caplog) == "crit"


def test_without_a_public_url_only_the_sites_audiences_are_accepted(make_app):
    app = make_app(PUBLIC_URL=None, SITE_YAML=f"audiences: [{SITE_AUDIENCE}]\n")
    client = app.test_client()
    assert call(client, "http://localhost/cds-services/echo").status_code == 401
    assert call(client, SITE_AUDIENCE).status_code == 200


def test_a_site_that_trusts_issuers_but_can_accept_no_audience_refuses_to_start(make_app):
    with pytest.raises(ConfigError) as info:
        make_app(PUBLIC_URL=None)
    message = str(info.value)
    assert "test-site" in message and "accepts no JWT audience" in message
    assert "CDS_PUBLIC_URL" in message and "audiences" in message


def test_without_authentication_no_audience_is_needed(make_app):
    make_app(PUBLIC_URL=None, AUTH_REQUIRED=False)


@pytest.mark.parametrize("url", ["cds.example.org", "ftp://cds.example.org",
                                 "https://user:pw@cds.example.org", "https://cds.example.org/?a=b",
                                 "https://cds.example.org/#x", "https://cds.example.org:99999"])
def test_a_malformed_public_url_stops_start_up_naming_the_setting(tmp_path, url):
    with pytest.raises(ConfigError, match="CDS_PUBLIC_URL"):
        create_app({"PUBLIC_URL": url, "AUTH_REQUIRED": False,
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"})


def test_a_path_prefix_in_the_public_url_is_part_of_the_audience(make_app):
    client = make_app(PUBLIC_URL="https://hospital.example.org/cds/").test_client()
    assert call(client, "https://hospital.example.org/cds/cds-services/echo").status_code == 200
    assert call(client, "https://hospital.example.org/cds-services/echo").status_code == 401


# -- a real gunicorn, where X-Forwarded-Proto from loopback is trusted by default ------------


def test_gunicorn_from_loopback_derives_no_audience_from_forwarded_headers(tmp_path):
    server = Server(tmp_path, "--workers", "1", "--site-config", str(ROOT / "site_config"))
    try:
        url = server.base + "/cds-services"
        https = url.replace("http://", "https://", 1)
        other = "https://other-vendor.example/cds-services"
        for aud, headers in [(https, {"X-Forwarded-Proto": "https"}),
                             (https, {"X-Forwarded-Ssl": "on"}),
                             (other, {"Host": "other-vendor.example"}),
                             (other, {"X-Forwarded-Host": "other-vendor.example",
                                      "X-Forwarded-Proto": "https"})]:
            status, _ = request(url, token=token_for(aud), headers=headers)
            assert status == 401, (aud, headers)
        assert request(url)[0] == 200  # the configured public URL (`--public-url`)
    finally:
        server.stop()


def test_serve_without_any_acceptable_audience_exits_2_and_says_what_to_set(tmp_path,
                                                                            site_file):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    done = subprocess.run([CLI, "serve", "--port", str(free_port()), "--site-config", site_file()],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert "accepts no JWT audience" in done.stderr and "CDS_PUBLIC_URL" in done.stderr
