"""The SMART test server itself (tests/helpers/smart_server.py), driven with `requests` over
real HTTP: discovery, EHR-launch authorize, PKCE, single-use codes, confidential clients,
refresh, and FHIR reads that need the patient's access token."""

from __future__ import annotations

import time
import uuid
from urllib.parse import parse_qs, urlsplit

import jwt
import requests

from tests.helpers.jwks import make_jwt, rsa_key
from tests.helpers.smart_server import new_verifier, s256

CALLBACK = "https://cds.example.org/smart/callback"
SCOPE = ("launch openid fhirUser offline_access patient/Patient.rs patient/Observation.rs "
         "patient/Condition.rs patient/MedicationRequest.rs patient/Medication.rs")


def authorize(server, verifier: str, **overrides) -> requests.Response:
    params = {"response_type": "code", "client_id": server.client_id, "redirect_uri": CALLBACK,
              "launch": server.new_launch(patient="p1", encounter="e1"), "scope": SCOPE,
              "state": "st-" + uuid.uuid4().hex, "aud": server.iss,
              "code_challenge": s256(verifier), "code_challenge_method": "S256"}
    params.update(overrides)
    params = {k: v for k, v in params.items() if v is not None}
    return requests.get(server.authorize_url, params=params, allow_redirects=False, timeout=5)


def code_from(response: requests.Response) -> str:
    assert response.status_code == 302, response.text
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    return query["code"][0]


def exchange(server, code: str, verifier: str, **extra) -> requests.Response:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK,
            "code_verifier": verifier, "client_id": server.client_id, **extra}
    return requests.post(server.token_url, data={k: v for k, v in form.items() if v is not None},
                         timeout=5)


def test_discovery_names_the_endpoints_and_counts_fetches(smart_server):
    answer = requests.get(f"{smart_server.iss}/.well-known/smart-configuration", timeout=5)
    config = answer.json()
    assert config["authorization_endpoint"] == f"{smart_server.origin}/oauth/authorize"
    assert config["token_endpoint"] == f"{smart_server.origin}/oauth/token"
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert {"launch-ehr", "permission-v2", "sso-openid-connect"} <= set(config["capabilities"])
    assert requests.get(config["jwks_uri"], timeout=5).json()["keys"][0]["kid"] == smart_server.kid
    smart_server.capabilities = ["launch-ehr", "client-public", "permission-v1"]
    again = requests.get(f"{smart_server.iss}/.well-known/smart-configuration", timeout=5).json()
    assert "permission-v2" not in again["capabilities"]
    assert smart_server.discovery_hits == 2


def test_authorize_redirects_with_a_code_or_an_error_and_never_to_an_unknown_uri(smart_server):
    smart_server.redirect_uris = [CALLBACK]
    verifier = new_verifier()
    ok = authorize(smart_server, verifier, state="s1")
    location = urlsplit(ok.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == CALLBACK
    assert parse_qs(location.query)["state"] == ["s1"]
    bad = authorize(smart_server, verifier, state="s2", code_challenge_method="plain")
    assert bad.status_code == 302
    assert parse_qs(urlsplit(bad.headers["Location"]).query)["error"] == ["invalid_request"]
    for wrong in ({"redirect_uri": CALLBACK + "/x"}, {"client_id": "someone-else"}):
        refused = authorize(smart_server, verifier, **wrong)
        assert refused.status_code == 400 and "Location" not in refused.headers
    no_launch = authorize(smart_server, verifier, launch="made-up")
    assert "error=invalid_request" in no_launch.headers["Location"]
    smart_server.deny_authorization = "access_denied"
    denied = authorize(smart_server, verifier, state="s3")
    assert parse_qs(urlsplit(denied.headers["Location"]).query) == {
        "error": ["access_denied"], "state": ["s3"]}
    assert [r["outcome"] for r in smart_server.authorize_requests][:2] == ["code",
                                                                          "code_challenge_method "
                                                                          "must be S256"]


def test_code_exchange_checks_pkce_is_single_use_and_signs_an_id_token(smart_server):
    smart_server.redirect_uris = [CALLBACK]
    verifier = new_verifier()
    wrong = exchange(smart_server, code_from(authorize(smart_server, verifier)), new_verifier())
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    code = code_from(authorize(smart_server, verifier, nonce="n1"))
    answer = exchange(smart_server, code, verifier)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["token_type"], body["patient"], body["encounter"]) == ("Bearer", "p1", "e1")
    assert body["expires_in"] == 300 and "refresh_token" in body
    assert "patient/Observation.rs" in body["scope"].split()
    key = jwt.PyJWKClient(smart_server.jwks_url).get_signing_key_from_jwt(body["id_token"])
    claims = jwt.decode(body["id_token"], key.key, algorithms=["RS256"],
                        audience=smart_server.client_id, issuer=smart_server.iss)
    assert claims["fhirUser"] == f"{smart_server.iss}/Practitioner/dr1"
    assert claims["nonce"] == "n1"
    assert [r["pkce_ok"] for r in smart_server.token_requests] == [False, True]

    # A replayed code is refused, and the token issued from it stops working.
    smart_server.add_patient_chart("p1")
    fhir = f"{smart_server.iss}/Patient/p1"
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert requests.get(fhir, headers=auth, timeout=5).status_code == 200
    replay = exchange(smart_server, code, verifier)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert requests.get(fhir, headers=auth, timeout=5).status_code == 401
    assert smart_server.issued_access_tokens == [body["access_token"]]


