"""hooks/data/rxnorm.json: RxNorm product codes and brand names resolve to in-scope ingredients.

Every expected code below was looked up by hand in the source the file is built from: NLM's RxNorm
Current Prescribable Content 10/06/2025, as extracted per ingredient in
github.com/davidanderson3/rxnorm-ingredients web/data at a8fcf13 (hooks/data/RXNORM.md). The raw
source is not committed, so regeneration is checked on a small synthetic extract instead.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import ROOT

DATA = ROOT / "hooks" / "data" / "rxnorm.json"
SCRIPT = ROOT / "scripts" / "terminology" / "build_rxnorm.py"
ROUTES = {
    "oral",
    "injectable",
    "rectal",
    "nasal",
    "transdermal",
    "topical",
    "ophthalmic",
    "otic",
    "vaginal",
    "inhalation",
    "other",
}

# RxNorm IN RxCUIs (RxNorm Prescribable 10/06/2025 IN records)
IBUPROFEN, FAMOTIDINE, METFORMIN, DICLOFENAC, KETOROLAC = "5640", "4278", "6809", "3355", "35827"
VALSARTAN, INDOMETHACIN, CIPROFLOXACIN, ENOXAPARIN = "69749", "5781", "2551", "67108"


@pytest.fixture(scope="module")
def data() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))


def _script():
    spec = importlib.util.spec_from_file_location("build_rxnorm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (rxcui, tty, expected in-scope ingredients, expected route), from the source records
PRODUCTS = [
    # Janumet: SBD "metformin hydrochloride 1000 MG / sitagliptin phosphate 50 MG Oral Tablet
    # [Janumet]"; sitagliptin is out of scope, so only metformin
    ("861771", "SBD", [METFORMIN], "oral"),
    # Duexis: SBD "famotidine 26.6 MG / ibuprofen 800 MG Oral Tablet [Duexis]" and its SCD
    ("1100070", "SBD", [FAMOTIDINE, IBUPROFEN], "oral"),
    ("1100066", "SCD", [FAMOTIDINE, IBUPROFEN], "oral"),
    # "diclofenac sodium 0.01 MG/MG Topical Gel" (DF Topical Gel): not systemic
    ("855633", "SCD", [DICLOFENAC], "topical"),
    # Flector: "Twice-Daily diclofenac epolamine 0.013 MG/MG Medicated Patch [Flector]"
    ("855628", "SBD", [DICLOFENAC], "topical"),
    # "ketorolac tromethamine 5 MG/ML Ophthalmic Solution" and [Acular]
    ("860107", "SCD", [KETOROLAC], "ophthalmic"),
    ("860109", "SBD", [KETOROLAC], "ophthalmic"),
    # Sprix: "ketorolac tromethamine 15.8 MG/ACTUAT Metered Dose Nasal Spray" (+ [Sprix])
    ("1797855", "SCD", [KETOROLAC], "nasal"),
    ("1797857", "SBD", [KETOROLAC], "nasal"),
    # "1 ML ketorolac tromethamine 30 MG/ML Injection"
    ("1665461", "SCD", [KETOROLAC], "injectable"),
    # "metformin hydrochloride 500 MG Oral Tablet"
    ("861007", "SCD", [METFORMIN], "oral"),
    # "indomethacin 50 MG Rectal Suppository"
    ("197819", "SCD", [INDOMETHACIN], "rectal"),
    # "ciprofloxacin 2 MG/ML Otic Solution"
    ("848956", "SCD", [CIPROFLOXACIN], "otic"),
    # "0.4 ML enoxaparin sodium 100 MG/ML Prefilled Syringe"
    ("854235", "SCD", [ENOXAPARIN], "injectable"),
    # Entresto: "sacubitril 24 MG / valsartan 26 MG Oral Tablet [Entresto]"
    ("1656346", "SBD", [VALSARTAN], "oral"),
    # "ibuprofen 200 MG Oral Tablet"
    ("310965", "SCD", [IBUPROFEN], "oral"),
    # brand names (BN) and ingredient-level concepts carry no route
    ("1100067", "BN", [FAMOTIDINE, IBUPROFEN], None),  # Duexis
    ("1372738", "BN", [METFORMIN], None),  # Janumet
    ("992421", "BN", [KETOROLAC], None),  # Sprix
    ("1100065", "MIN", [FAMOTIDINE, IBUPROFEN], None),  # famotidine / ibuprofen
    ("235743", "PIN", [METFORMIN], None),  # metformin hydrochloride
    ("28200", "PIN", [KETOROLAC], None),  # ketorolac tromethamine
    ("5640", "IN", [IBUPROFEN], None),
]


@pytest.mark.parametrize(("rxcui", "tty", "ingredients", "route"), PRODUCTS)
def test_a_product_code_resolves_to_its_in_scope_ingredients_and_route(
    data, rxcui, tty, ingredients, route
):
    concept = data["concepts"][rxcui]
    assert concept["tty"] == tty
    assert concept["ingredients"] == sorted(ingredients, key=int)
    assert concept["route"] == route


@pytest.mark.parametrize(
    ("brand", "ingredients"),
    [
        ("advil", [IBUPROFEN]),
        ("motrin", [IBUPROFEN]),
        ("duexis", [FAMOTIDINE, IBUPROFEN]),
        ("janumet", [METFORMIN]),
        ("synjardy", [METFORMIN]),  # empagliflozin / metformin
        ("entresto", [VALSARTAN]),
        ("voltaren", [DICLOFENAC]),
        ("sprix", [KETOROLAC]),
        ("lovenox", [ENOXAPARIN]),
    ],
)
def test_a_brand_name_resolves_to_its_in_scope_ingredients(data, brand, ingredients):
    assert data["brands"][brand] == sorted(ingredients, key=int)


# Our name → RxNorm IN RxCUI. Where RxNorm names the IN differently, the IN's name is noted.
IN_CODES = {
    "ibuprofen": "5640",
    "naproxen": "7258",
    "ketorolac": "35827",
    "diclofenac": "3355",
    "celecoxib": "140587",
    "indomethacin": "5781",
    "meloxicam": "41493",
    "etodolac": "24605",
    "piroxicam": "8356",
    "sulindac": "10237",
    "oxaprozin": "32613",
    "diflunisal": "3393",
    "mefenamate": "257844",  # IN of PIN 6693 "mefenamic acid"
    "ketoprofen": "6142",
    "nabumetone": "31448",
    "flurbiprofen": "4502",
    "fenoprofen": "4331",
    "meclofenamate": "588003",
    "tolmetin": "10636",
    "salsalate": "36108",
    "magnesium salicylate": "52364",  # choline magnesium trisalicylate = MIN 596050
    "metformin": "6809",
    "benazepril": "18867",
    "captopril": "1998",
    "enalapril": "3827",
    "fosinopril": "50166",
    "lisinopril": "29046",
    "moexipril": "30131",
    "perindopril": "54552",
    "quinapril": "35208",
    "ramipril": "35296",
    "trandolapril": "38454",
    "candesartan": "214354",
    "eprosartan": "83515",
    "irbesartan": "83818",
    "losartan": "52175",
    "olmesartan": "321064",
    "telmisartan": "73494",
    "valsartan": "69749",
    "furosemide": "4603",
    "bumetanide": "1808",
    "torsemide": "38413",
    "ethacrynate": "62349",  # IN of PIN 4109 "ethacrynic acid"
    "hydrochlorothiazide": "5487",
    "chlorthalidone": "2409",
    "chlorothiazide": "2396",
    "indapamide": "5764",
    "metolazone": "6916",
    "spironolactone": "9997",
    "eplerenone": "298869",
    "triamterene": "10763",
    "ciprofloxacin": "2551",
    "nitrofurantoin": "7454",
    "trimethoprim": "10829",
    "sulfamethoxazole": "10180",
    "dabigatran etexilate": "1037042",
    "dofetilide": "49247",
    "edoxaban": "1599538",
    "enoxaparin": "67108",
    "fondaparinux": "321208",
    "rivaroxaban": "1114195",
    "baclofen": "1292",
    "duloxetine": "72625",
    "gabapentin": "25480",
    "levetiracetam": "114477",
    "pregabalin": "187832",
    "tramadol": "10689",
    "cimetidine": "2541",
    "famotidine": "4278",
    "nizatidine": "42319",
    "colchicine": "2683",
    "probenecid": "8698",
    # Supplemented (SUPPLEMENT_IN in the script): the extract lacks them.
    "acetaminophen": "161",
    "aspirin": "1191",
    "amiloride": "644",
    "apixaban": "1364430",
}
# The extract's A.json (>4 MiB) was not in the snapshot the file was built from: products whose
# only in-scope ingredients start with "a" are missing; of the ingredients themselves, those in
# SUPPLEMENT_IN are added as IN concepts, and azilsartan is missing.
NOT_FOUND = ["azilsartan"]
SUPPLEMENTED = {"161": "acetaminophen", "1191": "aspirin", "644": "amiloride",
                "1364430": "apixaban"}


def test_every_in_scope_ingredient_is_present_with_its_rxnorm_code(data):
    assert data["ingredients"] == {code: name for name, code in IN_CODES.items()}
    for code in IN_CODES.values():
        assert data["concepts"][code] == {
            "tty": "IN",
            "name": data["concepts"][code]["name"],
            "ingredients": [code],
            "route": None,
        }


def test_ingredients_the_source_lacks_are_named_in_the_provenance(data):
    assert data["provenance"]["ingredients_not_found"] == NOT_FOUND
    assert data["provenance"]["missing_letters"] == ["A"]
    assert not set(NOT_FOUND) & set(data["ingredients"].values())
    for code, name in SUPPLEMENTED.items():
        assert f"{name} {code}" in data["provenance"]["supplement"]


def test_provenance_names_source_release_and_licence(data):
    prov = data["provenance"]
    for key in ("source", "release", "url", "licence", "generated_by", "generated_on"):
        assert prov[key]
    assert "10/06/2025" in prov["release"]
    assert "National Library of Medicine" in prov["licence"]
    assert prov["generated_by"] == "scripts/terminology/build_rxnorm.py"


def test_the_file_is_well_formed(data):
    ingredients = set(data["ingredients"])
    no_form = {"IN", "PIN", "MIN", "BN", "SCDC"}
    for rxcui, concept in data["concepts"].items():
        assert rxcui.isdigit()
        assert concept["ingredients"], rxcui
        assert set(concept["ingredients"]) <= ingredients, rxcui
        assert concept["ingredients"] == sorted(concept["ingredients"], key=int)
        if concept["tty"] in no_form:
            assert concept["route"] is None, rxcui
        else:
            assert concept["route"] in ROUTES, rxcui
    for brand, codes in data["brands"].items():
        assert brand == brand.lower() and codes and set(codes) <= ingredients
    text = DATA.read_text(encoding="utf-8")
    assert text == json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def test_no_topical_ophthalmic_or_otic_form_is_called_systemic(data):
    local = ("Topical", "Ophthalmic", "Otic", "Medicated Patch")
    for concept in data["concepts"].values():
        if concept["tty"] in {"SCD", "SBD"} and any(w in concept["name"] for w in local):
            assert concept["route"] in {"topical", "ophthalmic", "otic"}, concept["name"]


# A synthetic extract in the source's shape (invented RxCUIs 9000xx), to check the script itself.
PACK = "{10 (ibuprofen 200 MG Oral Tablet) / 1 (ibuprofen 50 MG/MG Topical Gel) } Pack"
SYNTHETIC = {
    "I.json": [
        {
            "Name": "ibuprofen",
            "RXCUI": "900001",
            "TTY": "IN",
            "SCDCs": [
                {
                    "Name": "ibuprofen 200 MG",
                    "RXCUI": "900010",
                    "TTY": "SCDC",
                    "SCDs": [
                        {
                            "Name": "ibuprofen 200 MG Oral Tablet",
                            "RXCUI": "900020",
                            "TTY": "SCD",
                            "GPCKs": [
                                {
                                    "Name": PACK,
                                    "RXCUI": "900040",
                                    "TTY": "GPCK",
                                }
                            ],
                            "SBDs": [
                                {
                                    "Name": "ibuprofen 200 MG Oral Tablet [Brandx]",
                                    "RXCUI": "900030",
                                    "TTY": "SBD",
                                    "BNs": [{"Name": "Brandx", "RXCUI": "900050", "TTY": "BN"}],
                                }
                            ],
                        },
                    ],
                },
                {
                    "Name": "ibuprofen 50 MG/MG",
                    "RXCUI": "900011",
                    "TTY": "SCDC",
                    "SCDs": [
                        {
                            "Name": "ibuprofen 50 MG/MG Topical Gel",
                            "RXCUI": "900021",
                            "TTY": "SCD",
                            "GPCKs": [
                                {
                                    "Name": PACK,
                                    "RXCUI": "900040",
                                    "TTY": "GPCK",
                                }
                            ],
                        },
                    ],
                },
            ],
        },
    ],
    "M.json": [
        {
            "Name": "mefenamate",
            "RXCUI": "900002",
            "TTY": "IN",
            "SCDCs": [
                {"Name": "mefenamic acid 250 MG", "RXCUI": "900012", "TTY": "SCDC", "SCDs": []}
            ],
        },
        {
            "Name": "mefenamic acid",
            "RXCUI": "900003",
            "TTY": "PIN",
            "SCDCs": [
                {"Name": "mefenamic acid 250 MG", "RXCUI": "900012", "TTY": "SCDC", "SCDs": []}
            ],
        },
    ],
}


def test_the_script_is_deterministic_and_derives_ingredients_and_routes(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name, records in SYNTHETIC.items():
        (source / name).write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "rxnorm.json"
    module = _script()
    assert module.main([str(source), "--out", str(out)]) == 0
    first = out.read_bytes()
    assert module.main([str(source), "--out", str(out)]) == 0
    assert out.read_bytes() == first
    assert module.main([str(source), "--out", str(out), "--check"]) == 0

    built = json.loads(first)
    assert built["ingredients"] == {"900001": "ibuprofen", "900002": "mefenamate",
                                    **SUPPLEMENTED}
    concepts = built["concepts"]
    assert concepts["900020"]["route"] == "oral"
    assert concepts["900021"]["route"] == "topical"
    assert concepts["900030"] == {
        "tty": "SBD",
        "name": "ibuprofen 200 MG Oral Tablet [Brandx]",
        "ingredients": ["900001"],
        "route": "oral",
    }
    assert concepts["900040"]["route"] == "oral"  # a mixed pack takes its systemic route
    assert concepts["900003"] == {
        "tty": "PIN",
        "name": "mefenamic acid",
        "ingredients": ["900002"],
        "route": None,
    }
    assert built["brands"] == {"brandx": ["900001"]}
    assert "naproxen" in built["provenance"]["ingredients_not_found"]
