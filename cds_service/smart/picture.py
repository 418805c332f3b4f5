"""The kidney picture behind the kidney-risk card, assembled from the same prefetch the hook reads
and with the same code (`hooks._kidney.assess`, `risk`, `hooks._prescribing.evaluate`): one truth
for card and app. Sources: docs/clinical.md ("The SMART app").

Never raises on a messy chart: a value that is missing, a bound or unreadable is said in the
picture instead (`Picture.missing`, `Picture.risk_not_shown`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from markupsafe import Markup

from cds_service.features import Reading, flatten
from cds_service.smart.chart import egfr_chart, uacr_chart
from hooks._kidney import (
    COMPARATOR_TEXT,
    Egfr,
    KidneyStatus,
    a_category,
    assess,
    factor_label,
    factor_text,
    g_category,
    long_history,
    number,
    risk,
    risk_text,
)
from hooks._medications import active_medications
from hooks._prescribing import Patient, evaluate

# KDIGO 2024 chapter 2.1: GFR and albuminuria assessed at least yearly in CKD (the card's
# "No urine ACR in the last 12 months" wording; docs/clinical.md, "Albuminuria testing";
# the practice-point number is not verified).
YEARLY = timedelta(days=365)
# The INPUTS specs read eGFR, creatinine and urine ACR of the last 2 years (lookback_days 730).
LOOKBACK_TEXT = "the last 2 years"
TANGRI = "the kidney failure risk equation (Tangri 2011/2016)"

# The kidney-risk service's prefetch keys (hooks/kidney_risk.py SERVICE.prefetch), as a reader
# of the page names them.
KEY_TEXT = {
    "egfr": "eGFR results", "creatinine": "creatinine results", "uacr": "urine ACR results",
    "patient": "the patient record (age, sex)", "hba1c": "HbA1c results",
    "bp": "blood pressure results", "conditions": "the problem list",
    "medications": "active medications",
}
# Prefetch sources (cds_service/data/prefetch.py) meaning the key could not be read; "null" is
# the EHR saying there is no data, which is no failure.
UNREAD = frozenset({"unsatisfiable", "optional-missing"})


@dataclass(frozen=True)
class PatientLabel:
    name: str | None
    birth_date: str | None
    sex: str | None

    def text(self) -> str:
        """"Jane Doe, born 1950-04-01, female" for the header."""
        parts = [self.name or "Name not recorded",
                 f"born {self.birth_date}" if self.birth_date else "birth date not recorded",
                 self.sex or "sex not recorded"]
        return ", ".join(parts)


@dataclass(frozen=True)
class EgfrPoint:
    date: date
    value: float
    comparator: str | None
    calculated: bool
    creatinine: str | None        # "creatinine 2.10 mg/dL" when calculated (CKD-EPI 2021)
    category: str                 # KDIGO G category the value (or bound) proves

    def text(self) -> str:
        return f"{COMPARATOR_TEXT[self.comparator]}{self.value:g}"


@dataclass(frozen=True)
class UacrPoint:
    date: date
    value: float                  # mg/g
    comparator: str | None
    category: str                 # KDIGO A category the value (or bound) proves

    def text(self) -> str:
        return f"{COMPARATOR_TEXT[self.comparator]}{number(self.value)}"


@dataclass(frozen=True)
class Category:
    code: str                     # "G3b", "A2"
    description: str              # KDIGO 2024 wording
    value: str                    # "eGFR 38", "urine ACR 45 mg/g"
    date: str


@dataclass(frozen=True)
class Risk:
    text: str                     # "kidney failure risk 9% at 2 years, 24% at 5 years"
    two_year: float | None
    five_year: float | None
    model: str                    # "kfre-4var 1.0.0"
    factors: tuple[str, ...]      # "eGFR 28 raises it"
    imputed: tuple[str, ...]      # inputs not on record, a typical value used


@dataclass(frozen=True)
class FlaggedMedicine:
    drug: str                     # the ingredient the rule is about
    order: str | None             # how the order names it
    summary: str
    advice: str
    indicator: str
    facts: tuple[str, ...]
    source_label: str
    source_url: str
    citation: str
    reference: str                # where in the source


@dataclass(frozen=True)
class Picture:
    patient: PatientLabel
    egfr: tuple[EgfrPoint, ...]           # oldest first, reported and calculated
    uacr: tuple[UacrPoint, ...]           # oldest first
    g: Category | None
    a: Category | None
    acute: str | None                     # why kidney function looks acutely changed
    risk: Risk | None
    risk_not_shown: str | None            # why there is no risk, when there is none
    medicines: tuple[FlaggedMedicine, ...]
    missing: tuple[str, ...]              # missing or old data, in words

    def egfr_chart(self) -> Markup:
        return egfr_chart(self.egfr)

    def uacr_chart(self) -> Markup:
        return uacr_chart(self.uacr)


def build_picture(prefetch: Mapping[str, Any], *, site: Any, binding: Any,
                  now: datetime) -> Picture:
    """The picture of `prefetch` (a `Prefetch` or a plain dict of key → resource, list, None)
    at `now`; `binding` is the site's `ModelBinding`, None without a model."""
    resources = [v for v in prefetch.values() if v is not None]
    code_map = getattr(site, "code_map", None) or {}
    status = assess(resources, now=now, code_map=code_map)
    prediction = risk(status, resources, binding, now=now)
    # The charts show ten years (`long_history`); the figures and rules use the card's window.
    egfr_history, uacr_history = long_history(resources, status, now=now, code_map=code_map)
    shown, not_shown = _risk(status, prediction, binding)
    return Picture(
        patient=patient_label(prefetch.get("patient")),
        egfr=tuple(_egfr_point(e) for e in egfr_history),
        uacr=tuple(_uacr_point(r) for r in uacr_history),
        g=_g(status), a=_a(status), acute=status.acute,
        risk=shown, risk_not_shown=not_shown,
        medicines=_medicines(prefetch, site, status, prediction, now),
        missing=_missing(prefetch, status, now))


