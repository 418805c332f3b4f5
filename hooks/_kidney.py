"""Kidney function shared by the services: CKD-EPI 2021 eGFR, KDIGO categories, and what a
chart says about kidney function (`assess`). Sources: docs/clinical.md.

Inputs outside the equations' domain give None, never an exception. What is read from a chart:
- kidney function is the **newest** result among reported eGFRs (every LOINC family: creatinine,
  cystatin C, both) and eGFRs we calculate from each creatinine, whatever its age relative to the
  others (a reported eGFR from last year never outweighs yesterday's creatinine);
- a result reported as a bound (`<15`, `>60`) stays a bound: categories and rules use what the
  bound proves, the risk equation is not fed a bound;
- sex other or unknown: both CKD-EPI 2021 equations, and the lower result, said on the card;
- where the kidney failure risk equation is valid (Tangri 2011/2016): adults with eGFR < 60, not
  on dialysis, without a kidney transplant, not pregnant, no acute kidney injury or disease.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from cds_service.features import (
    LOINC,
    ChartPass,
    CodeMap,
    FeatureValue,
    FeatureVector,
    Reading,
    parse_features,
    readings_many,
)

DATA = Path(__file__).parent / "data"

# CKD-EPI 2021 creatinine equation, without race (Inker LA, et al. N Engl J Med.
# 2021;385:1737-1749. doi:10.1056/NEJMoa2102953):
#   eGFR = 142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^-1.200 × 0.9938^age × 1.012 [female]
#   κ = 0.7 (female) / 0.9 (male); α = -0.241 (female) / -0.302 (male); Scr in mg/dL.
_KAPPA = {True: 0.7, False: 0.9}
_ALPHA = {True: -0.241, False: -0.302}

# KDIGO 2024 GFR categories (mL/min/1.73 m²): lower bound → (category, description).
G_CATEGORIES = (
    (90, "G1", "normal or high"),
    (60, "G2", "mildly decreased"),
    (45, "G3a", "mildly to moderately decreased"),
    (30, "G3b", "moderately to severely decreased"),
    (15, "G4", "severely decreased"),
    (0, "G5", "kidney failure"),
)
# KDIGO 2024 albuminuria categories by urine ACR (mg/g): A1 < 30, A2 30-300, A3 > 300.
A_CATEGORIES = {
    "A1": "normal to mildly increased",
    "A2": "moderately increased",
    "A3": "severely increased",
}
# Bounds a lab writes in front of a number (FHIR Quantity.comparator), as words on a card.
COMPARATOR_TEXT = {"<": "< ", "<=": "≤ ", ">": "> ", ">=": "≥ ", None: ""}


def ckd_epi_2021(creatinine_mg_dl: float, age_years: float, female: bool) -> float | None:
    """eGFR (mL/min/1.73 m²) from serum creatinine; None outside adult, positive inputs."""
    if not (creatinine_mg_dl > 0 and 18 <= age_years <= 120):
        return None
    ratio = creatinine_mg_dl / _KAPPA[female]
    egfr = (142 * min(ratio, 1.0) ** _ALPHA[female] * max(ratio, 1.0) ** -1.200
            * 0.9938 ** age_years)
    return egfr * 1.012 if female else egfr


def cockcroft_gault(creatinine_mg_dl: float, age_years: float, weight_kg: float,
                    female: bool) -> float | None:
    """Creatinine clearance (mL/min), Cockcroft DW, Gault MH. Nephron. 1976;16(1):31-41:
    (140 - age) × weight / (72 × Scr), × 0.85 for women. Actual body weight, as published."""
    if not (creatinine_mg_dl > 0 and 18 <= age_years <= 120 and 20 <= weight_kg <= 400):
        return None
    crcl = (140 - age_years) * weight_kg / (72 * creatinine_mg_dl)
    return crcl * 0.85 if female else crcl


def g_category(egfr: float, comparator: str | None = None) -> tuple[str, str]:
    """KDIGO G category; a bound gives the category the bound proves ("<15" is G5), or the
    span of categories it leaves open (">60" is "G1-G2")."""
    if comparator in (">", ">="):
        top, bottom = G_CATEGORIES[0], _g(egfr if comparator == ">=" else egfr + 1e-9)
        if top[1] == bottom[1]:
            return bottom[1:]
        return f"{top[1]}-{bottom[1]}", f"{bottom[2]} or better"
    if comparator == "<":
        return _g(egfr - 1e-9)[1:]
    return _g(egfr)[1:]


def _g(egfr: float) -> tuple[float, str, str]:
    for row in G_CATEGORIES:
        if egfr >= row[0]:
            return row
    return G_CATEGORIES[-1]


def a_category(uacr_mg_g: float) -> tuple[str, str]:
    category = "A3" if uacr_mg_g > 300 else "A2" if uacr_mg_g >= 30 else "A1"
    return category, A_CATEGORIES[category]


def below(value: float, comparator: str | None, limit: float) -> bool:
    """Whether a result, possibly a bound, is certainly below `limit` ("<15" is below 30,
    ">60" is not below 90: it may be 95)."""
    if comparator in (">", ">="):
        return False
    return value <= limit if comparator == "<" else value < limit


def at_least(value: float, comparator: str | None, limit: float) -> bool:
    """Whether a result, possibly a bound, is certainly at least `limit`."""
    if comparator in ("<", "<="):
        return False
    return value >= limit if comparator in (None, ">=") else value >= limit - 1e-9


# ---------------------------------------------------------------------------------------------
# Codes (hooks/data/loinc_kidney.yaml, hooks/data/kidney_conditions.yaml: provenance in
# hooks/data/LOINC.md and docs/clinical.md)

LOINC_FAMILIES: Mapping[str, tuple[str, ...]] = {
    name: tuple(f"{LOINC}|{code}" for code in sorted(family["codes"]))
    for name, family in yaml.safe_load(
        (DATA / "loinc_kidney.yaml").read_text(encoding="utf-8"))["families"].items()}
CONDITION_SETS: Mapping[str, tuple[str, ...]] = {
    name: tuple(entry.get("codes") or ()) + tuple(f"{p}*" for p in entry.get("prefixes") or ())
    for name, entry in yaml.safe_load(
        (DATA / "kidney_conditions.yaml").read_text(encoding="utf-8"))["sets"].items()}


def family_codes(*families: str) -> tuple[str, ...]:
    return tuple(code for name in families for code in LOINC_FAMILIES[name])


# Every estimate of GFR: creatinine-, cystatin C- and combined equations, those that do not
# name their equation, and paediatric ones. Test-strip urine ACR (semi-quantitative) and
# protein/creatinine ratios are left out (hooks/data/LOINC.md).
EGFR_FAMILIES = ("egfr_creatinine", "egfr_cystatin", "egfr_creatinine_cystatin",
                 "egfr_method_unspecified", "egfr_pediatric")
CREATININE_FAMILIES = ("creatinine_serum_mass", "creatinine_serum_molar")
UACR_FAMILIES = ("uacr_mass", "uacr_molar", "uacr_timed")


def search_codes(*families: str) -> str:
    """The `code` parameter of an Observation search for these families."""
    return ",".join(family_codes(*families))


def observation_search(*families: str) -> str:
    """A prefetch template: the patient's Observations in these families."""
    return "Observation?patient={{context.patientId}}&code=" + search_codes(*families)


