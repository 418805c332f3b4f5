"""LOINC kidney code families (hooks/data/loinc_kidney.yaml, hooks/data/LOINC.md).

Expected families are written by hand from the LOINC long common names in the VSAC expansions
of the CMS Kidney Health Evaluation value sets (LOINC 2.76) and the LOINC axes in the LOINC
eGFR mapping guidance; they are not copied from the generator's output."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "hooks" / "data" / "loinc_kidney.yaml"
SCRIPT = ROOT / "scripts" / "terminology" / "build_loinc.py"


@pytest.fixture(scope="module")
def data() -> dict:
    return yaml.safe_load(DATA.read_text(encoding="utf-8"))


def family_of(data: dict, code: str) -> list[str]:
    return [name for name, fam in data["families"].items() if code in (fam.get("codes") or {})]


# code -> family, by hand from each code's LOINC long common name (VSAC expansion, LOINC 2.76).
EXPECTED = {
    # "... by Creatinine-based formula (MDRD|CKD-EPI|CKD-EPI 2021)"
    "33914-3": "egfr_creatinine",
    "62238-1": "egfr_creatinine",
    "98979-8": "egfr_creatinine",
    "48642-3": "egfr_creatinine",
    "48643-1": "egfr_creatinine",
    "50044-7": "egfr_creatinine",
    "70969-1": "egfr_creatinine",
    "77147-7": "egfr_creatinine",
    "88293-6": "egfr_creatinine",
    "88294-4": "egfr_creatinine",
    # "... by Cystatin C-based formula"
    "50210-4": "egfr_cystatin",
    # "... by Creatinine and Cystatin C-based formula (CKD-EPI 2021)": both markers, so not the
    # cystatin-only family.
    "98980-6": "egfr_creatinine_cystatin",
    "94677-2": "egfr_creatinine_cystatin",
    # no METHOD in the name: the equation is not known from the code
    "69405-9": "egfr_method_unspecified",
    # "... by Creatinine-based formula (Schwartz)"
    "50384-7": "egfr_pediatric",
    "2160-0": "creatinine_serum_mass",
    "38483-4": "creatinine_serum_mass",
    "14682-9": "creatinine_serum_molar",
    "59826-8": "creatinine_serum_molar",
    "77140-2": "creatinine_serum_molar",
    "9318-7": "uacr_mass",
    "14959-1": "uacr_mass",
    "32294-1": "uacr_mass",
    "14585-4": "uacr_molar",
    "13705-9": "uacr_timed",
    "14958-3": "uacr_timed",
    "44292-1": "uacr_timed",
    "33863-2": "cystatin_c",
    "2890-2": "upcr",
}


@pytest.mark.parametrize(("code", "family"), sorted(EXPECTED.items()))
def test_code_is_in_its_family_and_only_there(data, code, family):
    assert family_of(data, code) == [family]


def test_microalbumin_creatinine_mass_ratio_is_named_exactly(data):
    entry = data["families"]["uacr_mass"]["codes"]["14959-1"]
    assert entry["name"] == "Microalbumin/Creatinine [Mass Ratio] in Urine"


def test_names_are_the_loinc_long_common_names(data):
    codes = {c: e for fam in data["families"].values() for c, e in (fam["codes"] or {}).items()}
    assert codes["2160-0"]["name"] == "Creatinine [Mass/volume] in Serum or Plasma"
    assert codes["14682-9"]["name"] == "Creatinine [Moles/volume] in Serum or Plasma"
    assert codes["14585-4"]["name"] == "Albumin/Creatinine [Molar ratio] in Urine"
    assert codes["98979-8"]["name"] == (
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or "
        "Blood by Creatinine-based formula (CKD-EPI 2021)"
    )
    assert codes["98979-8"]["method"] == "CKD-EPI 2021"


def test_no_code_is_in_two_families(data):
    seen: dict[str, str] = {}
    for name, fam in data["families"].items():
        for code in fam["codes"] or {}:
            assert code not in seen, f"{code} in {seen.get(code)} and {name}"
            seen[code] = name


def test_codes_are_well_formed_loinc_numbers_with_a_valid_check_digit(data):
    # LOINC check digit: Mod 10 over the digits (LOINC Users' Guide, appendix on check digits).
    def check_digit(body: str) -> int:
        total = 0
        for i, ch in enumerate(reversed(body)):
            d = int(ch) * (2 if i % 2 == 0 else 1)
            total += d // 10 + d % 10
        return (10 - total % 10) % 10

    for fam in data["families"].values():
        for code in fam["codes"] or {}:
            assert re.fullmatch(r"\d{1,6}-\d", code), code
            body, digit = code.split("-")
            assert check_digit(body) == int(digit), code


def test_families_and_units(data):
    fams = data["families"]
    for name in ("egfr_creatinine", "egfr_cystatin", "egfr_creatinine_cystatin", "egfr_pediatric"):
        assert fams[name]["unit"] == "mL/min/{1.73_m2}"
    assert fams["creatinine_serum_mass"]["unit"] == "mg/dL"
    assert fams["creatinine_serum_molar"]["unit"] == "umol/L"
    assert fams["uacr_mass"]["unit"] == "mg/g"
    assert fams["uacr_molar"]["unit"] == "mg/mmol"
    assert fams["cystatin_c"]["unit"] == "mg/L"


def test_urine_albumin_concentration_alone_and_dialysis_creatinine_are_left_out(data):
    # 14957-5 Microalbumin [Mass/volume] in Urine is a concentration, not a ratio; 11041-1 is
    # creatinine after dialysis (a challenge), 35203-9 a mass-or-moles result with no fixed unit.
    for code in ("14957-5", "1754-1", "11041-1", "11042-9", "35203-9", "35591-7"):
        assert family_of(data, code) == []


def test_every_egfr_code_is_per_1_73_m2(data):
    for name, fam in data["families"].items():
        if name.startswith("egfr"):
            for entry in fam["codes"].values():
                assert entry["name"].startswith("Glomerular filtration rate/1.73 sq M.predicted")


def test_provenance_is_present(data):
    prov = data["provenance"]
    for key in ("source", "release", "url", "licence", "generated_by", "generated_on"):
        assert prov[key], key
    assert "LOINC 2.76" in prov["release"]
    assert "This material contains content from LOINC (http://loinc.org)" in prov["licence"]
    assert "Regenstrief Institute" in prov["licence"]
    assert prov["generated_by"] == "scripts/terminology/build_loinc.py"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(prov["generated_on"]))
    assert (ROOT / prov["generated_by"]).is_file()


# --- the generator's rules, on LOINC-table rows written by hand --------------------------------
@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_loinc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


HEADER = (
    '"LOINC_NUM","COMPONENT","PROPERTY","TIME_ASPCT","SYSTEM","SCALE_TYP","METHOD_TYP",'
    '"STATUS","CLASSTYPE","LONG_COMMON_NAME"\n'
)


def test_loinc_table_rows_join_their_family_by_axes(builder, tmp_path):
    # Axes of 98979-8 / 98980-6 as in LOINC's eGFR mapping guidance; 99999-9 is an invented
    # future creatinine-based term that must join without any code list changing.
    rows = [
        '"98979-8","Glomerular filtration rate/1.73 sq M.predicted","ArVRat","Pt",'
        '"Ser/Plas/Bld","Qn","Creatinine-based formula (CKD-EPI 2021)","ACTIVE","1","eGFRcr"',
        '"98980-6","Glomerular filtration rate/1.73 sq M.predicted","ArVRat","Pt",'
        '"Ser/Plas/Bld","Qn","Creatinine and Cystatin C-based formula (CKD-EPI 2021)","ACTIVE",'
        '"1","eGFRcr-cys"',
        '"99999-9","Glomerular filtration rate/1.73 sq M.predicted","ArVRat","Pt",'
        '"Ser/Plas/Bld","Qn","Creatinine-based formula (Future)","TRIAL","1","future"',
        '"2160-0","Creatinine","MCnc","Pt","Ser/Plas","Qn","","ACTIVE","1","Creatinine"',
        '"14957-5","Microalbumin","MCnc","Pt","Urine","Qn","","ACTIVE","1","Microalbumin"',
        '"13705-9","Albumin/Creatinine","MRto","24H","Urine","Qn","","ACTIVE","1","24h ACR"',
    ]
    table = tmp_path / "Loinc.csv"
    table.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    families, excluded = builder.build(builder.read_loinc_csv(table))
    assert set(families["egfr_creatinine"]) == {"98979-8", "99999-9"}
    assert set(families["egfr_creatinine_cystatin"]) == {"98980-6"}
    assert set(families["creatinine_serum_mass"]) == {"2160-0"}
    assert set(families["uacr_timed"]) == {"13705-9"}
    assert [e.split()[0] for e in excluded] == ["14957-5"]


def test_long_common_names_are_read_back_into_axes(builder):
    t = builder.term_from_long_name(
        "48643-1",
        "Glomerular filtration rate/1.73 sq M.predicted among blacks [Volume Rate/Area] in "
        "Serum, Plasma or Blood by Creatinine-based formula (MDRD)",
        "test",
    )
    assert (t.component, t.prop, t.time, t.system, t.method) == (
        "Glomerular filtration rate/1.73 sq M.predicted.blacks",
        "ArVRat",
        "Pt",
        "Ser/Plas/Bld",
        "Creatinine-based formula (MDRD)",
    )
    timed = builder.term_from_long_name(
        "44292-1", "Microalbumin/Creatinine [Mass Ratio] in 12 hour Urine", "test"
    )
    assert (timed.prop, timed.time, timed.system) == ("MRto", "12H", "Urine")
    assert builder.term_from_long_name("0-0", "Something [Unknown property] in Urine", "t") is None
