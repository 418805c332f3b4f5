"""The EHR's access token is transient: never logged, stored or echoed (rules 59, 63, 64)."""

from __future__ import annotations

import json
import logging
import uuid

from tests.helpers.http import post
from tests.helpers.store_queries import list_feedback

TOKEN = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2VuLXZhbHVl.c2lnbmF0dXJl"


def test_token_never_in_logs_bodies_or_store(make_app, tmp_path, caplog, fhir_server):
    fhir_server.add("Patient/p1", json={"resourceType": "Patient", "id": "p1",
                                        "name": [{"given": ["Ada"]}]})
    app = make_app(SITE_YAML="prefetch:\n  allow_http_loopback: true\n",
                   FHIR_SERVERS=[fhir_server.url])
    client = app.test_client()
    caplog.set_level(logging.DEBUG)
    body = {
        "hook": "patient-view", "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_server.url,
        "fhirAuthorization": {"access_token": TOKEN, "token_type": "Bearer",
                              "expires_in": 300, "scope": "Patient.Read (R4)", "subject": "c"},
        "context": {"userId": "PractitionerRole/1", "patientId": "p1"},
    }
    ok = post(client, "/cds-services/greeter", body)
    assert ok.get_json()["cards"][0]["summary"] == "Hello Ada"
    assert fhir_server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"

    fhir_server.add("Patient/p2", status=401, json={"resourceType": "OperationOutcome",
                                                     "issue": [{"severity": "error",
                                                                "code": "login"}]})
    body["context"]["patientId"] = "p2"
    refused = post(client, "/cds-services/greeter", body)
    assert refused.status_code == 412

    feedback = {"feedback": [{"card": "c1", "outcome": "overridden",
                              "outcomeTimestamp": "2026-11-01T10:00:00Z"}]}
    assert post(client, "/cds-services/greeter/feedback", feedback).status_code == 200

    stored = json.dumps(list_feedback(app.extensions["cds"].store), default=str)
    for text in (caplog.text, ok.get_data(as_text=True), refused.get_data(as_text=True), stored):
        assert TOKEN not in text
        assert "c2VjcmV0" not in text  # no fragment of it either
    # Only reads ever reach the EHR.
    assert fhir_server.methods == {"GET"}
