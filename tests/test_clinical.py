"""Clinical scenarios on realistic charts, one per class of problem a clinical review found
(missed alerts, misleading cards). Each expectation is written by hand from the source cited
beside it (docs/clinical.md), never from the program's output."""

from __future__ import annotations

import pytest

from hooks import SERVICES
from tests.helpers.charts import (
    ICD10CM,
    NOW,
    call,
    condition,
    day,
    obs,
    order,
    patient,
    request,
)

RISK = "kidney-risk"
ORDERS = "nephrotoxic-order-check"
EGFR = "mL/min/{1.73_m2}"


@pytest.fixture
def client(make_app):
    from tests.helpers.golden import GOLDEN_SITE

    return make_app(SERVICES=SERVICES, CLOCK=lambda: NOW, SITE_YAML=GOLDEN_SITE).test_client()


def order_cards(client, chart, *drafts, hook="order-select"):
    return call(client, ORDERS, request(hook, chart, list(drafts)))


def risk_cards(client, chart):
    return call(client, RISK, request("patient-view", chart))


def topics(cards):
    return [(c["source"]["topic"]["code"], c["indicator"]) for c in cards]


# --- drugs by product code and name --------------------------------------------------------
# KDIGO 2024 and FDA metformin labeling (docs/clinical.md, "Prescribing rules"): NSAIDs are
# avoided at eGFR < 30 (critical); metformin is contraindicated at eGFR < 30 (critical).

@pytest.mark.parametrize(("text", "topic"), [
    ("JANUMET 50-1000 MG PO TABS", "metforminckd"),       # sitagliptin + metformin
    ("SYNJARDY 12.5-1000 MG PO TABS", "metforminckd"),    # empagliflozin + metformin
    ("DUEXIS 800-26.6 MG PO TABS", "nsaidckd"),           # ibuprofen + famotidine
    ("ketoprofen 75 MG Oral Capsule", "nsaidckd"),
    ("NABUMETONE 500 MG PO TABS", "nsaidckd"),
    ("etodolac 400 mg tablet", "nsaidckd"),
])
def test_combination_and_less_common_products_by_name_alert_at_egfr_below_30(client, text,
                                                                            topic):
    chart = [patient(), obs("33914-3", 22, EGFR)]
    cards = order_cards(client, chart, order(text))
    assert (topic, "critical") in topics(cards), cards


def test_topical_and_eye_forms_are_not_systemic_exposure(client):
    chart = [patient(), obs("33914-3", 22, EGFR)]
    for text in ("DICLOFENAC SODIUM 1 % TD GEL", "KETOROLAC 0.5 % OP SOLN",
                 "Voltaren 1 % topical gel", "ketorolac tromethamine 0.5 % eye drops"):
        assert order_cards(client, chart, order(text)) == [], text
    # The same ingredient by mouth still alerts.
    assert topics(order_cards(client, chart, order("DICLOFENAC 75 MG PO TBEC"))) == [
        ("nsaidckd", "critical")]
    # An order whose route is coded topical (SNOMED CT 6064005) with an ingredient-only code.
    topical = {"coding": [{"system": "http://snomed.info/sct", "code": "6064005"}]}
    assert order_cards(client, chart, order(rxcui="3355", route=topical)) == []


# --- units, comparators, codes -------------------------------------------------------------

def test_urine_acr_in_annotated_ucum_units_counts(client):
    # UCUM writes the ACR unit mg/g{creat}: the annotation is dimensionless. 450 mg/g is A3 and
    # a KDIGO 2024 referral criterion (≥ 300 mg/g); eGFR 40 (G3b).
    chart = [patient(), obs("33914-3", 40, EGFR, 10), obs("9318-7", 450, "mg/g{creat}", 10)]
    [card] = risk_cards(client, chart)
    assert "urine ACR 450 mg/g" in card["summary"] or "urine ACR 450 mg/g" in card["detail"]
    assert "KDIGO A3" in card["detail"]
    assert "Refer to nephrology" in [s["label"] for s in card.get("suggestions", [])]