def test_a_late_code_or_another_redirect_uri_is_refused(smart_server):
    smart_server.redirect_uris = [CALLBACK, CALLBACK + "2"]
    verifier = new_verifier()
    other = exchange(smart_server, code_from(authorize(smart_server, verifier)), verifier,
                     redirect_uri=CALLBACK + "2")
    assert other.json()["error"] == "invalid_grant"
    smart_server.code_lifetime = 0
    code = code_from(authorize(smart_server, verifier))
    time.sleep(0.01)
    assert exchange(smart_server, code, verifier).json()["error"] == "invalid_grant"


def test_confidential_client_authenticates_with_a_signed_assertion(smart_server):
    key = rsa_key()
    smart_server.client_jwks = {"keys": [key.public_jwk]}
    smart_server.redirect_uris = [CALLBACK]
    verifier = new_verifier()

    def assertion(**claims):
        defaults = {"iss": smart_server.client_id, "sub": smart_server.client_id,
                    "aud": smart_server.token_url}
        return make_jwt(key, **{**defaults, **claims})

    good = assertion()
    form = {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}
    answer = exchange(smart_server, code_from(authorize(smart_server, verifier)), verifier,
                      client_assertion=good, client_id=None, **form)
    assert answer.status_code == 200, answer.text
    for bad in (good,  # jti replayed
                assertion(aud="https://elsewhere.example.org/token"),
                assertion(exp=int(time.time()) + 3600),
                make_jwt(rsa_key(kid=key.kid), iss=smart_server.client_id,
                         sub=smart_server.client_id, aud=smart_server.token_url)):
        refused = exchange(smart_server, code_from(authorize(smart_server, verifier)), verifier,
                           client_assertion=bad, client_id=None, **form)
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
    public = exchange(smart_server, code_from(authorize(smart_server, verifier)), verifier)
    assert public.status_code == 401
    assert [r["client_auth"] for r in smart_server.token_requests][:1] == ["private_key_jwt"]


def test_refresh_rotates_and_the_old_refresh_token_dies(smart_server):
    smart_server.redirect_uris = [CALLBACK]
    smart_server.rotate_refresh = True
    verifier = new_verifier()
    first = exchange(smart_server, code_from(authorize(smart_server, verifier)), verifier).json()
    smart_server.expire_access_tokens()
    auth = {"Authorization": f"Bearer {first['access_token']}"}
    assert requests.get(f"{smart_server.iss}/Patient/p1", headers=auth,
                        timeout=5).status_code == 401

    def refresh(token):
        return requests.post(smart_server.token_url, timeout=5, data={
            "grant_type": "refresh_token", "refresh_token": token,
            "client_id": smart_server.client_id})

    second = refresh(first["refresh_token"])
    assert second.status_code == 200, second.text
    renewed = second.json()
    assert renewed["refresh_token"] != first["refresh_token"]
    assert renewed["access_token"] != first["access_token"] and renewed["patient"] == "p1"
    assert refresh(first["refresh_token"]).json()["error"] == "invalid_grant"
    assert refresh(renewed["refresh_token"]).status_code == 200
    without = authorize(smart_server, verifier, scope=SCOPE.replace(" offline_access", ""))
    assert "refresh_token" not in exchange(smart_server, code_from(without), verifier).json()


def test_fhir_needs_the_patients_token(smart_server):
    smart_server.redirect_uris = [CALLBACK]
    observation = {"resourceType": "Observation", "id": "o1", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "62238-1"}]},
                   "subject": {"reference": "Patient/p1"}}
    other_code = {**observation, "id": "o2",
                  "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]}}
    smart_server.add_patient_chart("p1", observations=[observation, other_code])
    smart_server.add_patient_chart("p2")
    search = f"{smart_server.iss}/Observation?patient=p1&code=http://loinc.org|62238-1"
    anonymous = requests.get(search, timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.json()["resourceType"] == "OperationOutcome"
    verifier = new_verifier()
    token = exchange(smart_server, code_from(authorize(smart_server, verifier)),
                     verifier).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    found = requests.get(search + "&category=laboratory", headers=auth, timeout=5)
    assert found.status_code == 200
    assert [e["resource"]["id"] for e in found.json()["entry"]] == ["o1"]
    assert requests.get(f"{smart_server.iss}/Patient/p1", headers=auth,
                        timeout=5).json()["id"] == "p1"
    other = requests.get(f"{smart_server.iss}/Patient/p2", headers=auth, timeout=5)
    assert other.status_code == 403
    assert requests.get(f"{smart_server.iss}/metadata", timeout=5).status_code == 200
    assert [d["status"] for d in smart_server.denied] == [401, 403]
    assert smart_server.fhir.requests_for("Observation")[-1].headers["authorization"] == (
        f"Bearer {token}")


def test_v1_only_server_grants_no_v2_scopes(smart_server):
    smart_server.redirect_uris = [CALLBACK]
    smart_server.capabilities = ["launch-ehr", "client-public", "permission-v1"]
    smart_server.add_patient_chart("p1")
    verifier = new_verifier()
    v2 = exchange(smart_server, code_from(authorize(smart_server, verifier)), verifier).json()
    assert "patient/Patient.rs" not in v2["scope"]
    assert requests.get(f"{smart_server.iss}/Patient/p1", timeout=5, headers={
        "Authorization": f"Bearer {v2['access_token']}"}).status_code == 403
    v1_scope = SCOPE.replace(".rs", ".read")
    v1 = exchange(smart_server, code_from(authorize(smart_server, verifier, scope=v1_scope)),
                  verifier).json()
    assert requests.get(f"{smart_server.iss}/Patient/p1", timeout=5, headers={
        "Authorization": f"Bearer {v1['access_token']}"}).status_code == 200