def patient_label(resource: Any) -> PatientLabel:
    """Name, birth date and sex from a Patient resource; None for what is not readable."""
    patients = [r for r in flatten(resource) if r.get("resourceType") == "Patient"]
    if not patients:
        return PatientLabel(None, None, None)
    p = patients[0]
    birth = p.get("birthDate")
    sex = p.get("gender")
    return PatientLabel(_name(p.get("name")), birth if isinstance(birth, str) else None,
                        sex if isinstance(sex, str) else None)


def _name(names: Any) -> str | None:
    if not isinstance(names, list):
        return None
    names = [n for n in names if isinstance(n, Mapping)]
    # FHIR R4 HumanName.use: the official name first, then the usual one, then any.
    names.sort(key=lambda n: {"official": 0, "usual": 1}.get(n.get("use"), 2))
    for n in names:
        if isinstance(n.get("text"), str) and n["text"].strip():
            return n["text"].strip()
        given = [g for g in n.get("given") or () if isinstance(g, str)]
        family = n.get("family") if isinstance(n.get("family"), str) else ""
        text = " ".join([*given, family]).strip()
        if text:
            return text
    return None


def _day(text: str, instant: datetime) -> date:
    try:
        return date.fromisoformat(text[:10])
    except (TypeError, ValueError):
        return instant.date()


def _egfr_point(e: Egfr) -> EgfrPoint:
    creatinine = None
    if e.creatinine is not None:
        creatinine = f"creatinine {e.creatinine.value:.2f} mg/dL"
        if e.creatinine.notes:
            creatinine += f" ({'; '.join(e.creatinine.notes)})"
        if e.sex_basis:
            creatinine += f"; {e.sex_basis}"
    return EgfrPoint(_day(e.date, e.instant), e.value, e.comparator, e.creatinine is not None,
                     creatinine, g_category(e.value, e.comparator)[0])


def a_bound(value: float, comparator: str | None) -> str:
    """KDIGO A category a urine ACR proves; a bound that leaves two open gives the span
    ("<50" is "A1-A2", ">30" is "A2-A3"), as `g_category` does for eGFR."""
    if comparator in ("<", "<="):
        top = a_category(value - 1e-9 if comparator == "<" else value)[0]
        return top if top == "A1" else f"A1-{top}"
    if comparator in (">", ">="):
        bottom = a_category(value + 1e-9 if comparator == ">" else value)[0]
        return bottom if bottom == "A3" else f"{bottom}-A3"
    return a_category(value)[0]