# Prefetch keys both kidney services read, with their templates: each service names the ones it
# asks for, so a key means the same data in either. No `_sort` or `_count`: Epic documents no
# `_sort` for Observation search, and an R4 server ignores what it does not support, so `_count`
# would page the server's order and could cut off the newest result. The newest is taken by its
# date from whatever comes back (cds_service/features/); site_config/README.md, "Readiness
# check before go-live".
PREFETCH: Mapping[str, str] = MappingProxyType({
    "egfr": observation_search(*EGFR_FAMILIES),
    "creatinine": observation_search(*CREATININE_FAMILIES),
    "uacr": observation_search(*UACR_FAMILIES),
    "patient": "Patient/{{context.patientId}}",
    # CKD, dialysis, transplant, pregnancy and AKI on the problem list.
    "conditions": "Condition?patient={{context.patientId}}&clinical-status=active",
    "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
})


def _inputs() -> tuple[Any, ...]:
    """hooks/data/kidney_inputs.yaml with each `families:` replaced by the family codes."""
    path = DATA / "kidney_inputs.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))["features"]
    for feature in raw:
        source = feature["source"]
        if "families" in source:
            source["codes"] = list(family_codes(*source.pop("families")))
        if "condition_sets" in source:
            source["codes"] = [c for name in source.pop("condition_sets")
                               for c in CONDITION_SETS[name]]
    return parse_features(raw, str(path))


