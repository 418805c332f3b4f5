"""Prescribing rules (hooks/data/prescribing_rules.yaml): loading, and each rule's threshold as
its source states it. Expected indicators are written from the source named in each row."""

from __future__ import annotations

import pytest
import yaml

from hooks._kidney import assess
from hooks._medications import Medication
from hooks._prescribing import DATA_FILE, RULES, Patient, evaluate, load_rules
from tests.helpers.charts import NOW, obs, patient


def medication(*ingredients: str, route: str | None = "oral") -> Medication:
    return Medication(frozenset(ingredients), route, "test", None)


def patient_with(*chart, risk=None, active=(), drafts=()) -> Patient:
    return Patient(status=assess(list(chart), now=NOW), now=NOW, risk_indicator=risk,
                   active=tuple(active), drafts=tuple(drafts))


def findings(drug: Medication, who: Patient) -> list[tuple[str, str]]:
    return [(f.rule.topic.code, f.rule.indicator) for f in evaluate(drug, who)]


def egfr(value: float, age: int = 60) -> Patient:
    return patient_with(patient(age=age), obs("33914-3", value, "mL/min/{1.73_m2}"))


# --- the shipped file ------------------------------------------------------------------------

def test_every_rule_cites_a_source_and_reference_and_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "clinical.md").read_text("utf-8")
    assert RULES
    for rule in RULES:
        assert rule.source.citation and rule.reference, rule.id
        assert rule.id in doc, f"{rule.id} is not in docs/clinical.md"
        assert rule.topic.code.isalnum()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["rules"][0].pop("indicator"), "indicator"),
    (lambda d: d["rules"][0].update(indicator="severe"), "indicator"),
    (lambda d: d["rules"][0]["when"].update(egfr_belwo=30), "egfr_belwo"),
    (lambda d: d["rules"][0].update(drugs=["ibuprofenn"]), "ibuprofenn"),
    (lambda d: d["rules"][0].update(source="nowhere"), "nowhere"),
    (lambda d: d["rules"][1].update(id=d["rules"][0]["id"]), "used twice"),
    (lambda d: d["groups"]["nsaid"]["ingredients"].append("unobtainium"), "unobtainium"),
    (lambda d: d["rules"][0].update(alternative="unobtainium"), "unobtainium"),
])
def test_a_bad_edit_of_the_rules_is_refused_naming_the_key(tmp_path, edit, message):
    data = yaml.safe_load(DATA_FILE.read_text("utf-8"))
    edit(data)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_rules(path)
    assert str(path) in str(info.value)


# --- NSAIDs: KDIGO 2024 ---------------------------------------------------------------------

@pytest.mark.parametrize(("value", "risk", "expected"), [
    (24, None, [("nsaidckd", "critical")]),      # avoid below 30
    (29, None, [("nsaidckd", "critical")]),
    (30, None, [("nsaidckd", "warning")]),       # no prolonged use below 60
    (59, None, [("nsaidckd", "warning")]),
    (60, None, []),
    (75, "warning", [("nsaidckd", "warning")]),  # high model risk alone
    (75, "info", []),
])
def test_nsaid_by_egfr_and_risk(value, risk, expected):
    who = patient_with(patient(), obs("33914-3", value, "mL/min/{1.73_m2}"), risk=risk)
    assert findings(medication("naproxen"), who) == expected


@pytest.mark.parametrize("ingredient", [
    "ibuprofen", "naproxen", "ketorolac", "diclofenac", "celecoxib", "indomethacin", "meloxicam",
    "etodolac", "piroxicam", "sulindac", "oxaprozin", "diflunisal", "ketoprofen", "nabumetone",
    "flurbiprofen", "fenoprofen", "meclofenamate", "tolmetin",
])
def test_every_systemic_nsaid_is_covered(ingredient):
    assert findings(medication(ingredient), egfr(22)) == [("nsaidckd", "critical")]


@pytest.mark.parametrize("route", ["topical", "ophthalmic", "otic"])
def test_local_routes_are_not_systemic_exposure(route):
    assert findings(medication("diclofenac", route=route), egfr(22)) == []


@pytest.mark.parametrize("route", ["oral", "injectable", "rectal", "nasal", None])
def test_systemic_and_unknown_routes_alert(route):
    assert findings(medication("ketorolac", route=route), egfr(22)) == [("nsaidckd", "critical")]


def test_aspirin_is_not_an_nsaid_here():
    # Low-dose aspirin is continued in CKD (docs/clinical.md, choices).
    assert findings(medication("aspirin"), egfr(22)) == []


# --- metformin: FDA labeling, KDIGO 2022 ------------------------------------------------------

@pytest.mark.parametrize(("value", "taking", "expected"), [
    (25, False, [("metforminckd", "critical")]),   # contraindicated below 30
    (25, True, [("metforminckd", "critical")]),
    (40, False, [("metforminckd", "warning")]),    # do not start at 30-45
    (40, True, [("metforminckd", "info")]),        # continuing at 30-44: review the dose
    (44, True, [("metforminckd", "info")]),
    (45, False, []), (70, False, []),
])
def test_metformin(value, taking, expected):
    active = [medication("metformin")] if taking else []
    who = patient_with(patient(), obs("33914-3", value, "mL/min/{1.73_m2}"), active=active)
    assert findings(medication("metformin", "sitagliptin"), who) == expected


# --- the triple combination: Lapi 2013 -------------------------------------------------------

def test_triple_combination_needs_both_other_classes():
    ace, diuretic = medication("lisinopril"), medication("furosemide")
    who = patient_with(patient(), obs("33914-3", 80, "mL/min/{1.73_m2}"),
                       active=[ace, diuretic])
    assert findings(medication("ibuprofen"), who) == [("nsaidtriple", "warning")]
    only_ace = patient_with(patient(), obs("33914-3", 80, "mL/min/{1.73_m2}"), active=[ace])
    assert findings(medication("ibuprofen"), only_ace) == []
    # Ordering the diuretic that completes the combination raises it too.
    nsaid = medication("naproxen")
    who = patient_with(patient(), active=[nsaid, ace])
    assert ("nsaidtriple", "warning") in findings(medication("hydrochlorothiazide"), who)


# --- AGS Beers Criteria 2023, kidney table: Cockcroft-Gault ----------------------------------

def beers_patient(age: int, creatinine: float, kg: float | None, gender="male") -> Patient:
    chart = [patient(gender=gender, age=age), obs("2160-0", creatinine, "mg/dL")]
    if kg is not None:
        chart.append(obs("29463-7", kg, "kg"))
    return patient_with(*chart)


@pytest.mark.parametrize(("drug", "age", "scr", "kg", "expected"), [
    # (140 - 80) × 60 / (72 × 1.5) = 33.3 mL/min: below 50, not below 30.
    ("famotidine", 80, 1.5, 60, "info"),          # reduce dose below 50
    ("ciprofloxacin", 80, 1.5, 60, None),         # only below 30
    # (140 - 85) × 50 / (72 × 1.6) = 23.9 mL/min
    ("ciprofloxacin", 85, 1.6, 50, "info"),
    ("spironolactone", 85, 1.6, 50, "warning"),   # avoid below 30
    ("amiloride", 85, 1.6, 50, "warning"),
    ("gabapentin", 64, 1.6, 50, None),            # Beers applies from 65
])
def test_beers_kidney_table(drug, age, scr, kg, expected):
    found = [f for f in evaluate(medication(drug), beers_patient(age, scr, kg))
             if f.rule.source.label.startswith("AGS Beers")]
    assert [f.rule.indicator for f in found] == ([expected] if expected else [])
