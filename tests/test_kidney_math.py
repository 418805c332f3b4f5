"""CKD-EPI 2021 and KDIGO categories against published definitions, and `assess` (what a chart
says about kidney function)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hooks._kidney import (
    a_category,
    assess,
    below,
    ckd_epi_2021,
    cockcroft_gault,
    g_category,
)


@pytest.mark.parametrize(
    ("scr", "age", "female", "expected"),
    [
        # Worked by hand from Inker 2021 (Scr/κ above 1 → only the -1.200 term applies):
        # 142 × (1.0/0.9)^-1.2 × 0.9938^60 = 142 × 0.88123 × 0.68835 = 86.1
        (1.0, 60, False, 86.1),
        # 142 × (1.0/0.7)^-1.2 × 0.9938^60 × 1.012 = 142 × 0.65181 × 0.68835 × 1.012 = 64.5
        (1.0, 60, True, 64.5),
        # Scr/κ below 1 → only the α term:
        # 142 × (0.6/0.7)^-0.241 × 0.9938^40 × 1.012 = 142 × 1.03785 × 0.77975 × 1.012 = 116.3
        (0.6, 40, True, 116.3),
        # Advanced CKD: 142 × (3.2/0.9)^-1.2 × 0.9938^72 = 142 × 0.21824 × 0.63906 = 19.8
        (3.2, 72, False, 19.8),
    ],
    ids=["60M-1.0", "60F-1.0", "40F-0.6", "72M-3.2"],
)
def test_ckd_epi_2021(scr, age, female, expected):
    assert ckd_epi_2021(scr, age, female) == pytest.approx(expected, abs=0.1)


@pytest.mark.parametrize(("scr", "age"), [(0, 60), (-1, 60), (1.0, 17), (1.0, 121)])
def test_ckd_epi_2021_outside_its_domain_is_none(scr, age):
    assert ckd_epi_2021(scr, age, female=False) is None


@pytest.mark.parametrize(("egfr", "category"), [
    (120, "G1"), (90, "G1"), (89.9, "G2"), (60, "G2"), (59, "G3a"), (45, "G3a"), (44.9, "G3b"),
    (30, "G3b"), (29, "G4"), (15, "G4"), (14.9, "G5"), (0, "G5"), (-3, "G5"),
])
def test_g_categories(egfr, category):
    assert g_category(egfr)[0] == category


@pytest.mark.parametrize(("uacr", "category"), [
    (0, "A1"), (29.9, "A1"), (30, "A2"), (300, "A2"), (300.1, "A3"), (5000, "A3"),
])
def test_a_categories(uacr, category):
    assert a_category(uacr)[0] == category


# --- assess: what a chart says about kidney function ----------------------------------------
NOW = datetime(2026, 11, 21, 12, tzinfo=UTC)


def obs(loinc: str, value, unit: str, when: str = "2026-09-14", **extra) -> dict:
    return {"resourceType": "Observation", "id": f"{loinc}-{when}", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": unit}, **extra}


def patient(gender="male", birth="1962-05-01") -> dict:
    return {"resourceType": "Patient", "id": "p", "gender": gender, "birthDate": birth}


def test_the_newest_kidney_function_wins_reported_or_calculated():
    # The laboratory's eGFR of 2026-09-14 is older than the creatinine of 2026-10-01: the
    # creatinine's CKD-EPI 2021 value is the current kidney function.
    # Male, 64 at 2026-10-01: 142 × (3.0/0.9)^-1.2 × 0.9938^64 = 142 × 0.23575 × 0.67141 = 22.5.
    status = assess([patient(), obs("98979-8", 41.6, "mL/min/1.73m2"),
                     obs("2160-0", 3.0, "mg/dL", "2026-10-01")], now=NOW)
    assert (status.egfr, status.egfr_date) == (22, "2026-10-01")
    assert status.egfr_text() == "calculated eGFR 22"
    # A reported eGFR newer than the creatinine wins; on the same day the laboratory's does.
    status = assess([patient(), obs("98979-8", 41.6, "mL/min/1.73m2", "2026-10-01"),
                     obs("2160-0", 3.0, "mg/dL", "2026-10-01")], now=NOW)
    assert (status.egfr, status.calculated_from) == (42, None)
    assert status.g == ("G3b", "moderately to severely decreased")


def test_a_reported_egfr_from_14_months_ago_does_not_outweigh_yesterdays_creatinine():
    # 72 reported 2025-09-21; creatinine 3.4 mg/dL yesterday, male 60:
    # 142 × (3.4/0.9)^-1.2 × 0.9938^60 = 142 × 0.20291 × 0.68854 = 19.8 → 20 (G4).
    status = assess([patient(birth="1966-05-01"), obs("33914-3", 72, "mL/min/1.73m2",
                                                      "2025-09-21"),
                     obs("2160-0", 3.4, "mg/dL", "2026-11-20")], now=NOW)
    assert (status.egfr, status.g[0]) == (20, "G4")


def test_egfr_calculated_from_creatinine_in_umol_per_litre_and_handed_to_the_model():
    # 186 µmol/L = 2.104 mg/dL; male, 64 at NOW: 142 × (2.104/0.9)^-1.2 × 0.9938^64 = 34.
    status = assess([patient(), obs("14682-9", "186", "µmol/L")], now=NOW)
    assert status.egfr == 34 and status.egfr_date == "2026-09-14"
    assert status.egfr_text() == "calculated eGFR 34"
    assert status.creatinine_text() == "creatinine 2.10 mg/dL (converted from µmol/L)"
    [derived] = status.extra_resources
    assert derived["code"]["coding"][0]["code"] == "98979-8"
    assert derived["valueQuantity"]["value"] == 34


@pytest.mark.parametrize("gender", ["unknown", "other", None])
def test_sex_not_male_or_female_uses_the_lower_of_both_equations(gender):
    # Creatinine 2.0 mg/dL at 60 (2026-09-14: the patient born 1966-05-01 is 60):
    # female 142 × (2.0/0.7)^-1.2 × 0.9938^60 × 1.012 = 142 × 0.28373 × 0.68854 × 1.012 = 28.1;
    # male 142 × (2.0/0.9)^-1.2 × 0.9938^60 = 142 × 0.38358 × 0.68854 = 37.5. The lower: 28.
    person = patient(birth="1966-05-01")
    if gender is None:
        del person["gender"]
    else:
        person["gender"] = gender
    status = assess([person, obs("2160-0", 2.0, "mg/dL")], now=NOW)
    assert status.egfr == 28 and status.g[0] == "G4"
    assert "lower of the two" in status.latest.sex_basis


@pytest.mark.parametrize(("resources", "note"), [
    ([{"resourceType": "Patient", "id": "p", "gender": "female"}], "age not recorded"),
    ([], "age not recorded"),
    ([patient(birth="2012-01-01")], "CKD-EPI 2021 is for adults"),
])
def test_no_egfr_when_creatinine_cannot_be_used_and_the_reason_is_kept(resources, note):
    status = assess([*resources, obs("2160-0", 2.0, "mg/dL")], now=NOW)
    assert status.egfr is None
    assert note in status.notes[0]


def test_urine_acr_category_and_recency():
    status = assess([obs("14959-1", 51, "mg/mmol", "2026-03-01"),
                     obs("9318-7", 20, "mg/g", "2025-06-01")], now=NOW)
    assert round(status.uacr.value) == 451 and status.a[0] == "A3"
    assert status.uacr_last_12_months == 1
    old = assess([obs("9318-7", 20, "mg/g", "2025-06-01")], now=NOW)
    assert old.a[0] == "A1" and old.uacr_last_12_months == 0
    assert not assess([], now=NOW).has_data


# --- bounds, Cockcroft-Gault, acute change, where the risk equation applies -----------------

@pytest.mark.parametrize(("value", "comparator", "category"), [
    (15, "<", "G5"),        # "<15" is below 15: G5, not G4
    (15, "<=", "G4"),       # "≤15" may be 15: only what is certain, G4 at worst 15
    (60, ">", "G1-G2"),     # ">60": G2 or G1, not "60"
    (90, ">=", "G1"),
    (28, None, "G4"),
])
def test_g_category_of_a_bound(value, comparator, category):
    assert g_category(value, comparator)[0] == category


@pytest.mark.parametrize(("value", "comparator", "limit", "expected"), [
    (15, "<", 15, True), (15, "<", 30, True), (60, ">", 60, False), (60, ">", 90, False),
    (29, None, 30, True), (30, None, 30, False), (30, "<=", 30, False), (29, "<=", 30, True),
])
def test_below_is_what_a_bound_proves(value, comparator, limit, expected):
    assert below(value, comparator, limit) is expected


@pytest.mark.parametrize(("scr", "age", "kg", "female", "expected"), [
    # Cockcroft & Gault 1976: (140 - age) × weight / (72 × Scr) [× 0.85 female]
    (1.8, 70, 70, False, 37.8),    # 70 × 70 / 129.6
    (1.8, 70, 70, True, 32.1),     # × 0.85
    (1.0, 40, 72, False, 100.0),   # 100 × 72 / 72
])
def test_cockcroft_gault(scr, age, kg, female, expected):
    assert cockcroft_gault(scr, age, kg, female) == pytest.approx(expected, abs=0.05)


def test_comparators_are_kept_as_bounds_to_the_status():
    bound = obs("33914-3", 15, "mL/min/1.73m2")
    bound["valueQuantity"]["comparator"] = "<"
    status = assess([patient(), bound], now=NOW)
    assert status.egfr_text() == "eGFR < 15" and status.g[0] == "G5"
    assert status.egfr_below(15) and not status.extra_resources  # no bound for the model
    assert "bound" in " ".join(status.risk_exclusions())
    high = assess([patient(), obs("33914-3", ">60", None)], now=NOW)
    assert high.egfr_text() == "eGFR > 60" and not high.egfr_below(60)
    assert "eGFR below 60" in " ".join(high.risk_exclusions())


def test_a_fall_of_35_percent_within_90_days_is_acute_not_ckd():
    # KDIGO 2012 acute kidney disease: GFR down ≥ 35% within 3 months. 85 → 24 in 18 days.
    status = assess([patient(), obs("98979-8", 85, "mL/min/1.73m2", "2026-10-27"),
                     obs("98979-8", 24, "mL/min/1.73m2", "2026-11-14")], now=NOW)
    assert status.acute == "eGFR 24 on 2026-11-14, down 72% from 85 on 2026-10-27, 18 days earlier"
    assert any("acutely" in why for why in status.risk_exclusions())
    # 50 → 40 is a 20% fall: not acute.
    assert assess([patient(), obs("98979-8", 50, "mL/min/1.73m2", "2026-10-27"),
                   obs("98979-8", 40, "mL/min/1.73m2", "2026-11-14")], now=NOW).acute is None


@pytest.mark.parametrize(("first", "second", "hours", "acute"), [
    (1.0, 1.3, 24, True),    # KDIGO 2012 rec. 2.1.1: +0.3 mg/dL within 48 h
    (1.0, 1.25, 24, False),
    (1.0, 1.3, 72, False),   # +0.3 but over 72 h, and less than 1.5 ×
    # 1.5 × within 7 days (0.7 → 1.05 mg/dL keeps the eGFR above 60, so the fall is not also
    # acute kidney disease by eGFR: 103 → 79 at 64, male).
    (0.7, 1.05, 120, True),
    (0.7, 1.05, 24 * 9, False),
])
def test_creatinine_rises_meeting_kdigo_aki(first, second, hours, acute):
    from datetime import timedelta
    later = NOW - timedelta(hours=2)
    earlier = later - timedelta(hours=hours)
    chart = [patient(), obs("2160-0", first, "mg/dL", earlier.isoformat()),
             obs("2160-0", second, "mg/dL", later.isoformat())]
    assert (assess(chart, now=NOW).acute is not None) is acute


def test_risk_equation_population():
    def exclusions(*extra, **kw):
        chart = [kw.get("person", patient()), obs("98979-8", 40, "mL/min/1.73m2"),
                 obs("9318-7", 400, "mg/g"), *extra]
        return assess(chart, now=NOW).risk_exclusions()

    def problem(code):
        return {"resourceType": "Condition", "id": code, "code": {"coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}]},
            "clinicalStatus": {"coding": [{"code": "active"}]}, "recordedDate": "2026-01-05"}

    assert exclusions() == ()
    assert exclusions(person=patient(birth="2016-03-01")) == ("it is validated in adults only",)
    assert exclusions(problem("Z99.2")) == ("the patient is on dialysis",)
    assert exclusions(problem("Z94.0")) == ("the patient has a kidney transplant",)
    assert exclusions(problem("Z33.1")) == ("it is not validated in pregnancy",)


# --- how a card names model inputs -----------------------------------------------------------

def test_model_factors_are_named_for_clinicians_and_zero_effects_are_not_listed():
    from types import SimpleNamespace

    from cds_service.models.explain import Contribution
    from hooks.kidney_risk import _model_text

    prediction = SimpleNamespace(
        model_id="m", model_version="1", output="risk_5y", score=0.24,
        secondary={"risk_2y": 0.08}, imputed=("egfr_slope", "sbp", "hba1c"),
        features=SimpleNamespace(missing_required=()),
        top=lambda n: (Contribution("egfr", 27.0, 1.2), Contribution("egfr_slope", -3.4, 0.4),
                       Contribution("diabetes", 0.0, 0.0)))
    text = _model_text(prediction)
    assert text == (
        "**Kidney failure risk 8% at 2 years, 24% at 5 years** (model m 1). Main factors: "
        "eGFR 27 raises it; yearly change in eGFR -3.4 mL/min/1.73 m² per year raises it. "
        "Not on record, so a typical value was used: yearly change in eGFR, mean systolic blood "
        "pressure, HbA1c.")