INPUTS = _inputs()
_SPECS = {spec.name: spec for spec in INPUTS}
# LOINC 98979-8: eGFR by CKD-EPI 2021 (creatinine, without race). Given to the model when we
# calculated the eGFR ourselves, exactly as if the laboratory had reported it.
CALCULATED_EGFR_LOINC = "98979-8"
# LOINC 9318-7: albumin/creatinine [mass ratio] in urine, the unit (mg/g) the models read.
UACR_LOINC = "9318-7"

# Acute kidney injury and disease, from the results themselves (docs/clinical.md, "Where the
# risk equation applies"): KDIGO 2012 AKI guideline rec. 2.1.1 — creatinine up ≥ 0.3 mg/dL
# within 48 hours, or ≥ 1.5 × a value of the prior 7 days; KDIGO 2012 section 2.5 (acute kidney
# disease) — GFR down ≥ 35% within 3 months.
AKI_RISE_MG_DL, AKI_RISE_WINDOW = 0.3, timedelta(hours=48)
AKI_RATIO, AKI_RATIO_WINDOW = 1.5, timedelta(days=7)
AKD_FALL, AKD_WINDOW = 0.35, timedelta(days=90)


@dataclass(frozen=True)
class Egfr:
    """One kidney-function result: reported by the laboratory, or calculated by us."""

    value: float                  # whole number, as laboratories report it
    comparator: str | None
    date: str
    instant: datetime
    source: str | None
    creatinine: Reading | None = None   # when we calculated it
    sex_basis: str | None = None        # how sex entered a calculation we made

    def text(self) -> str:
        """"eGFR 28", "eGFR < 15", or "calculated eGFR 27"."""
        calculated = "calculated " if self.creatinine is not None else ""
        return f"{calculated}eGFR {COMPARATOR_TEXT[self.comparator]}{self.value:g}"


@dataclass(frozen=True)
class KidneyStatus:
    latest: Egfr | None = None
    uacr: FeatureValue | None = None
    uacr_last_12_months: int = 0
    age: float | None = None
    history: tuple[Egfr, ...] = ()        # every eGFR, oldest first
    conditions: frozenset[str] = frozenset()   # kidney_conditions.yaml sets active on the chart
    acute: str | None = None              # why the latest value looks acute (AKI/AKD)
    last_kidney_function: str | None = None    # date of the newest eGFR or creatinine
    weight: FeatureValue | None = None
    creatinine: Reading | None = None     # the newest creatinine
    female: bool | None = None            # None: sex other, unknown or not recorded
    notes: tuple[str, ...] = ()
    extra_resources: tuple[Mapping[str, Any], ...] = field(default=())

    # The latest eGFR as earlier code reads it.
    @property
    def egfr(self) -> float | None:
        return self.latest.value if self.latest else None

    @property
    def egfr_comparator(self) -> str | None:
        return self.latest.comparator if self.latest else None

    @property
    def egfr_date(self) -> str | None:
        return self.latest.date if self.latest else None

    @property
    def calculated_from(self) -> Reading | None:
        return self.latest.creatinine if self.latest else None

    @property
    def g(self) -> tuple[str, str] | None:
        return g_category(self.latest.value, self.latest.comparator) if self.latest else None

    @property
    def a(self) -> tuple[str, str] | None:
        if self.uacr is None:
            return None
        value = self.uacr.value
        if self.uacr.comparator == "<" and value <= 30:
            return a_category(min(value, 29.9))
        return a_category(value)

    @property
    def has_data(self) -> bool:
        return self.latest is not None or self.uacr is not None

    def egfr_below(self, limit: float) -> bool:
        return self.latest is not None and below(self.latest.value, self.latest.comparator,
                                                 limit)

    def uacr_at_least(self, limit: float) -> bool:
        return self.uacr is not None and at_least(self.uacr.value, self.uacr.comparator, limit)

    def uacr_text(self) -> str:
        return f"urine ACR {COMPARATOR_TEXT[self.uacr.comparator]}{number(self.uacr.value)} mg/g"

    def creatinine_text(self) -> str:
        """"creatinine 2.10 mg/dL (converted from µmol/L)" for a calculated eGFR."""
        c = self.calculated_from
        notes = f" ({'; '.join(c.notes)})" if c.notes else ""
        return f"creatinine {c.value:.2f} mg/dL{notes}"

    def egfr_text(self) -> str:
        return self.latest.text()

    def risk_exclusions(self) -> tuple[str, ...]:
        """Why the kidney failure risk equation does not apply to this patient (Tangri 2011:
        adults with CKD G3-G5, not on dialysis, no transplant; docs/clinical.md)."""
        why = []
        if self.age is not None and self.age < 18:
            why.append("it is validated in adults only")
        if "dialysis" in self.conditions:
            why.append("the patient is on dialysis")
        if "kidney_transplant" in self.conditions:
            why.append("the patient has a kidney transplant")
        if "pregnancy" in self.conditions:
            why.append("it is not validated in pregnancy")
        if self.acute:
            why.append(f"kidney function is changing acutely ({self.acute})")
        if self.latest is not None:
            if not self.egfr_below(60) and self.latest.comparator in (None, ">", ">="):
                why.append("it applies to eGFR below 60 (CKD G3-G5)")
            elif self.latest.comparator is not None:
                why.append(f"the eGFR was reported as a bound ({self.latest.text()})")
        if self.uacr is not None and self.uacr.comparator is not None:
            why.append(f"the urine ACR was reported as a bound ({self.uacr_text()})")
        return tuple(why)


