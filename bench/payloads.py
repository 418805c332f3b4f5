"""Epic-shaped CDS Hooks requests for the HTTP benchmark (`bench.service_bench`).

Every payload is one synthetic patient (female, born 1958, CKD G4 A3: latest eGFR 28, urine
ACR 420 mg/g), shaped the way Epic sends it: `fhirServer` and `fhirAuthorization` present, and
every prefetch key of the service present, so the service never falls back to the FHIR server
(an absent key would be read from `fhirServer`, which does not exist here). Searchsets are
newest first (`_sort=-date`); Epic's empty search answers `total: 0`.

- ``pv-3kb``: patient-view, compact JSON of about 3 KB: the Patient, an eGFR searchset with 2
  results, a urine ACR searchset with 1, the other keys empty. kidney-risk answers one card with
  a kfre-4var score.
- ``pv-100obs``, ``pv-1000obs``: patient-view, the same patient with 100 / 1,000 Observations
  over the 3 years before the run date, spread over the keys as a CKD chart is (eGFR 30 %,
  creatinine 30 %, blood pressure panels 20 %, HbA1c 10 %, urine ACR 10 %), each with Epic's
  baggage (issued time, local code beside the LOINC, reference range, interpretation), plus 3
  problem-list Conditions and 3 active MedicationRequests. The kidney-risk templates have no
  catch-all laboratory key, so every result is one a key asks for.
- ``os-10orders``: order-select with 10 draft MedicationRequests, one of them ibuprofen (RxNorm
  5640, an NSAID) and selected; none of the other nine is in a nephrotoxic value set.
  nephrotoxic-order-check answers one card.

Inputs are deterministic (fixed ids, values and generator seed); only the dates move with the
run date, since the services ignore results older than their lookback windows.
"""

from __future__ import annotations

import json
import random
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

FHIR_BASE = "https://fhir.example-hospital.org/interconnect-fhir-oauth/api/FHIR/R4"
PATIENT_ID = "eBnchPt0Kx4Rm7Qz2Wv9Ld3"
USER_ID = "PractitionerRole/e-QokEGUJIzyynNdkCFrs9w3"
ENCOUNTER_ID = "eBnchEnc8Tq1Vz5Ym3Kp7Hs3"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
# Epic's local component ids (an OID per organisation) sit beside the LOINC code.
EPIC_LAB_SYSTEM = "urn:oid:1.2.840.114350.1.13.861.1.7.2.768282"
EPIC_MRN_SYSTEM = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.0"
EPIC_ORDER_SYSTEM = "urn:oid:1.2.840.114350.1.13.861.1.7.2.798268"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
LARGE_SEED = 20261121
LARGE_SPAN_DAYS = 3 * 365
# uuid4 strings all have 36 characters: a body's size does not depend on its hookInstance.
_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"

# LOINC, Epic component id, display, UCUM unit, reference low, reference high.
EGFR = ("98979-8", "1558112", "eGFR (CKD-EPI 2021)", "mL/min/{1.73_m2}", 60.0, None)
CREATININE = ("2160-0", "1558004", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.5,
              1.1)
