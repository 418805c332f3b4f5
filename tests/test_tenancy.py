"""Caller authentication at the endpoints, and one process serving several sites by issuer."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hooks import SERVICES
from tests.conftest import TEST_ISS, make_jwt
from tests.helpers.http import PATIENT_VIEW, assert_outcome

B_ISS = "https://hospital-b.example.org/api/FHIR/R4"
B_KID = "b-key-1"
B_KEY = ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def two_sites(make_app, tmp_path, test_jwks_file):
    import jwt as pyjwt

    public = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(B_KEY.public_key()))
    public.update(kid=B_KID, alg="ES384")
    (tmp_path / "b.jwks.json").write_text(json.dumps({"keys": [public]}))
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "a.yaml").write_text(
        f"site: hospital-a\nissuers:\n  - iss: {TEST_ISS}\n    jwks_file: {test_jwks_file}\n"
        "services:\n  kidney-risk: {}\n")
    (sites / "b.yaml").write_text(
        f"site: hospital-b\nissuers:\n  - iss: {B_ISS}\n    jwks_file: ../b.jwks.json\n"
        "audiences: [https://cds.hospital-b.example.org/cds-services]\n"
        "jwt:\n  algorithms: [ES384]\nservices:\n  nephrotoxic-order-check: {}\n")
    return make_app(SERVICES=SERVICES, SITE_CONFIG=str(sites), DEFAULT_SITE="hospital-a")


def b_token(aud="https://cds.hospital-b.example.org/cds-services"):
    return make_jwt(aud, key=B_KEY, kid=B_KID, alg="ES384", iss=B_ISS)


def test_the_verified_issuer_selects_the_site(two_sites):
    client = two_sites.test_client()
    a = client.get("/cds-services").get_json()["services"]
    assert {s["id"] for s in a} == {"kidney-risk"}
    b = client.get("/cds-services", headers={"Authorization": f"Bearer {b_token()}"})
    assert {s["id"] for s in b.get_json()["services"]} == {"nephrotoxic-order-check"}


def test_a_token_from_site_a_cannot_reach_a_service_only_site_b_enables(two_sites):
    client = two_sites.test_client()
    response = client.post("/cds-services/nephrotoxic-order-check", json=PATIENT_VIEW)
    assert_outcome(response, 404, "is enabled for this site")
    # And site B's algorithm allow-list is its own: an RS384 token for B's issuer is refused.
    forged = make_jwt("http://localhost/cds-services", iss=B_ISS, kid=B_KID)
    assert client.get("/cds-services", headers={"Authorization": f"Bearer {forged}"}
                      ).status_code == 401


def test_configured_audience_is_accepted_and_another_services_url_is_not(two_sites):
    client = two_sites.test_client()
    assert client.get("/cds-services", headers={"Authorization": f"Bearer {b_token()}"}
                      ).status_code == 200
    other = make_jwt("http://localhost/cds-services/kidney-risk")  # a different endpoint
    assert client.get("/cds-services", headers={"Authorization": f"Bearer {other}"}
                      ).status_code == 401


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer not.a.jwt", "Token abc"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/cds-services"), ("post", "/cds-services/echo"),
     ("post", "/cds-services/echo/feedback"), ("post", "/cds-services/unknown-id")],
)
def test_every_cds_endpoint_requires_a_bearer_jwt(client, method, path, authorization):
    headers = {"Authorization": authorization}
    response = getattr(client, method)(path, json=PATIENT_VIEW, headers=headers)
    body = assert_outcome(response, 401, "Authentication required.")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert len(body["issue"]) == 1


def test_probes_and_docs_need_no_token(client):
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 200


def test_auth_off_is_explicit_and_warned(make_app, caplog):
    app = make_app(AUTH_REQUIRED=False)
    assert "AUTH_REQUIRED is false" in caplog.text
    response = app.test_client().get("/cds-services", headers={"Authorization": ""})
    assert response.status_code == 200


def test_replayed_token_is_refused(client):
    token = make_jwt("http://localhost/cds-services")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/cds-services", headers=headers).status_code == 200
    assert client.get("/cds-services", headers=headers).status_code == 401
