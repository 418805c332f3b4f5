"""The SMART app's kidney picture (cds_service/smart/picture.py) and its page: expected values are
worked by hand from the sources (CKD-EPI 2021, KDIGO 2024 categories, KFRE 4-variable,
hooks/data/prescribing_rules.yaml), never copied from the program's output. Dates are relative
to `now`."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask import Blueprint, Flask, render_template

from cds_service.config import SHIPPED_MODELS_DIR, Site
from cds_service.data.prefetch import Prefetch
from cds_service.models.binding import ModelBinding
from cds_service.models.loaded import load_model_by_id
from cds_service.smart.picture import build_picture
from tests.helpers.charts import ICD10CM, NOW, condition, obs, order, patient

SITE = Site(id="test-site", source="test", services={})
EGFR, CREATININE, UACR = "62238-1", "2160-0", "9318-7"
ML_MIN = "mL/min/{1.73_m2}"


@pytest.fixture(scope="module")
def kfre():
    return ModelBinding(active=load_model_by_id(SHIPPED_MODELS_DIR, "kfre-4var"), observed=False)


def egfr(value, days_ago, comparator=None):
    return obs(EGFR, value, ML_MIN, days_ago, comparator=comparator)


def uacr(value, days_ago, comparator=None):
    return obs(UACR, value, "mg/g", days_ago, comparator=comparator)


def chart(*, egfrs=(), creatinines=(), uacrs=(), person=None, conditions=(), medications=()):
    return {"egfr": list(egfrs), "creatinine": list(creatinines), "uacr": list(uacrs),
            "patient": person, "conditions": list(conditions),
            "medications": list(medications)}


def picture(prefetch, binding=None):
    return build_picture(prefetch, site=SITE, binding=binding, now=NOW)


def test_calculated_egfr_is_told_from_the_reported_one():
    # Woman aged 70, creatinine 1.2 mg/dL. CKD-EPI 2021 (Inker 2021), female: κ 0.7, α -0.241:
    # Scr/κ = 1.714 > 1, so 142 × 1.714^-1.200 × 0.9938^70 × 1.012
    # = 142 × 0.5237 × 0.6471 × 1.012 = 48.7 → 49, KDIGO G3a (45-59).
    p = picture(chart(creatinines=[obs(CREATININE, 1.2, "mg/dL", 10)],
                      egfrs=[egfr(52, 100)], person=patient("female", 70)))
    reported, calculated = p.egfr
    assert (reported.value, reported.calculated, reported.category) == (52, False, "G3a")
    assert (calculated.value, calculated.calculated, calculated.category) == (49, True, "G3a")
    assert calculated.creatinine == "creatinine 1.20 mg/dL"
    assert calculated.date == (NOW - timedelta(days=10)).date()
    # The newest result is the category shown, calculated or not.
    assert (p.g.code, p.g.value) == ("G3a", "calculated eGFR 49")


@pytest.mark.parametrize(("value", "category"), [
    # KDIGO 2024: G1 ≥ 90, G2 60-89, G3a 45-59, G3b 30-44, G4 15-29, G5 < 15.
    (90, "G1"), (89, "G2"), (60, "G2"), (59, "G3a"), (45, "G3a"), (44, "G3b"), (30, "G3b"),
    (29, "G4"), (15, "G4"), (14, "G5"),
])
def test_egfr_band_boundaries(value, category):
    p = picture(chart(egfrs=[egfr(value, 5)], person=patient("male", 60)))
    assert p.egfr[0].category == category
    assert p.g.code == category


@pytest.mark.parametrize(("value", "category", "description"), [
    # KDIGO 2024: A1 < 30, A2 30-300, A3 > 300 mg/g.
    (29, "A1", "normal to mildly increased"), (30, "A2", "moderately increased"),
    (300, "A2", "moderately increased"), (301, "A3", "severely increased"),
])
def test_albuminuria_band_boundaries(value, category, description):
    p = picture(chart(egfrs=[egfr(40, 5)], uacrs=[uacr(value, 5)], person=patient()))
    assert p.uacr[0].category == category
    assert (p.a.code, p.a.description) == (category, description)


def test_urine_acr_history_oldest_first_with_bounds():
    p = picture(chart(egfrs=[egfr(40, 5)], person=patient(),
                      uacrs=[uacr(45, 30), uacr(10, 600, comparator="<"), uacr(350, 300)]))
    assert [(pt.value, pt.comparator, pt.category) for pt in p.uacr] == [
        (10, "<", "A1"), (350, None, "A3"), (45, None, "A2")]
    assert p.uacr[0].date == (NOW - timedelta(days=600)).date()


def test_a_bound_egfr_is_g5_and_gets_no_risk(kfre):
    p = picture(chart(egfrs=[egfr(15, 3, comparator="<")], uacrs=[uacr(500, 3)],
                      person=patient("male", 60)), kfre)
    (point,) = p.egfr
    assert (point.value, point.comparator, point.text(), point.category) == (15, "<", "< 15",
                                                                              "G5")
    assert p.g.code == "G5"
    assert p.risk is None
    assert "the eGFR was reported as a bound (eGFR < 15)" in p.risk_not_shown


def test_risk_shown_with_its_factors(kfre):
    # KFRE 4-variable (Tangri 2011; North American baseline, Tangri 2016), man aged 65, eGFR 35,
    # urine ACR 400 mg/g. Linear predictor against the centroid:
    #   -0.2201 × (6.5 - 7.036) = 0.1180;  0.2467 × (1 - 0.5642) = 0.1075;
    #   -0.5567 × (35/5 - 7.222) = 0.1236;  0.4510 × (ln 400 - 5.137) = 0.4510 × 0.8545 = 0.3854
    #   sum 0.7344, exp 2.084
    #   2 years: 1 - 0.9750^2.084 = 1 - 0.9486 = 5.1%;  5 years: 1 - 0.9240^2.084 = 15.2%
    p = picture(chart(egfrs=[egfr(35, 10)], uacrs=[uacr(400, 20)], person=patient("male", 65)),
                kfre)
    assert p.risk_not_shown is None
    assert p.risk.two_year == pytest.approx(0.051, abs=0.002)
    assert p.risk.five_year == pytest.approx(0.152, abs=0.002)
    assert p.risk.text == "kidney failure risk 5% at 2 years, 15% at 5 years"
    assert p.risk.model.startswith("kfre-4var ")
    # Every term is above the centroid's, so each factor raises the risk; urine ACR most.
    assert p.risk.factors[0] == "urine ACR 400 mg/g raises it"
    assert "eGFR 35 raises it" in p.risk.factors
    assert p.risk.imputed == ()


@pytest.mark.parametrize(("prefetch", "reason"), [
    (chart(egfrs=[egfr(75, 10)], uacrs=[uacr(400, 10)], person=patient()),
     "it applies to eGFR below 60 (CKD G3-G5)"),
    (chart(egfrs=[egfr(12, 10)], uacrs=[uacr(400, 10)], person=patient(),
           conditions=[condition(ICD10CM, "Z99.2", "Dependence on renal dialysis")]),
     "the patient is on dialysis"),
    (chart(uacrs=[uacr(400, 10)], person=patient()), "No eGFR in the last 2 years"),
])
def test_risk_not_shown_says_why(kfre, prefetch, reason):
    p = picture(prefetch, kfre)
    assert p.risk is None
    assert reason in p.risk_not_shown


def test_no_model_at_this_site():
    p = picture(chart(egfrs=[egfr(35, 10)], uacrs=[uacr(400, 20)], person=patient()))
    assert p.risk is None
    assert p.risk_not_shown == "No kidney failure risk model is set up at this site."


def test_a_flagged_medicine_cites_its_rule_source():
    # hooks/data/prescribing_rules.yaml, metformin-egfr-below-30 (source fda-metformin).
    p = picture(chart(egfrs=[egfr(25, 10)], person=patient(),
                      medications=[order("metformin 500 mg tablet", "6809", status="active")]))
    (m,) = p.medicines
    assert (m.drug, m.summary, m.indicator) == ("metformin", "contraindicated at eGFR below 30",
                                               "critical")
    assert m.source_label == "FDA metformin labeling (2016 safety communication)"
    assert m.reference == "Contraindications: eGFR below 30 mL/min/1.73 m²"
    assert "metformin in certain patients with reduced kidney function" in m.citation


def test_a_draft_or_unflagged_medicine_is_not_listed():
    p = picture(chart(egfrs=[egfr(80, 10)], person=patient(),
                      medications=[order("metformin 500 mg tablet", "6809", status="active"),
                                   order("ibuprofen 400 mg tablet", "5640", status="draft")]))
    assert p.medicines == ()


def test_missing_and_old_data_are_listed():
    values = chart(egfrs=[egfr(40, 400)], uacrs=[uacr(50, 400)], person=patient())
    values["uacr"] = None
    sources = {key: "prefetch" for key in values}
    sources["uacr"] = "optional-missing"
    p = picture(Prefetch(values, sources))
    old = (NOW - timedelta(days=400)).date().isoformat()
    assert p.missing == (
        f"The newest eGFR is from {old}, over 12 months ago: KDIGO 2024 recommends checking "
        "kidney function at least yearly in CKD.",
        "No urine ACR in the last 12 months: KDIGO 2024 recommends testing albuminuria at least "
        "yearly in CKD.",
        "Could not be read from the EHR: urine ACR results.",
    )


def test_a_urine_acr_over_12_months_old_is_shown_but_said_to_be_due():
    p = picture(chart(egfrs=[egfr(40, 10)], uacrs=[uacr(50, 400)], person=patient()))
    assert [pt.value for pt in p.uacr] == [50]
    assert any(item.startswith("No urine ACR in the last 12 months") for item in p.missing)
    assert not any("newest eGFR" in item for item in p.missing)


def test_a_messy_chart_never_raises():
    messy = {"egfr": [{"resourceType": "Observation"}, egfr("<15 ", 5), "junk", None,
                      {"resourceType": "Observation", "status": "final",
                       "code": {"coding": [{"system": "http://loinc.org", "code": EGFR}]},
                       "valueQuantity": {"value": "abc"}}],
             "creatinine": [obs(CREATININE, 1.0, "mg/dL", 5)],
             "uacr": {"resourceType": "Bundle"}, "patient": None, "conditions": None,
             "medications": [{"resourceType": "MedicationRequest", "status": "active"}]}
    p = picture(messy)
    assert p.patient.text() == "Name not recorded, birth date not recorded, sex not recorded"
    assert "No patient record: age and sex unknown." in p.missing
    # Creatinine without an age gives no eGFR: said, not guessed.
    assert "No eGFR could be calculated from creatinine: age not recorded." in p.missing
    assert p.uacr == ()
    assert p.medicines == ()


def test_empty_prefetch():
    p = picture({})
    assert (p.egfr, p.uacr, p.g, p.a, p.risk) == ((), (), None, None, None)
    assert "No eGFR or creatinine result in the last 2 years." in p.missing


def test_patient_label():
    person = patient("female", 70) | {"name": [
        {"use": "old", "family": "Former"},
        {"use": "official", "given": ["Ada", "M"], "family": "Lovelace"}]}
    born = person["birthDate"]
    assert picture(chart(person=person)).patient.text() == f"Ada M Lovelace, born {born}, female"


# --- the page ---------------------------------------------------------------------------------

def page(p, **extra) -> str:
    app = Flask(__name__)
    app.register_blueprint(Blueprint("smart", "cds_service.smart", template_folder="templates",
                                     static_folder="static", static_url_path="/smart/static"))
    with app.test_request_context():
        return render_template("smart_app.html", picture=p, fhir_user="Practitioner/eDoc1",
                               launched_at=NOW, **extra)


def test_the_page_escapes_the_patient_name_and_has_no_script_or_inline_style(kfre):
    person = patient() | {"name": [{"text": "<script>alert(1)</script> Smith"}]}
    p = picture(chart(egfrs=[egfr(35, 10), egfr(15, 200, comparator="<")],
                      uacrs=[uacr(400, 20)], person=person,
                      medications=[order("metformin 500 mg tablet", "6809", status="active")]),
                kfre)
    html = page(p)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Smith" in html
    assert "<script" not in html.lower()
    assert "style=" not in html and "<style" not in html
    # Nothing fetched from elsewhere: the stylesheet is ours (the SVG namespace is no fetch).
    assert 'href="/smart/static/smart_app.css"' in html
    assert "src=" not in html and 'href="http' not in html


def test_the_page_has_its_sections_charts_and_tables(kfre):
    p = picture(chart(egfrs=[egfr(35, 10), egfr(41, 200)], uacrs=[uacr(400, 20)],
                      person=patient("male", 65),
                      medications=[order("metformin 500 mg tablet", "6809", status="active")]),
                kfre)
    html = page(p)
    for heading in ("Kidney function", "Albuminuria", "Kidney failure risk",
                    "Medicines the prescribing rules flag", "Missing or old data"):
        assert f">{heading}</h2>" in html
    assert html.count('role="img"') == 2
    assert "<caption>eGFR results, newest first</caption>" in html
    assert "<caption>Urine ACR results, newest first</caption>" in html
    recent = (NOW - timedelta(days=10)).date().isoformat()
    assert f'<tr><td>{recent}</td><td class="num">35</td>' in html
    assert "<dt>2-year risk</dt><dd>5%</dd>" in html
    assert "<dt>5-year risk</dt><dd>15%</dd>" in html
    assert "<main" in html and "<header" in html
    assert "Opened by Practitioner/eDoc1" in html


def test_the_charts_show_ten_years_while_the_figures_use_the_cards_window(kfre):
    # The card reads the last 2 years (hooks/data/kidney_inputs.yaml, lookback_days 730); the
    # charts the last 10 (hooks/_kidney.HISTORY_YEARS, 366-day years): a result of 5 years ago
    # is charted, one of 11 years ago is not, and neither changes the category shown.
    p = picture(chart(egfrs=[egfr(70, 11 * 365), egfr(58, 5 * 365), egfr(41, 20)],
                      uacrs=[uacr(20, 6 * 365), uacr(80, 20)], person=patient("male", 66)),
                kfre)
    assert [point.value for point in p.egfr] == [58, 41]
    assert [point.value for point in p.uacr] == [20, 80]
    assert (p.g.code, p.g.value) == ("G3b", "eGFR 41")
    assert p.a.code == "A2"