UACR = ("9318-7", "1558024", "Albumin/Creatinine [Mass Ratio] in Urine", "mg/g", None, 30.0)
HBA1C = ("4548-4", "1557980", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", None, 5.7)
UNITS = {"mL/min/{1.73_m2}": "mL/min/1.73m2"}  # Epic's display unit beside the UCUM code

# (RxNorm ingredient, display, text): the other draft orders. Only the ibuprofen one is selected;
# gabapentin and furosemide are in hooks/data/prescribing_rules.yaml, here only as context.
OTHER_ORDERS = (
    ("83367", "atorvastatin", "atorvastatin (LIPITOR) 40 mg tablet"),
    ("17767", "amlodipine", "amlodipine (NORVASC) 5 mg tablet"),
    ("7646", "omeprazole", "omeprazole (PRILOSEC) 20 mg capsule"),
    ("36437", "sertraline", "sertraline (ZOLOFT) 50 mg tablet"),
    ("10582", "levothyroxine", "levothyroxine (SYNTHROID) 75 mcg tablet"),
    ("6918", "metoprolol", "metoprolol succinate (TOPROL-XL) 50 mg 24 hr tablet"),
    ("25480", "gabapentin", "gabapentin (NEURONTIN) 300 mg capsule"),
    ("4603", "furosemide", "furosemide (LASIX) 20 mg tablet"),
    ("274783", "insulin glargine", "insulin glargine (LANTUS) 100 unit/mL injection"),
)
NSAID = ("5640", "ibuprofen", "ibuprofen (MOTRIN) 600 mg tablet")


@dataclass(frozen=True)
class Payload:
    """One request shape; `body(hook_instance)` gives its bytes with that hookInstance."""

    name: str
    service_id: str
    hook: str
    description: str
    counts: dict            # what is in it (Observations, orders, ...)
    expected_cards: int
    check: Callable[[dict], str | None]   # a problem with a 200 response, or None
    _prefix: bytes
    _suffix: bytes

    @property
    def path(self) -> str:
        return f"/cds-services/{self.service_id}"

    @property
    def size(self) -> int:
        return len(self._prefix) + len(_PLACEHOLDER) + len(self._suffix)

    def body(self, hook_instance: str) -> bytes:
        return self._prefix + hook_instance.encode("ascii") + self._suffix

    def verify(self, response: dict) -> str | None:
        """Why `response` is not what this payload must produce, or None."""
        cards = response.get("cards")
        if not isinstance(cards, list) or len(cards) != self.expected_cards:
            return f"expected {self.expected_cards} card(s), got {cards!r:.300}"
        return self.check(response)


def _payload(name: str, service_id: str, request: dict, description: str, counts: dict,
             expected_cards: int, check: Callable[[dict], str | None]) -> Payload:
    request = {"hookInstance": _PLACEHOLDER, **request}
    text = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()
    prefix, suffix = text.split(_PLACEHOLDER.encode())
    return Payload(name, service_id, request["hook"], description, counts, expected_cards, check,
                   prefix, suffix)


def new_hook_instance() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------------------------------------
# FHIR resources


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def searchset(resources: Sequence[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"{FHIR_BASE}/{r['resourceType']}/{r['id']}", "resource": r,
                       "search": {"mode": "match"}} for r in resources]}


def patient() -> dict:
    return {"resourceType": "Patient", "id": PATIENT_ID, "active": True,
            "identifier": [{"use": "usual", "system": EPIC_MRN_SYSTEM, "value": "E7311"}],
            "name": [{"use": "official", "family": "Testpatient", "given": ["Renal"]}],
            "gender": "female", "birthDate": "1958-03-02"}


def _quantity(value: float, unit: str) -> dict:
    return {"value": value, "unit": UNITS.get(unit, unit), "system": UCUM, "code": unit}


def lab(obs_id: str, test: tuple, value: float, when: datetime, *, full: bool) -> dict:
    """A resulted laboratory Observation; `full` adds what Epic also sends with every result."""
    code, epic_code, display, unit, low, high = test
    obs = {"resourceType": "Observation", "id": obs_id, "status": "final",
           "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
           "code": {"coding": [{"system": LOINC, "code": code, "display": display}],
                    "text": display},
           "subject": {"reference": f"Patient/{PATIENT_ID}"},
           "effectiveDateTime": _stamp(when), "valueQuantity": _quantity(value, unit)}
    if not full:
        return obs
    obs["issued"] = _stamp(when + timedelta(hours=2))
    obs["code"]["coding"].insert(0, {"system": EPIC_LAB_SYSTEM, "code": epic_code,
                                     "display": display.upper()[:40]})
    obs["subject"]["display"] = "Testpatient, Renal"
    limits = {k: _quantity(v, unit) for k, v in (("low", low), ("high", high)) if v is not None}
    obs["referenceRange"] = [limits]
    outside = (low is not None and value < low) or (high is not None and value > high)
    if outside:
        flag = "L" if low is not None and value < low else "H"
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag}],
                                  "text": {"L": "Low", "H": "High"}[flag]}]
    return obs


def blood_pressure(obs_id: str, systolic: int, diastolic: int, when: datetime) -> dict:
    def component(code: str, display: str, value: int) -> dict:
        return {"code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                "valueQuantity": _quantity(value, "mm[Hg]")}

    return {"resourceType": "Observation", "id": obs_id, "status": "final",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs",
                                      "display": "Vital Signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": "85354-9",
                                 "display": "Blood pressure panel"}], "text": "BP"},
            "subject": {"reference": f"Patient/{PATIENT_ID}"},
            "effectiveDateTime": _stamp(when),
            "component": [component("8480-6", "Systolic blood pressure", systolic),
                          component("8462-4", "Diastolic blood pressure", diastolic)]}


def condition(cond_id: str, icd10: str, display: str, onset: str) -> dict:
    return {"resourceType": "Condition", "id": cond_id,
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"}]},
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed"}]},
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": icd10,
                                 "display": display}], "text": display},
            "subject": {"reference": f"Patient/{PATIENT_ID}"}, "onsetDateTime": onset}


