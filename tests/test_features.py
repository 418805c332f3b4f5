"""The FHIR → features engine on messy, Epic-shaped data; spec validation; never-raise properties.

Every table row is a realistic resource (or a few) and the exact value, status and notes the
engine must produce. `NOW` is the prediction time; results after it are in the future.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import pickle
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service import features as engine
from cds_service.features import (
    FeatureSpec,
    FeatureSpecError,
    FeatureValue,
    FeatureVector,
    MissingPolicy,
    extract,
    flatten,
    group_by_patient,
    parse_code_map,
    parse_features,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
DATA = Path(__file__).parent / "fixtures" / "features"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
# Epic lab component ids (an example instance's OID prefix); sites map them in code_mappings.
EPIC_COMPONENT = "urn:oid:1.2.840.114350.1.13.0.1.7.2.768282"
PATIENT_REF = {"reference": "Patient/eRvWTq3.S2kkB0zl0tnjWmw3"}

MANIFEST_YAML = """
- name: age
  source: {resource: Patient, attribute: age}
  missing: required
- name: male
  source: {resource: Patient, attribute: male}
  missing: required
- name: egfr
  description: latest eGFR
  source:
    resource: Observation
    codes: ["http://loinc.org|33914-3", "http://loinc.org|62238-1", "http://loinc.org|98979-8",
            "http://loinc.org|48642-3"]
  aggregation: latest
  lookback_days: 730
  unit: "mL/min/{1.73_m2}"
  plausible: [1, 200]
  missing: required
- name: egfr_slope
  source:
    resource: Observation
    codes: ["http://loinc.org|33914-3", "http://loinc.org|62238-1", "http://loinc.org|98979-8",
            "http://loinc.org|48642-3"]
  aggregation: slope
  lookback_days: 1095
  unit: "mL/min/{1.73_m2}"
  plausible: [1, 200]
  missing: {impute: -1.5, fit: median}
- name: creatinine
  source: {resource: Observation, codes: ["http://loinc.org|2160-0", "http://loinc.org|38483-4"]}
  unit: mg/dL
  conversions: {"umol/L": 0.011309658}
  plausible: [0.1, 20]
  missing: required
- name: uacr
  source:
    resource: Observation
    codes: ["http://loinc.org|9318-7", "http://loinc.org|14959-1", "http://loinc.org|32294-1"]
  lookback_days: 730
  unit: mg/g
  conversions: {"mg/mmol": 8.84}
  plausible: [0.1, 100000]
  missing: {impute: 10}
- name: hba1c
  source: {resource: Observation, codes: ["http://loinc.org|4548-4", "http://loinc.org|59261-8"]}
  unit: "%"
  conversions: {"mmol/mol": {factor: 0.09148, offset: 2.152}}
  plausible: [3, 20]
  missing: {impute: 5.6}
- name: sbp
  source: {resource: Observation, codes: ["http://loinc.org|8480-6"]}
  aggregation: mean
  lookback_days: 365
  unit: mm[Hg]
  plausible: [60, 260]
  missing: {impute: 130}
- name: dbp
  source: {resource: Observation, codes: ["http://loinc.org|8462-4"]}
  unit: mm[Hg]
  plausible: [30, 160]
  missing: {impute: 80}
- name: hba1c_tests
  source: {resource: Observation, codes: ["http://loinc.org|4548-4", "http://loinc.org|59261-8"]}
  aggregation: count
  lookback_days: 365
- name: diabetes
  source:
    resource: Condition
    codes: ["http://snomed.info/sct|44054006", "http://hl7.org/fhir/sid/icd-10-cm|E11*"]
- name: hypertension
  source:
    resource: Condition
    codes: ["http://hl7.org/fhir/sid/icd-10-cm|I10*", "http://hl7.org/fhir/sid/icd-10-cm|I12*",
            "http://hl7.org/fhir/sid/icd-10-cm|I13*"]
  aggregation: count
