"""What an order's medication is (hooks/_medications.py): RxNorm codes of every level, site code
mappings, names and brands in free text, the route, and medicationReference resolution. The
RxCUIs below were looked up in RxNorm (Current Prescribable Content, hooks/data/RXNORM.md)."""

from __future__ import annotations

import pytest

from cds_service.features import parse_code_map
from hooks._medications import (
    TERMINOLOGY,
    identify,
    medication_of,
    order_route,
    resolve_medication,
)

RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
RX_OID = "urn:oid:2.16.840.1.113883.6.88"
ERX = "urn:oid:1.2.840.114350.1.13.861.1.7.2.698288"
SNOMED = "http://snomed.info/sct"


def concept(*codes: tuple[str, str], text: str | None = None) -> dict:
    out: dict = {"coding": [{"system": s, "code": c} for s, c in codes]}
    if text is not None:
        out["text"] = text
    return out


def found(medication) -> tuple[set[str], str | None]:
    return set(medication.ingredients), medication.route


# --- the shipped data file -----------------------------------------------------------------

def test_terminology_states_its_provenance():
    assert "RxNorm" in TERMINOLOGY.provenance["source"]
    assert TERMINOLOGY.provenance["release"]
    assert TERMINOLOGY.ingredients["5640"] == "ibuprofen"
    assert TERMINOLOGY.ingredients["6809"] == "metformin"


# --- by code, any RxNorm level ---------------------------------------------------------------

@pytest.mark.parametrize(("codes", "ingredients", "route"), [
    ([(RX, "5640")], {"ibuprofen"}, None),                              # IN
    ([(RX_OID, "7258")], {"naproxen"}, None),                           # HL7 OID for RxNorm
    ([(RX, "197806")], {"ibuprofen"}, "oral"),                          # SCD, no text
    ([(RX, "1243843")], {"metformin"}, "oral"),                         # SBD Janumet
    ([(RX, "1664325")], {"metformin"}, "oral"),                         # SBD Synjardy
    ([(RX, "1100070")], {"ibuprofen", "famotidine"}, "oral"),           # SBD Duexis
    ([(RX, "1372738")], {"metformin"}, None),                           # BN Janumet
    ([(RX, "858364")], {"ketorolac"}, "ophthalmic"),                    # ophthalmic solution
    ([(RX, "1487074")], {"diclofenac"}, "topical"),                     # topical solution
    ([(RX, "1797857")], {"ketorolac"}, "nasal"),                        # Sprix nasal spray
    ([(RX, "1739997")], {"ciprofloxacin"}, "otic"),
])
def test_identify_by_code_of_any_level(codes, ingredients, route):
    medication = identify(concept(*codes))
    assert found(medication) == (ingredients, route)
    assert medication.matched_by == f"RxNorm {codes[0][1]}"


@pytest.mark.parametrize(("text", "ingredients", "route"), [
    ("IBUPROFEN 600 MG PO TABS", {"ibuprofen"}, None),
    ("Motrin IB 200 mg", {"ibuprofen"}, None),
    ("JANUMET 50-1000 MG PO TABS", {"metformin"}, None),
    ("DUEXIS 800-26.6 MG PO TABS", {"ibuprofen", "famotidine"}, None),
    ("DICLOFENAC SODIUM 1 % TD GEL", {"diclofenac"}, "topical"),
    ("KETOROLAC 0.5 % OP SOLN", {"ketorolac"}, "ophthalmic"),
    ("ciprofloxacin 0.3 % ear drops", {"ciprofloxacin"}, "otic"),
    # Words of a systemic form win over an ambiguous one: "gel caps" are swallowed.
    ("ibuprofen 200 mg gel caps", {"ibuprofen"}, None),
    # "OD" is also "once daily": never read as the right eye.
    ("meloxicam 15 mg OD", {"meloxicam"}, None),
])
def test_identify_by_name_with_the_route_from_the_text(text, ingredients, route):
    medication = identify(concept(text=text))
    assert found(medication) == (ingredients, route)
    assert medication.matched_by.startswith("name ")


def test_the_coded_dose_form_wins_over_the_text():
    medication = identify(concept((RX, "858364"), text="ketorolac PO"))
    assert medication.route == "ophthalmic"


@pytest.mark.parametrize("medication", [
    None, "ibuprofen", 42, [], {}, {"coding": "5640"}, {"coding": [None, 3, {"code": None}]},
    concept(text="Patient's own supply: magic mouthwash"),
    concept(text="ibuprofenate-free formulation"),          # whole words only
    concept((RX, "83367"), text="atorvastatin 40 mg"),      # out of scope
])
def test_identify_never_raises_and_matches_nothing_else(medication):
    assert identify(medication) is None


def test_site_code_mapping_by_code_and_epic_identifier():
    code_map = parse_code_map([{"from": f"{ERX}|28217", "to": f"{RX}|35827"}])
    local = concept((ERX, "28217"))
    assert identify(local) is None
    assert identify(local, code_map).matched_by == "site code mapping"
    # Epic's Medication carries the ERX id as an identifier, not always as a coding.
    match = identify(None, code_map, identifiers=[{"system": ERX, "value": "28217"}])
    assert match.ingredients == {"ketorolac"}


def test_reference_display_is_the_last_resort():
    assert identify(None, display="KETOROLAC 10 MG PO TABS").ingredients == {"ketorolac"}


# --- the order's route -------------------------------------------------------------------

@pytest.mark.parametrize(("route", "expected"), [
    ({"coding": [{"system": SNOMED, "code": "6064005"}]}, "topical"),
    ({"coding": [{"system": SNOMED, "code": "54485002"}]}, "ophthalmic"),
    ({"coding": [{"system": SNOMED, "code": "26643006"}]}, "oral"),
    ({"text": "Both Eyes"}, "ophthalmic"),
    ({"text": "Oral"}, None),
    (None, None), ("topical", None), ({"coding": "x"}, None),
])
def test_order_route(route, expected):
    assert order_route({"dosageInstruction": [{"route": route}]}) == expected


def test_an_order_routed_topically_is_not_systemic():
    order = {"medicationCodeableConcept": concept((RX, "3355")),
             "dosageInstruction": [{"route": {"coding": [{"system": SNOMED,
                                                          "code": "6064005"}]}}]}
    assert not medication_of(order, []).systemic
    order["dosageInstruction"] = [{"text": "1 tablet by mouth"}]
    assert medication_of(order, []).systemic


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
    assert medication_of(order, bundles).ingredients == {ingredient}


@pytest.mark.parametrize("order", [
    {}, {"medicationReference": None}, {"medicationReference": "Medication/x"},
    {"medicationReference": {"reference": 5}}, {"medicationReference": {"reference": ""}},
    {"medicationReference": {"reference": "#m"}, "contained": 7},
    {"medicationReference": {"reference": "#m"}, "contained": [None, "x", {"id": "m"}]},
    {"dosageInstruction": "x"}, {"dosageInstruction": [None, {"route": 3}]},
])
def test_incomplete_orders_never_raise(order):
    resolve_medication(order, [None, 3, {"entry": "x"}])
    assert medication_of(order, [None, {"entry": [None, {"resource": 1}]}]) is None