def assess(resources: Iterable[Any], *, now: datetime,
           code_map: CodeMap | None = None) -> KidneyStatus:
    """What the chart says about kidney function at `now` (see the module docstring)."""
    return assess_chart(ChartPass([INPUTS], resources, now=now, code_map=code_map))


def chart_pass(resources: Iterable[Any], *, now: datetime, code_map: CodeMap | None,
               model: Any = None) -> ChartPass:
    """One pass over the chart for INPUTS and the features of `model` (a `ModelBinding`)."""
    groups = [INPUTS, *(model.feature_groups() if model is not None else ())]
    return ChartPass(groups, resources, now=now, code_map=code_map)


def assess_chart(chart: ChartPass) -> KidneyStatus:
    """`assess` from a pass whose groups include INPUTS."""
    egfrs, creatinines = chart.readings(INPUTS, (_SPECS["egfr"], _SPECS["creatinine"]))
    return interpret(chart.vector(INPUTS), egfrs, creatinines, now=chart.now)


def _female(vector: FeatureVector) -> bool | None:
    male = vector["male"]
    return None if male.status != "observed" else not male.value


def _calculated(creatinine: Reading, age_now: float, now: datetime,
                female: bool | None) -> Egfr | None:
    if creatinine.comparator is not None:
        return None  # "<0.5 mg/dL" is no number to put into an equation
    # Age at the time of the result, in whole years as at `now`.
    age = age_now - int((now - creatinine.instant).days / 365.25)
    if female is None:
        both = [ckd_epi_2021(creatinine.value, age, female=f) for f in (True, False)]
        if None in both:
            return None
        value, basis = min(both), "sex not recorded as female or male: the lower of the two"
    else:
        value, basis = ckd_epi_2021(creatinine.value, age, female=female), None
        if value is None:
            return None
    return Egfr(float(round(value)), None, creatinine.date, creatinine.instant,
                creatinine.source, creatinine=creatinine, sex_basis=basis)


def _acute(history: list[Egfr], creatinines: list[Reading]) -> str | None:
    if creatinines:
        last = creatinines[-1]
        for prior in reversed(creatinines[:-1]):
            gap = last.instant - prior.instant
            if gap > AKI_RATIO_WINDOW or prior.comparator or last.comparator:
                break
            if gap <= AKI_RISE_WINDOW and last.value - prior.value >= AKI_RISE_MG_DL - 1e-9:
                return (f"creatinine {last.value:.2f} mg/dL on {last.date}, up "
                        f"{last.value - prior.value:.2f} from {prior.value:.2f} on {prior.date}")
            if last.value >= AKI_RATIO * prior.value:
                return (f"creatinine {last.value:.2f} mg/dL on {last.date}, "
                        f"{last.value / prior.value:.1f} times {prior.value:.2f} on {prior.date}")
    if history and history[-1].comparator is None and history[-1].value < 60:
        last = history[-1]
        window = [e for e in history[:-1] if last.instant - e.instant <= AKD_WINDOW
                  and e.comparator in (None, ">", ">=")]
        if window:
            high = max(window, key=lambda e: e.value)
            if last.value <= (1 - AKD_FALL) * high.value:
                days = (last.instant - high.instant).days
                return (f"eGFR {last.value:g} on {last.date}, down "
                        f"{1 - last.value / high.value:.0%} from {high.value:g} on {high.date}, "
                        f"{days} days earlier")
    return None