def _uacr_point(r: Reading) -> UacrPoint:
    return UacrPoint(_day(r.date, r.instant), r.value, r.comparator,
                     a_bound(r.value, r.comparator))


def _g(status: KidneyStatus) -> Category | None:
    if status.latest is None:
        return None
    code, description = status.g
    return Category(code, description, status.egfr_text(), status.latest.date)


def _a(status: KidneyStatus) -> Category | None:
    if status.uacr is None:
        return None
    code, description = status.a
    return Category(code, description, status.uacr_text(), status.uacr.date)


def _risk(status: KidneyStatus, prediction: Any, binding: Any) -> tuple[Risk | None, str | None]:
    """(the risk, None) or (None, why it is not shown), as the card decides it."""
    if binding is None:
        return None, "No kidney failure risk model is set up at this site."
    if status.latest is None:
        return None, f"No eGFR in {LOOKBACK_TEXT}: the risk needs one."
    if exclusions := status.risk_exclusions():
        return None, (f"Not calculated: {TANGRI} does not apply because "
                      f"{'; '.join(exclusions)}.")
    model = f"{prediction.model_id} {prediction.model_version}"
    if prediction.score is None:
        missing = ", ".join(factor_label(n) for n in prediction.features.missing_required)
        return None, f"Not calculated (model {model}): no {missing} on record."
    factors = tuple(f"{factor_text(c.name, c.value)} {c.direction} it"
                    for c in prediction.top(3) if c.contribution != 0)
    scores = prediction.scores
    return Risk(risk_text(prediction), scores.get("risk_2y"), scores.get("risk_5y"), model,
                factors, tuple(factor_label(n) for n in prediction.imputed)), None


def _medicines(prefetch: Mapping[str, Any], site: Any, status: KidneyStatus, prediction: Any,
               now: datetime) -> tuple[FlaggedMedicine, ...]:
    """Active medications a prescribing rule flags, as hooks/kidney_risk.py
    `_medications_to_review` finds them for the card."""
    active = tuple(active_medications(prefetch.get("medications"),
                                      getattr(site, "code_map", None) or {}))
    patient = Patient(status=status, now=now, active=active,
                      risk_indicator=prediction.indicator if prediction is not None else None)
    found: dict[tuple[str, str], FlaggedMedicine] = {}
    for medication in active:
        for finding in evaluate(medication, patient):
            rule = finding.rule
            found.setdefault((finding.drug, rule.id), FlaggedMedicine(
                finding.drug, medication.text, rule.summary, rule.advice, rule.indicator,
                finding.facts, rule.source.label, rule.source.url, rule.source.citation,
                rule.reference))
    return tuple(found.values())


def _missing(prefetch: Mapping[str, Any], status: KidneyStatus, now: datetime) -> tuple[str, ...]:
    out = []
    if status.latest is None:
        out.append(f"No eGFR or creatinine result in {LOOKBACK_TEXT}.")
    elif status.latest.instant < now - YEARLY:
        out.append(f"The newest eGFR is from {status.latest.date}, over 12 months ago: KDIGO "
                   "2024 recommends checking kidney function at least yearly in CKD.")
    if status.uacr_last_12_months == 0:
        out.append("No urine ACR in the last 12 months: KDIGO 2024 recommends testing "
                   "albuminuria at least yearly in CKD.")
    sources = getattr(prefetch, "sources", {}) or {}
    truncated = getattr(prefetch, "truncated", frozenset()) or frozenset()
    for key in sorted(sources):
        if sources[key] in UNREAD:
            out.append(f"Could not be read from the EHR: {KEY_TEXT.get(key, key)}.")
    for key in sorted(truncated):
        out.append(f"Only part of {KEY_TEXT.get(key, key)} could be read.")
    if prefetch.get("patient") is None and sources.get("patient") not in UNREAD:
        out.append("No patient record: age and sex unknown.")
    out += [f"{note[0].upper()}{note[1:]}." for note in status.notes]
    return tuple(out)
