"""Kidney function shared by the services: CKD-EPI 2021 eGFR, KDIGO categories, and what a
chart says about kidney function (`assess`). Sources: docs/clinical.md.

Pure functions; inputs outside the equations' domain give None, never an exception.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cds_service import metrics
from cds_service.features import (
    LOINC,
    CodeMap,
    FeatureValue,
    FeatureVector,
    extract,
    extract_many,
    parse_features,
)

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


def ckd_epi_2021(creatinine_mg_dl: float, age_years: float, female: bool) -> float | None:
    """eGFR (mL/min/1.73 m²) from serum creatinine; None outside adult, positive inputs."""
    if not (creatinine_mg_dl > 0 and 18 <= age_years <= 120):
        return None
    ratio = creatinine_mg_dl / _KAPPA[female]
    egfr = (142 * min(ratio, 1.0) ** _ALPHA[female] * max(ratio, 1.0) ** -1.200
            * 0.9938 ** age_years)
    return egfr * 1.012 if female else egfr


def g_category(egfr: float) -> tuple[str, str]:
    for lower, category, text in G_CATEGORIES:
        if egfr >= lower:
            return category, text
    return G_CATEGORIES[-1][1:]


def a_category(uacr_mg_g: float) -> tuple[str, str]:
    category = "A3" if uacr_mg_g > 300 else "A2" if uacr_mg_g >= 30 else "A1"
    return category, A_CATEGORIES[category]


# ---------------------------------------------------------------------------------------------
# What a chart says about kidney function (both services read it the same way)

INPUTS_FILE = Path(__file__).parent / "data" / "kidney_inputs.yaml"
INPUTS = parse_features(yaml.safe_load(INPUTS_FILE.read_text(encoding="utf-8"))["features"],
                        str(INPUTS_FILE))
# LOINC 98979-8: eGFR by CKD-EPI 2021 (creatinine, without race). Given to the model when we
# calculated the eGFR ourselves, exactly as if the laboratory had reported it.
CALCULATED_EGFR_LOINC = "98979-8"


@dataclass(frozen=True)
class KidneyStatus:
    egfr: float | None = None            # rounded to a whole number, as laboratories report it
    egfr_date: str | None = None
    calculated_from: FeatureValue | None = None   # the creatinine, when we computed the eGFR
    uacr: FeatureValue | None = None
    uacr_last_12_months: int = 0
    notes: tuple[str, ...] = ()            # why an eGFR could not be calculated, etc.
    extra_resources: tuple[Mapping[str, Any], ...] = ()

    @property
    def g(self) -> tuple[str, str] | None:
        return g_category(self.egfr) if self.egfr is not None else None

    @property
    def a(self) -> tuple[str, str] | None:
        return a_category(self.uacr.value) if self.uacr is not None else None

    @property
    def has_data(self) -> bool:
        return self.egfr is not None or self.uacr is not None

    def creatinine_text(self) -> str:
        """"creatinine 2.10 mg/dL (converted from µmol/L)" for a calculated eGFR."""
        c = self.calculated_from
        notes = f" ({'; '.join(c.notes)})" if c.notes else ""
        return f"creatinine {c.value:.2f} mg/dL{notes}"

    def egfr_text(self) -> str:
        """"eGFR 28", or "calculated eGFR 27" when we computed it from creatinine."""
        return ("calculated " if self.calculated_from else "") + f"eGFR {self.egfr:g}"


def assess(resources: Iterable[Any], *, now: datetime,
           code_map: CodeMap | None = None) -> KidneyStatus:
    """Latest eGFR (or CKD-EPI 2021 from the latest creatinine), urine ACR and its recency."""
    return interpret(extract(INPUTS, resources, now=now, code_map=code_map))


def interpret(vector: FeatureVector) -> KidneyStatus:
    """`assess` on the INPUTS vector already extracted."""
    uacr = vector["uacr"] if vector["uacr"].status == "observed" else None
    status = {"uacr": uacr, "uacr_last_12_months": int(vector["uacr_12m"].value or 0)}
    egfr = vector["egfr"]
    if egfr.status == "observed":
        return KidneyStatus(egfr=float(round(egfr.value)), egfr_date=egfr.date, **status)
    creatinine = vector["creatinine"]
    if creatinine.status != "observed":
        return KidneyStatus(**status)
    age, male = vector["age"], vector["male"]
    if age.status != "observed" or male.status != "observed":
        return KidneyStatus(notes=("an eGFR could not be calculated from creatinine "
                                   f"{creatinine.value:.2f} mg/dL ({creatinine.date}): "
                                   + ("age" if age.status != "observed" else "sex")
                                   + " not recorded",), **status)
    value = ckd_epi_2021(creatinine.value, age.value, female=not male.value)
    if value is None:
        return KidneyStatus(notes=("CKD-EPI 2021 is for adults; no eGFR calculated",), **status)
    value = float(round(value))
    derived = {
        "resourceType": "Observation", "id": "cds-calculated-egfr", "status": "final",
        "code": {"coding": [{"system": LOINC, "code": CALCULATED_EGFR_LOINC}]},
        "valueQuantity": {"value": value, "unit": "mL/min/{1.73_m2}"},
        "effectiveDateTime": creatinine.date,
    }
    return KidneyStatus(egfr=value, egfr_date=creatinine.date, calculated_from=creatinine,
                        extra_resources=(derived,), **status)


def assess_request(request: Any) -> tuple[KidneyStatus, Any]:
    """(kidney status, the site model's prediction or None) for a hook request; the model sees
    the calculated eGFR when there is one, and is not run without any eGFR."""
    resources = [v for v in request.prefetch.values() if v is not None]
    model = request.model
    with metrics.stage("features"):  # one pass over the chart for our inputs and the model's
        inputs, features = extract_many((INPUTS, model.features if model else ()), resources,
                                        now=request.now, code_map=request.site.code_map)
        status = interpret(inputs)
    if model is None or status.egfr is None:
        return status, None
    if status.extra_resources:  # the model must see the eGFR calculated from creatinine
        return status, model.predict([*resources, *status.extra_resources], now=request.now)
    return status, model.predict(resources, now=request.now, vector=features)


# ---------------------------------------------------------------------------------------------
# Model risk as clinicians read it

HORIZONS = {"risk_5y": "5-year", "risk_2y": "2-year"}
# Model feature names as a card names them, with their units.
_FACTOR_LABELS = {
    "egfr": ("eGFR", ""), "uacr": ("urine ACR", " mg/g"), "age": ("age", ""),
    "egfr_slope": ("eGFR slope", "/year"), "sbp_mean": ("mean systolic BP", " mmHg"),
    "hba1c": ("HbA1c", "%"), "diabetes": ("diabetes", ""), "hypertension": ("hypertension", ""),
}


def factor_label(name: str) -> str:
    return _FACTOR_LABELS.get(name, (name, ""))[0]


def factor_text(name: str, value: float | None) -> str:
    if name == "male" and value is not None:
        return "male sex" if value else "female sex"
    label, unit = _FACTOR_LABELS.get(name, (name, ""))
    if value is None:
        return label
    if name in ("diabetes", "hypertension"):
        return label if value else f"no {label}"
    return f"{label} {number(value)}{unit}"


def number(value: float) -> str:
    """Figures as a lab report shows them: 420, 28, 2.1, -3.4."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def risk_text(prediction: Any) -> str:
    """"5-year kidney failure risk 24%" for a scored prediction."""
    horizon = HORIZONS.get(prediction.output, prediction.output)
    return f"{horizon} kidney failure risk {prediction.score:.0%}"
