"""The SMART app's EHR launch end to end against a local authorization and FHIR server (real HTTP
on loopback, tests/helpers/smart_server.py): launch → authorize → callback → app, and the attacks
the issue names. SMART App Launch 2.x; RFC 6749 / 7636 sections at each test."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import serialization

from hooks import SERVICES
from tests.helpers.smart_server import SmartServer
from tests.helpers.smart_site import write_smart_site

REDIRECT = "http://localhost/smart/callback"


def chart(patient_id: str, family: str) -> dict:
    now = datetime.now(UTC)
    observations = [
        {"resourceType": "Observation", "id": f"{patient_id}-egfr-{n}", "status": "final",
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                             "observation-category", "code": "laboratory"}]}],
         "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8"}]},
         "subject": {"reference": f"Patient/{patient_id}"},
         "effectiveDateTime": (now - timedelta(days=days)).date().isoformat(),
         "valueQuantity": {"value": value, "unit": "mL/min/{1.73_m2}"}}
        for n, (days, value) in enumerate([(400, 41), (30, 35)])]
    return {"patient": {"resourceType": "Patient", "id": patient_id,
                        "name": [{"family": family, "given": ["Ada"]}], "gender": "female",
                        "birthDate": (now - timedelta(days=70 * 365)).date().isoformat()},
            "observations": observations}


@pytest.fixture
def ehr():
    with SmartServer(redirect_uris=[REDIRECT]) as server:
        for pid, family in (("p1", "Lovelace"), ("p2", "Byron")):
            server.add_patient_chart(pid, **chart(pid, family))
        yield server


@pytest.fixture
def make_smart_app(make_app, tmp_path):
    """The conftest app factory on a site that enables the app for `ehr`'s issuer."""
    made = []

    def _make(ehr, smart_extra: str = ""):
        site = write_smart_site(tmp_path, ehr.iss, REDIRECT, smart_extra=smart_extra,
                                name=f"site-{len(made)}.yaml")
        made.append(site)
        return make_app(SITE_CONFIG=str(site), SERVICES=SERVICES, SMART_SESSION_URL=(
            f"sqlite:///{tmp_path / f'smart-{len(made)}.sqlite3'}"))

    return _make


@pytest.fixture
def app(make_smart_app, ehr):
    return make_smart_app(ehr)


def start(client, ehr, patient="p1", **extra):
    """GET /smart/launch as Epic opens it; the redirect to the authorize endpoint."""
    launch = ehr.new_launch(patient=patient)
    response = client.get("/smart/launch", query_string={"iss": ehr.iss, "launch": launch,
                                                         **extra})
    assert response.status_code == 302, response.text
    return response


