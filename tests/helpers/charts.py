"""Small builders of realistic Epic-shaped charts and hook requests for clinical tests.

Dates are given as days before `NOW` (the frozen request time of the golden scenarios), so a
chart reads the same on any day the suite runs.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

# The request time the tests' app clock is frozen at (tests/helpers/golden.py FROZEN_NOW).
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
PATIENT_ID = "eTestPatient0001"
UCUM = "http://unitsofmeasure.org"


def day(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).date().isoformat()


def when(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def patient(gender: str | None = "male", age: int = 60) -> dict:
    """A Patient who is `age` whole years old at NOW (born a month before that birthday)."""
    born = NOW.date().replace(year=NOW.year - age) - timedelta(days=30)
    out: dict[str, Any] = {"resourceType": "Patient", "id": PATIENT_ID,
                           "birthDate": born.isoformat()}
    if gender is not None:
        out["gender"] = gender
    return out


_counter = iter(range(1, 1_000_000))


def obs(loinc: str, value: Any, unit: str | None, days_ago: float = 3, *,
        comparator: str | None = None, status: str = "final", ucum: bool = True) -> dict:
    """An Observation; `value` a str becomes valueString, else a valueQuantity."""
    resource: dict[str, Any] = {
        "resourceType": "Observation", "id": f"eObs{next(_counter)}", "status": status,
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "effectiveDateTime": when(days_ago),
    }
    if isinstance(value, str):
        resource["valueString"] = value
    else:
        quantity: dict[str, Any] = {"value": value}
        if unit is not None:
            quantity["unit"] = unit
            if ucum:
                quantity.update(system=UCUM, code=unit)
        if comparator:
            quantity["comparator"] = comparator
        resource["valueQuantity"] = quantity
    return resource


def condition(system: str, code: str, text: str, days_ago: float = 200) -> dict:
    return {"resourceType": "Condition", "id": f"eCond{next(_counter)}",
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"}]},
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed"}]},
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": system, "code": code}], "text": text},
            "subject": {"reference": f"Patient/{PATIENT_ID}"},
            "recordedDate": day(days_ago)}


def order(text: str | None = None, rxcui: str | None = None, *, status: str = "draft",
          route: dict | None = None) -> dict:
    """A MedicationRequest coded by RxNorm `rxcui` and/or named by `text` only."""
    concept: dict[str, Any] = {}
    if rxcui is not None:
        concept["coding"] = [{"system": RXNORM, "code": rxcui}]
    if text is not None:
        concept["text"] = text
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest", "id": f"eRx{next(_counter)}", "status": status,
        "intent": "order", "medicationCodeableConcept": concept,
        "subject": {"reference": f"Patient/{PATIENT_ID}"}, "authoredOn": when(1)}
    if route is not None:
        resource["dosageInstruction"] = [{"route": route}]
    return resource


def searchset(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r} for r in resources]}


def _by_key(resources: list[dict]) -> dict[str, Any]:
    """The prefetch both services declare, filled from a flat list of chart resources."""
    from hooks._kidney import family_codes

    def codes(*families: str) -> set[str]:
        return {c.split("|")[1] for c in family_codes(*families)}

    egfr = codes("egfr_creatinine", "egfr_cystatin", "egfr_creatinine_cystatin",
                 "egfr_method_unspecified", "egfr_pediatric")
    creatinine = codes("creatinine_serum_mass", "creatinine_serum_molar")
    uacr = codes("uacr_mass", "uacr_molar", "uacr_timed")
    keys: dict[str, list[dict]] = {k: [] for k in (
        "egfr", "creatinine", "uacr", "hba1c", "bp", "conditions", "medications", "weight")}
    found_patient = None
    for r in resources:
        kind = r["resourceType"]
        if kind == "Patient":
            found_patient = r
        elif kind == "Condition":
            keys["conditions"].append(r)
        elif kind == "MedicationRequest":
            keys["medications"].append(r)
        elif kind == "Observation":
            code = r["code"]["coding"][0]["code"]
            key = ("egfr" if code in egfr else "creatinine" if code in creatinine
                   else "uacr" if code in uacr else "weight" if code in ("29463-7", "3141-9")
                   else "bp")
            keys[key].append(r)
    out: dict[str, Any] = {k: searchset(*v) for k, v in keys.items()}
    out["patient"] = found_patient
    return out


def request(hook: str, chart: list[dict], drafts: list[dict] = (), *,
            select_all: bool = True) -> dict:
    """A complete hook request whose prefetch holds `chart` (every key present)."""
    body: dict[str, Any] = {
        "hookInstance": str(uuid.uuid4()), "hook": hook,
        "fhirServer": "https://fhir.example-hospital.org/api/FHIR/R4",
        "context": {"patientId": PATIENT_ID, "userId": "PractitionerRole/eTestUser"},
        "prefetch": _by_key(list(chart)),
    }
    if hook in ("order-select", "order-sign"):
        body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                          "entry": [{"resource": d} for d in drafts]}
        if hook == "order-select":
            body["context"]["selections"] = [f"MedicationRequest/{d['id']}" for d in drafts
                                             if select_all]
    return body


def call(client, service: str, body: dict) -> list[dict]:
    """The cards a service answers with (asserting a 200)."""
    response = client.post(f"/cds-services/{service}", data=json.dumps(body),
                           content_type="application/json")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["cards"]
