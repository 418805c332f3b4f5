"""Medication value sets (hooks/data/medications.yaml): loading, matching, resolving references,
and the eGFR / risk / new-start rules. Golden scenarios cover the same paths end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cds_service.features import parse_code_map
from hooks._medications import (
    DATA_FILE,
    VALUE_SETS,
    applicable_rule,
    identify,
    load_value_sets,
    medication_match,
    resolve_medication,
)

RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
RX_OID = "urn:oid:2.16.840.1.113883.6.88"
ERX = "urn:oid:1.2.840.114350.1.13.861.1.7.2.698288"
NSAID = next(c for c in VALUE_SETS.classes if c.id == "nsaid")
METFORMIN = next(c for c in VALUE_SETS.classes if c.id == "metformin")


def concept(*codes: tuple[str, str], text: str | None = None) -> dict:
    out: dict = {"coding": [{"system": s, "code": c} for s, c in codes]}
    if text is not None:
        out["text"] = text
    return out


# --- the shipped data file -----------------------------------------------------------------

def test_shipped_value_sets_name_the_issue_ingredients():
    assert dict(NSAID.ingredients) == {
        "5640": "ibuprofen", "7258": "naproxen", "35827": "ketorolac", "3355": "diclofenac",
        "140587": "celecoxib", "5781": "indomethacin", "41493": "meloxicam"}
    assert dict(METFORMIN.ingredients) == {"6809": "metformin"}
    assert NSAID.alternative == ("acetaminophen", "161")
    assert METFORMIN.alternative is None
    # Epic remembers overrides against the topic code: alphanumeric, stable.
    assert [c.topic.code for c in VALUE_SETS.classes] == ["nsaidckd", "metforminckd"]


def test_every_rule_and_ingredient_is_cited_in_the_clinical_doc():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "clinical.md").read_text("utf-8")
    for med_class in VALUE_SETS.classes:
        assert med_class.topic.code in doc
        for rxcui, name in med_class.ingredients.items():
            assert rxcui in doc and name in doc, name
        for rule in med_class.rules:
            if rule.egfr_below is not None:
                assert f"{rule.egfr_below:g}" in doc


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["classes"]["nsaid"]["rules"][0].pop("indicator"), "indicator"),
    (lambda d: d["classes"]["nsaid"]["rules"][0].update(indicator="info"), "indicator"),
    (lambda d: d["classes"]["nsaid"]["rules"][0].update(risk_at_least="warning"),
     "exactly one of egfr_below and risk_at_least"),
    (lambda d: d["classes"]["nsaid"]["ingredients"].update({"ibu": {"name": "x"}}), "RxCUI"),
    (lambda d: d["classes"]["metformin"]["ingredients"].update({"5640": {"name": "x"}}),
     r"ingredients\.5640: also listed under"),
    (lambda d: d["classes"]["nsaid"].update(colour="red"), "colour"),
])
def test_a_bad_edit_of_the_data_file_is_refused_naming_the_key(tmp_path, edit, message):
    data = yaml.safe_load(DATA_FILE.read_text("utf-8"))
    edit(data)
    path = tmp_path / "medications.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_value_sets(path)
    assert str(path) in str(info.value)


# --- matching --------------------------------------------------------------------------------

@pytest.mark.parametrize("medication, ingredient, how", [
    (concept((RX, "5640")), "ibuprofen", "RxNorm 5640"),
    (concept((RX_OID, "7258")), "naproxen", "RxNorm 7258"),          # HL7 OID for RxNorm
    (concept((RX, "197806"), (RX, "5640")), "ibuprofen", "RxNorm 5640"),  # product + ingredient
    (concept((RX, "861007"), (RX, "6809")), "metformin", "RxNorm 6809"),
    (concept(text="IBUPROFEN 600 MG PO TABS"), "ibuprofen", "name"),
    (concept(text="Motrin IB 200 mg"), "ibuprofen", "name"),          # brand name
    (concept((RX, "197806"), text="ibuprofen 600 MG Oral Tablet"), "ibuprofen", "name"),
    ({"coding": [{"system": RX, "code": "999", "display": "Toradol 10 mg"}]}, "ketorolac", "name"),
])
def test_identify(medication, ingredient, how):
    match = identify(medication)
    assert (match.ingredient, match.matched_by) == (ingredient, how)


@pytest.mark.parametrize("medication", [
    None, "ibuprofen", 42, [], {}, {"coding": "5640"}, {"coding": [None, 3, {"code": None}]},
    concept((RX, "1191"), text="aspirin 81 MG"),          # deliberately not an NSAID here
    concept((RX, "161"), text="acetaminophen 500 MG"),
    concept(text="Patient's own supply: magic mouthwash"),
    concept(text="ibuprofenate-free formulation"),          # whole words only
])
def test_identify_never_raises_and_matches_nothing_else(medication):
    assert identify(medication) is None


def test_site_code_mapping_extends_the_value_set_by_code_and_epic_identifier():
    code_map = parse_code_map([{"from": f"{ERX}|28217", "to": f"{RX}|35827"}])
    local = concept((ERX, "28217"))
    assert identify(local) is None
    assert identify(local, code_map).matched_by == "site code mapping"
    # Epic's Medication carries the ERX id as an identifier, not always as a coding.
    match = identify(None, code_map, identifiers=[{"system": ERX, "value": "28217"}])
    assert match.ingredient == "ketorolac"


def test_reference_display_is_the_last_resort():
    assert identify(None, display="KETOROLAC 10 MG PO TABS").ingredient == "ketorolac"


# --- resolving medicationReference ----------------------------------------------------------

MEDICATION = {"resourceType": "Medication", "id": "eMed1", "code": concept((RX, "3355"))}


@pytest.mark.parametrize("order, bundles, ingredient", [
    ({"medicationReference": {"reference": "Medication/eMed1"}},
     [{"resourceType": "Bundle", "entry": [{"resource": MEDICATION}]}], "diclofenac"),
    ({"medicationReference": {"reference": "https://ehr.example.org/R4/Medication/eMed1"}},
     [{"resourceType": "Bundle", "entry": [{"resource": MEDICATION}]}], "diclofenac"),
    ({"medicationReference": {"reference": "#m"},
      "contained": [{**MEDICATION, "id": "m"}]}, [], "diclofenac"),
    ({"medicationReference": {"reference": "Medication/eMed1"}}, [MEDICATION], "diclofenac"),
    ({"medicationReference": {"reference": "Medication/unknown", "display": "MELOXICAM 15 MG"}},
     [MEDICATION], "meloxicam"),
])
def test_medication_reference_resolution(order, bundles, ingredient):
    assert medication_match(order, bundles).ingredient == ingredient


@pytest.mark.parametrize("order", [
    {}, {"medicationReference": None}, {"medicationReference": "Medication/x"},
    {"medicationReference": {"reference": 5}}, {"medicationReference": {"reference": ""}},
    {"medicationReference": {"reference": "#m"}, "contained": 7},
    {"medicationReference": {"reference": "#m"}, "contained": [None, "x", {"id": "m"}]},
])
def test_incomplete_orders_never_raise(order):
    resolve_medication(order, [None, 3, {"entry": "x"}])
    assert medication_match(order, [None, {"entry": [None, {"resource": 1}]}]) is None


# --- rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("egfr, risk, taking, expected", [
    (24, None, False, "critical"),
    (29.9, None, False, "critical"),
    (30, None, False, "warning"),
    (59, None, False, "warning"),
    (60, None, False, None),
    (75, "warning", False, "warning"),    # high model risk alone
    (75, "critical", False, "warning"),
    (75, "info", False, None),
    (None, None, False, None),
])
def test_nsaid_rules(egfr, risk, taking, expected):
    rule = applicable_rule(NSAID, egfr=egfr, risk_indicator=risk, already_taking=taking)
    assert (rule.indicator if rule else None) == expected


@pytest.mark.parametrize("egfr, taking, expected", [
    (25, False, "critical"), (25, True, "critical"),   # contraindicated whatever the history
    (40, False, "warning"),                           # FDA: do not start at 30-45
    (40, True, None),                                 # continuing: no card
    (44.9, False, "warning"), (45, False, None), (70, False, None),
])
def test_metformin_rules_follow_fda_labeling(egfr, taking, expected):
    rule = applicable_rule(METFORMIN, egfr=egfr, risk_indicator=None, already_taking=taking)
    assert (rule.indicator if rule else None) == expected