def authorize(location: str) -> str:
    """The authorization server's answer (auto-approved): the redirect back to us."""
    answer = requests.get(location, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    return answer.headers["Location"]


def local(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def launch_to_app(client, ehr, patient="p1"):
    """The whole launch; returns the app page's response."""
    callback = authorize(start(client, ehr, patient).headers["Location"])
    landed = client.get(local(callback))
    assert landed.status_code == 303, landed.text
    return client.get(landed.headers["Location"])


def test_the_whole_launch_shows_the_patient(app, ehr):
    client = app.test_client()
    page = launch_to_app(client, ehr)
    assert page.status_code == 200
    assert "Lovelace" in page.text
    assert page.headers["Cache-Control"] == "no-store"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    # The FHIR reads carried the launch's token and read only this patient.
    reads = [r for r in ehr.fhir.requests if r.path != "metadata"]
    assert reads and all(r.headers["authorization"].startswith("Bearer ") for r in reads)
    assert not ehr.denied


def test_the_authorize_redirect_is_smart_ehr_launch_with_pkce(app, ehr):
    location = start(app.test_client(), ehr).headers["Location"]
    assert location.startswith(ehr.authorize_url + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert query["response_type"] == "code"
    assert query["client_id"] == "cds-kidney-app"
    assert query["redirect_uri"] == REDIRECT
    assert query["aud"] == ehr.iss
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43  # base64url SHA-256, RFC 7636 §4.2
    assert len(query["state"]) >= 43
    assert query["scope"].split()[:3] == ["launch", "openid", "fhirUser"]
    assert "patient/Observation.rs" in query["scope"].split()  # the server speaks v2


def test_a_v1_only_server_gets_v1_scopes(app, ehr):
    ehr.capabilities = [c for c in ehr.capabilities if c != "permission-v2"]
    location = start(app.test_client(), ehr).headers["Location"]
    scope = parse_qs(urlsplit(location).query)["scope"][0].split()
    assert "patient/Observation.read" in scope and "patient/Observation.rs" not in scope


def test_the_session_cookie_is_opaque_httponly_secure_samesite(app, ehr):
    response = start(app.test_client(), ehr)
    (cookie,) = response.headers.getlist("Set-Cookie")
    name, _, rest = cookie.partition("=")
    assert name == "cds_smart"
    flags = {part.strip().split("=")[0].lower() for part in rest.split(";")[1:]}
    assert {"httponly", "secure", "samesite"} <= flags
    assert "SameSite=Lax" in cookie
    assert len(rest.split(";")[0]) == 43


def test_discovery_is_cached(app, ehr):
    client = app.test_client()
    for _ in range(3):
        start(client, ehr)
    assert ehr.discovery_hits == 1


def test_an_untrusted_iss_is_refused_and_never_contacted(app, ehr):
    with SmartServer(redirect_uris=[REDIRECT]) as stranger:
        response = app.test_client().get("/smart/launch", query_string={
            "iss": stranger.iss, "launch": stranger.new_launch()})
        assert response.status_code == 400
        assert stranger.discovery_hits == 0
        assert not stranger.fhir.requests


def test_a_launch_without_iss_or_launch_is_a_400(app):
    client = app.test_client()
    assert client.get("/smart/launch").status_code == 400
    assert client.get("/smart/launch?iss=x").status_code == 400


def test_a_wrong_or_missing_state_is_refused_and_the_code_never_exchanged(app, ehr):
    client = app.test_client()
    callback = authorize(start(client, ehr).headers["Location"])
    query = parse_qs(urlsplit(callback).query)
    code = query["code"][0]
    assert client.get("/smart/callback", query_string={"code": code}).status_code == 400
    assert client.get("/smart/callback", query_string={
        "code": code, "state": "A" * 43}).status_code == 400
    assert ehr.token_requests == []


def test_a_callback_from_another_browser_is_refused(app, ehr):
    """The state belongs to the session that started the launch (login CSRF, RFC 6749 §10.12)."""
    callback = authorize(start(app.test_client(), ehr).headers["Location"])
    other = app.test_client()
    other.get("/smart/launch", query_string={"iss": ehr.iss, "launch": ehr.new_launch()})
    assert other.get(local(callback)).status_code == 400
    assert ehr.token_requests == []


def test_a_replayed_callback_is_refused(app, ehr):
    client = app.test_client()
    callback = authorize(start(client, ehr).headers["Location"])
    assert client.get(local(callback)).status_code == 303
    assert client.get(local(callback)).status_code == 400
    assert len(ehr.token_requests) == 1  # the code went to the token endpoint once


def test_a_stolen_code_with_the_attackers_own_state_fails_pkce(app, ehr):
    """RFC 7636 §1: the code is bound to the victim's verifier, which never left our server."""
    victim = app.test_client()
    stolen = parse_qs(urlsplit(authorize(start(victim, ehr).headers["Location"])).query)
    attacker = app.test_client()
    own = parse_qs(urlsplit(authorize(start(attacker, ehr).headers["Location"])).query)
    response = attacker.get("/smart/callback", query_string={"code": stolen["code"][0],
                                                            "state": own["state"][0]})
    assert response.status_code == 400
    assert [r["pkce_ok"] for r in ehr.token_requests] == [False]
    assert victim.get("/smart/callback", query_string={
        "code": stolen["code"][0], "state": stolen["state"][0]}).status_code == 400


def test_a_server_without_pkce_s256_is_refused_before_any_redirect(app, ehr, monkeypatch):
    original = ehr._discovery

    def without_s256():
        config = original()
        config["code_challenge_methods_supported"] = ["plain"]
        return config

    monkeypatch.setattr(ehr, "_discovery", without_s256)
    response = app.test_client().get("/smart/launch", query_string={
        "iss": ehr.iss, "launch": ehr.new_launch()})
    assert response.status_code == 502
    assert ehr.authorize_requests == []


def test_no_open_redirect(app, ehr):
    client = app.test_client()
    location = start(client, ehr, redirect_uri="https://evil.example/steal",
                     next="https://evil.example/").headers["Location"]
    assert parse_qs(urlsplit(location).query)["redirect_uri"] == [REDIRECT]
    callback = authorize(location) + "&next=https://evil.example/"
    landed = client.get(local(callback))
    assert landed.status_code == 303
    target = urlsplit(landed.headers["Location"])
    assert target.netloc in ("", "localhost") and target.path == "/smart/app"


def test_an_authorization_refusal_is_a_page_not_a_session(app, ehr):
    ehr.deny_authorization = "access_denied"
    client = app.test_client()
    callback = authorize(start(client, ehr).headers["Location"])
    assert "error=access_denied" in callback
    assert client.get(local(callback)).status_code == 400
    assert ehr.token_requests == []


def test_a_forged_or_foreign_session_cookie_shows_nothing(app, ehr):
    client = app.test_client()
    page = launch_to_app(client, ehr)
    assert page.status_code == 200
    app_url = page.request.full_path
    forged = app.test_client()
    forged.set_cookie("cds_smart", "A" * 43, path="/smart/")
    assert forged.get(app_url).status_code == 401
    other = app.test_client()
    other.get("/smart/launch", query_string={"iss": ehr.iss, "launch": ehr.new_launch()})
    assert other.get(app_url).status_code == 401
    assert app.test_client().get(app_url).status_code == 401


def test_two_launches_in_one_browser_keep_their_own_patient(app, ehr):
    client = app.test_client()
    first = launch_to_app(client, ehr, "p1")
    second = launch_to_app(client, ehr, "p2")
    assert "Byron" in second.text and "Lovelace" not in second.text
    again = client.get(first.request.full_path)
    assert "Lovelace" in again.text and "Byron" not in again.text


def test_an_expired_token_is_refreshed_when_granted(app, ehr):
    client = app.test_client()
    page = launch_to_app(client, ehr)
    ehr.expire_access_tokens()
    _age(app, client, page)
    again = client.get(page.request.full_path)
    assert again.status_code == 200
    assert [r["form"]["grant_type"] for r in ehr.token_requests] == [
        "authorization_code", "refresh_token"]


def test_without_a_refresh_token_the_session_ends_with_the_token(app, ehr):
    ehr.grant_refresh_tokens = False
    client = app.test_client()
    page = launch_to_app(client, ehr)
    ehr.expire_access_tokens()
    _age(app, client, page)
    assert client.get(page.request.full_path).status_code == 401
    assert client.get(page.request.full_path).status_code == 401


def test_a_revoked_token_ends_the_session(app, ehr):
    client = app.test_client()
    page = launch_to_app(client, ehr)
    ehr.revoke_all()
    assert client.get(page.request.full_path).status_code == 401


def _age(app, client, page) -> None:
    """Make the page's stored context look, to us, as if its access token had run out (the
    EHR's side is `expire_access_tokens`)."""
    sessions = app.extensions["smart"]["sessions"]
    session_id = client.get_cookie("cds_smart", path="/smart/").value
    name = f"context:{page.request.args['ctx']}"
    record = sessions.get(session_id, name)
    record["expires_at"] = 0
    sessions.put(session_id, name, record, 600)


def test_the_token_is_never_in_a_page_a_cookie_or_a_log(app, ehr, caplog):
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    responses = []
    callback = authorize(start(client, ehr).headers["Location"])
    responses.append(client.get(local(callback)))
    responses.append(client.get(responses[-1].headers["Location"]))
    responses.append(client.get("/smart/app?ctx=" + "B" * 43))
    tokens = ehr.issued_access_tokens + ehr.issued_refresh_tokens
    code = parse_qs(urlsplit(callback).query)["code"][0]
    assert tokens
    for response in responses:
        seen = response.get_data(as_text=True) + str(response.headers)
        assert not any(t in seen for t in tokens)
    logged = caplog.text
    assert not any(t in logged for t in [*tokens, code])


def test_a_confidential_client_signs_its_token_requests(make_smart_app, ehr, tmp_path):
    from tests.helpers.jwks import jwks, rsa_key

    key = rsa_key(kid="smart-app-key")
    (tmp_path / "app-key.pem").write_bytes(key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ehr.client_jwks = jwks(key)
    app = make_smart_app(ehr, "  client_auth: private_key_jwt\n"
                              f"  private_key_file: {tmp_path / 'app-key.pem'}\n"
                              "  kid: smart-app-key\n")
    page = launch_to_app(app.test_client(), ehr)
    assert page.status_code == 200
    assert [r["client_auth"] for r in ehr.token_requests] == ["private_key_jwt"]


def test_the_kidney_risk_card_links_to_the_app_when_the_site_enables_it(make_app):
    from tests.helpers.golden import as_of_today, patient_request
    from tests.helpers.http import post

    smart = ("smart_app:\n  client_id: cds-kidney-app\n"
             "  redirect_uri: https://cds.example.org/cds/smart/callback\n")
    for site_yaml, expected in (("", []), (smart, ["https://cds.example.org/cds/smart/launch"])):
        client = make_app(SERVICES=SERVICES, SITE_YAML=site_yaml).test_client()
        response = post(client, "/cds-services/kidney-risk", as_of_today(patient_request()))
        assert response.status_code == 200
        (card,) = response.get_json()["cards"]
        # CDS Hooks 2.0 Link: type "smart" is launched by the EHR with iss and launch.
        assert [link["url"] for link in card["links"] if link["type"] == "smart"] == expected


def test_a_refresh_raced_by_another_worker_keeps_the_session(app, ehr, monkeypatch):
    """With rotating refresh tokens, the second of two concurrent refreshes is refused
    (invalid_grant): the page then takes the token the first one stored."""
    ehr.rotate_refresh = True
    client = app.test_client()
    page = launch_to_app(client, ehr)
    ehr.expire_access_tokens()
    _age(app, client, page)
    sessions = app.extensions["smart"]["sessions"]
    session_id = client.get_cookie("cds_smart", path="/smart/").value
    stale = sessions.get(session_id, f"context:{page.request.args['ctx']}")
    assert client.get(page.request.full_path).status_code == 200  # worker A refreshes
    # Worker B read the context before A stored the new token, and refreshes with the old one.
    real_get, reads = sessions.get, []

    def read_before_a_stored(*args):
        reads.append(args)
        return stale if len(reads) == 1 else real_get(*args)

    monkeypatch.setattr(sessions, "get", read_before_a_stored)
    again = client.get(page.request.full_path)
    assert again.status_code == 200 and "Lovelace" in again.text
    assert [(r["form"]["grant_type"], r["status"]) for r in ehr.token_requests] == [
        ("authorization_code", 200), ("refresh_token", 200), ("refresh_token", 400)]