def medication_request(med_id: str, medication: tuple, status: str, authored: datetime) -> dict:
    rxnorm, name, text = medication
    return {"resourceType": "MedicationRequest", "id": med_id,
            "identifier": [{"use": "usual", "system": EPIC_ORDER_SYSTEM,
                            "value": str(zlib.crc32(med_id.encode()))}],
            "status": status, "intent": "order",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                "code": "outpatient", "display": "Outpatient"}], "text": "Outpatient"}],
            "priority": "routine",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rxnorm,
                                                      "display": name}], "text": text},
            "subject": {"reference": f"Patient/{PATIENT_ID}", "display": "Testpatient, Renal"},
            "authoredOn": _stamp(authored),
            "dosageInstruction": [{"text": "by mouth, as directed"}]}


# ---------------------------------------------------------------------------------------------
# Requests


def _envelope(hook: str, now: datetime, context: dict | None = None) -> dict:
    return {
        "fhirServer": FHIR_BASE,
        "hook": hook,
        "fhirAuthorization": {"access_token": "opaque-epic-access-token-b3nc",
                              "token_type": "Bearer", "expires_in": 300,
                              "scope": "Patient.Read (R4) Observation.Search (Labs) (R4)",
                              "subject": "aeac3da7-6481-45af-ad41-42e5e701141d"},
        "context": {"patientId": PATIENT_ID, "encounterId": ENCOUNTER_ID, "userId": USER_ID,
                    **(context or {})},
    }


def _empty() -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": 0}


def _scored_card(response: dict) -> str | None:
    summary = response["cards"][0].get("summary", "")
    if not summary.startswith("Kidney failure risk "):
        return f"the card carries no model score: {summary!r}"
    return None


def _nsaid_card(response: dict) -> str | None:
    summary = response["cards"][0].get("summary", "")
    if not summary.startswith("Ibuprofen"):
        return f"the card is not about the selected ibuprofen order: {summary!r}"
    return None


def pv_3kb(now: datetime) -> Payload:
    recent = now - timedelta(days=9, hours=3)
    egfr = [lab("fBnchEgfr0001", EGFR, 28, recent, full=False),
            lab("fBnchEgfr0002", EGFR, 34, recent - timedelta(days=196), full=False)]
    uacr = [lab("fBnchUacr0001", UACR, 420, recent, full=False)]
    request = {**_envelope("patient-view", now), "prefetch": {
        "egfr": searchset(egfr), "creatinine": _empty(), "patient": patient(),
        "uacr": searchset(uacr), "hba1c": _empty(), "bp": _empty(), "conditions": _empty(),
        "medications": _empty()}}
    return _payload("pv-3kb", "kidney-risk", request,
                    "patient-view: Patient, 2 eGFR, 1 urine ACR, other keys empty",
                    {"observations": 3, "conditions": 0, "medications": 0}, 1, _scored_card)