def test_molar_urine_acr_loinc_and_unit(client):
    # LOINC 14585-4 (albumin/creatinine, molar ratio) in mg/mmol: 40 mg/mmol × 8.84 = 354 mg/g.
    chart = [patient(), obs("33914-3", 40, EGFR, 10), obs("14585-4", 40, "mg/mmol", 10)]
    [card] = risk_cards(client, chart)
    assert "354 mg/g" in card["detail"] and "KDIGO A3" in card["detail"]


@pytest.mark.parametrize(("loinc", "value", "unit"), [
    ("69405-9", 22, EGFR), ("88293-6", 22, EGFR), ("88294-4", 22, EGFR),
    ("50044-7", 22, EGFR), ("77147-7", 22, EGFR), ("98980-6", 22, EGFR),
])
def test_every_egfr_code_family_counts(client, loinc, value, unit):
    cards = order_cards(client, [patient(), obs(loinc, value, unit)], order("ibuprofen 600 mg"))
    assert topics(cards) == [("nsaidckd", "critical")], loinc


def test_creatinine_in_blood_molar_code_is_used(client):
    # LOINC 59826-8 creatinine [moles/volume] in blood; 300 µmol/L = 3.39 mg/dL; male 64:
    # 142 × (3.39/0.9)^-1.2 × 0.9938^64 = 142 × 0.20372 × 0.67164 = 19.4 → 19.
    chart = [patient(age=64), obs("59826-8", 300, "umol/L", 1)]
    [card] = order_cards(client, chart, order("naproxen 500 mg tablet"))
    assert "calculated eGFR 19" in card["summary"] and card["indicator"] == "critical"


def test_egfr_reported_below_15_is_g5_not_g4(client):
    chart = [patient(), obs("33914-3", 15, EGFR, comparator="<")]
    [card] = risk_cards(client, chart)
    assert card["indicator"] == "critical" and "eGFR < 15" in card["summary"]
    assert "G5" in card["summary"] and "%" not in card["summary"]


def test_egfr_reported_above_60_is_no_number_for_the_risk_equation(client):
    # ">60" with urine ACR 50 mg/g (A2): no KDIGO referral criterion, G1-G2, no risk: no card.
    assert risk_cards(client, [patient(), obs("33914-3", ">60", None),
                               obs("9318-7", 50, "mg/g")]) == []


# --- the newest kidney function, sex ------------------------------------------------------

def test_old_reported_egfr_does_not_hide_yesterdays_creatinine(client):
    # eGFR 72 reported 14 months ago; creatinine 3.4 mg/dL yesterday, male 60: CKD-EPI 2021
    # 142 × (3.4/0.9)^-1.2 × 0.9938^60 = 19.8 → 20, below 30: NSAID critical (KDIGO 2024).
    chart = [patient(age=60), obs("33914-3", 72, EGFR, 425), obs("2160-0", 3.4, "mg/dL", 1)]
    [card] = order_cards(client, chart, order("ibuprofen 800 MG PO TABS"))
    assert card["indicator"] == "critical"
    assert f"calculated eGFR 20 on {day(1)}" in card["summary"]


@pytest.mark.parametrize("gender", ["other", "unknown", None])
def test_sex_other_or_unknown_acts_on_the_lower_equation(client, gender):
    # Creatinine 2.0 mg/dL at 60: female 28.1, male 37.5 (Inker 2021); the lower, 28, is < 30.
    chart = [patient(gender=gender, age=60), obs("2160-0", 2.0, "mg/dL", 2)]
    [card] = order_cards(client, chart, order("ibuprofen 400 mg tablet"))
    assert card["indicator"] == "critical" and "calculated eGFR 28" in card["summary"]
    assert "lower of the two" in card["detail"]


