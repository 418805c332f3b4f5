#!/usr/bin/env python3
"""Regenerate hooks/data/loinc_kidney.yaml: the LOINC code families the kidney services search
Observations by (eGFR, serum creatinine, urine albumin/creatinine ratio, ...).

Membership is decided by rules on the six LOINC axes (COMPONENT, PROPERTY, TIME_ASPCT, SYSTEM,
SCALE_TYP, METHOD_TYP), not by a list of codes, so a new LOINC term joins its family on the next
run. The candidate terms come from one of two kinds of source:

* ``--loinc-csv LoincTable/Loinc.csv`` (a LOINC release, https://loinc.org/downloads/): the axes
  are read from their columns, the name from LONG_COMMON_NAME, and STATUS is recorded;
* ``--valueset FILE.json`` (repeatable; FHIR ValueSet expansions, e.g. the VSAC value sets that the
  CMS "Kidney Health Evaluation" eCQM uses): the axes are read back from each term's LOINC long
  common name, whose fixed form is ``COMPONENT [PROPERTY] in [TIME] SYSTEM by METHOD``.

Terms that no given source lists but the services need (older codes still in charts, pediatric
equations, cystatin C, protein/creatinine) are the SUPPLEMENT rows below, each with its source;
they pass through the same rules. See hooks/data/LOINC.md for provenance and how to rerun.

Usage (stdlib + pyyaml; output is sorted, so the same sources give the same file):

    python scripts/terminology/build_loinc.py \
        --valueset .../valueset-2.16.840.1.113883.3.6929.3.1000.json ... \
        --generated-on 2026-12-05 -o hooks/data/loinc_kidney.yaml
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

LOINC_SYSTEM = "http://loinc.org"

# The notice LOINC's licence requires with any copy of LOINC content (https://loinc.org/license).
LOINC_NOTICE = (
    "This material contains content from LOINC (http://loinc.org). LOINC is copyright "
    "\u00a9 1995-2024, Regenstrief Institute, Inc. and the Logical Observation Identifiers Names "
    "and Codes (LOINC) Committee and is available at no cost under the license at "
    "http://loinc.org/license. LOINC\u00ae is a registered United States trademark of Regenstrief "
    "Institute, Inc."
)


@dataclass(frozen=True)
class Term:
    code: str
    name: str  # LOINC long common name
    component: str
    prop: str  # PROPERTY abbreviation (MCnc, SCnc, MRto, SRto, Ratio, ArVRat, ...)
    time: str  # TIME_ASPCT (Pt, 24H, 12H, ...)
    system: str  # SYSTEM abbreviation (Ser/Plas, Bld, Urine, ...)
    scale: str  # SCALE_TYP (Qn, Ord, ...)
    method: str  # METHOD_TYP, "" when none
    status: str = ""  # LOINC STATUS when the source has it (ACTIVE, DISCOURAGED, DEPRECATED)
    source: str = ""


# --- Reading the axes back from a long common name ------------------------------------------
# LOINC Users' Guide, "Long Common Name": the PROPERTY is shown in brackets by its display name,
# the SYSTEM after "in" (with the TIME_ASPCT in front of it when not a point in time) and the
# METHOD after "by". Only the display names met in the families below are mapped; anything else
# maps to None and the term is reported as not understood rather than guessed.
PROPERTY_NAMES = {
    "Mass/volume": "MCnc",
    "Moles/volume": "SCnc",
    "Mass or Moles/volume": "MSCnc",
    "Mass Ratio": "MRto",
    "Molar ratio": "SRto",
    "Ratio": "Ratio",
    "Volume Rate/Area": "ArVRat",
    "Mass/time": "MRat",
    "Presence": "PrThr",
}
SYSTEM_NAMES = {
    "Serum or Plasma": "Ser/Plas",
    "Serum, Plasma or Blood": "Ser/Plas/Bld",
    "Serum": "Ser",
    "Plasma": "Plas",
    "Blood": "Bld",
    "Arterial blood": "BldA",
    "Venous blood": "BldV",
    "Capillary blood": "BldC",
    "Urine": "Urine",
    "DBS": "Bld.dot",
}
TIMED = re.compile(r"^(?P<n>\d+) hour (?P<system>.+)$")
LCN = re.compile(
    r"^(?P<component>.+?) \[(?P<property>[^\]]+)\] in (?P<system>.+?)"
    r"(?: by (?P<method>.+?))?(?: --(?P<challenge>.+))?$"
)
# Adjustments written into the long name of the eGFR components ("... among females").
AMONG = re.compile(r"^(?P<base>.+?) among (?P<who>.+)$")


def term_from_long_name(code: str, name: str, source: str, status: str = "") -> Term | None:
    m = LCN.match(name)
    if not m:
        return None
    prop = PROPERTY_NAMES.get(m["property"])
    system_text, time = m["system"], "Pt"
    timed = TIMED.match(system_text)
    if timed:
        system_text, time = timed["system"], f"{timed['n']}H"
    system = SYSTEM_NAMES.get(system_text)
    if prop is None or system is None:
        return None
    component = m["component"]
    among = AMONG.match(component)
    if among:  # LOINC writes the adjustment as a COMPONENT subpart: "...predicted.female"
        component = f"{among['base']}.{among['who']}"
    if m["challenge"]:  # challenge is the 2nd COMPONENT subpart: "Creatinine^post dialysis"
        component = f"{component}^{m['challenge']}"
    return Term(code, name, component, prop, time, system, "Qn", m["method"] or "", status, source)


# --- Membership rules ---------------------------------------------------------------------------
EGFR_COMPONENT = "Glomerular filtration rate/1.73 sq M.predicted"
SERUM_PLASMA_BLOOD = {"Ser/Plas", "Ser/Plas/Bld", "Ser", "Plas", "Bld", "BldA", "BldV", "BldC"}
UACR_COMPONENTS = {"Albumin/Creatinine", "Microalbumin/Creatinine"}

# family -> (canonical unit, rule text written above the family in the YAML)
FAMILIES: dict[str, tuple[str, str]] = {
    "egfr_creatinine": (
        "mL/min/{1.73_m2}",
        f"COMPONENT {EGFR_COMPONENT}[.adjustment], PROPERTY ArVRat, TIME Pt, SYSTEM Ser/Plas or "
        "Ser/Plas/Bld, SCALE Qn, METHOD 'Creatinine-based formula (...)' other than Schwartz",
    ),
    "egfr_cystatin": (
        "mL/min/{1.73_m2}",
        f"COMPONENT {EGFR_COMPONENT}, PROPERTY ArVRat, TIME Pt, SYSTEM Ser/Plas[/Bld], SCALE Qn, "
        "METHOD 'Cystatin C-based formula' without creatinine",
    ),
    "egfr_creatinine_cystatin": (
        "mL/min/{1.73_m2}",
        f"COMPONENT {EGFR_COMPONENT}, PROPERTY ArVRat, TIME Pt, SYSTEM Ser/Plas[/Bld], SCALE Qn, "
        "METHOD 'Creatinine and Cystatin C-based formula (...)'",
    ),
    "egfr_method_unspecified": (
        "mL/min/{1.73_m2}",
        f"COMPONENT {EGFR_COMPONENT}, PROPERTY ArVRat, TIME Pt, SYSTEM Ser/Plas[/Bld], SCALE Qn, "
        "no METHOD (the equation is not stated by the code)",
    ),
    "egfr_pediatric": (
        "mL/min/{1.73_m2}",
        f"COMPONENT {EGFR_COMPONENT}, PROPERTY ArVRat, TIME Pt, SYSTEM Ser/Plas[/Bld], SCALE Qn, "
        "METHOD a pediatric equation (Schwartz)",
    ),
    "creatinine_serum_mass": (
        "mg/dL",
        "COMPONENT Creatinine (no challenge), PROPERTY MCnc, TIME Pt, SYSTEM serum/plasma/blood "
        "(Ser/Plas, Ser/Plas/Bld, Bld, BldA, ...), SCALE Qn",
    ),
    "creatinine_serum_molar": (
        "umol/L",
        "COMPONENT Creatinine (no challenge), PROPERTY SCnc, TIME Pt, SYSTEM serum/plasma/blood, "
        "SCALE Qn",
    ),
    "uacr_mass": (
        "mg/g",
        "COMPONENT Albumin/Creatinine or Microalbumin/Creatinine, PROPERTY MRto or Ratio, TIME Pt, "
        "SYSTEM Urine, SCALE Qn, METHOD not Test strip",
    ),
    "uacr_molar": (
        "mg/mmol",
        "COMPONENT Albumin/Creatinine or Microalbumin/Creatinine, PROPERTY SRto, TIME Pt, "
        "SYSTEM Urine, SCALE Qn",
    ),
    "uacr_timed": (
        "mg/g",
        "COMPONENT Albumin/Creatinine or Microalbumin/Creatinine, PROPERTY MRto, SRto or Ratio, "
        "TIME a timed collection (12H, 24H, ...), SYSTEM Urine, SCALE Qn",
    ),
    "uacr_test_strip": (
        "mg/g",
        "COMPONENT Albumin/Creatinine or Microalbumin/Creatinine, TIME Pt, SYSTEM Urine, "
        "SCALE Qn, METHOD Test strip (reference only: strips are often semi-quantitative)",
    ),
    "cystatin_c": (
        "mg/L",
        "COMPONENT Cystatin C, PROPERTY MCnc, TIME Pt, SYSTEM Ser/Plas[/Bld], SCALE Qn",
    ),
    "upcr": (
        "mg/g",
        "COMPONENT Protein/Creatinine, PROPERTY MRto, SRto or Ratio, any TIME, SYSTEM Urine, "
        "SCALE Qn (reference only, not used by the services)",
    ),
}


def equation(method: str) -> str:
    """The equation named in the METHOD ("Creatinine-based formula (CKD-EPI 2021)" -> CKD-EPI
    2021); "" when the method names none."""
    m = re.search(r"\(([^)]+)\)\s*$", method)
    return m[1] if m else ""


def family_of(t: Term) -> str | None:
    if t.scale != "Qn":
        return None
    base = t.component  # a challenge ("Creatinine^post dialysis") makes it another component
    if t.component == EGFR_COMPONENT or t.component.startswith(EGFR_COMPONENT + "."):
        if t.prop != "ArVRat" or t.time != "Pt" or t.system not in {"Ser/Plas", "Ser/Plas/Bld"}:
            return None
        method = t.method.lower()
        if "schwartz" in method:
            return "egfr_pediatric"
        if "creatinine and cystatin" in method:
            return "egfr_creatinine_cystatin"
        if "cystatin" in method:
            return "egfr_cystatin"
        if "creatinine-based" in method:
            return "egfr_creatinine"
        if not method:
            return "egfr_method_unspecified"
        return None
    if base == "Creatinine" and t.time == "Pt" and t.system in SERUM_PLASMA_BLOOD:
        return {"MCnc": "creatinine_serum_mass", "SCnc": "creatinine_serum_molar"}.get(t.prop)
    if base in UACR_COMPONENTS and t.system == "Urine":
        if t.method.lower() == "test strip":
            return "uacr_test_strip" if t.time == "Pt" else None
        if t.time != "Pt":
            return "uacr_timed" if t.prop in {"MRto", "SRto", "Ratio"} else None
        return {"MRto": "uacr_mass", "Ratio": "uacr_mass", "SRto": "uacr_molar"}.get(t.prop)
    if base == "Cystatin C" and t.prop == "MCnc" and t.time == "Pt":
        return "cystatin_c" if t.system in {"Ser/Plas", "Ser/Plas/Bld"} else None
    if base == "Protein/Creatinine" and t.system == "Urine":
        return "upcr" if t.prop in {"MRto", "SRto", "Ratio"} else None
    return None


def notes_for(t: Term, family: str) -> str:
    notes = []
    prefix = EGFR_COMPONENT + "."
    who = t.component[len(prefix) :] if t.component.startswith(prefix) else ""
    if who in {"black", "non black", "blacks", "non-blacks"}:
        notes.append("race-specific result; NKF-ASN 2021 recommends race-free CKD-EPI 2021")
    elif who:
        notes.append(f"result for {who} only")
    if t.system == "Ser/Plas" and family.startswith("egfr"):
        notes.append("SYSTEM Ser/Plas (older term; current eGFR terms are Ser/Plas/Bld)")
    if t.system == "BldA":
        notes.append("arterial blood")
    elif t.system == "Bld":
        notes.append("whole blood")
    if t.prop == "Ratio" and family.startswith("uacr"):
        notes.append("PROPERTY Ratio: the code fixes no unit; convert by the Observation's unit")
    if family == "egfr_method_unspecified":
        notes.append("equation not stated by the code; may be creatinine or cystatin C based")
    if t.status and t.status != "ACTIVE":
        notes.append(f"LOINC status {t.status}")
    if t.source.startswith("supplement"):
        notes.append(t.source.split(": ", 1)[1])
    return "; ".join(notes)


# --- Sources ----------------------------------------------------------------------------------
# Terms the value-set sources do not list. Each row: code, LOINC long common name, source.
SUPPLEMENT: list[tuple[str, str, str]] = [
    (
        "33914-3",
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma "
        "by Creatinine-based formula (MDRD)",
        "supplement: not in the VSAC eGFR expansion (LOINC 2.76); still carried by charts and by "
        "this service before; axes from LOINC mapping guidance 'Choosing the Correct LOINC for "
        "eGFR' (2022), name from OHDSI Athena concept 3030354",
    ),
    (
        "50384-7",
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or "
        "Blood by Creatinine-based formula (Schwartz)",
        "supplement: pediatric; axes from LOINC mapping guidance 'Choosing the Correct LOINC for "
        "eGFR' (2022), name from OHDSI Athena concept 3030104",
    ),
    (
        "33863-2",
        "Cystatin C [Mass/volume] in Serum or Plasma",
        "supplement: VSAC-derived list lab_creatinine_cystatin_c in "
        "smart-on-fhir/cumulus-library-kidney-transplant",
    ),
]
for _code, _name in [
    ("2890-2", "Protein/Creatinine [Mass Ratio] in Urine"),
    ("34366-5", "Protein/Creatinine [Ratio] in Urine"),
    ("13801-6", "Protein/Creatinine [Mass Ratio] in 24 hour Urine"),
    ("40486-3", "Protein/Creatinine [Ratio] in 24 hour Urine"),
    ("60678-0", "Protein/Creatinine [Mass Ratio] in 12 hour Urine"),
]:
    SUPPLEMENT.append(
        (
            _code,
            _name,
            "supplement: VSAC-derived list lab_creatinine_urine_protein_cr_ratio in "
            "smart-on-fhir/cumulus-library-kidney-transplant",
        )
    )


def read_valueset(path: Path) -> tuple[list[Term], list[str], dict]:
    vs = json.loads(path.read_text(encoding="utf-8"))
    terms, skipped = [], []
    versions = set()
    for c in vs.get("expansion", {}).get("contains", []):
        if c.get("system") != LOINC_SYSTEM:
            continue
        versions.add(c.get("version", ""))
        t = term_from_long_name(c["code"], c.get("display", ""), vs.get("title", path.name))
        if t is None:
            skipped.append(f"{c['code']} {c.get('display', '')!r} (long name not understood)")
        else:
            terms.append(t)
    meta = {
        "title": vs.get("title", ""),
        "oid": vs.get("id", ""),
        "version": vs.get("version", ""),
        "expansion": vs.get("expansion", {}).get("identifier", ""),
        "loinc": ",".join(sorted(v for v in versions if v)),
    }
    return terms, skipped, meta


def read_loinc_csv(path: Path) -> list[Term]:
    terms = []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("CLASSTYPE") not in (None, "", "1"):  # 1 = laboratory terms
                continue
            terms.append(
                Term(
                    row["LOINC_NUM"],
                    row.get("LONG_COMMON_NAME", ""),
                    row["COMPONENT"],
                    row["PROPERTY"],
                    row["TIME_ASPCT"],
                    row["SYSTEM"],
                    row["SCALE_TYP"],
                    row.get("METHOD_TYP", ""),
                    row.get("STATUS", ""),
                    "Loinc.csv",
                )
            )
    return terms


# --- Output -----------------------------------------------------------------------------------
def q(s: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(s, ensure_ascii=False)


def render(families: dict[str, dict[str, Term]], provenance: dict[str, str]) -> str:
    out = [
        "# LOINC code families for the kidney services. GENERATED by "
        "scripts/terminology/build_loinc.py;",
        "# do not edit by hand. Provenance, rules and licence: hooks/data/LOINC.md.",
        "provenance:",
    ]
    for key in ("source", "release", "url", "licence", "generated_by", "generated_on"):
        out.append(f"  {key}: {q(provenance[key])}")
    out.append("families:")
    for fam, (unit, rule) in FAMILIES.items():
        out.append(f"  # {rule}")
        out.append(f"  {fam}:")
        out.append(f"    unit: {q(unit)}")
        codes = families.get(fam, {})
        if not codes:
            out.append("    codes: {}")
            continue
        out.append("    codes:")
        for code in sorted(codes, key=lambda c: [int(p) for p in c.split("-")]):
            t = codes[code]
            fields = [f"name: {q(t.name)}"]
            eq = (equation(t.method) or t.method) if fam.startswith("egfr") else t.method
            if eq:
                fields.append(f"method: {q(eq)}")
            notes = notes_for(t, fam)
            if notes:
                fields.append(f"notes: {q(notes)}")
            out.append(f"      {q(code)}: {{{', '.join(fields)}}}")
    return "\n".join(out) + "\n"


def build(terms: list[Term]) -> tuple[dict[str, dict[str, Term]], list[str]]:
    families: dict[str, dict[str, Term]] = {}
    seen: dict[str, str] = {}
    excluded = []
    for t in terms:
        fam = family_of(t)
        if fam is None:
            excluded.append(f"{t.code} {t.name!r}")
            continue
        if t.code in seen:
            if seen[t.code] != fam:
                raise SystemExit(f"{t.code} falls in {seen[t.code]} and {fam}")
            continue  # the same term from a second source; the first one wins
        seen[t.code] = fam
        families.setdefault(fam, {})[t.code] = t
    return families, sorted(set(excluded))


def log(message: str) -> None:
    sys.stderr.write(message + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--valueset", type=Path, action="append", default=[])
    ap.add_argument("--loinc-csv", type=Path)
    ap.add_argument("--source", default="", help="provenance: where the sources came from")
    ap.add_argument("--release", default="", help="provenance: LOINC / VSAC release")
    ap.add_argument("--url", default="", help="provenance: URL of the source")
    ap.add_argument("--generated-on", default=dt.date.today().isoformat())
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    if not args.valueset and not args.loinc_csv:
        ap.error("give --valueset files and/or --loinc-csv")

    terms: list[Term] = []
    if args.loinc_csv:
        terms += read_loinc_csv(args.loinc_csv)
    releases = []
    for path in sorted(args.valueset):
        vs_terms, skipped, meta = read_valueset(path)
        terms += vs_terms
        releases.append(
            f"{meta['title']} ({meta['oid']}) version {meta['version']}, expansion "
            f"{meta['expansion']}, LOINC {meta['loinc']}"
        )
        for s in skipped:
            log(f"skipped {s}")
    terms += [t for t in (term_from_long_name(c, n, s) for c, n, s in SUPPLEMENT) if t]

    families, excluded = build(terms)
    for e in excluded:
        log(f"excluded by the rules: {e}")
    provenance = {
        "source": args.source or "; ".join(releases) or "LOINC table",
        "release": args.release or "; ".join(releases),
        "url": args.url,
        "licence": LOINC_NOTICE,
        "generated_by": "scripts/terminology/build_loinc.py",
        "generated_on": args.generated_on,
    }
    text = render(families, provenance)
    parsed = yaml.safe_load(text)  # the file must read back to what was meant
    if set(parsed["families"]) != set(FAMILIES):
        raise SystemExit("the rendered YAML does not read back")
    args.output.write_text(text, encoding="utf-8")
    log(f"wrote {args.output}: {sum(len(v) for v in families.values())} codes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