def pv_large(now: datetime, n_obs: int, seed: int = LARGE_SEED) -> Payload:
    """`n_obs` Observations over 3 years; the newest eGFR and urine ACR are those of pv-3kb."""
    rng = random.Random(f"{seed}-{n_obs}")  # noqa: S311 - synthetic values, not secrets
    shares = {"egfr": 0.3, "creatinine": 0.3, "bp": 0.2, "hba1c": 0.1}
    sizes = {key: max(1, round(n_obs * share)) for key, share in shares.items()}
    sizes["uacr"] = n_obs - sum(sizes.values())
    recent = now - timedelta(days=9, hours=3)
    span = timedelta(days=LARGE_SPAN_DAYS)

    def dates(n: int) -> list[datetime]:
        older = sorted((recent - span * rng.random() for _ in range(n - 1)), reverse=True)
        return [recent, *older]  # newest first, as `_sort=-date` returns them

    def trend(when: datetime, now_value: float, then_value: float, sd: float) -> float:
        years = (recent - when) / span
        return now_value + (then_value - now_value) * years + rng.gauss(0, sd)

    keys: dict[str, list] = {}
    keys["egfr"] = [lab(f"fBnchEgfr{k:05d}", EGFR, 28 if k == 0 else
                        max(5, round(trend(d, 28, 45, 2.5))), d, full=True)
                    for k, d in enumerate(dates(sizes["egfr"]))]
    keys["creatinine"] = [lab(f"fBnchCrea{k:05d}", CREATININE,
                              round(max(0.4, trend(d, 1.9, 1.3, 0.1)), 2), d, full=True)
                          for k, d in enumerate(dates(sizes["creatinine"]))]
    keys["uacr"] = [lab(f"fBnchUacr{k:05d}", UACR, 420 if k == 0 else
                        max(1, round(trend(d, 420, 250, 40))), d, full=True)
                    for k, d in enumerate(dates(sizes["uacr"]))]
    keys["hba1c"] = [lab(f"fBnchA1c{k:05d}", HBA1C, round(trend(d, 7.1, 7.6, 0.3), 1), d,
                         full=True)
                     for k, d in enumerate(dates(sizes["hba1c"]))]
    keys["bp"] = [blood_pressure(f"fBnchBp{k:05d}", round(rng.gauss(142, 12)),
                                 round(rng.gauss(84, 8)), d)
                  for k, d in enumerate(dates(sizes["bp"]))]
    conditions = [condition("eBnchCond001", "N18.4", "Chronic kidney disease, stage 4 (severe)",
                            "2021-04-12"),
                  condition("eBnchCond002", "E11.22", "Type 2 diabetes mellitus with diabetic "
                            "chronic kidney disease", "2014-05-20"),
                  condition("eBnchCond003", "I10", "Essential (primary) hypertension",
                            "2009-11-02")]
    medications = [medication_request(f"eBnchMed{k:03d}", med, "active",
                                      now - timedelta(days=90 * (k + 1)))
                   for k, med in enumerate((OTHER_ORDERS[0], OTHER_ORDERS[1], OTHER_ORDERS[8]))]
    prefetch = {key: searchset(keys[key]) for key in ("egfr", "creatinine")}
    prefetch["patient"] = patient()
    prefetch.update({key: searchset(keys[key]) for key in ("uacr", "hba1c", "bp")})
    prefetch["conditions"] = searchset(conditions)
    prefetch["medications"] = searchset(medications)
    request = {**_envelope("patient-view", now), "prefetch": prefetch}
    counts = {"observations": n_obs, **{f"{key}_observations": len(v) for key, v in keys.items()},
              "conditions": len(conditions), "medications": len(medications)}
    return _payload(f"pv-{n_obs}obs", "kidney-risk", request,
                    f"patient-view: {n_obs:,} Observations over 3 years, 3 Conditions, "
                    "3 active medications", counts, 1, _scored_card)


def os_orders(now: datetime, n_orders: int = 10) -> Payload:
    """order-select: `n_orders` draft MedicationRequests, the NSAID first and selected."""
    if not 1 <= n_orders <= len(OTHER_ORDERS) + 1:
        raise ValueError(f"n_orders must be 1 to {len(OTHER_ORDERS) + 1}")
    authored = now - timedelta(minutes=3)
    orders = [medication_request(f"eBnchDraft{k:02d}", med, "draft", authored)
              for k, med in enumerate((NSAID, *OTHER_ORDERS[:n_orders - 1]))]
    recent = now - timedelta(days=9, hours=3)
    context = {"selections": [f"MedicationRequest/{orders[0]['id']}"],
               "draftOrders": {"resourceType": "Bundle", "type": "collection",
                               "entry": [{"resource": order} for order in orders]}}
    request = {**_envelope("order-select", now, context), "prefetch": {
        "egfr": searchset([lab("fBnchEgfr0001", EGFR, 28, recent, full=False)]),
        "creatinine": _empty(), "patient": patient(),
        "uacr": searchset([lab("fBnchUacr0001", UACR, 420, recent, full=False)]),
        "medications": _empty(), "conditions": _empty(), "weight": _empty()}}
    return _payload(f"os-{n_orders}orders", "nephrotoxic-order-check", request,
                    f"order-select: {n_orders} draft MedicationRequests, the ibuprofen one "
                    "selected", {"draft_orders": n_orders, "selected": 1}, 1, _nsaid_card)


def build(now: datetime | None = None) -> dict[str, Payload]:
    """Every payload of the benchmark, dated relative to `now` (default: today, 00:00 UTC)."""
    if now is None:
        today = datetime.now(UTC)
        now = datetime(today.year, today.month, today.day, tzinfo=UTC)
    payloads = [pv_3kb(now), pv_large(now, 100), pv_large(now, 1000), os_orders(now)]
    return {p.name: p for p in payloads}


def describe(payloads: dict[str, Payload]) -> dict[str, Any]:
    return {name: {"service": p.service_id, "hook": p.hook, "description": p.description,
                   "bytes": p.size, **p.counts} for name, p in payloads.items()}
