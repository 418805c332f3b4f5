"""Posting to the in-process test client and checking what comes back."""

from __future__ import annotations

import json

PATIENT_VIEW = {
    "hook": "patient-view",
    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "context": {"userId": "PractitionerRole/123", "patientId": "1288992"},
}


def post(client, path, body, **kwargs):
    return client.post(path, data=json.dumps(body), content_type="application/json", **kwargs)


def nested(levels: int, leaf="leaf"):
    """`leaf` inside `levels` levels of objects and arrays, alternately."""
    value = leaf
    for level in range(levels):
        value = [value] if level % 2 else {"extension": value}
    return value


def walk(value, path="$"):
    """Yield (path, value) for every node of a JSON document."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, f"{path}[{index}]")


def assert_outcome(response, status, *fragments):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"], body
    text = json.dumps(body)
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, body)
    return body