def interpret(vector: FeatureVector, egfrs: list[Reading], creatinines: list[Reading], *,
              now: datetime) -> KidneyStatus:
    """`assess` on the INPUTS vector and the eGFR and creatinine results already extracted."""
    notes: list[str] = []
    uacr = vector["uacr"] if vector["uacr"].status == "observed" else None
    weight = vector["weight"] if vector["weight"].status == "observed" else None
    age = vector["age"].value if vector["age"].status == "observed" else None
    female = _female(vector)
    conditions = frozenset(name for name in CONDITION_SETS
                           if f"has_{name}" in vector.names and vector[f"has_{name}"].value)

    history = _history(egfrs, creatinines, age, female, now, notes)
    latest = history[-1] if history else None
    dates = [e.date for e in history] + [c.date for c in creatinines]
    extra = []
    if latest is not None and latest.comparator is None:
        # The model reads the very eGFR the card shows, whatever its code (one truth).
        extra.append(_observation("cds-kidney-function", CALCULATED_EGFR_LOINC, latest.value,
                                  "mL/min/{1.73_m2}", latest.date))
    if uacr is not None and uacr.comparator is None:
        extra.append(_observation("cds-urine-acr", UACR_LOINC, uacr.value, "mg/g", uacr.date))
    return KidneyStatus(
        latest=latest, uacr=uacr, uacr_last_12_months=int(vector["uacr_12m"].value or 0),
        age=age, history=tuple(history), conditions=conditions,
        acute=_acute(history, creatinines) or (
            "acute kidney injury on the problem list" if "aki" in conditions else None),
        last_kidney_function=max(dates) if dates else None, weight=weight,
        creatinine=creatinines[-1] if creatinines else None, female=female,
        notes=tuple(notes), extra_resources=tuple(extra))


def _history(egfrs: list[Reading], creatinines: list[Reading], age: float | None,
             female: bool | None, now: datetime, notes: list[str]) -> list[Egfr]:
    """Reported eGFRs and CKD-EPI 2021 from each creatinine, oldest first."""
    reported = [Egfr(float(round(r.value)), r.comparator, r.date, r.instant, r.source)
                for r in egfrs]
    calculated = []
    if creatinines and age is None:
        notes.append("no eGFR could be calculated from creatinine: age not recorded")
    elif creatinines and age < 18:
        notes.append("CKD-EPI 2021 is for adults; no eGFR calculated from creatinine")
    elif creatinines:
        calculated = [e for c in creatinines if (e := _calculated(c, age, now, female))]
    # On the same instant the laboratory's own eGFR sorts after (wins over) ours.
    return sorted([*calculated, *reported], key=lambda e: (e.instant, e.creatinine is None))


# The SMART app charts the years behind the card: the course of eGFR and albuminuria over years
# is what a referral weighs (KDIGO 2024 chapter 2, progression), while the card reads the 2-year
# window of kidney_inputs.yaml. Same codes, units and plausibility rules, a longer window.
HISTORY_YEARS = 10
_LONG_SPECS = tuple(replace(_SPECS[name], lookback_days=HISTORY_YEARS * 366)
                    for name in ("egfr", "creatinine", "uacr"))


def long_history(resources: Iterable[Any], status: KidneyStatus, *, now: datetime,
                 code_map: CodeMap | None = None) -> tuple[tuple[Egfr, ...], tuple[Reading, ...]]:
    """(every eGFR, every urine ACR) of the last `HISTORY_YEARS`, oldest first, read as
    `interpret` reads the last two years for `status`."""
    egfrs, creatinines, uacrs = readings_many(_LONG_SPECS, list(resources), now=now,
                                              code_map=code_map)
    return tuple(_history(egfrs, creatinines, status.age, status.female, now, [])), tuple(uacrs)