"""
MANIFEST = yaml.safe_load(MANIFEST_YAML)
SPECS = parse_features(MANIFEST)
SPEC = {s.name: s for s in SPECS}
CODE_MAP = parse_code_map(yaml.safe_load(f"""
- {{from: "{EPIC_COMPONENT}|1526", to: "http://loinc.org|2160-0"}}
- {{from: "{EPIC_COMPONENT}|4418", to: ["http://loinc.org|33914-3", "http://loinc.org|62238-1"]}}
"""))

_ids = itertools.count(1)


def q(value, unit="mg/dL", **extra) -> dict:
    """A Quantity with its UCUM code (Epic sends both unit and code)."""
    out = {"value": value}
    if unit is not None:
        out.update(unit=unit, system=UCUM, code=unit)
    return {**out, **extra}


def obs(code, *, system=LOINC, id=None, date="2025-05-01T09:00:00Z", status="final",
        codings=None, **extra) -> dict:
    resource = {"resourceType": "Observation", "id": id or f"obs-{next(_ids)}", "status": status,
                "code": {"coding": codings if codings is not None
                         else [{"system": system, "code": code}]},
                "subject": PATIENT_REF}
    if date is not None:
        resource["effectiveDateTime"] = date
    resource.update(extra)
    return resource


def creat(value, unit="mg/dL", **kw) -> dict:
    return obs("2160-0", valueQuantity=q(value, unit), **kw)


def egfr(value, date="2025-05-01T09:00:00Z", **kw) -> dict:
    return obs("33914-3", date=date, valueQuantity=q(value, "mL/min/{1.73_m2}"), **kw)


def bp_panel(sbp_component, dbp_component, **kw) -> dict:
    return obs("85354-9", component=[sbp_component, dbp_component], **kw)


def comp(code, value=None, **extra) -> dict:
    out = {"code": {"coding": [{"system": LOINC, "code": code}]}, **extra}
    if value is not None:
        out["valueQuantity"] = q(value, "mm[Hg]")
    return out


def status(code, system) -> dict:
    return {"coding": [{"system": f"http://terminology.hl7.org/CodeSystem/{system}", "code": code}]}


def cond(code, system=ICD10CM, *, id=None, clinical="active", verification="confirmed",
         **extra) -> dict:
    resource = {"resourceType": "Condition", "id": id or f"cond-{next(_ids)}",
                "code": {"coding": [{"system": system, "code": code}]}, "subject": PATIENT_REF,
                "recordedDate": "2020-02-14"}
    if clinical is not None:
        resource["clinicalStatus"] = status(clinical, "condition-clinical")
    if verification is not None:
        resource["verificationStatus"] = status(verification, "condition-ver-status")
    resource.update(extra)
    return resource


def patient(id="eRvWTq3.S2kkB0zl0tnjWmw3", **fields) -> dict:
    return {"resourceType": "Patient", "id": id, **fields}


def check(fv: FeatureValue, *, value=None, status="observed", notes=(), exact_notes=None,
          **fields) -> None:
    assert fv.status == status, fv
    if value is None:
        assert fv.value is None, fv
    else:
        assert fv.value == pytest.approx(value, rel=1e-6), fv
    for note in notes:
        assert note in fv.notes, fv.notes
    if exact_notes is not None:
        assert fv.notes == tuple(exact_notes)
    for key, expected in fields.items():
        assert getattr(fv, key) == expected, (key, fv)


def run(name: str, resources, *, code_map=CODE_MAP, now=NOW) -> FeatureValue:
    return extract(SPECS, resources, now=now, code_map=code_map)[name]


# ---------------------------------------------------------------------------------------------
# Codes


CODE_ROWS = [
    pytest.param("creatinine", [creat(1.2)], dict(value=1.2, n=1), id="loinc-2160-0"),
    pytest.param("creatinine", [obs("38483-4", valueQuantity=q(1.3))], dict(value=1.3),
                 id="loinc-38483-4-same-concept"),
    pytest.param("creatinine", [obs("1526", system=EPIC_COMPONENT, valueQuantity=q(1.4))],
                 dict(value=1.4), id="epic-local-component-via-code-map"),
    pytest.param("egfr", [obs("4418", system=EPIC_COMPONENT, valueQuantity=q(51, "mL/min"))],
                 dict(value=None, status="missing", notes=[
                     "unit 'mL/min' not convertible to mL/min/{1.73_m2} (not per {1.73_m2})"]),
                 id="local-code-mapped-to-a-list-then-unit-checked"),
    pytest.param("egfr", [obs("4418", system=EPIC_COMPONENT,
                              valueQuantity=q(51, "mL/min/1.73m2"))],
                 dict(value=51), id="local-code-mapped-to-a-list"),
    pytest.param("creatinine", [obs("9999", system=EPIC_COMPONENT, valueQuantity=q(1.4))],
                 dict(value=None, status="missing", notes=["no usable result"], n=0),
                 id="unmapped-local-code-not-matched"),
    pytest.param("creatinine", [obs("2160-0", system="urn:oid:2.16.840.1.113883.6.1",
                                    valueQuantity=q(0.9))], dict(value=0.9), id="loinc-oid"),
    pytest.param("creatinine", [obs("2160-0", system="http://loinc.org/", valueQuantity=q(0.8))],
                 dict(value=0.8), id="system-trailing-slash"),
    pytest.param("creatinine", [obs("2160-0", system=" http://loinc.org ", valueQuantity=q(0.8))],
                 dict(value=0.8), id="system-whitespace"),
    pytest.param("creatinine", [obs(None, codings=[
        {"system": EPIC_COMPONENT, "code": "77777", "display": "CREAT"},
        {"system": LOINC, "code": "2160-0"}], valueQuantity=q(1.1))],
                 dict(value=1.1), id="any-coding-matches"),
    # Epic's two codings per result, in either order, on several results of one chart: each is
    # matched (the pass remembers a concept's match by its codings; a second result reuses it).
    pytest.param("creatinine", [
        obs(None, codings=[{"system": EPIC_COMPONENT, "code": "77777"},
                           {"system": LOINC, "code": "2160-0"}], valueQuantity=q(1.1),
            date="2025-05-01"),
        obs(None, codings=[{"system": LOINC, "code": "2160-0"},
                           {"system": EPIC_COMPONENT, "code": "77777"}], valueQuantity=q(1.3),
            date="2025-05-02"),
        obs(None, codings=[{"system": EPIC_COMPONENT, "code": "77777"},
                           {"system": LOINC, "code": "2160-0"}], valueQuantity=q(1.5),
            date="2025-05-03")],
                 dict(value=1.5, n=3, date="2025-05-03"), id="two-codings-on-each-result"),
    pytest.param("creatinine", [obs(None, codings=["CREAT", {"system": LOINC, "code": "2160-0"}],
                                    valueQuantity=q(1.2))],
                 dict(value=1.2), id="two-codings-one-not-an-object"),
    pytest.param("creatinine", [obs(None, codings=[{"system": EPIC_COMPONENT, "code": {"id": 7}},
                                                   {"system": LOINC, "code": "2160-0"}],
                                    valueQuantity=q(1.2))],
                 dict(value=1.2), id="two-codings-one-code-not-a-string"),
    pytest.param("creatinine", [obs("2160-0", system=SNOMED, valueQuantity=q(1.1))],
                 dict(value=None, status="missing"), id="same-code-other-system"),
    pytest.param("creatinine", [obs("2160-0", system=None, valueQuantity=q(1.1))],
                 dict(value=None, status="missing"), id="coding-without-system"),
    pytest.param("egfr", [egfr(40, id="a"), obs("62238-1", valueQuantity=q(41, "mL/min/1.73m2"),
                                                 date="2025-05-02"),
                          obs("98979-8", valueQuantity=q(42, "mL/min/1.73m2"), date="2025-05-03"),
                          obs("48642-3", valueQuantity=q(43, "mL/min/1.73m2"), date="2025-05-04")],
                 dict(value=43, n=4, date="2025-05-04"), id="egfr-four-loinc-codes-one-concept"),
    pytest.param("uacr", [obs("14959-1", valueQuantity=q(30, "mg/g"), date="2025-01-01"),
                          obs("32294-1", valueQuantity=q(31, "mg/g"), date="2025-02-01"),
                          obs("9318-7", valueQuantity=q(29, "mg/g"), date="2024-12-01")],
                 dict(value=31, n=3), id="uacr-three-loinc-codes-one-concept"),
    pytest.param("diabetes", [cond("E11.9")], dict(value=1.0, n=1), id="icd10cm-dotted"),
    pytest.param("diabetes", [cond("E119")], dict(value=1.0), id="icd10cm-dotless"),
    pytest.param("diabetes", [cond("e11.65")], dict(value=1.0), id="icd10cm-lower-case"),
    pytest.param("diabetes", [cond("E11")], dict(value=1.0), id="icd10cm-prefix-itself"),
    pytest.param("diabetes", [cond("E11.22", system="urn:oid:2.16.840.1.113883.6.90")],
                 dict(value=1.0), id="icd10cm-oid"),
    pytest.param("diabetes", [cond("E10.9")], dict(value=0.0, n=0), id="icd10cm-other-family"),
    pytest.param("diabetes", [cond("E1")], dict(value=0.0), id="icd10cm-shorter-than-prefix"),
    pytest.param("diabetes", [cond("44054006", SNOMED)], dict(value=1.0), id="snomed"),
    pytest.param("diabetes", [cond("44054006", "urn:oid:2.16.840.1.113883.6.96")],
                 dict(value=1.0), id="snomed-oid"),
    pytest.param("hypertension", [cond("I10"), cond("I10", SNOMED)], dict(value=1.0, n=1),
                 id="icd-prefix-not-other-system"),
]


@pytest.mark.parametrize(("name", "resources", "expected"), CODE_ROWS)
def test_codes(name, resources, expected):
    check(run(name, resources), **expected)


def test_code_map_is_needed_for_local_codes():
    local = [obs("1526", system=EPIC_COMPONENT, valueQuantity=q(1.4))]
    check(run("creatinine", local, code_map=None), value=None, status="missing")
    check(run("creatinine", local, code_map=CODE_MAP), value=1.4)
    # A plain dict keyed by normalised codings works too (config.Site's default).
    plain = {(EPIC_COMPONENT, "1526"): ((LOINC, "2160-0"),)}
    check(run("creatinine", local, code_map=plain), value=1.4)


# ---------------------------------------------------------------------------------------------
# Values: numbers as strings, comparators, non-numbers


VALUE_ROWS = [
    pytest.param("creatinine", [creat(1.2)], dict(value=1.2, exact_notes=[]), id="number"),
    pytest.param("creatinine", [creat("1.010")], dict(value=1.01, exact_notes=[]),
                 id="quantity-value-string"),
    pytest.param("creatinine", [creat(" 1.5 ")], dict(value=1.5), id="quantity-value-padded"),
    pytest.param("creatinine", [obs("2160-0", valueString="1.010")],
                 dict(value=1.01, exact_notes=["unit missing; assumed mg/dL"]), id="value-string"),
    pytest.param("egfr", [obs("33914-3", valueString="45 mL/min/1.73m2")],
                 dict(value=45, exact_notes=[]), id="value-string-with-unit"),
    pytest.param("creatinine", [obs("2160-0", valueString="133 umol/L")],
                 dict(value=133 * 0.011309658, notes=["converted from umol/L"]),
                 id="value-string-with-unit-converted"),
    pytest.param("egfr", [obs("33914-3", valueInteger=45)],
                 dict(value=45, notes=["unit missing; assumed mL/min/{1.73_m2}"]),
                 id="value-integer"),
    pytest.param("creatinine", [obs("2160-0", valueString="1,5")],
                 dict(value=None, status="missing", notes=["value '1,5' not a number"]),
                 id="decimal-comma-rejected"),
    pytest.param("creatinine", [obs("2160-0", valueString="1.2.3")],
                 dict(value=None, status="missing"), id="two-dots-rejected"),
    pytest.param("creatinine", [obs("2160-0", valueString="abc")],
                 dict(value=None, status="missing", notes=["value 'abc' not a number"]),
                 id="text-rejected"),
    pytest.param("creatinine", [creat("NaN")], dict(value=None, status="missing"),
                 id="nan-string-rejected"),
    pytest.param("creatinine", [creat("inf")], dict(value=None, status="missing"),
                 id="inf-string-rejected"),
    pytest.param("creatinine", [creat("1e999")], dict(value=None, status="missing"),
                 id="overflowing-string-rejected"),
    pytest.param("creatinine", [creat(float("nan"))], dict(value=None, status="missing"),
                 id="nan-float-rejected"),
    pytest.param("creatinine", [creat(10**400)], dict(value=None, status="missing",
                                                      notes=["value a huge number not a number"]),
                 id="huge-int-rejected"),
    pytest.param("creatinine", [creat(True)],
                 dict(value=None, status="missing", notes=["value True not a number"]),
                 id="boolean-is-not-a-number"),
    pytest.param("creatinine", [obs("2160-0", valueBoolean=True)],
                 dict(value=None, status="missing", notes=["no numeric value"]),
                 id="value-boolean"),
    pytest.param("creatinine", [creat("")], dict(value=None, status="missing"),
                 id="empty-string"),
    pytest.param("creatinine", [obs("2160-0", valueString="60-90")],
                 dict(value=None, status="missing"), id="range-text-rejected"),
    pytest.param("egfr", [obs("33914-3", valueQuantity=q(60, "mL/min/1.73m2", comparator=">"))],
                 dict(value=60, exact_notes=["reported as >60; used 60"]),
                 id="quantity-comparator"),
    pytest.param("egfr", [obs("33914-3", valueQuantity=q(">60", "mL/min/1.73m2"))],
                 dict(value=60, exact_notes=["reported as >60; used 60"]),
                 id="comparator-inside-quantity-value"),
    pytest.param("egfr", [obs("33914-3", valueString=">60")],
                 dict(value=60, notes=["reported as >60; used 60",
                                       "unit missing; assumed mL/min/{1.73_m2}"]),
                 id="value-string-greater-than"),
    pytest.param("creatinine", [obs("2160-0", valueString="<0.2")],
                 dict(value=0.2, notes=["reported as <0.2; used 0.2"]), id="value-string-less"),
    pytest.param("egfr", [obs("33914-3", valueString=">= 90")],
                 dict(value=90, notes=["reported as >=90; used 90"]), id="value-string-ge-space"),
    pytest.param("egfr", [obs("33914-3", valueString="≥90 mL/min/1.73m2")],
                 dict(value=90, exact_notes=["reported as >=90; used 90"]),
                 id="value-string-unicode-ge"),
    pytest.param("egfr", [obs("33914-3", valueQuantity=q(60, "mL/min/1.73m2", comparator="ad"))],
                 dict(value=None, status="missing", notes=["comparator 'ad' not understood"]),
                 id="unknown-comparator"),
    pytest.param("creatinine", [obs("2160-0", valueCodeableConcept={"text": "hemolyzed"})],
                 dict(value=None, status="missing", notes=["no numeric value"]),
                 id="coded-value"),
]


@pytest.mark.parametrize(("name", "resources", "expected"), VALUE_ROWS)
def test_values(name, resources, expected):
    check(run(name, resources), **expected)


# ---------------------------------------------------------------------------------------------
# Components and dataAbsentReason

DAR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                   "code": "not-performed"}]}

COMPONENT_ROWS = [
    pytest.param("sbp", [bp_panel(comp("8480-6", 128), comp("8462-4", 82))],
                 dict(value=128, n=1), id="panel-systolic-component"),
    pytest.param("dbp", [bp_panel(comp("8480-6", 128), comp("8462-4", 82))],
                 dict(value=82, n=1), id="panel-diastolic-component"),
    pytest.param("sbp", [obs("8480-6", valueQuantity=q(131, "mm[Hg]"))], dict(value=131),
                 id="standalone-systolic-top-level"),
    pytest.param("sbp", [bp_panel(comp("8480-6", 128), comp("8462-4", 82), date="2025-05-01"),
                         bp_panel(comp("8480-6", 140), comp("8462-4", 90), date="2025-03-01")],
                 dict(value=134, n=2, date="2025-05-01", source=None), id="mean-of-components"),
    pytest.param("dbp", [bp_panel(comp("8480-6", 128), comp("8462-4", dataAbsentReason=DAR))],
                 dict(value=80, status="imputed",
                      notes=["no value (dataAbsentReason not-performed)", "imputed 80"]),
                 id="component-data-absent"),
    pytest.param("sbp", [bp_panel(comp("8480-6", 128), comp("8462-4", 82),
                                  dataAbsentReason=DAR)],
                 dict(value=128), id="panel-level-data-absent-leaves-components"),
    pytest.param("creatinine", [creat(1.2, dataAbsentReason=DAR)],
                 dict(value=None, status="missing",
                      notes=["no value (dataAbsentReason not-performed)"]),
                 id="observation-data-absent"),
    pytest.param("creatinine", [obs("2160-0", dataAbsentReason={"text": "lab error"})],
                 dict(value=None, status="missing",
                      notes=["no value (dataAbsentReason unspecified)"]),
                 id="data-absent-text-only"),
    pytest.param("sbp", [obs("85354-9", component={"code": {"coding": [
        {"system": LOINC, "code": "8480-6"}]}, "valueQuantity": q(120, "mm[Hg]")})],
                 dict(value=130, status="imputed"), id="component-is-a-dict"),
    pytest.param("sbp", [bp_panel(comp("8480-6", 128), "not a component")],
                 dict(value=128), id="component-entry-not-a-dict"),
    pytest.param("sbp", [bp_panel(comp("8480-6", 128), comp("8462-4", 82), id="panel-1"),
                         obs("8480-6", id="standalone-1", valueQuantity=q(128, "mm[Hg]"))],
                 dict(value=128, n=1), id="panel-and-standalone-twin-count-once"),
]


@pytest.mark.parametrize(("name", "resources", "expected"), COMPONENT_ROWS)
def test_components(name, resources, expected):
    check(run(name, resources), **expected)


# ---------------------------------------------------------------------------------------------
# Statuses


STATUS_ROWS = [
    pytest.param("egfr", [egfr(52, "2025-04-01", id="old"),
                          egfr(18, "2025-05-01", id="newer", status="entered-in-error")],
                 dict(value=52, source="Observation/old", n=1,
                      exact_notes=["1 entered-in-error result excluded"]),
                 id="entered-in-error-newer-result"),
    pytest.param("egfr", [egfr(18, status="cancelled")],
                 dict(value=None, status="missing",
                      exact_notes=["no usable result", "1 cancelled result excluded"]),
                 id="cancelled-only"),
    pytest.param("egfr", [egfr(18, status="entered-in-error"),
                          egfr(19, "2025-04-01", status="entered-in-error")],
                 dict(value=None, status="missing", notes=["2 entered-in-error results excluded"]),
                 id="two-entered-in-error"),
    pytest.param("egfr", [egfr(47, status="preliminary")], dict(value=47), id="preliminary-used"),
    pytest.param("egfr", [egfr(47, status=["final"])], dict(value=47), id="status-not-a-string"),
    pytest.param("diabetes", [cond("E11.9", verification="entered-in-error")],
                 dict(value=0.0, n=0, exact_notes=["1 entered-in-error condition excluded"]),
                 id="condition-entered-in-error"),
    pytest.param("diabetes", [cond("E11.9", verification="refuted")],
                 dict(value=0.0, notes=["1 refuted condition excluded"]), id="condition-refuted"),
    pytest.param("diabetes", [cond("E11.9", clinical="resolved")],
                 dict(value=0.0, notes=["1 resolved condition not counted"]),
                 id="condition-resolved"),
    pytest.param("diabetes", [cond("E11.9", clinical="inactive")],
                 dict(value=0.0, notes=["1 inactive condition not counted"]),
                 id="condition-inactive"),
    pytest.param("diabetes", [cond("E11.9", clinical=None, verification=None)],
                 dict(value=1.0), id="condition-without-statuses-counted"),
    pytest.param("diabetes", [cond("E11.9", clinicalStatus="resolved")],
                 dict(value=0.0), id="condition-status-bare-string"),
    pytest.param("hypertension", [cond("I10", clinical="resolved"), cond("I12.9"),
                                  cond("I13.0", verification="provisional")],
                 dict(value=2.0, n=2, notes=["1 resolved condition not counted"]),
                 id="condition-count"),
]


@pytest.mark.parametrize(("name", "resources", "expected"), STATUS_ROWS)
def test_statuses(name, resources, expected):
    check(run(name, resources), **expected)


# ---------------------------------------------------------------------------------------------
# Dates


def egfr_dated(value, **dates):
    resource = egfr(value, date=None)
    resource.update(dates)
    return resource


DATE_ROWS = [
    pytest.param([egfr(40, "2025-05-01"), egfr(90, "2025-07-01")],
                 dict(value=40, date="2025-05-01", notes=["1 future-dated result ignored"]),
                 id="future-ignored"),
    pytest.param([egfr(90, "2026-01-01"), egfr(91, "2030")],
                 dict(value=None, status="missing", notes=["2 future-dated results ignored"]),
                 id="two-future"),
    pytest.param([egfr(90, "2025-06-01T13:00:00Z"), egfr(41, "2025-06-01T11:00:00Z")],
                 dict(value=41), id="later-today-is-future"),
    pytest.param([egfr(42, "2025-06-01")], dict(value=42, date="2025-06-01"),
                 id="date-only-today-counts"),
    pytest.param([egfr_dated(43, effectiveInstant="2025-04-02T10:11:12.123+02:00")],
                 dict(value=43, date="2025-04-02"), id="effective-instant"),
    pytest.param([egfr_dated(44, effectivePeriod={"start": "2025-03-03", "end": "2025-03-04"})],
                 dict(value=44, date="2025-03-03"), id="effective-period-start"),
    pytest.param([egfr_dated(45, effectivePeriod={"end": "2025-03-04T08:00:00Z"})],
                 dict(value=45, date="2025-03-04"), id="effective-period-end-only"),
    pytest.param([egfr_dated(46, issued="2025-02-05T16:41:09.5Z")],
                 dict(value=46, date="2025-02-05"), id="issued-only"),
    pytest.param([egfr(47, "2024")], dict(value=47, date="2024-01-01"), id="partial-year"),
    pytest.param([egfr(48, "2024-03")], dict(value=48, date="2024-03-01"), id="partial-month"),
    pytest.param([egfr(49, "2025-05-01T09:00:00")], dict(value=49, date="2025-05-01"),
                 id="no-timezone-utc"),
    pytest.param([egfr(50, "2025-05-31T23:30:00-05:00")], dict(value=50, date="2025-05-31"),
                 id="local-date-kept"),
    pytest.param([egfr(51, None)],
                 dict(value=None, status="missing",
                      exact_notes=["no usable result", "1 undated result excluded"]),
                 id="undated"),
    pytest.param([egfr(52, "2024-13-45")],
                 dict(value=None, status="missing", notes=["1 undated result excluded"]),
                 id="invalid-date-is-undated"),
    pytest.param([egfr_dated(53, effectiveDateTime="2024-13-45", issued="2025-01-01T00:00:00Z")],
                 dict(value=53, date="2025-01-01"), id="invalid-effective-falls-back-to-issued"),
    pytest.param([egfr(54, "2023-05-31")],
                 dict(value=None, status="missing",
                      notes=["1 result before the 730-day window not used"]),
                 id="outside-lookback"),
    pytest.param([egfr(55, "2023-06-03"), egfr(56, "2023-05-01")],
                 dict(value=55, n=1, exact_notes=[]), id="window-edge"),
    pytest.param([egfr(57, "2025-01-01T00:00:00Z", id="a"),
                  egfr(58, "2025-01-01T00:00:00Z", id="b")],
                 dict(value=58, source="Observation/b", n=2), id="same-instant-larger-id-wins"),
    pytest.param([egfr(58, "2025-01-01T00:00:00Z", id="b"),
                  egfr(57, "2025-01-01T00:00:00Z", id="a")],
                 dict(value=58, source="Observation/b", n=2),
                 id="same-instant-larger-id-wins-whatever-the-order"),
    pytest.param([egfr(59, "2025-01-01T01:00:00+01:00", id="z"),
                  egfr(60, "2025-01-01T00:30:00Z", id="a")],
                 dict(value=60, source="Observation/a"), id="ordered-by-instant-not-text"),
]


@pytest.mark.parametrize(("resources", "expected"), DATE_ROWS)
def test_dates(resources, expected):
    check(run("egfr", resources), **expected)


def test_naive_now_is_utc():
    # 12:10Z is past the 5-minute skew only if the naive 12:00 is read as UTC.
    resources = [egfr(40, "2025-06-01T11:59:00Z"), egfr(41, "2025-06-01T12:10:00Z")]
    check(run("egfr", resources, now=datetime(2025, 6, 1, 12, 0)), value=40)


# ---------------------------------------------------------------------------------------------
# Units, conversions, plausibility


UNIT_ROWS = [
    pytest.param("egfr", [obs("33914-3", valueQuantity={"value": 40, "unit": u})],
                 dict(value=40, exact_notes=[]), id="egfr-unit-" + re.sub(r"\W+", "_", u))
    for u in ("mL/min/1.73m2", "mL/min/{1.73_m2}", "ml/min/1.73 m2", "mL/min/1.73m²",
              "ML/MIN/1.73M2")
] + [
    pytest.param("creatinine", [creat(88.42, unit)],
                 dict(value=1.0, exact_notes=[f"converted from {unit}"]), id=f"creatinine-{name}")
    for name, unit in (("micro-sign", "µmol/L"), ("greek-mu", "μmol/L"), ("ascii", "umol/L"))
] + [
    pytest.param("uacr", [obs("9318-7", valueQuantity=q(3, "mg/mmol"))],
                 dict(value=26.52, notes=["converted from mg/mmol"]), id="uacr-mg-per-mmol"),
    pytest.param("hba1c", [obs("4548-4", valueQuantity=q(53, "mmol/mol"))],
                 dict(value=53 * 0.09148 + 2.152), id="hba1c-ifcc-to-ngsp"),
    pytest.param("hba1c", [obs("4548-4", valueQuantity=q(7.1, "%"))], dict(value=7.1),
                 id="hba1c-canonical"),
    pytest.param("creatinine", [obs("2160-0", valueQuantity={
        "value": 1.2, "unit": "mg/dl (serum)", "system": UCUM, "code": "mg/dL"})],
                 dict(value=1.2, exact_notes=[]),
                 id="ucum-code-preferred-over-text"),
    pytest.param("creatinine", [obs("2160-0", valueQuantity={
        "value": 88.42, "unit": "mg/dL", "system": UCUM, "code": "umol/L"})],
                 dict(value=1.0, notes=["converted from umol/L"]),
                 id="ucum-code-wins-when-they-disagree"),
    pytest.param("creatinine", [obs("2160-0", valueQuantity={
        "value": 1.2, "unit": "mg/dL", "system": "http://example.org/u", "code": "MGDL"})],
                 dict(value=1.2),
                 id="non-ucum-code-ignored"),
    pytest.param("creatinine", [obs("2160-0", valueQuantity={"value": 1.2, "code": "mg/dL"})],
                 dict(value=1.2),
                 id="code-without-system-used-when-no-unit"),
    pytest.param("creatinine", [creat(1.2, None)],
                 dict(value=1.2, exact_notes=["unit missing; assumed mg/dL"]), id="unit-missing"),
    pytest.param("creatinine", [obs("2160-0", valueQuantity={"value": 1.2, "unit": "  "})],
                 dict(value=1.2, notes=["unit missing; assumed mg/dL"]), id="unit-blank"),
    pytest.param("creatinine", [creat(0.1, "mmol/L")],
                 dict(value=None, status="missing",
                      notes=["unit 'mmol/L' not convertible to mg/dL"]), id="unit-unknown"),
    pytest.param("creatinine", [creat(0.1, "mmol/L"), creat(0.2, "mmol/L", date="2025-01-01")],
                 dict(value=None, status="missing",
                      notes=["unit 'mmol/L' not convertible to mg/dL (2 results)"]),
                 id="unit-unknown-twice"),
    pytest.param("creatinine", [creat(150)],
                 dict(value=None, status="missing",
                      notes=["implausible value 150 mg/dL rejected (plausible 0.1-20)"]),
                 id="implausible"),
    pytest.param("creatinine", [creat(15000, "umol/L")],
                 dict(value=None, status="missing", notes=[
                     "implausible value 169.645 mg/dL rejected (plausible 0.1-20)"]),
                 id="implausible-after-conversion"),
    pytest.param("creatinine", [creat(1.0, "mg/dL", date="2025-04-01"), creat(150)],
                 dict(value=1.0, date="2025-04-01", n=1), id="implausible-newer-skipped"),
    pytest.param("egfr", [egfr(200)], dict(value=200), id="plausible-bound-inclusive"),
]


@pytest.mark.parametrize(("name", "resources", "expected"), UNIT_ROWS)
def test_units(name, resources, expected):
    check(run(name, resources), **expected)


# ---------------------------------------------------------------------------------------------
# Patient


PATIENT_ROWS = [
    pytest.param([patient(birthDate="1950-06-01", gender="male")], 75.0, 1.0, (),
                 id="birthday-today"),
    pytest.param([patient(birthDate="1950-06-02", gender="female")], 74.0, 0.0, (),
                 id="birthday-tomorrow"),
    pytest.param([patient(birthDate="1950", gender="male")], 75.0, 1.0,
                 ("birthDate 1950 partial; assumed 1950-01-01",), id="partial-year-birth"),
    pytest.param([patient(birthDate="1950-09", gender="male")], 74.0, 1.0,
                 ("birthDate 1950-09 partial; assumed 1950-09-01",), id="partial-month-birth"),
    pytest.param([patient(gender="male")], None, 1.0, ("birthDate missing",), id="no-birth-date"),
    pytest.param([patient(_birthDate={"extension": [{
        "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
        "valueCode": "unknown"}]}, gender="male")], None, 1.0, ("birthDate missing",),
                 id="birth-date-extension-only"),
    pytest.param([patient(birthDate="1950-02-30", gender="male")], None, 1.0,
                 ("birthDate '1950-02-30' unparseable",), id="impossible-birth-date"),
    pytest.param([patient(birthDate="2026-01-01", gender="male")], None, 1.0,
                 ("implausible age -1 from birthDate 2026-01-01",), id="birth-in-future"),
    pytest.param([patient(birthDate="1850-01-01", gender="male")], None, 1.0,
                 ("implausible age 175 from birthDate 1850-01-01",), id="implausibly-old"),
    pytest.param([patient(birthDate="1950-06-01T00:00:00Z", gender="male")], 75.0, 1.0, (),
                 id="birth-date-as-datetime"),
    pytest.param([patient(birthDate="1960-01-01", gender="other")], 65.0, None,
                 ("gender 'other' is neither male nor female",), id="gender-other"),
    pytest.param([patient(birthDate="1960-01-01", gender="unknown")], 65.0, None, (),
                 id="gender-unknown"),
    pytest.param([patient(birthDate="1960-01-01")], 65.0, None, ("gender missing",),
                 id="gender-missing"),
    pytest.param([patient(birthDate="1960-01-01", gender=["male"])], 65.0, None, (),
                 id="gender-not-a-string"),
    pytest.param([patient(birthDate="1960-01-01", gender="Male")], 65.0, 1.0, (),
                 id="gender-capitalised"),
    pytest.param([egfr(40)], None, None, ("no Patient resource",), id="no-patient"),
    pytest.param([patient(birthDate="1960-01-01", gender="female"),
                  patient(id="other", birthDate="1940-01-01", gender="male")], 65.0, 0.0, (),
                 id="first-patient-wins"),
    pytest.param([None, "Patient", patient(birthDate="1960-01-01", gender="female")], 65.0, 0.0,
                 (), id="junk-before-patient"),
]


@pytest.mark.parametrize(("resources", "age", "male", "notes"), PATIENT_ROWS)
def test_patient(resources, age, male, notes):
    vector = extract(SPECS, resources, now=NOW)
    for name, value in (("age", age), ("male", male)):
        fv = vector[name]
        if value is None:
            check(fv, value=None, status="missing", n=0, source=None)
            assert name in vector.missing_required
        else:
            check(fv, value=value, n=1, source="Patient/eRvWTq3.S2kkB0zl0tnjWmw3")
    all_notes = vector["age"].notes + vector["male"].notes
    for note in notes:
        assert note in all_notes


# ---------------------------------------------------------------------------------------------
# Duplicates


DUPLICATE_ROWS = [
    pytest.param("hba1c_tests", [obs("4548-4", id="a1c", valueQuantity=q(7.0, "%"))] * 2, 1.0,
                 id="same-id-twice"),
    pytest.param("hba1c_tests", [{"resourceType": "Bundle", "entry": [
        {"resource": obs("4548-4", id="a1c", valueQuantity=q(7.0, "%"))}]},
        obs("4548-4", id="a1c", valueQuantity=q(7.0, "%"))], 1.0,
                 id="same-id-in-bundle-and-outside"),
    pytest.param("hba1c_tests", [obs("4548-4", id="x", valueQuantity=q(7.0, "%")),
                                 obs("4548-4", id="y", valueQuantity=q(7.0, "%"))], 1.0,
                 id="same-instant-same-value"),
    pytest.param("hba1c_tests", [obs("4548-4", id="x", valueQuantity=q(7.0, "%")),
                                 obs("4548-4", id="y", valueQuantity=q(7.2, "%"))], 2.0,
                 id="same-instant-other-value"),
    pytest.param("hba1c_tests", [obs("4548-4", id="x", valueQuantity=q(7.0, "%")),
                                 obs("4548-4", id="y", valueQuantity=q(7.0, "%"),
                                     date="2025-02-01")], 2.0,
                 id="same-value-other-instant"),
    pytest.param("sbp", [obs("8480-6", id="x", valueQuantity=q(120, "mm[Hg]")),
                         obs("8480-6", id="y", valueQuantity=q(120, "mm[Hg]")),
                         obs("8480-6", id="z", valueQuantity=q(150, "mm[Hg]"),
                             date="2025-03-01")], 135.0, id="duplicate-not-double-weighted"),
    pytest.param("hypertension", [cond("I10", id="htn")] * 3, 1.0, id="condition-same-id"),
    pytest.param("hypertension", [cond("I10", id="htn-problem-list"),
                                  cond("I10", id="htn-encounter-dx")], 2.0,
                 id="conditions-distinct-ids"),
]


@pytest.mark.parametrize(("name", "resources", "value"), DUPLICATE_ROWS)
def test_duplicates(name, resources, value):
    check(run(name, resources), value=value)


# ---------------------------------------------------------------------------------------------
# Malformed at any depth: skipped, the good result beside it still counts


def broken(**changes):
    resource = creat(9.9, id="broken", date="2025-05-20")
    for path, value in changes.items():
        node = resource
        *parents, last = path.split("__")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return resource


GOOD = creat(1.1, id="good", date="2025-05-01")

MALFORMED_ROWS = [
    pytest.param(broken(code__coding="http://loinc.org|2160-0"), id="coding-is-a-string"),
    pytest.param(broken(code__coding__0__code=["2160-0"]), id="code-is-a-list"),
    pytest.param(broken(code__coding__0__code=None), id="code-is-null"),
    pytest.param(broken(code__coding__0__system=2160), id="system-is-a-number"),
    pytest.param(broken(code__coding__0="2160-0"), id="coding-entry-is-a-string"),
    pytest.param(broken(code__coding={"system": LOINC, "code": "2160-0"}), id="coding-is-a-dict"),
    pytest.param(broken(code="2160-0"), id="code-is-a-string"),
    pytest.param(broken(valueQuantity=9.9), id="value-quantity-is-a-number"),
    pytest.param(broken(valueQuantity=[q(9.9)]), id="value-quantity-is-a-list"),
    pytest.param(broken(valueQuantity__value={"value": 9.9}), id="value-is-a-dict"),
    pytest.param(broken(valueQuantity__value="9" * 5000), id="huge-string-value"),
    pytest.param(broken(valueQuantity__unit=["mg/dL"], valueQuantity__code=None,
                        valueQuantity__value=99.9), id="unit-is-a-list-then-implausible"),
    pytest.param(broken(valueQuantity__comparator=["<"]), id="comparator-is-a-list"),
    pytest.param(broken(effectiveDateTime="2024-13-45"), id="date-2024-13-45"),
    pytest.param(broken(effectiveDateTime=20250520), id="date-is-a-number"),
    pytest.param(broken(effectiveDateTime="x" * 100_000), id="date-huge-string"),
    pytest.param(broken(effectiveDateTime="9999-12-31T23:59:59-14:00"), id="date-overflows-utc"),
    pytest.param(broken(effectiveDateTime=None, effectivePeriod="2025-05-20"),
                 id="period-is-a-string"),
    pytest.param(broken(status="entered-in-error", dataAbsentReason=[1]),
                 id="excluded-and-junk"),
    pytest.param(broken(code__coding__0__code="2160-0" + " " * 1000), id="padded-huge-code"),
    pytest.param(None, id="resource-is-none"),
    pytest.param({"resourceType": "Bundle", "entry": [None, {"resource": None}, {}, "x",
                                                        {"resource": [GOOD]}]},
                 id="bundle-with-junk-entries"),
    pytest.param({"resourceType": "Bundle", "entry": {"resource": GOOD}},
                 id="bundle-entry-is-a-dict"),
    pytest.param({"resourceType": ["Observation"], "code": GOOD["code"]}, id="type-is-a-list"),
    pytest.param({"code": GOOD["code"], "valueQuantity": q(9.9)}, id="no-resource-type"),
    pytest.param({"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]},
                 id="operation-outcome"),
]


@pytest.mark.parametrize("junk", MALFORMED_ROWS)
def test_malformed(junk):
    vector = extract(SPECS, [junk, GOOD], now=NOW, code_map=CODE_MAP)
    check(vector["creatinine"], value=1.1, source="Observation/good", n=1)
    assert vector["creatinine"].date == "2025-05-01"
    assert_consistent(SPECS, vector)


def test_not_iterable_resources():
    for resources in (None, 42, "Observation", b"{}"):
        vector = extract(SPECS, resources, now=NOW)
        assert vector.missing_required == ("age", "male", "egfr", "creatinine")
        assert_consistent(SPECS, vector)


def test_a_single_bundle_instead_of_a_list():
    vector = extract(SPECS, {"resourceType": "Bundle", "entry": [{"resource": GOOD}]}, now=NOW)
    check(vector["creatinine"], value=1.1)


# ---------------------------------------------------------------------------------------------
# Aggregations

SERIES = [egfr(50, "2023-07-01", id="e1"), egfr(45, "2024-01-01", id="e2"),
          egfr(41, "2024-07-01", id="e3"), egfr(38, "2025-01-01", id="e4"),
          egfr(35, "2025-05-01", id="e5"), egfr(35, "2024-10-01", id="e6")]


def variant(aggregation, *, missing="required", lookback=1095) -> FeatureSpec:
    raw = {**MANIFEST[2], "name": f"egfr_{aggregation}", "aggregation": aggregation,
           "lookback_days": lookback, "missing": missing}
    if aggregation in ("count", "exists"):
        for key in ("unit", "plausible", "missing"):
            raw.pop(key)
    return parse_features([raw], allow_unfitted=True)[0]


def ols_per_year(points):
    """Reference slope (numpy least squares) per 365.25-day year; naive times are UTC."""
    def years(text):
        when = datetime.fromisoformat(text)
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        return (when - datetime(2023, 1, 1, tzinfo=UTC)).total_seconds() / (365.25 * 86400)
    return float(np.polyfit([years(d) for d, _ in points], [v for _, v in points], 1)[0])


AGGREGATION_ROWS = [
    pytest.param("latest", SERIES, dict(value=35, date="2025-05-01", source="Observation/e5", n=6),
                 id="latest"),
    pytest.param("min", SERIES, dict(value=35, date="2025-05-01", source="Observation/e5"),
                 id="min-ties-latest"),
    pytest.param("max", SERIES, dict(value=50, date="2023-07-01", source="Observation/e1"),
                 id="max"),
    pytest.param("mean", SERIES, dict(value=(50 + 45 + 41 + 38 + 35 + 35) / 6, date="2025-05-01",
                                      source=None, n=6), id="mean"),
    pytest.param("count", SERIES, dict(value=6.0, date="2025-05-01", n=6), id="count"),
    pytest.param("exists", SERIES, dict(value=1.0, n=6), id="exists"),
    pytest.param("exists", [], dict(value=0.0, n=0, date=None), id="exists-nothing"),
    pytest.param("count", [egfr(40, "2020-01-01")],
                 dict(value=0.0, notes=["1 result before the 1095-day window not used"]),
                 id="count-outside-window-is-zero"),
    pytest.param("slope", SERIES,
                 dict(value=ols_per_year([("2023-07-01", 50), ("2024-01-01", 45),
                                          ("2024-07-01", 41), ("2024-10-01", 35),
                                          ("2025-01-01", 38), ("2025-05-01", 35)]),
                      date="2025-05-01", source=None, n=6), id="slope"),
    pytest.param("slope", [egfr(40, "2025-01-01"), egfr(38, "2025-03-01")],
                 dict(value=None, status="missing",
                      notes=["slope needs ≥2 results spanning ≥90 days; have 2 results over "
                             "59 days"]), id="slope-span-too-short"),
    pytest.param("slope", [egfr(40, "2025-01-01")],
                 dict(value=None, status="missing", n=1), id="slope-one-result"),
    pytest.param("slope", [egfr(40, "2024-01-01"), egfr(40, "2025-01-01")],
                 dict(value=0.0), id="slope-flat"),
]


@pytest.mark.parametrize(("aggregation", "resources", "expected"), AGGREGATION_ROWS)
def test_aggregations(aggregation, resources, expected):
    spec = variant(aggregation)
    check(extract([spec], resources, now=NOW)[spec.name], **expected)


def test_slope_sign_and_units_per_year():
    spec = variant("slope")
    value = extract([spec], [egfr(60, "2023-06-01"), egfr(50, "2024-06-01"),
                             egfr(40, "2025-06-01")], now=NOW)[spec.name].value
    assert value == pytest.approx(-10 * 365.25 / 365.5, rel=1e-3)


def test_mean_uses_only_the_window():
    spec = variant("mean", lookback=365)
    check(extract([spec], SERIES, now=NOW)[spec.name], value=(41 + 38 + 35 + 35) / 4, n=4)


# ---------------------------------------------------------------------------------------------
# Missing policies


MISSING_ROWS = [
    pytest.param("required", dict(value=None, status="missing", required=True), True,
                 id="required"),
    pytest.param({"impute": 30.5}, dict(value=30.5, status="imputed", observed=None,
                                        notes=["imputed 30.5"]), False, id="impute"),
    pytest.param({"impute": "median"}, dict(value=None, status="missing",
                                            notes=["imputation value not fitted"]), False,
                 id="median-unfitted"),
    pytest.param({"impute": 41.25, "fit": "median"}, dict(value=41.25, status="imputed"), False,
                 id="median-fitted"),
]


@pytest.mark.parametrize(("missing", "expected", "blocks"), MISSING_ROWS)
def test_missing_policy(missing, expected, blocks):
    spec = variant("latest", missing=missing)
    vector = extract([spec], [egfr(40, "2019-01-01")], now=NOW)
    check(vector[spec.name], **expected)
    assert vector.missing_required == ((spec.name,) if blocks else ())
    assert (spec.name in vector.missing) == (expected["status"] == "missing")
    assert (spec.name in vector.imputed) == (expected["status"] == "imputed")
    row = vector.row()
    assert math.isnan(row[0]) if expected["value"] is None else row[0] == expected["value"]


def test_observed_value_is_not_imputed():
    spec = variant("latest", missing={"impute": 30.5})
    check(extract([spec], [egfr(40)], now=NOW)[spec.name], value=40, observed=40.0,
          required=False)


# ---------------------------------------------------------------------------------------------
# A whole Epic-shaped searchset


def test_epic_searchset_bundle():
    bundle = json.loads((DATA / "epic-ckd-searchset.json").read_text(encoding="utf-8"))
    vector = extract(SPECS, [bundle], now=NOW, code_map=CODE_MAP)
    check(vector["age"], value=69, source="Patient/eRvWTq3.S2kkB0zl0tnjWmw3")
    check(vector["male"], value=0.0)
    check(vector["egfr"], value=38, date="2025-05-12", source="Observation/eGFR-2025-05.Ukx3",
          n=3, exact_notes=["1 entered-in-error result excluded",
                            "1 future-dated result ignored"])
    check(vector["egfr_slope"], value=ols_per_year([("2023-11-20", 60),
                                                    ("2024-05-10T09:30:00-05:00", 44),
                                                    ("2025-05-12T14:05:00Z", 38)]), n=3,
          notes=["reported as >60; used 60"])
    assert -14 < vector["egfr_slope"].value < -13  # mL/min/1.73 m² lost per year
    check(vector["creatinine"], value=132.6 * 0.011309658, notes=["converted from µmol/L"])
    check(vector["uacr"], value=35 * 8.84, date="2025-04-02")
    check(vector["hba1c"], value=64 * 0.09148 + 2.152)
    check(vector["sbp"], value=(148 + 136) / 2, n=2)
    check(vector["dbp"], value=86, notes=["no value (dataAbsentReason error)"])
    check(vector["hba1c_tests"], value=1.0)
    check(vector["diabetes"], value=1.0, n=1, date="2011-01-01")
    check(vector["hypertension"], value=0.0, notes=["1 resolved condition not counted"])
    assert vector.missing == () and vector.imputed == () and vector.missing_required == ()
    out = vector.to_dict()
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert [f["name"] for f in out["features"]] == [s.name for s in SPECS]
    # Without the site's code map, Epic's local creatinine code is unknown.
    check(extract(SPECS, [bundle], now=NOW)["creatinine"], value=None, status="missing")


def test_condition_window_and_dates():
    spec = parse_features([{"name": "recent_dm", "source": MANIFEST[10]["source"],
                            "lookback_days": 365}])[0]
    rows = [
        ([cond("E11.9", onsetDateTime="2025-01-01")], 1.0, ()),
        ([cond("E11.9", onsetDateTime="2020-01-01")], 0.0,
         ("1 condition before the 365-day window not used",)),
        ([cond("E11.9", recordedDate=None)], 0.0, ("1 undated condition excluded",)),
        ([cond("E11.9", onsetPeriod={"start": "2025-02-01"})], 1.0, ()),
        ([cond("E11.9", recordedDate="2025-07-01")], 0.0, ("1 future-dated condition ignored",)),
        ([cond("E11.9", onsetDateTime="2024-12-01", recordedDate="2026-01-01")], 0.0, ()),
    ]
    for resources, value, notes in rows:
        check(extract([spec], resources, now=NOW)[spec.name], value=value, notes=notes)
    # Without a window an undated condition still counts: nothing to window it against.
    check(run("diabetes", [cond("E11.9", recordedDate=None)]), value=1.0)


# ---------------------------------------------------------------------------------------------
# Specifications


def test_manifest_round_trips():
    again = parse_features([s.to_dict() for s in SPECS])
    assert again == SPECS
    assert yaml.safe_load(yaml.safe_dump([s.to_dict() for s in SPECS])) == \
        [s.to_dict() for s in SPECS]
    assert pickle.loads(pickle.dumps(SPECS)) == SPECS  # noqa: S301 - our own bytes
    assert len({hash(s) for s in SPECS}) == len(SPECS)


def test_parsed_specs_are_normalised():
    spec = parse_features([{"name": "dm", "source": {"resource": "Condition", "codes": [
        "urn:oid:2.16.840.1.113883.6.90|e11.*", "http://snomed.info/sct/|44054006"]}}])[0]
    assert spec.codes == ("http://hl7.org/fhir/sid/icd-10-cm|E11*",
                          "http://snomed.info/sct|44054006")
    assert spec.aggregation == "exists" and spec.missing == MissingPolicy("impute", 0.0)
    assert SPEC["egfr"].aggregation == "latest" and SPEC["egfr"].plausible == (1.0, 200.0)
    assert SPEC["hba1c"].conversions == {"mmol/mol": (0.09148, 2.152)}
    assert SPEC["uacr"].conversions == {"mg/mmol": (8.84, 0.0)}
    assert SPEC["age"].aggregation == "value" and SPEC["age"].missing.strategy == "required"
    assert SPEC["egfr_slope"].missing == MissingPolicy("impute", -1.5, "median")
    assert SPEC["egfr"].description == "latest eGFR" and SPEC["age"].description == ""


def test_unfitted_median_needs_allow_unfitted():
    raw = [{**MANIFEST[2], "missing": {"impute": "median"}}]
    with pytest.raises(FeatureSpecError, match=r"^features\[0\]\.missing\.impute: 'median' "
                                                r"must be fitted by training"):
        parse_features(raw)
    spec = parse_features(raw, allow_unfitted=True)[0]
    assert spec.missing == MissingPolicy("impute", None, "median")
    assert parse_features([spec.to_dict()], allow_unfitted=True) == (spec,)


def test_counting_features_are_never_missing():
    raw = {"name": "n", "source": {"resource": "Condition", "codes": ["http://snomed.info/sct|1"]},
           "aggregation": "count", "missing": "required"}
    assert parse_features([raw])[0].missing == MissingPolicy("impute", 0.0)


EGFR = MANIFEST[2]


def bad(**changes):
    raw = copy.deepcopy(EGFR)
    for key, value in changes.items():
        if value is ...:
            raw.pop(key)
        else:
            raw[key] = value
    return [raw]


UMOL = r"features\[0\]\.conversions\['umol/L'\]"
BAD_SPECS = [
    pytest.param({"name": "egfr"}, r"features: must be a list", id="not-a-list"),
    pytest.param("egfr", r"features: must be a list", id="a-string"),
    pytest.param(None, r"features: must be a list", id="null"),
    pytest.param(["egfr"], r"features\[0\]: must be a mapping", id="item-not-a-mapping"),
    pytest.param(bad(colour="red"), r"features\[0\]\.colour: unknown key", id="unknown-key"),
    pytest.param(bad(name=...), r"features\[0\]\.name: required", id="no-name"),
    pytest.param(bad(name="eGFR"), r"features\[0\]\.name: required, matching", id="name-case"),
    pytest.param(bad(name="1egfr"), r"features\[0\]\.name:", id="name-digit"),
    pytest.param(bad(name="e-gfr"), r"features\[0\]\.name:", id="name-dash"),
    pytest.param(bad() + bad(), r"features\[1\]\.name: duplicate of features\[0\]\.name",
                 id="duplicate-name"),
    pytest.param(bad(description=3), r"features\[0\]\.description: must be a string",
                 id="description-type"),
    pytest.param(bad(source=...), r"features\[0\]\.source: required mapping", id="no-source"),
    pytest.param(bad(source={"resource": "Observation", "codes": ["http://loinc.org|1"],
                             "system": "x"}),
                 r"features\[0\]\.source\.system: unknown key", id="source-unknown-key"),
    pytest.param(bad(source={"resource": "Procedure", "codes": ["http://loinc.org|1"]}),
                 r"features\[0\]\.source\.resource: must be one of", id="bad-resource"),
    pytest.param(bad(source={"resource": "Observation"}),
                 r"features\[0\]\.source\.codes: required", id="no-codes"),
    pytest.param(bad(source={"resource": "Observation", "codes": []}),
                 r"features\[0\]\.source\.codes: required", id="empty-codes"),
    pytest.param(bad(source={"resource": "Observation", "codes": "http://loinc.org|1"}),
                 r"features\[0\]\.source\.codes: required", id="codes-a-string"),
    pytest.param(bad(source={"resource": "Observation", "codes": ["http://loinc.org|1", "2160-0"]}),
                 r'features\[0\]\.source\.codes\[1\]: must be a "system\|code" string',
                 id="code-without-system"),
    pytest.param(bad(source={"resource": "Observation", "codes": ["http://loinc.org|"]}),
                 r"features\[0\]\.source\.codes\[0\]: must be \"system\|code\" with a non-empty",
                 id="empty-code"),
    pytest.param(bad(source={"resource": "Observation", "codes": ["|2160-0"]}),
                 r"features\[0\]\.source\.codes\[0\]:", id="empty-system"),
    pytest.param(bad(source={"resource": "Observation", "codes": [2160]}),
                 r"features\[0\]\.source\.codes\[0\]:", id="code-a-number"),
    pytest.param(bad(source={"resource": "Observation", "codes": ["http://loinc.org|2*0"]}),
                 r"features\[0\]\.source\.codes\[0\]: '\*' is only allowed at the end",
                 id="star-inside"),
    pytest.param(bad(source={"resource": "Observation", "codes": ["http://loinc.org|*"]}),
                 r"features\[0\]\.source\.codes\[0\]: a wildcard needs", id="star-alone"),
    pytest.param(bad(source={"resource": "Condition", "codes": [
        "http://hl7.org/fhir/sid/icd-10-cm|E11.9", "http://hl7.org/fhir/sid/icd-10-cm|E119"]}),
                 r"features\[0\]\.source\.codes\[1\]: duplicate of", id="duplicate-code"),
    pytest.param(bad(source={"resource": "Observation", "codes": ["http://loinc.org|1"],
                             "attribute": "age"}),
                 r"features\[0\]\.source\.attribute: only for Patient", id="attribute-on-obs"),
    pytest.param([{"name": "age", "source": {"resource": "Patient", "attribute": "height"}}],
                 r"features\[0\]\.source\.attribute: must be one of age, male",
                 id="bad-attribute"),
    pytest.param([{"name": "age", "source": {"resource": "Patient", "attribute": "age",
                                             "codes": ["http://loinc.org|1"]}}],
                 r"features\[0\]\.source\.codes: not used by Patient", id="codes-on-patient"),
    pytest.param([{"name": "age", "source": {"resource": "Patient", "attribute": "age"},
                   "lookback_days": 30}],
                 r"features\[0\]\.lookback_days: not used by Patient", id="lookback-on-patient"),
    pytest.param([{"name": "age", "source": {"resource": "Patient", "attribute": "age"},
                   "aggregation": "latest"}],
                 r"features\[0\]\.aggregation: must be one of value for Patient",
                 id="patient-aggregation"),
    pytest.param(bad(aggregation="median"),
                 r"features\[0\]\.aggregation: must be one of latest, min, max, mean, count, "
                 r"exists, slope for Observation", id="bad-aggregation"),
    pytest.param([{"name": "dm", "source": {"resource": "Condition",
                                            "codes": ["http://snomed.info/sct|1"]},
                   "aggregation": "latest"}],
                 r"features\[0\]\.aggregation: must be one of exists, count for Condition",
                 id="condition-aggregation"),
    pytest.param(bad(lookback_days=0), r"features\[0\]\.lookback_days: must be an integer",
                 id="lookback-zero"),
    pytest.param(bad(lookback_days=-5), r"features\[0\]\.lookback_days:", id="lookback-negative"),
    pytest.param(bad(lookback_days=1.5), r"features\[0\]\.lookback_days:", id="lookback-float"),
    pytest.param(bad(lookback_days=True), r"features\[0\]\.lookback_days:", id="lookback-bool"),
    pytest.param(bad(lookback_days="730"), r"features\[0\]\.lookback_days:",
                 id="lookback-string"),
    pytest.param(bad(lookback_days=10**9), r"features\[0\]\.lookback_days:", id="lookback-huge"),
    pytest.param(bad(unit=...), r"features\[0\]\.unit: required for latest", id="no-unit"),
    pytest.param(bad(unit=" "), r"features\[0\]\.unit: required", id="blank-unit"),
    pytest.param([{"name": "dm", "source": {"resource": "Condition",
                                            "codes": ["http://snomed.info/sct|1"]},
                   "unit": "1"}],
                 r"features\[0\]\.unit: only for numeric Observation", id="unit-on-condition"),
    pytest.param(bad(aggregation="count"), r"features\[0\]\.unit: only for numeric",
                 id="unit-on-count"),
    pytest.param(bad(conversions=[8.84]), r"features\[0\]\.conversions: must be a mapping",
                 id="conversions-list"),
    pytest.param(bad(conversions={"ml/min/1.73 m2": 1}),
                 r"features\[0\]\.conversions\['ml/min/1.73 m2'\]: same unit as the canonical",
                 id="conversion-of-canonical-unit"),
    pytest.param(bad(conversions={"umol/L": 1, "µmol/L": 1}),
                 r"features\[0\]\.conversions\['µmol/L'\]: same unit as 'umol/L'",
                 id="conversion-duplicate-unit"),
    pytest.param(bad(conversions={"umol/L": 0}), UMOL + r": factor must be",
                 id="conversion-zero"),
    pytest.param(bad(conversions={"umol/L": -1}), UMOL + r": factor", id="conversion-negative"),
    pytest.param(bad(conversions={"umol/L": "0.0113"}), UMOL + r": must be a",
                 id="conversion-string"),
    pytest.param(bad(conversions={"umol/L": True}), UMOL + r": must be a", id="conversion-bool"),
    pytest.param(bad(conversions={"umol/L": float("inf")}), UMOL + r":", id="conversion-inf"),
    pytest.param(bad(conversions={"umol/L": {"factor": 1, "scale": 2}}),
                 UMOL + r"\.scale: unknown key", id="conversion-unknown-key"),
    pytest.param(bad(conversions={"umol/L": {"offset": 2}}), UMOL + r": factor must be",
                 id="conversion-no-factor"),
    pytest.param(bad(conversions={"umol/L": {"factor": 1, "offset": "2"}}),
                 UMOL + r"\.offset: must be a finite", id="conversion-offset"),
    pytest.param(bad(conversions={"": 1}), r"features\[0\]\.conversions\[''\]: a unit must be",
                 id="conversion-empty-unit"),
    pytest.param(bad(plausible=[200, 1]), r"features\[0\]\.plausible: must be \[low, high\]",
                 id="plausible-reversed"),
    pytest.param(bad(plausible=[1, 1]), r"features\[0\]\.plausible:", id="plausible-equal"),
    pytest.param(bad(plausible=[1]), r"features\[0\]\.plausible:", id="plausible-one"),
    pytest.param(bad(plausible=[1, "200"]), r"features\[0\]\.plausible:", id="plausible-string"),
    pytest.param(bad(plausible=[float("nan"), 1]), r"features\[0\]\.plausible:",
                 id="plausible-nan"),
    pytest.param(bad(missing="optional"), r"features\[0\]\.missing: must be 'required' or",
                 id="missing-word"),
    pytest.param(bad(missing={"impute": "30"}),
                 r"features\[0\]\.missing\.impute: must be a finite number", id="impute-string"),
    pytest.param(bad(missing={"impute": None}), r"features\[0\]\.missing\.impute:",
                 id="impute-null"),
    pytest.param(bad(missing={"impute": float("nan")}), r"features\[0\]\.missing\.impute:",
                 id="impute-nan"),
    pytest.param(bad(missing={"impute": 1, "by": "x"}), r"features\[0\]\.missing\.by: unknown",
                 id="missing-unknown-key"),
    pytest.param(bad(missing={"impute": 1, "fit": "mean"}),
                 r"features\[0\]\.missing\.fit: must be 'median'", id="fit-mean"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_SPECS)
def test_bad_specs(raw, message):
    with pytest.raises(FeatureSpecError, match="^" + message):
        parse_features(raw)


def test_error_path_prefix():
    with pytest.raises(FeatureSpecError, match=r"^models/x\.yaml: features\[0\]\.name:"):
        parse_features(bad(name="X"), "models/x.yaml: features")


def test_code_map():
    assert CODE_MAP == {
        (EPIC_COMPONENT, "1526"): ((LOINC, "2160-0"),),
        (EPIC_COMPONENT, "4418"): ((LOINC, "33914-3"), (LOINC, "62238-1")),
    }
    merged = parse_code_map([
        {"from": "urn:oid:9.9|A", "to": "urn:oid:2.16.840.1.113883.6.1|2160-0"},
        {"from": "urn:oid:9.9|A", "to": ["http://loinc.org/|2160-0", "http://loinc.org|38483-4"]},
        {"from": "urn:oid:9.9|E", "to": "urn:oid:2.16.840.1.113883.6.90|e11.9"},
    ])
    assert merged == {("urn:oid:9.9", "A"): ((LOINC, "2160-0"), (LOINC, "38483-4")),
                      ("urn:oid:9.9", "E"): ((ICD10CM, "E119"),)}
    assert parse_code_map([]) == {} and parse_code_map(None) == {}
    assert pickle.loads(pickle.dumps(merged)) == merged  # noqa: S301 - our own bytes


BAD_CODE_MAPS = [
    pytest.param({"from": "a|1", "to": "b|2"}, r"code_mappings: must be a list", id="a-mapping"),
    pytest.param(["a|1"], r"code_mappings\[0\]: must be a mapping", id="item-a-string"),
    pytest.param([{"from": "a|1"}], r"code_mappings\[0\]\.to: required", id="no-to"),
    pytest.param([{"to": "b|2"}], r'code_mappings\[0\]\.from: must be a "system\|code"',
                 id="no-from"),
    pytest.param([{"from": "a|1", "to": []}], r"code_mappings\[0\]\.to: required", id="to-empty"),
    pytest.param([{"from": "a|1", "to": ["b|2", "c"]}], r"code_mappings\[0\]\.to\[1\]:",
                 id="to-item-bad"),
    pytest.param([{"from": "a|", "to": "b|2"}], r"code_mappings\[0\]\.from:", id="from-no-code"),
    pytest.param([{"from": "a|1*", "to": "b|2"}], r"code_mappings\[0\]\.from: wildcards",
                 id="from-wildcard"),
    pytest.param([{"from": "a|1", "to": "b|2", "note": "x"}],
                 r"code_mappings\[0\]\.note: unknown key", id="unknown-key"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_CODE_MAPS)
def test_bad_code_maps(raw, message):
    with pytest.raises(FeatureSpecError, match="^" + message):
        parse_code_map(raw)


# ---------------------------------------------------------------------------------------------
# flatten, group_by_patient, FeatureVector


def test_flatten():
    a, b, c = egfr(1, id="a"), creat(1, id="b"), cond("E11", id="c")
    nested = {"resourceType": "Bundle", "entry": [
        {"resource": a},
        {"resource": {"resourceType": "Bundle", "entry": [{"resource": b}, {"search": {}}]}},
        {"resource": {"resourceType": "OperationOutcome"}}, None, {"resource": "x"}]}
    assert list(flatten([nested, c, 7, None, {"no": "type"}])) == [a, b, c]
    assert list(flatten(nested)) == [a, b]
    assert list(flatten(None)) == [] and list(flatten("Bundle")) == []
    # Prefetch values: a resource, a searchset, or a list of search results; None for "no data".
    assert list(flatten([{"resourceType": "Patient", "id": "p"}, [a, (b,)], None, nested])) == [
        {"resourceType": "Patient", "id": "p"}, a, b, a, b]
    deep = a
    for _ in range(40):
        deep = {"resourceType": "Bundle", "entry": [{"resource": deep}]}
    assert list(flatten([deep])) == []  # nesting capped; real bundles nest one or two levels


def test_group_by_patient():
    p1, p2 = {"resourceType": "Patient", "id": "p1"}, {"resourceType": "Patient", "id": "p.2-x"}
    o1 = obs("1", subject={"reference": "Patient/p1"})
    o2 = obs("1", subject={"reference": "https://fhir.epic.example/api/FHIR/R4/Patient/p.2-x"})
    o3 = obs("1", subject={"reference": "Patient/p1/_history/3"})
    a1 = {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p1"}}
    orphans = [obs("1", subject={"reference": "Group/g"}), obs("1", subject=None),
               obs("1", subject={"reference": ["Patient/p1"]}), {"resourceType": "Patient"},
               obs("1", subject={"reference": "urn:uuid:9b1c"}), "junk"]
    groups = group_by_patient([p1, o1, o2, *orphans, p2, o3, a1])
    assert groups == {"p1": [p1, o1, o3, a1], "p.2-x": [o2, p2]}


def test_feature_vector_api():
    vector = extract(SPECS, [patient(birthDate="1960-01-01", gender="female"), egfr(40)],
                     now=NOW)
    assert vector.names == tuple(s.name for s in SPECS)
    row = vector.row()
    assert len(row) == len(SPECS) and all(isinstance(x, float) for x in row)
    assert row[:3] == [65.0, 0.0, 40.0]
    assert math.isnan(row[4])  # creatinine: required, missing
    assert row[5] == 10.0  # uacr imputed
    assert vector.missing == ("creatinine",)
    assert vector.missing_required == ("creatinine",)
    assert vector.imputed == ("egfr_slope", "uacr", "hba1c", "sbp", "dbp")
    with pytest.raises(KeyError):
        vector["nope"]
    out = vector.to_dict()
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert out["missing_required"] == ["creatinine"]
    assert out["features"][2] == {
        "name": "egfr", "value": 40.0, "status": "observed", "observed": 40.0,
        "unit": "mL/min/{1.73_m2}", "date": "2025-05-01", "source": vector["egfr"].source,
        "n": 1, "notes": [], "required": True, "comparator": None}


def test_empty_specs():
    assert extract((), [egfr(40)], now=NOW) == FeatureVector(())


def test_now_must_be_a_datetime():
    with pytest.raises(TypeError):
        extract(SPECS, [], now="2025-06-01")


def test_hand_built_spec():
    spec = FeatureSpec(name="creat", resource="Observation", attribute=None,
                       codes=["http://loinc.org|2160-0"], aggregation="latest",
                       lookback_days=None, unit="mg/dL", conversions={"µmol/L": 1 / 88.42},
                       plausible=[0.1, 20], missing=MissingPolicy("required", None))
    assert spec.codes == ("http://loinc.org|2160-0",) and spec.plausible == (0.1, 20.0)
    assert spec.conversions == {"µmol/L": (1 / 88.42, 0.0)}
    hash(spec)
    check(extract([spec], [creat(88.42, "umol/L")], now=NOW)["creat"], value=1.0)
    assert parse_features([spec.to_dict()]) == (spec,)


# ---------------------------------------------------------------------------------------------
# Speed and the compile cache


def test_compiled_once_per_spec_tuple():
    assert engine._compiled(SPECS) is engine._compiled(tuple(SPECS))
    assert engine._compiled(parse_features(MANIFEST)) is engine._compiled(SPECS)


def test_thousand_observations_in_milliseconds():
    codes = ["33914-3", "2160-0", "9318-7", "4548-4", "8480-6", "8462-4", "1234-5"]
    resources = [patient(birthDate="1960-01-01", gender="male")]
    for i in range(1000):
        code = codes[i % len(codes)]
        resources.append(obs(code, id=f"o{i}", date=f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}",
                             codings=[{"system": EPIC_COMPONENT, "code": str(i)},
                                      {"system": LOINC, "code": code}],
                             valueQuantity=q(1.0 + i % 50, "mg/dL")))
    bundle = {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}
    extract(SPECS, [bundle], now=NOW, code_map=CODE_MAP)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        vector = extract(SPECS, [bundle], now=NOW, code_map=CODE_MAP)
        best = min(best, time.perf_counter() - start)
    assert vector["hba1c_tests"].value > 0 and vector["creatinine"].status == "observed"
    assert best < 0.05, f"{best * 1000:.1f} ms"


# ---------------------------------------------------------------------------------------------
# Properties: damaged and random data never raise, and statuses stay consistent


def assert_consistent(specs, vector: FeatureVector) -> None:
    assert isinstance(vector, FeatureVector)
    assert [v.name for v in vector.values] == [s.name for s in specs]
    for spec, v in zip(specs, vector.values, strict=True):
        assert v.status in ("observed", "imputed", "missing")
        assert isinstance(v.n, int) and v.n >= 0
        assert all(isinstance(note, str) for note in v.notes)
        assert v.date is None or re.fullmatch(r"\d{4}-\d{2}-\d{2}", v.date)
        assert v.required == (spec.missing.strategy == "required")
        if v.status == "observed":
            assert v.value is not None and math.isfinite(v.value) and v.value == v.observed
            if spec.plausible is not None and spec.aggregation != "slope":  # slope: per year
                assert spec.plausible[0] <= v.value <= spec.plausible[1]
        elif v.status == "imputed":
            assert v.observed is None and spec.missing.value is not None
            assert v.value == spec.missing.value
        else:
            assert v.value is None and v.observed is None
        if spec.aggregation in ("count", "exists"):
            assert v.status == "observed"
            assert v.value == (float(v.n) if spec.aggregation == "count" else float(v.n > 0))
        if spec.attribute == "age" and v.status == "observed":
            assert v.value.is_integer() and 0 <= v.value <= 130
        if spec.attribute == "male" and v.status == "observed":
            assert v.value in (0.0, 1.0)
    row = vector.row()
    assert len(row) == len(specs)
    json.dumps(vector.to_dict(), allow_nan=False)


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])

TRICKY = st.sampled_from([
    "", " ", "NaN", "inf", "-inf", "1,5", ">60", "<=0.2", "≥ 90", "45 mL/min/1.73m2", "1e999",
    "2024-13-45", "2024", "2024-03", "2025-06-01T12:00:01Z", "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00+14:00", "x" * 5000, "entered-in-error", "cancelled", "refuted",
    "resolved", "µmol/L", "mmol/mol", "mg/mmol", "urn:oid:2.16.840.1.113883.6.1",
    "http://loinc.org", "2160-0", "E11.9", "Patient/eRvWTq3.S2kkB0zl0tnjWmw3", "Bundle",
    "Observation", "Condition", "Patient", "male", "female", "<", ">", "ad", 10**400, -(10**400),
    2**63, True, False, None, 0, -1, 1e308, -1e308, 5e-324,
])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), TRICKY)
KEYS = st.one_of(st.text(max_size=8), st.sampled_from([
    "resourceType", "id", "status", "code", "coding", "system", "code", "valueQuantity",
    "value", "unit", "comparator", "valueString", "valueInteger", "component", "entry",
    "resource", "effectiveDateTime", "effectivePeriod", "start", "issued", "dataAbsentReason",
    "birthDate", "gender", "clinicalStatus", "verificationStatus", "onsetDateTime",
    "recordedDate", "subject", "reference"]))
JSON = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=4)), max_leaves=16)
DATES = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).flatmap(
        lambda d: st.sampled_from(["", "Z", "+14:00", "-14:00", "+05:30"]).map(
            lambda tz: d.isoformat() + tz)),
    st.dates().map(str), st.integers(0, 9999).map(lambda y: f"{y:04d}"), st.text(max_size=12))
STATUSES = st.sampled_from(["final", "amended", "corrected", "preliminary", "registered",
                            "entered-in-error", "cancelled", "unknown", "", "FINAL"]) | SCALARS


def _walk(draw, root):
    """A random (parent, key) inside root, or (None, None) for the root itself."""
    parent, key, node = None, None, root
    while isinstance(node, dict | list) and node and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(node, key=str))) if isinstance(node, dict) \
            else draw(st.integers(0, len(node) - 1))
        parent, node = node, node[key]
    return parent, key


@st.composite
def damaged(draw, resource):
    resource = copy.deepcopy(resource)
    for _ in range(draw(st.integers(1, 6))):
        parent, key = _walk(draw, resource)
        action = draw(st.sampled_from(["delete", "replace", "status", "date", "wrap", "stringify"]))
        if parent is None:
            if action == "replace":
                resource = draw(JSON)
            continue
        if action == "delete":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(JSON)
        elif action == "status":
            parent[key] = draw(STATUSES)
        elif action == "date":
            parent[key] = draw(DATES)
        elif action == "wrap":
            parent[key] = [parent[key]]
        else:
            parent[key] = str(parent[key])
    return resource


VALID = [
    patient(birthDate="1956-03-02", gender="female"),
    egfr(38, "2025-05-12T14:05:00Z", id="v-egfr-1"),
    egfr(44, "2024-05-10", id="v-egfr-2"),
    obs("33914-3", id="v-egfr-3", date="2023-11-20", valueString=">60"),
    obs("1526", system=EPIC_COMPONENT, id="v-creat", valueQuantity=q("132.6", "µmol/L")),
    obs("9318-7", id="v-uacr", valueQuantity=q(35, "mg/mmol")),
    obs("4548-4", id="v-a1c", valueQuantity=q(64, "mmol/mol")),
    bp_panel(comp("8480-6", 148), comp("8462-4", 86), id="v-bp-1"),
    bp_panel(comp("8480-6", 136), comp("8462-4", dataAbsentReason=DAR), id="v-bp-2",
             date="2025-01-08"),
    cond("E11.22", id="v-dm"),
    cond("I10", id="v-htn", clinical="resolved"),
    cond("I12.9", id="v-htn-2", onsetPeriod={"start": "2019-04"}),
]


@PROPERTY_SETTINGS
@given(st.lists(st.sampled_from(VALID).flatmap(damaged), max_size=12))
def test_damaged_resources_never_raise(resources):
    vector = extract(SPECS, resources, now=NOW, code_map=CODE_MAP)
    assert_consistent(SPECS, vector)


@PROPERTY_SETTINGS
@given(damaged({"resourceType": "Bundle", "type": "searchset",
                "entry": [{"resource": r} for r in VALID]}))
def test_damaged_bundle_never_raises(bundle):
    vector = extract(SPECS, [bundle], now=NOW, code_map=CODE_MAP)
    assert_consistent(SPECS, vector)
    assert isinstance(group_by_patient([bundle]), dict)


RANDOM_RESOURCE = st.one_of(JSON, st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Observation", "Condition", "Patient", "Bundle"])},
    optional={"id": SCALARS, "status": STATUSES, "code": JSON, "component": JSON,
              "valueQuantity": JSON, "valueString": SCALARS, "effectiveDateTime": DATES,
              "effectivePeriod": JSON, "issued": DATES, "entry": JSON, "birthDate": DATES,
              "gender": SCALARS, "clinicalStatus": JSON, "onsetDateTime": DATES,
              "recordedDate": DATES, "subject": JSON, "dataAbsentReason": JSON}))


@PROPERTY_SETTINGS
@given(st.lists(RANDOM_RESOURCE, max_size=8))
def test_random_json_never_raises(resources):
    vector = extract(SPECS, resources, now=NOW, code_map=CODE_MAP)
    assert_consistent(SPECS, vector)
    groups = group_by_patient(resources)
    assert all(isinstance(k, str) and v for k, v in groups.items())


BASELINE = extract(SPECS, VALID, now=NOW, code_map=CODE_MAP)


@PROPERTY_SETTINGS
@given(st.permutations(VALID))
def test_order_does_not_matter(resources):
    assert extract(SPECS, resources, now=NOW, code_map=CODE_MAP) == BASELINE


def test_baseline_values():
    assert BASELINE.row()[:10] == pytest.approx([
        69.0, 0.0, 38.0, BASELINE["egfr_slope"].value, 132.6 * 0.011309658, 309.4,
        64 * 0.09148 + 2.152, 142.0, 86.0, 1.0])
    assert BASELINE["egfr_slope"].status == "observed"
    assert BASELINE["diabetes"].value == 1.0 and BASELINE["hypertension"].value == 1.0


SPEC_KEYS = st.sampled_from(["name", "description", "source", "aggregation", "lookback_days",
                             "unit", "conversions", "molar_mass", "plausible", "missing",
                             "resource", "codes",
                             "attribute", "impute", "fit", "factor", "offset"])
SPEC_JSON = st.recursive(SCALARS | st.sampled_from(["Observation", "latest", "required", "median",
                                                    "http://loinc.org|2160-0", "mg/dL", "age"]),
                         lambda children: st.lists(children, max_size=3)
                         | st.dictionaries(SPEC_KEYS | st.text(max_size=4), children, max_size=5),
                         max_leaves=20)


@PROPERTY_SETTINGS
@given(st.one_of(SPEC_JSON, st.lists(st.sampled_from(MANIFEST).flatmap(damaged), max_size=3)))
def test_bad_specs_raise_only_feature_spec_error(raw):
    for allow in (False, True):
        try:
            specs = parse_features(raw, allow_unfitted=allow)
        except FeatureSpecError as exc:
            assert re.match(r"features(\[\d+\])?[.:\[]", str(exc)), str(exc)
            continue
        assert parse_features([s.to_dict() for s in specs], allow_unfitted=allow) == specs


@PROPERTY_SETTINGS
@given(SPEC_JSON)
def test_bad_code_maps_raise_only_feature_spec_error(raw):
    try:
        code_map = parse_code_map(raw)
    except FeatureSpecError as exc:
        assert str(exc).startswith("code_mappings")
    else:
        assert all(isinstance(k, tuple) and len(k) == 2 for k in code_map)


def test_feature_value_fields_match_the_interface():
    assert [f.name for f in dataclasses.fields(FeatureValue)][:9] == [
        "name", "value", "status", "observed", "unit", "date", "source", "n", "notes"]
    assert [f.name for f in dataclasses.fields(FeatureSpec)] == [
        "name", "resource", "attribute", "codes", "aggregation", "lookback_days", "unit",
        "conversions", "plausible", "missing", "description", "molar_mass"]