def test_future_dated_and_entered_in_error_results_are_ignored(client):
    chart = [patient(), obs("33914-3", 50, EGFR, 30),
             obs("33914-3", 20, EGFR, -3),                       # 3 days ahead of now
             obs("33914-3", 18, EGFR, 2, status="entered-in-error")]
    [card] = order_cards(client, chart, order("ibuprofen 400 mg tablet"))
    assert card["indicator"] == "warning" and "eGFR 50" in card["summary"]


# --- where the risk equation applies -------------------------------------------------------
# Tangri 2011/2016: adults with CKD G3-G5, not on dialysis, without a transplant.

def test_no_risk_percentage_for_a_child(client):
    chart = [patient(age=10), obs("33914-3", 40, EGFR), obs("9318-7", 400, "mg/g")]
    [card] = risk_cards(client, chart)
    assert "%" not in card["summary"] and "adults only" in card["detail"]


def test_no_card_for_a_patient_on_dialysis(client):
    chart = [patient(), obs("33914-3", 8, EGFR), obs("9318-7", 2000, "mg/g"),
             condition(ICD10CM, "Z99.2", "Dependence on renal dialysis")]
    assert risk_cards(client, chart) == []


def test_transplant_recipient_gets_no_percentage_and_no_referral(client):
    chart = [patient(), obs("33914-3", 25, EGFR), obs("9318-7", 400, "mg/g"),
             condition(ICD10CM, "Z94.0", "Kidney transplant status")]
    [card] = risk_cards(client, chart)
    assert "%" not in card["summary"] and "kidney transplant" in card["detail"]
    assert "Refer to nephrology" not in [s["label"] for s in card.get("suggestions", [])]


def test_pregnancy_gets_no_percentage(client):
    chart = [patient(gender="female", age=32), obs("33914-3", 40, EGFR),
             obs("9318-7", 400, "mg/g"), condition(ICD10CM, "Z33.1", "Pregnant state")]
    [card] = risk_cards(client, chart)
    assert "%" not in card["summary"] and "pregnancy" in card["detail"]


def test_an_acute_fall_is_not_labelled_ckd(client):
    # 85 → 24 in 18 days: a fall ≥ 35% within 3 months (KDIGO 2012 acute kidney disease).
    chart = [patient(), obs("33914-3", 85, EGFR, 20), obs("33914-3", 24, EGFR, 2),
             obs("9318-7", 100, "mg/g", 2)]
    [card] = risk_cards(client, chart)
    assert card["summary"] == (f"Acute fall in kidney function: eGFR 24 on {day(2)}, down 72% "
                               f"from 85 on {day(20)}, 18 days earlier")
    assert "CKD" not in card["summary"] and "risk not calculated" in card["detail"]
    assert "%" not in card["detail"].split("risk not calculated")[1].replace("72%", "")
    assert card["indicator"] == "warning"


def test_high_egfr_with_severe_albuminuria_refers_without_a_risk_of_0_percent(client):
    # eGFR 95 is outside KFRE's population (eGFR < 60); urine ACR 1500 mg/g is A3 and a KDIGO
    # 2024 referral criterion (≥ 300 mg/g).
    chart = [patient(), obs("33914-3", 95, EGFR), obs("9318-7", 1500, "mg/g")]
    [card] = risk_cards(client, chart)
    assert "%" not in card["summary"] and "G1A3" in card["summary"]
    assert "severely increased" in card["summary"] and card["indicator"] == "warning"
    assert "Refer to nephrology" in [s["label"] for s in card["suggestions"]]
    assert "eGFR below 60" in card["detail"]


# --- prescribing rules (hooks/data/prescribing_rules.yaml) --------------------------------