def _observation(rid: str, loinc: str, value: float, unit: str, day: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": loinc}]},
            "valueQuantity": {"value": value, "unit": unit}, "effectiveDateTime": day}


def creatinine_clearance(status: KidneyStatus) -> tuple[float | None, str]:
    """(Cockcroft-Gault creatinine clearance, how it was obtained) from the newest creatinine and
    weight; (None, why not) when it cannot be computed."""
    c, weight = status.creatinine, status.weight
    if c is None or c.comparator is not None:
        return None, "no creatinine value"
    if weight is None:
        return None, "no weight in the last year"
    if status.age is None:
        return None, "age not recorded"
    sexes = (status.female,) if status.female is not None else (True, False)
    values = [cockcroft_gault(c.value, status.age, weight.value, female=f) for f in sexes]
    if None in values:
        return None, "outside the equation's range"
    how = (f"Cockcroft-Gault from creatinine {c.value:.2f} mg/dL ({c.date}) and weight "
           f"{weight.value:g} kg ({weight.date})")
    if status.female is None:
        how += "; sex not recorded as female or male: the lower of the two"
    return round(min(values)), how


def assess_request(request: Any) -> tuple[KidneyStatus, Any]:
    """(kidney status, the site model's prediction or None) for a hook request."""
    resources = [v for v in request.prefetch.values() if v is not None]
    with request.stage("features"):
        chart = chart_pass(resources, now=request.now, code_map=request.site.code_map,
                           model=request.model)
        status = assess_chart(chart)
    return status, risk(status, chart, request.model, now=request.now)


def risk(status: KidneyStatus, resources: list[Any] | ChartPass, model: Any, *,
         now: datetime) -> Any:
    """The model's prediction (a `ModelBinding`'s) for the chart `status` was read from, or None:
    the model sees the eGFR and urine ACR the card shows, and is not run without an eGFR or
    where the risk equation does not apply (`KidneyStatus.risk_exclusions`). A `ChartPass`
    `status` was assessed from is extended with them and scored without a second pass."""
    if model is None or status.latest is None or status.risk_exclusions():
        return None
    if isinstance(resources, ChartPass):
        resources.extend(status.extra_resources)
        return model.score(resources, now=now)
    return model.score([*resources, *status.extra_resources], now=now)


# ---------------------------------------------------------------------------------------------
# Model risk as clinicians read it

HORIZONS = {"risk_5y": "5-year", "risk_2y": "2-year"}
# Model feature names as a card names them, with their units (the shipped models' features;
# another model's unknown name is shown with spaces for underscores).
_FACTOR_LABELS = {
    "egfr": ("eGFR", ""), "uacr": ("urine ACR", " mg/g"), "age": ("age", ""),
    "egfr_slope": ("yearly change in eGFR", " mL/min/1.73 m² per year"),
    "sbp": ("mean systolic blood pressure", " mmHg"), "hba1c": ("HbA1c", "%"),
    "diabetes": ("diabetes", ""), "hypertension": ("hypertension", ""), "male": ("sex", ""),
}


def factor_label(name: str) -> str:
    return _FACTOR_LABELS.get(name, (name.replace("_", " "), ""))[0]


def factor_text(name: str, value: float | None) -> str:
    if name == "male" and value is not None:
        return "male sex" if value else "female sex"
    label, unit = _FACTOR_LABELS.get(name, (name.replace("_", " "), ""))
    if value is None:
        return label
    if name in ("diabetes", "hypertension"):
        return label if value else f"no {label}"
    return f"{label} {number(value)}{unit}"


def number(value: float) -> str:
    """Figures as a lab report shows them: 420, 28, 2.1, -3.4."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def risk_text(prediction: Any) -> str:
    """"kidney failure risk 9% at 2 years, 24% at 5 years" for a scored prediction."""
    scores = {prediction.output: prediction.score, **prediction.secondary}
    parts = [f"{scores[name]:.0%} at {HORIZONS[name].split('-')[0]} years"
             for name in ("risk_2y", "risk_5y") if name in scores]
    if not parts:
        return f"kidney failure risk {prediction.score:.0%}"
    return "kidney failure risk " + ", ".join(parts)
