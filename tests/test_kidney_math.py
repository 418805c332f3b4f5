"""CKD-EPI 2021 and KDIGO categories against published definitions, and `assess` (what a chart
says about kidney function)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hooks._kidney import a_category, assess, ckd_epi_2021, g_category


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


def test_reported_egfr_wins_over_creatinine():
    status = assess([patient(), obs("98979-8", 41.6, "mL/min/1.73m2"),
                     obs("2160-0", 3.0, "mg/dL", "2026-10-01")], now=NOW)
    assert (status.egfr, status.egfr_date, status.calculated_from) == (42, "2026-09-14", None)
    assert status.g == ("G3b", "moderately to severely decreased")
    assert status.egfr_text() == "eGFR 42"


def test_egfr_calculated_from_creatinine_in_umol_per_litre_and_handed_to_the_model():
    # 186 µmol/L = 2.104 mg/dL; male, 64 at NOW: 142 × (2.104/0.9)^-1.2 × 0.9938^64 = 34.
    status = assess([patient(), obs("14682-9", "186", "µmol/L")], now=NOW)
    assert status.egfr == 34 and status.egfr_date == "2026-09-14"
    assert status.egfr_text() == "calculated eGFR 34"
    assert status.creatinine_text() == "creatinine 2.10 mg/dL (converted from µmol/L)"
    [derived] = status.extra_resources
    assert derived["code"]["coding"][0]["code"] == "98979-8"
    assert derived["valueQuantity"]["value"] == 34


@pytest.mark.parametrize(("resources", "note"), [
    ([patient(gender="unknown")], "sex not recorded"),
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
