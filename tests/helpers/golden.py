"""The golden scenarios of tests/data: loading them, the frozen clock they are read at, the
comparison with `expected.json`, and the same requests sent without their `egfr` prefetch."""

from __future__ import annotations

import copy
import json
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cds_service.tools.invoke import shift_dates
from hooks import SERVICES
from tests.helpers.validator import validate_response

DATA = Path(__file__).resolve().parents[1] / "data"
# Keys holding dates the services compare with the request time (results dated after it are
# ignored as data errors).
DATE_KEYS = ("effectiveDateTime", "issued", "authoredOn")
# A kidney-risk patient-view with a full prefetch: eGFR 28, G4, a warning card.
EGFR_28 = DATA / "kidney-risk" / "egfr-28-g4-warning"


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def without_volatile(body: dict) -> dict:
    """The response without card and suggestion `uuid`s (fresh on every call)."""
    body = copy.deepcopy(body)
    for card in body.get("cards", []):
        card.pop("uuid", None)
        for suggestion in card.get("suggestions", []):
            suggestion.pop("uuid", None)
    return body


def uuids(body: dict) -> list[str]:
    found = []
    for card in body["cards"]:
        found.append(card.get("uuid"))
        found.extend(s.get("uuid") for s in card.get("suggestions", []))
    return found


def scenario_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


# Models see ages and look-back windows as of this instant, so golden cards do not age.
FROZEN_NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def as_of_today(body: dict) -> dict:
    """A golden request with every date moved as far as today is from FROZEN_NOW: what a server
    that runs on the real clock (a subprocess, where CLOCK cannot reach) must be sent."""
    return shift_dates(body, (datetime.now(UTC).date() - FROZEN_NOW.date()).days)


# The golden site: orderables, local code mappings and a SMART link (tests/data/site.yaml).
GOLDEN_SITE = (DATA / "site.yaml").read_text(encoding="utf-8")


def assert_matches_golden(response, expected: dict) -> dict:
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert validate_response(body, epic=True) == []
    ids = uuids(body)
    assert all(isinstance(i, str) and i for i in ids), ids
    assert len(set(ids)) == len(ids), ids
    actual = without_volatile(body)
    assert actual == expected, "actual response (uuids dropped):\n" + json.dumps(
        actual, indent=2, ensure_ascii=False
    )
    return body


def golden_request(patient: str) -> dict:
    """EGFR_28's request as of today, as a fresh call (new hookInstance) about `patient`."""
    body = as_of_today(load(EGFR_28 / "request.json"))
    body["hookInstance"] = str(uuid.uuid4())
    body["context"]["patientId"] = patient
    return body


def patient_request() -> dict:
    """EGFR_28's request, prefetch only (no FHIR server to fall back to), as a fresh call."""
    body = load(EGFR_28 / "request.json")
    body.pop("fhirServer")
    body.pop("fhirAuthorization")
    body["hookInstance"] = str(uuid.uuid4())
    return body


# --- the egfr prefetch read from a real local FHIR server ----------------------------------

# Distinctive, so a leak into a response is found by a substring search.
TOKEN = "tok-" + secrets.token_urlsafe(24)
FETCH_SCENARIOS = [
    EGFR_28,
    DATA / "nephrotoxic-order-check" / "order-select-ibuprofen-egfr-38",
]


def loopback_client(make_app, tmp_path, server, *extra_prefetch_settings: str):
    head = "prefetch:\n  allow_http_loopback: true\n"
    assert GOLDEN_SITE.count(head) == 1
    settings = "".join(f"  {setting}\n" for setting in extra_prefetch_settings)
    return make_app(SERVICES=SERVICES, CLOCK=lambda: FROZEN_NOW, FHIR_SERVERS=[server.url],
                    SITE_YAML=GOLDEN_SITE.replace(head, head + settings)).test_client()


def without_prefetch(scenario: Path, server, token: str | None = TOKEN) -> tuple[dict, dict]:
    """The scenario's request without its `egfr` prefetch (other keys stay prefetched) and
    pointed at `server`, and the egfr searchset it had prefetched."""
    body = load(scenario / "request.json")
    bundle = body["prefetch"].pop("egfr")
    body["fhirServer"] = server.url
    if token is None:
        body.pop("fhirAuthorization")
    else:
        body["fhirAuthorization"]["access_token"] = token
    return body, bundle