def test_nsaid_with_ace_inhibitor_and_diuretic_is_the_triple_combination(client):
    # Lapi 2013: an NSAID added to an ACE inhibitor or ARB plus a diuretic raised acute kidney
    # injury (rate ratio 1.31). eGFR 75: no eGFR rule, so only the combination card.
    chart = [patient(), obs("33914-3", 75, EGFR, 30),
             order("lisinopril 10 mg tablet", "29046", status="active"),
             order("furosemide 40 mg tablet", "4603", status="active")]
    cards = order_cards(client, chart, order("ibuprofen 600 MG PO TABS"))
    assert topics(cards) == [("nsaidtriple", "warning")]
    assert "lisinopril" in cards[0]["detail"] and "furosemide" in cards[0]["detail"]
    # The combination completed by a diuretic drafted in the same order session counts too.
    drafts = [order("ibuprofen 600 MG PO TABS"), order("hydrochlorothiazide 25 mg tablet")]
    chart = [patient(), obs("33914-3", 75, EGFR, 30),
             order("lisinopril 10 mg tablet", "29046", status="active")]
    cards = order_cards(client, chart, *drafts, hook="order-sign")
    assert sorted(topics(cards)) == [("nsaidtriple", "warning"), ("nsaidtriple", "warning")]


def test_nsaid_with_ckd_on_the_problem_list_and_no_kidney_function_in_a_year(client):
    chart = [patient(), condition(ICD10CM, "N18.31", "Chronic kidney disease, stage 3a"),
             obs("33914-3", 48, EGFR, 800)]                   # beyond the 2-year look-back
    cards = order_cards(client, chart, order("naproxen 500 mg tablet"))
    assert topics(cards) == [("nsaidckd", "warning")]
    assert cards[0]["summary"].startswith("Naproxen ordered with no kidney function on record")
    # An eGFR within 2 years but over a year old still counts (below 60: warning), and the card
    # says it is old.
    chart[-1] = obs("33914-3", 48, EGFR, 500)
    [card] = order_cards(client, chart, order("naproxen 500 mg tablet"))
    assert f"eGFR 48 on {day(500)}" in card["summary"] and "over a year old" in card["detail"]
    # Without CKD on the problem list there is nothing to go on: no card.
    assert order_cards(client, [patient()], order("naproxen 500 mg tablet")) == []


def test_beers_dose_reduction_uses_cockcroft_gault_from_the_latest_weight(client):
    # Male 70, creatinine 1.8 mg/dL, 70 kg: CrCl = (140 - 70) × 70 / (72 × 1.8) = 37.8 mL/min,
    # below 60: Beers 2023 Table 6, gabapentin: reduce dose (info).
    chart = [patient(age=70), obs("2160-0", 1.8, "mg/dL", 5), obs("29463-7", 70, "kg", 5)]
    cards = order_cards(client, chart, order("gabapentin 300 MG PO CAPS"))
    assert [c["indicator"] for c in cards] == ["info"]
    assert cards[0]["summary"].startswith("Gabapentin ordered with creatinine clearance 38 mL/min")
    assert "Creatinine clearance 38 mL/min (Cockcroft-Gault" in cards[0]["detail"]
    # Without a weight, the eGFR stands in and the card says so. CKD-EPI 2021 for 1.8 at 70,
    # male: 142 × (1.8/0.9)^-1.2 × 0.9938^70 = 142 × 0.43528 × 0.64690 = 40.0 → 40.
    cards = order_cards(client, chart[:2], order("gabapentin 300 MG PO CAPS"))
    assert [c["indicator"] for c in cards] == ["info"]
    assert "eGFR used instead" in cards[0]["detail"]
    # Beers is for adults 65 and older: the same chart at 50 raises nothing.
    assert order_cards(client, [patient(age=50), *chart[1:]],
                       order("gabapentin 300 MG PO CAPS")) == []


def test_metformin_new_start_and_continuing_at_egfr_30_44(client):
    # FDA labeling: starting at eGFR 30-45 not recommended (warning); KDIGO 2022: continuing,
    # review the dose (info).
    chart = [patient(), obs("33914-3", 38, EGFR)]
    assert topics(order_cards(client, chart, order("metformin 500 mg tablet"))) == [
        ("metforminckd", "warning")]
    taking = order("metformin 500 mg tablet", "6809", status="active")
    assert topics(order_cards(client, [*chart, taking], order("metformin 1000 mg tablet"))) == [
        ("metforminckd", "info")]
