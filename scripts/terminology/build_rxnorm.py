"""Build hooks/data/rxnorm.json: RxNorm product codes and brand names → in-scope ingredients.

Usage (stdlib only, from the repository root):

    python scripts/terminology/build_rxnorm.py SOURCE_DIR [--out hooks/data/rxnorm.json]
    python scripts/terminology/build_rxnorm.py SOURCE_DIR --check  # exit 1 if it would change

SOURCE_DIR holds the per-letter ingredient files (``0-9.json``, ``A.json`` … ``Z.json``) that
https://github.com/davidanderson3/rxnorm-ingredients published under ``web/data/`` at commit
a8fcf13a679fa37073e8fa83e11d5e0d8cc07276 (2025-11-20). That repository's script walks NLM's
**RxNorm Current Prescribable Content 10/06/2025** (RxNorm_full_prescribe_10062025.zip, built from
the October 6, 2025 RxNorm full release; https://www.nlm.nih.gov/research/umls/rxnorm/docs/prescribe.html)
along RXNREL: IN/PIN/MIN → SCDC (has_ingredient / has_precise_ingredient) → SCD (constitutes)
→ SBD (has_tradename), GPCK/BPCK (contains) → BN (SBD has_ingredient), with every non-suppressed
SAB=RXNORM concept. Each record is::

    {"Name", "RXCUI", "TTY": IN|PIN|MIN, "SCDCs": [{"Name", "RXCUI", "SCDs": [{"Name", "RXCUI",
      "GPCKs"?, "BPCKs"?, "SBDs"?: [{"Name", "RXCUI", "BNs"?: [{"Name", "RXCUI"}]}]}]}]}

To regenerate: ``git clone https://github.com/davidanderson3/rxnorm-ingredients`` and
``git checkout a8fcf13a679fa37073e8fa83e11d5e0d8cc07276``, then pass its ``web/data`` folder. A
letter file that is missing or empty is skipped and listed in ``provenance.missing_letters``
(the snapshot this file was first built from lacked ``A.json``; see hooks/data/RXNORM.md).

What is derived here, and how:
* in-scope ingredients: IN records named in INGREDIENTS below (RxNorm's own names); a name that is
  a PIN in RxNorm (e.g. "mefenamic acid") resolves to the IN that shares its SCDCs, since each SCDC
  has exactly one IN (RxNorm has_ingredient) and one optional PIN.
* each SCD's ingredients: the INs whose SCDCs constitute it; SBD and packs inherit from their
  SCD(s); BN from its SBDs; MIN from its SCDCs.
* route: from the dose form (DF), which ends every SCD/SBD name by RxNorm's naming convention
  (``<components> <DF>``, SBD ``... [Brand]``), mapped by DOSE_FORM_ROUTES below; packs take the
  route of their in-scope component SCDs, the systemic one when they differ.

The output is deterministic (sorted keys, sorted lists). ``generated_on`` is kept from the existing
output when nothing else changed, so re-running gives a byte-identical file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "hooks" / "data" / "rxnorm.json"

PROVENANCE = {
    "source": "RxNorm Current Prescribable Content (U.S. National Library of Medicine), via the "
    "per-ingredient extract published in github.com/davidanderson3/rxnorm-ingredients web/data",
    "release": "RxNorm_full_prescribe_10062025 (10/06/2025, from the October 6, 2025 RxNorm "
    "full release); extract at commit a8fcf13a679fa37073e8fa83e11d5e0d8cc07276",
    "url": "https://www.nlm.nih.gov/research/umls/rxnorm/docs/prescribe.html",
    "licence": "RxNorm Current Prescribable Content is released by NLM without UMLS licence "
    "restrictions. This product uses publicly available data courtesy of the U.S. National "
    "Library of Medicine (NLM), National Institutes of Health, Department of Health and Human "
    "Services; NLM is not responsible for the product and does not endorse or recommend this "
    "or any other product.",
    "generated_by": "scripts/terminology/build_rxnorm.py",
}

# Ingredients in scope, by the name RxNorm gives the IN (or a PIN that resolves to its IN).
# Groups are for reading only; which class a rule applies to is set in hooks/data/medications.yaml.
INGREDIENTS = {
    "nsaid": [
        "ibuprofen",
        "naproxen",
        "ketorolac",
        "diclofenac",
        "celecoxib",
        "indomethacin",
        "meloxicam",
        "etodolac",
        "piroxicam",
        "sulindac",
        "oxaprozin",
        "diflunisal",
        "mefenamic acid",  # RxNorm: PIN 6693 "mefenamic acid" of IN 257844 "mefenamate"
        "ketoprofen",
        "nabumetone",
        "flurbiprofen",
        "fenoprofen",
        "meclofenamate",
        "tolmetin",
        "salsalate",
        # Choline magnesium trisalicylate is RxNorm MIN "choline / magnesium salicylate"; its IN
        # "choline" also covers choline supplements, so only the salicylate IN is in scope.
        "magnesium salicylate",
    ],
    "aspirin": ["aspirin"],
    "metformin": ["metformin"],
    "ace_inhibitor": [
        "benazepril",
        "captopril",
        "enalapril",
        "fosinopril",
        "lisinopril",
        "moexipril",
        "perindopril",
        "quinapril",
        "ramipril",
        "trandolapril",
    ],
    "arb": [
        "azilsartan",
        "candesartan",
        "eprosartan",
        "irbesartan",
        "losartan",
        "olmesartan",
        "telmisartan",
        "valsartan",
    ],
    "diuretic": [
        "furosemide",
        "bumetanide",
        "torsemide",
        "ethacrynic acid",  # RxNorm: PIN 4109 "ethacrynic acid" of IN 62349 "ethacrynate"
        "hydrochlorothiazide",
        "chlorthalidone",
        "chlorothiazide",
        "indapamide",
        "metolazone",
        "spironolactone",
        "eplerenone",
        "amiloride",
        "triamterene",
    ],
    "beers_kidney": [
        "ciprofloxacin",
        "nitrofurantoin",
        "trimethoprim",
        "sulfamethoxazole",
        "apixaban",
        "dabigatran",  # RxNorm IN 1037042 is named "dabigatran etexilate"
        "dofetilide",
        "edoxaban",
        "enoxaparin",
        "fondaparinux",
        "rivaroxaban",
        "baclofen",
        "duloxetine",
        "gabapentin",
        "levetiracetam",
        "pregabalin",
        "tramadol",
        "cimetidine",
        "famotidine",
        "nizatidine",
        "colchicine",
        "probenecid",
    ],
    "analgesic": ["acetaminophen"],
}
# Our name → the RxNorm IN name, where RxNorm names the IN differently.
RXNORM_IN_NAMES = {"dabigatran": "dabigatran etexilate"}

# RxNorm dose form (TTY=DF, the tail of every SCD/SBD name) → route of exposure.
# Systemic routes: oral, injectable, rectal, nasal, transdermal, inhalation, vaginal (vaginal is
# kept apart so the matcher can decide). Local-only: topical, ophthalmic, otic.
DOSE_FORM_ROUTES = {
    # oral (swallowed, chewed, dissolved in the mouth or placed under the tongue: all absorbed)
    "Oral Tablet": "oral",
    "Oral Capsule": "oral",
    "Oral Solution": "oral",
    "Oral Suspension": "oral",
    "Oral Powder": "oral",
    "Oral Granules": "oral",
    "Oral Pellet": "oral",
    "Oral Film": "oral",
    "Oral Gel": "oral",
    "Oral Liquid": "oral",
    "Oral Lozenge": "oral",
    "Chewable Tablet": "oral",
    "Disintegrating Oral Tablet": "oral",
    "Effervescent Oral Tablet": "oral",
    "Delayed Release Oral Tablet": "oral",
    "Delayed Release Oral Capsule": "oral",
    "Extended Release Oral Tablet": "oral",
    "Extended Release Oral Capsule": "oral",
    "Extended Release Oral Suspension": "oral",
    "Extended Release Suspension": "oral",
    "Sublingual Tablet": "oral",
    "Buccal Tablet": "oral",
    "Buccal Film": "oral",
    "Sublingual Film": "oral",
    "Pill": "oral",
    "Powder for Oral Suspension": "oral",
    "Powder for Oral Solution": "oral",
    "Granules for Oral Solution": "oral",
    "Granules for Oral Suspension": "oral",
    "Extended Release Oral Granules": "oral",
    "Delayed Release Oral Granules": "oral",
    "Oral Paste": "oral",
    "Oral Spray": "oral",
    "Extended Release Enteric Coated Oral Tablet": "oral",
    # injectable: every parenteral form (IV, IM, SC)
    "Injection": "injectable",
    "Injectable Solution": "injectable",
    "Injectable Suspension": "injectable",
    "Prefilled Syringe": "injectable",
    "Auto-Injector": "injectable",
    "Pen Injector": "injectable",
    "Cartridge": "injectable",
    "Injectable Foam": "injectable",
    "Extended Release Injectable Suspension": "injectable",
    "Jet Injector": "injectable",
    "Injectable Liposomal Suspension": "injectable",
    "Intraperitoneal Solution": "injectable",
    # rectal: suppositories and enemas are absorbed systemically (e.g. indomethacin suppository)
    "Rectal Suppository": "rectal",
    "Rectal Suspension": "rectal",
    "Enema": "rectal",
    "Rectal Solution": "rectal",
    "Rectal Foam": "rectal",
    "Rectal Cream": "rectal",
    "Rectal Gel": "rectal",
    "Rectal Ointment": "rectal",
    "Suppository": "rectal",
    # nasal: ketorolac nasal spray (Sprix) is a systemic NSAID (its label carries the systemic
    # ketorolac boxed warnings, renal risk included)
    "Nasal Spray": "nasal",
    "Metered Dose Nasal Spray": "nasal",
    "Nasal Solution": "nasal",
    "Nasal Powder": "nasal",
    "Nasal Gel": "nasal",
    "Nasal Inhalant": "nasal",
    # transdermal: "Transdermal System" is RxNorm's DF for patches designed for systemic delivery
    "Transdermal System": "transdermal",
    "Transdermal Patch": "transdermal",
    # topical: local-effect skin forms. The diclofenac epolamine 1.3% patch (Flector) is RxNorm DF
    # "Medicated Patch" (a local-effect patch, not "Transdermal System"), so topical; diclofenac
    # sodium gel (Voltaren Arthritis Pain) is "Topical Gel"; "Topical Solution" is Pennsaid.
    "Topical Gel": "topical",
    "Topical Solution": "topical",
    "Topical Cream": "topical",
    "Topical Ointment": "topical",
    "Topical Lotion": "topical",
    "Topical Foam": "topical",
    "Topical Spray": "topical",
    "Topical Powder": "topical",
    "Topical Oil": "topical",
    "Medicated Patch": "topical",
    "Medicated Pad": "topical",
    "Medicated Shampoo": "topical",
    "Medicated Bar Soap": "topical",
    "Medicated Liquid Soap": "topical",
    "Cutaneous Solution": "topical",
    "Paste": "topical",
    "Mucosal Spray": "topical",
    "Mouthwash": "topical",
    "Oral Rinse": "topical",  # not swallowed
    "Toothpaste": "topical",
    "Dental Paste": "topical",
    # ophthalmic: eye drops (ketorolac 0.5% Acular) are local-only
    "Ophthalmic Solution": "ophthalmic",
    "Ophthalmic Suspension": "ophthalmic",
    "Ophthalmic Ointment": "ophthalmic",
    "Ophthalmic Gel": "ophthalmic",
    "Ophthalmic Emulsion": "ophthalmic",
    "Ophthalmic Irrigation Solution": "ophthalmic",
    # Omidria (ketorolac/phenylephrine) is added to intraocular irrigation fluid: local to the eye
    "Intraocular Solution": "ophthalmic",
    "Ophthalmic Insert": "ophthalmic",
    # otic: ear drops (ciprofloxacin otic) are local-only
    "Otic Solution": "otic",
    "Otic Suspension": "otic",
    # vaginal
    "Vaginal Cream": "vaginal",
    "Vaginal Gel": "vaginal",
    "Vaginal Tablet": "vaginal",
    "Vaginal Suppository": "vaginal",
    "Vaginal Ring": "vaginal",
    "Vaginal Insert": "vaginal",
    # inhalation
    "Inhalation Solution": "inhalation",
    "Inhalation Powder": "inhalation",
    "Dry Powder Inhaler": "inhalation",
    "Metered Dose Inhaler": "inhalation",
    "Inhalation Spray": "inhalation",
    "Inhalation Suspension": "inhalation",
    # other: irrigation, intravesical and similar forms that fit none of the above
    "Irrigation Solution": "other",
    "Intravesical Solution": "other",
    "Urethral Suppository": "other",
}
SYSTEMIC_ORDER = [
    "injectable",
    "oral",
    "rectal",
    "nasal",
    "transdermal",
    "inhalation",
    "vaginal",
    "other",
    "topical",
    "ophthalmic",
    "otic",
]  # packs: the first route found wins
_DF_BY_LENGTH = sorted(DOSE_FORM_ROUTES, key=len, reverse=True)
_BRACKET = re.compile(r"\s*\[[^\]]*\]\s*$")



# RxNorm IN RxCUIs (RxNav) of in-scope ingredients the extract at PROVENANCE's commit lacks
# (its web/data/A.json is absent). acetaminophen 161 and aspirin 1191 are the codes the earlier
# hand value sets cited; amiloride and apixaban as RxNav lists their ingredient concepts.
# azilsartan is left out: its IN code could not be confirmed here.
SUPPLEMENT_IN = {"acetaminophen": "161", "aspirin": "1191", "amiloride": "644",
                 "apixaban": "1364430"}

def dose_form(name: str) -> str | None:
    """The RxNorm dose form that ends an SCD/SBD name, or None when the table lacks it."""
    base = _BRACKET.sub("", name)
    for df in _DF_BY_LENGTH:
        if base.endswith(" " + df):
            return df
    return None


def load_records(source: Path) -> tuple[list[dict], list[str]]:
    records: list[dict] = []
    missing: list[str] = []
    for key in ["0-9", *[chr(c) for c in range(ord("A"), ord("Z") + 1)]]:
        path = source / f"{key}.json"
        if not path.is_file() or path.stat().st_size == 0:
            missing.append(key)
            continue
        records.extend(json.loads(path.read_text(encoding="utf-8")))
    return records, missing


def build(source: Path) -> tuple[dict, list[str]]:
    records, missing = load_records(source)
    by_cui = {r["RXCUI"]: r for r in records}
    scdc_in: dict[str, str] = {}
    for r in records:
        if r["TTY"] == "IN":
            for c in r["SCDCs"]:
                scdc_in[c["RXCUI"]] = r["RXCUI"]

    # resolve our names to IN RxCUIs
    ins_by_name = {r["Name"].lower(): r["RXCUI"] for r in records if r["TTY"] == "IN"}
    pins_by_name = {r["Name"].lower(): r["RXCUI"] for r in records if r["TTY"] == "PIN"}
    ingredients: dict[str, str] = {}
    not_found: list[str] = []
    for group in INGREDIENTS.values():
        for name in group:
            rx_name = RXNORM_IN_NAMES.get(name, name)
            cui = ins_by_name.get(rx_name)
            if cui is None and rx_name in pins_by_name:
                pin = by_cui[pins_by_name[rx_name]]
                cui = next(
                    (scdc_in[c["RXCUI"]] for c in pin["SCDCs"] if c["RXCUI"] in scdc_in), None
                )
            if cui is None:
                not_found.append(name)
            else:
                ingredients[cui] = by_cui[cui]["Name"].lower()
    # Ingredients the extract lost (its A.json was absent): their RxNorm IN concepts only, from
    # SUPPLEMENT_IN below, so rules can name them and coded ingredient orders match; their
    # products and brand names stay out until the script runs on a complete extract.
    supplemented = []
    for name in list(not_found):
        if name in SUPPLEMENT_IN:
            ingredients[SUPPLEMENT_IN[name]] = name
            by_cui.setdefault(SUPPLEMENT_IN[name], {"RXCUI": SUPPLEMENT_IN[name], "TTY": "IN",
                                                    "Name": name, "SCDCs": []})
            not_found.remove(name)
            supplemented.append(name)
    in_scope = set(ingredients)

    concepts: dict[str, dict] = {}
    pack_routes: dict[str, set] = {}
    bn_ings: dict[str, set] = {}
    unknown_dfs: set[str] = set()

    def add(cui: str, tty: str, name: str, ings, route):
        entry = concepts.setdefault(
            cui, {"tty": tty, "name": name, "ingredients": set(), "route": route}
        )
        entry["ingredients"] |= set(ings)

    # SCD → INs (all of them, from every IN record whose SCDC constitutes it)
    scd_ins: dict[str, set] = {}
    for r in records:
        if r["TTY"] != "IN":
            continue
        for c in r["SCDCs"]:
            for s in c["SCDs"]:
                scd_ins.setdefault(s["RXCUI"], set()).add(r["RXCUI"])

    for r in records:
        tty = r["TTY"]
        scdcs = r["SCDCs"]
        ings = {scdc_in[c["RXCUI"]] for c in scdcs if c["RXCUI"] in scdc_in} & in_scope
        if not ings:
            continue
        if tty == "IN" and r["RXCUI"] not in in_scope:
            continue
        add(r["RXCUI"], tty, r["Name"], ings if tty != "IN" else {r["RXCUI"]}, None)
        for c in scdcs:
            c_ings = {scdc_in.get(c["RXCUI"])} & in_scope
            if not c_ings:
                continue
            add(c["RXCUI"], "SCDC", c["Name"], c_ings, None)
            for s in c["SCDs"]:
                s_ings = scd_ins.get(s["RXCUI"], set()) & in_scope
                df = dose_form(s["Name"])
                if df is None:
                    unknown_dfs.add(s["Name"])
                route = DOSE_FORM_ROUTES.get(df) if df else None
                add(s["RXCUI"], "SCD", s["Name"], s_ings, route)
                for key, ptty in (("GPCKs", "GPCK"), ("BPCKs", "BPCK")):
                    for p in s.get(key, []):
                        add(p["RXCUI"], ptty, p["Name"], s_ings, None)
                        pack_routes.setdefault(p["RXCUI"], set()).add(route)
                for b in s.get("SBDs", []):
                    b_df = dose_form(b["Name"])
                    add(
                        b["RXCUI"],
                        "SBD",
                        b["Name"],
                        s_ings,
                        DOSE_FORM_ROUTES.get(b_df) if b_df else route,
                    )
                    for bn in b.get("BNs", []):
                        add(bn["RXCUI"], "BN", bn["Name"], s_ings, None)
                        bn_ings.setdefault(bn["Name"].lower(), set()).update(s_ings)

    for cui, routes in pack_routes.items():
        known = [r for r in SYSTEMIC_ORDER if r in routes]
        concepts[cui]["route"] = known[0] if known else None

    for cui in (SUPPLEMENT_IN[n] for n in supplemented):
        concepts.setdefault(cui, {"tty": "IN", "name": ingredients[cui], "ingredients": {cui},
                                  "route": None})
    out_concepts = {
        cui: {
            "tty": e["tty"],
            "name": e["name"],
            "ingredients": sorted(e["ingredients"], key=int),
            "route": e["route"],
        }
        for cui, e in concepts.items()
    }
    brands = {name: sorted(ings, key=int) for name, ings in bn_ings.items()}
    provenance = dict(PROVENANCE)
    if supplemented:
        provenance["supplement"] = (
            "RxNorm ingredient (IN) concepts added by SUPPLEMENT_IN in the script, as RxNav "
            "(https://mor.nlm.nih.gov/RxNav/) lists them, for ingredients missing from the "
            "extract: " + ", ".join(f"{n} {SUPPLEMENT_IN[n]}" for n in sorted(supplemented))
            + "; their products and brand names are not included")
    if missing:
        provenance["missing_letters"] = missing
    if not_found:
        provenance["ingredients_not_found"] = sorted(not_found)
    payload = {
        "provenance": provenance,
        "ingredients": ingredients,
        "concepts": out_concepts,
        "brands": brands,
    }
    warnings = [f"no dose form in table for: {n}" for n in sorted(unknown_dfs)]
    warnings += [f"ingredient not found in source: {n}" for n in sorted(not_found)]
    return payload, warnings


def render(payload: dict, generated_on: str) -> str:
    payload = dict(payload)
    payload["provenance"] = {**payload["provenance"], "generated_on": generated_on}
    return json.dumps(payload, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with the per-letter JSON files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the output would change")
    args = parser.parse_args(argv)

    payload, warnings = build(args.source)
    for w in warnings:
        sys.stderr.write(f"warning: {w}\n")
    today = dt.date.today().isoformat()
    text = render(payload, today)
    if args.out.is_file():
        old = args.out.read_text(encoding="utf-8")
        old_date = json.loads(old).get("provenance", {}).get("generated_on", today)
        if render(payload, old_date) == old:
            text = old  # unchanged content keeps its date: re-runs are byte-identical
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        sys.stdout.write("up to date\n" if same else f"{args.out} would change\n")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    c = payload["concepts"]
    sys.stdout.write(
        f"wrote {args.out}: {len(payload['ingredients'])} ingredients, {len(c)} concepts, "
        f"{len(payload['brands'])} brands\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
