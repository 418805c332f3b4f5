"""Seeded synthetic chronic-kidney-disease cohort, written as FHIR Bulk Data NDJSON.

SYNTHETIC DATA. Every patient, value and outcome here is drawn from a random number generator.
Nothing is derived from any real patient, and the generating model is NOT clinically validated:
it exists so that the training pipeline, the feature engine and an external check of the
published KFRE can be exercised end to end on data that looks like an Epic Bulk ``$export``.

Output (`write_cohort`), following the FHIR Bulk Data Access IG (v2.0.0, "ndjson" output: one
file per resource type, one resource per line):

- ``Patient.ndjson``, ``Observation.ndjson``, ``Condition.ndjson`` - FHIR R4 resources, each
  tagged ``meta.tag`` code ``synthetic``; no names, addresses or identifiers (nothing PHI-like).
- ``labels.csv`` - ``patient_id,index_date,label``; label = kidney failure within 5 years.
- ``cohort.json`` - seed, size, index date, generator version, outcome prevalence, the risk-model
  constants, population summary and every injected data defect with its rate and realised count.

Same ``(n_patients, seed, index_date)`` gives byte-identical files: one ``numpy`` Generator
(``np.random.default_rng(seed)``) drawn in a fixed order, ids derived from the patient number
(``pt-000001``, ``obs-000001-egfr-3``), JSON written with sorted keys, and no wall-clock time.

Generation, in order (numbers are assumptions chosen to be of the size reported in the cited
literature; they are not estimates fitted to any data set):

1. Population at the index date (predictions are made as of ``index_date``; every date written
   is strictly before it).

   - Age 30-90: ``30 + 60 * Beta(3.6, 2.4)`` (mean ~66, sd ~11): CKD is mostly a disease of
     older adults (USRDS Annual Data Report, CKD volume; CRIC baseline, Lash JP et al.,
     CJASN 2009;4:1302). Sex: male with probability 0.5.
   - eGFR (mL/min/1.73 m2) from a histogram over KDIGO G-stages (KDIGO 2024 CKD guideline,
     Kidney Int 2024;105(4S):S117), uniform inside each bin: 10-15 4%, 15-30 18%, 30-45 30%,
     45-60 28%, 60-90 15%, 90-100 5% (58% in G3a/G3b, as in a nephrology-referred population).
   - Type 2 diabetes ~37% and hypertension ~70%, both logistic in eGFR (and age for
     hypertension): diabetes and hypertension are the leading CKD causes and comorbidities,
     present in roughly 35-50% and 70-85% of adults with CKD (USRDS ADR; CRIC baseline).
   - UACR (mg/g) lognormal, median ~35-40 overall, x2.1 with diabetes, x1.4 with hypertension,
     x1.35 per 10 mL/min lower eGFR, log-sd 1.35 (KDIGO A1 <30, A2 30-300, A3 >300 mg/g;
     albuminuria rises with diabetes, hypertension and falling eGFR - CKD Prognosis Consortium).
   - Systolic BP ``127 + 11*hypertension + N(0, 16.5)`` mmHg (overall ~135 +/- 18); diastolic
     ``30 + 0.35*SBP + N(0, 8)``.
   - HbA1c: ``N(7.5, 1.2)`` % in diabetics, ``N(5.5, 0.4)`` % otherwise (ADA Standards of Care:
     diabetes >= 6.5%; typical treated T2D population around 7-8%).
   - eGFR slope (mL/min/1.73 m2 per year): 20% "stable" patients ``N(0, 0.4)``; the rest
     ``-(0.7 + 0.9*diabetes + 0.45*max(ln(UACR/30), 0)) + N(0, 1.0)``, clipped to [-8, 2];
     mean about -1.1. Decline in CKD is typically 1-3 mL/min/yr and faster with diabetes and
     albuminuria (KDIGO 2024 ch. 2; Grams ME et al., JASN 2019;30:1746).

2. Outcome: kidney failure (eGFR <15 sustained or kidney replacement therapy) within 5 years.
   ``risk = 1 - S0 ** exp(LP + extra + CALIBRATION_SHIFT)`` with

   - LP = the published 4-variable Kidney Failure Risk Equation (Tangri N et al., JAMA
     2011;305:1553; multinational recalibration Tangri N et al., JAMA 2016;315:164, North
     American 5-year baseline): ``-0.2201*(age/10 - 7.036) + 0.2467*(male - 0.5642)
     - 0.5567*(eGFR/5 - 7.222) + 0.4510*(ln ACR[mg/g] - 5.137)``, ``S0(5 y) = 0.9240``;
   - extra log hazard, so that a model using more than KFRE's four inputs can beat it (the
     sizes are ASSUMPTIONS chosen from the direction and magnitude reported in the literature):
     percentage eGFR decline over the 2 years before index (from the slope) at
     ``ln(5)/30`` per percent - a 30% decline over 2 years carried HR ~5 for ESKD in Coresh J
     et al., JAMA 2014;311:2518 (increases are not protective: clipped at 0); diabetes HR 1.3
     and hypertension HR 1.2 (both carry higher ESKD risk at the same eGFR and ACR in the CKD
     Prognosis Consortium meta-analyses: Fox CS et al., Lancet 2012;380:1662; Mahmoodi BK et
     al., Lancet 2012;380:1649 - the HR values themselves are ours); HR 1.1 per 10 mmHg
     systolic above 130 and per 1% HbA1c above 7 in diabetics (direction only: poorer BP and
     glycaemic control go with faster progression; sizes assumed);
   - ``CALIBRATION_SHIFT`` (a constant added to the log hazard, -0.8): the extra effects are
     not centred, so on their own they raise the hazard of almost everyone (KFRE alone gives a
     5-year prevalence of ~9.7% here, KFRE + extra effects ~17%); the shift brings the
     prevalence back to ~11% (target 8-15%). It was chosen once on 400,000 simulated patients
     and is a fixed constant, not fitted per cohort. KFRE alone is therefore not the true model
     here (it lacks the extra terms and the shift), so by design it is somewhat miscalibrated
     in subgroups - which is what an external check of it should be able to see.

   The label is ``Bernoulli(risk)`` from the same Generator. It uses the clean values only.

3. History before the index date (each result dated 1+ days before ``index_date``):

   - 2-6 eGFR results over 3 years, the last within 6 months of index whose value IS the index
     eGFR; earlier ones follow the slope with 5% multiplicative noise (within-person biological
     variation of serum creatinine is roughly 4-6%, EFLM Biological Variation Database). Code
     LOINC 98979-8 (CKD-EPI 2021) 75%, 33914-3 (MDRD-labelled) 20%, 62238-1 (CKD-EPI 2009)
     5%; the value is the same underlying eGFR.
   - A serum creatinine (LOINC 2160-0) with each eGFR, computed by inverting CKD-EPI 2021
     (Inker LA et al., NEJM 2021;385:1737) for the age and sex at that date; 85% in mg/dL,
     15% in umol/L (x 88.42).
   - 1-3 UACR results over 3 years (last within a year, equal to the true value; earlier ones
     log-noise sd 0.35): LOINC 9318-7 mg/g 80%, 14959-1 mg/g 10%, and 10% as 9318-7 in mg/mmol
     (value / 8.84: the code still says "mass ratio" - a mislabel seen in real feeds).
   - 1-4 blood pressure readings over 2 years (usual BP + N(0, 9)/N(0, 6)): 80% as a panel
     LOINC 85354-9 with components 8480-6 and 8462-4, 20% as a lone systolic 8480-6.
   - HbA1c: 1-3 results in diabetics, 0-1 otherwise (true + N(0, 0.3)); LOINC 4548-4 in %,
     10% as IFCC 59261-8 in mmol/mol (``(% - 2.152) / 0.09148``, IFCC-NGSP master equation,
     Hoelzel W et al., Clin Chem 2004;50:166).
   - Conditions: type 2 diabetes as SNOMED 44054006 (60%) or ICD-10-CM E11.9/E11.22/E11.65;
     hypertension as SNOMED 38341003 (60%) or ICD-10-CM I10; active, confirmed, onset before
     index.

4. Injected real-world defects (rates in ``DEFECTS``; realised counts in ``cohort.json``):
   numeric value sent as a JSON string; eGFR >= 60 sent as ``valueString ">60"`` (the NKDEP
   recommendation for reporting, Myers GL et al., Clin Chem 2006;52:5); an Observation line
   repeated at the end of the file (as a retried page would); an extra ``entered-in-error``
   Observation with an absurd value dated just before index; patients whose UACR was never
   measured; a Patient without ``gender``. Defects change only what is written, never labels.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np

GENERATOR_VERSION = "1"

RESOURCE_TYPES = ("Patient", "Observation", "Condition")
LABELS_FILE = "labels.csv"
METADATA_FILE = "cohort.json"
LABEL_NAME = "kidney_failure_within_5y"
DISCLAIMER = (
    "Synthetic data drawn from a seeded random generator; not derived from any real patient; "
    "the generating risk model is literature-based and not clinically validated."
)

# --- outcome model ------------------------------------------------------------------------
# 4-variable KFRE, Tangri et al. JAMA 2011;305:1553 and JAMA 2016;315:164 (5-year, North America)
KFRE = {
    "age_per_10y": -0.2201, "age_mean": 7.036,
    "male": 0.2467, "male_mean": 0.5642,
    "egfr_per_5": -0.5567, "egfr_mean": 7.222,
    "ln_acr": 0.4510, "ln_acr_mean": 5.137,
    "baseline_survival_5y": 0.9240,
}
# Extra log hazards (assumptions sized from the literature; see the module docstring).
EXTRA_LOG_HR = {
    "per_pct_egfr_decline_2y": math.log(5.0) / 30.0,  # Coresh 2014: -30% over 2 y ~ HR 5
    "diabetes": math.log(1.3),
    "hypertension": math.log(1.2),
    "per_10mmHg_sbp_above_130": math.log(1.1),
    "per_1pct_hba1c_above_7_diabetic": math.log(1.1),
}
CALIBRATION_SHIFT = -0.8  # added to the log hazard; brings 5-y prevalence to ~11% (docstring)
HORIZON_YEARS = 5

# --- population ----------------------------------------------------------------------------
EGFR_BINS = ((10, 15, 0.04), (15, 30, 0.18), (30, 45, 0.30), (45, 60, 0.28),
             (60, 90, 0.15), (90, 100, 0.05))
P_MALE = 0.5
P_DIABETES = 0.37
P_HYPERTENSION = 0.70
P_STABLE_SLOPE = 0.20
EGFR_NOISE_CV = 0.05       # within-person biological variation of creatinine ~4-6%
UACR_LOG_NOISE = 0.35
MG_DL_TO_UMOL_L = 88.42    # creatinine, 1 mg/dL = 88.42 umol/L
MG_G_PER_MG_MMOL = 8.84    # UACR, 1 mg/mmol = 8.84 mg/g

# --- coding variants (not defects: all are legitimate, the consumer must normalise them) -----
P_EGFR_CODE = {"98979-8": 0.75, "33914-3": 0.20, "62238-1": 0.05}
P_CREATININE_UMOL = 0.15
P_UACR_14959 = 0.10
P_UACR_MG_MMOL = 0.10
P_HBA1C_IFCC = 0.10
P_BP_SYSTOLIC_ONLY = 0.20
P_CONDITION_ICD10 = 0.40

# --- injected defects: name -> (probability, what it is drawn over, description) ----------
DEFECTS: dict[str, tuple[float, str, str]] = {
    "egfr_gt60_string": (
        0.05, "final eGFR Observations with value >= 60",
        'eGFR >= 60 reported as valueString ">60" instead of a valueQuantity'),
    "numeric_as_string": (
        0.02, "final Observations with a top-level valueQuantity",
        'valueQuantity.value sent as a JSON string, e.g. "1.12"'),
    "entered_in_error": (
        0.02, "patients",
        "one extra Observation with status entered-in-error and an absurd value "
        "(eGFR 999 or creatinine 88.4 mg/dL), dated within 30 days before index"),
    "duplicate_line": (
        0.01, "Observation resources",
        "the same Observation (same id) written twice; the copy is at the end of the file"),
    "missing_uacr": (
        0.10, "patients",
        "UACR never measured: no UACR Observation at all (labels still use the true UACR)"),
    "patient_missing_gender": (
        0.01, "patients", "Patient resource without gender"),
}

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
SYNTHETIC_TAG = {"system": "urn:cds-service:data-provenance", "code": "synthetic",
                 "display": "Synthetic data, not from any real patient"}

LOINC_DISPLAY = {
    "98979-8": "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, "
               "Plasma or Blood by Creatinine-based formula (CKD-EPI 2021)",
    "33914-3": "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum "
               "or Plasma by Creatinine-based formula (MDRD)",
    "62238-1": "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, "
               "Plasma or Blood by Creatinine-based formula (CKD-EPI)",
    "2160-0": "Creatinine [Mass/volume] in Serum or Plasma",
    "9318-7": "Albumin/Creatinine [Mass Ratio] in Urine",
    "14959-1": "Microalbumin/Creatinine [Mass Ratio] in Urine",
    "4548-4": "Hemoglobin A1c/Hemoglobin.total in Blood",
    "59261-8": "Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol",
    "85354-9": "Blood pressure panel with all children optional",
    "8480-6": "Systolic blood pressure",
    "8462-4": "Diastolic blood pressure",
}
EGFR_UNIT = "mL/min/{1.73_m2}"
DIABETES_ICD10 = {"E11.9": "Type 2 diabetes mellitus without complications",
                  "E11.22": "Type 2 diabetes mellitus with diabetic chronic kidney disease",
                  "E11.65": "Type 2 diabetes mellitus with hyperglycemia"}


@dataclass(frozen=True)
class Cohort:
    """A generated cohort: the resources as they will be written (defects included)."""

    seed: int
    index_date: date                  # predictions are made as of this date
    resources: dict[str, list[dict]]  # "Patient" | "Observation" | "Condition" -> resources
    labels: list[tuple[str, int]]     # (patient_id, kidney_failure_within_5y), patient order
    metadata: dict                    # what cohort.json holds


@dataclass(frozen=True)
class _Population:
    age_days: np.ndarray     # int, age at index in days
    male: np.ndarray         # bool
    egfr: np.ndarray         # float (integer-valued), index eGFR
    diabetes: np.ndarray     # bool
    hypertension: np.ndarray  # bool
    uacr: np.ndarray         # mg/g, one decimal
    sbp: np.ndarray          # mmHg, usual systolic
    dbp: np.ndarray          # mmHg, usual diastolic
    hba1c: np.ndarray        # %, one decimal
    slope: np.ndarray        # mL/min/1.73 m2 per year

    @property
    def age(self) -> np.ndarray:
        return self.age_days / 365.25


# ------------------------------------------------------------------------------------------
# population and outcome
# ------------------------------------------------------------------------------------------

def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _draw_population(rng: np.random.Generator, n: int) -> _Population:
    age_years = 30.0 + 60.0 * rng.beta(3.6, 2.4, n)
    age_days = np.rint(age_years * 365.25).astype(np.int64)
    male = rng.random(n) < P_MALE

    lo = np.array([b[0] for b in EGFR_BINS], dtype=float)
    hi = np.array([b[1] for b in EGFR_BINS], dtype=float)
    weights = np.array([b[2] for b in EGFR_BINS])
    which = rng.choice(len(EGFR_BINS), size=n, p=weights / weights.sum())
    egfr = np.clip(np.rint(lo[which] + (hi[which] - lo[which]) * rng.random(n)), 10, 100)

    age = age_days / 365.25
    diabetes = rng.random(n) < _expit(_logit(P_DIABETES) + 0.012 * (45.0 - egfr))
    hypertension = rng.random(n) < _expit(
        _logit(P_HYPERTENSION) + 0.04 * (age - 66.0) + 0.025 * (45.0 - egfr))

    ln_uacr = (math.log(22.0) + 0.75 * diabetes + 0.35 * hypertension
               + 0.03 * (45.0 - egfr) + rng.normal(0.0, 1.35, n))
    uacr = np.round(np.exp(np.clip(ln_uacr, math.log(2.0), math.log(5000.0))), 1)

    sbp = np.rint(np.clip(127.0 + 11.0 * hypertension + rng.normal(0.0, 16.5, n), 90, 210))
    dbp = np.rint(np.clip(30.0 + 0.35 * sbp + rng.normal(0.0, 8.0, n), 45, sbp - 20))

    a1c_dm = np.clip(rng.normal(7.5, 1.2, n), 5.6, 13.5)
    a1c_no = np.clip(rng.normal(5.5, 0.4, n), 4.2, 6.4)
    hba1c = np.round(np.where(diabetes, a1c_dm, a1c_no), 1)

    stable = rng.random(n) < P_STABLE_SLOPE
    progressive = (-(0.7 + 0.9 * diabetes + 0.45 * np.maximum(np.log(uacr / 30.0), 0.0))
                   + rng.normal(0.0, 1.0, n))
    slope = np.clip(np.where(stable, rng.normal(0.0, 0.4, n), progressive), -8.0, 2.0)
    return _Population(age_days, male, egfr, diabetes, hypertension, uacr, sbp, dbp, hba1c,
                       slope)


def _kfre_linear_predictor(age: np.ndarray, male: np.ndarray, egfr: np.ndarray,
                           acr_mg_g: np.ndarray) -> np.ndarray:
    k = KFRE
    return (k["age_per_10y"] * (age / 10.0 - k["age_mean"])
            + k["male"] * (male - k["male_mean"])
            + k["egfr_per_5"] * (egfr / 5.0 - k["egfr_mean"])
            + k["ln_acr"] * (np.log(acr_mg_g) - k["ln_acr_mean"]))


def _egfr_decline_pct_2y(pop: _Population) -> np.ndarray:
    """Percentage eGFR decline over the 2 years before index implied by the slope (>= 0)."""
    before = pop.egfr - 2.0 * pop.slope
    return np.maximum(100.0 * (before - pop.egfr) / before, 0.0)


def _five_year_risk(pop: _Population) -> np.ndarray:
    e = EXTRA_LOG_HR
    extra = (e["per_pct_egfr_decline_2y"] * _egfr_decline_pct_2y(pop)
             + e["diabetes"] * pop.diabetes
             + e["hypertension"] * pop.hypertension
             + e["per_10mmHg_sbp_above_130"] * np.maximum(pop.sbp - 130.0, 0.0) / 10.0
             + e["per_1pct_hba1c_above_7_diabetic"] * np.maximum(pop.hba1c - 7.0, 0.0)
             * pop.diabetes)
    lp = _kfre_linear_predictor(pop.age, pop.male, pop.egfr, pop.uacr)
    return 1.0 - KFRE["baseline_survival_5y"] ** np.exp(lp + extra + CALIBRATION_SHIFT)


def _creatinine_from_egfr(egfr: np.ndarray, age: np.ndarray, male: np.ndarray) -> np.ndarray:
    """Serum creatinine (mg/dL) that CKD-EPI 2021 (Inker 2021) maps to ``egfr``.

    eGFR = 142 * min(Scr/k, 1)^a * max(Scr/k, 1)^-1.200 * 0.9938^age * 1.012 [female],
    k = 0.7/0.9, a = -0.241/-0.302 (female/male); solved piecewise for Scr.
    """
    kappa = np.where(male, 0.9, 0.7)
    alpha = np.where(male, -0.302, -0.241)
    a = egfr / (142.0 * 0.9938 ** age * np.where(male, 1.0, 1.012))
    ratio = np.where(a >= 1.0, a ** (1.0 / alpha), a ** (-1.0 / 1.2))
    return kappa * ratio


# ------------------------------------------------------------------------------------------
# schedules of results before the index date
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Schedule:
    patient: np.ndarray      # patient index of each result, sorted by patient then time
    seq: np.ndarray          # 1-based chronological number within the patient
    days_before: np.ndarray  # whole days before index (>= 1)
    minute_of_day: np.ndarray
    is_last: np.ndarray      # the most recent result of the patient


def _schedule(rng: np.random.Generator, counts: np.ndarray, last_within: int,
              span: int) -> _Schedule:
    """``counts[i]`` results for patient i: the last within ``last_within`` days before index,
    the others spread uniformly over the earlier part of the ``span`` days before index."""
    n = counts.size
    patient = np.repeat(np.arange(n), counts)
    total = patient.size
    last_days = rng.integers(1, last_within + 1, size=n)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(total) - np.repeat(starts, counts)          # 0..count-1 within patient
    is_last = rank == np.repeat(counts - 1, counts)
    lo = last_days[patient] + 7
    earlier = lo + np.floor(rng.random(total) * (span - lo + 1)).astype(np.int64)
    days = np.where(is_last, last_days[patient], earlier)
    minute = rng.integers(7 * 60, 18 * 60, size=total)
    # chronological within each patient (older first); patient blocks keep their positions,
    # so ``rank`` is also the chronological rank after sorting
    order = np.lexsort((-days, is_last, patient))
    return _Schedule(patient[order], rank + 1, days[order], minute[order], is_last[order])


# ------------------------------------------------------------------------------------------
# FHIR resources
# ------------------------------------------------------------------------------------------

class _Clock:
    """Dates relative to the index date, as FHIR strings (cached: few distinct days)."""

    def __init__(self, index_date: date) -> None:
        self._ordinal = index_date.toordinal()
        self._days: dict[int, str] = {}

    def day(self, days_before: int) -> str:
        text = self._days.get(days_before)
        if text is None:
            text = date.fromordinal(self._ordinal - days_before).isoformat()
            self._days[days_before] = text
        return text

    def instant(self, days_before: int, minute_of_day: int) -> str:
        hour, minute = divmod(minute_of_day, 60)
        return f"{self.day(days_before)}T{hour:02d}:{minute:02d}:00Z"


def _meta() -> dict:
    return {"tag": [dict(SYNTHETIC_TAG)]}


def _concept(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _loinc(code: str) -> dict:
    return _concept(LOINC, code, LOINC_DISPLAY[code])


def _quantity(value: float | int, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _category(vital: bool) -> list[dict]:
    code, display = ("vital-signs", "Vital Signs") if vital else ("laboratory", "Laboratory")
    return [{"coding": [{"system": OBS_CATEGORY, "code": code, "display": display}]}]


def _observation(obs_id: str, patient_id: str, code: str, when: str, *, vital: bool = False,
                 status: str = "final") -> dict:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "meta": _meta(),
        "status": status,
        "category": _category(vital),
        "code": _loinc(code),
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
    }


def _condition(cond_id: str, patient_id: str, system: str, code: str, display: str,
               onset: str) -> dict:
    return {
        "resourceType": "Condition",
        "id": cond_id,
        "meta": _meta(),
        "clinicalStatus": {"coding": [{"system": COND_CLINICAL, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": COND_VERIFICATION, "code": "confirmed"}]},
        "category": [{"coding": [{"system": COND_CATEGORY, "code": "problem-list-item",
                                  "display": "Problem List Item"}]}],
        "code": _concept(system, code, display),
        "subject": {"reference": f"Patient/{patient_id}"},
        "onsetDateTime": onset,
    }


# An observation waiting to be ordered: (patient index, -days before, minute, id, resource)
_Row = tuple[int, int, int, str, dict]


def _egfr_rows(rng: np.random.Generator, pop: _Population, nums: list[str], clock: _Clock,
               counts: dict[str, Any]) -> list[_Row]:
    """eGFR results and a paired serum creatinine for each; applies the ">60" defect."""
    n = pop.egfr.size
    sch = _schedule(rng, rng.integers(2, 7, n), 182, 3 * 365)
    p = sch.patient
    last_days = np.zeros(n, dtype=np.int64)
    last_days[p[sch.is_last]] = sch.days_before[sch.is_last]
    years_before_last = (sch.days_before - last_days[p]) / 365.25
    noise = np.exp(rng.normal(0.0, EGFR_NOISE_CV, p.size))
    trend = pop.egfr[p] - pop.slope[p] * years_before_last
    value = np.where(sch.is_last, pop.egfr[p], np.rint(np.clip(trend * noise, 5.0, 150.0)))
    codes = list(P_EGFR_CODE)
    code_idx = rng.choice(len(codes), size=p.size, p=list(P_EGFR_CODE.values()))
    age_then = (pop.age_days[p] - sch.days_before) / 365.25
    scr = _creatinine_from_egfr(value, age_then, pop.male[p])
    umol = rng.random(p.size) < P_CREATININE_UMOL
    gt60 = (rng.random(p.size) < DEFECTS["egfr_gt60_string"][0]) & (value >= 60)
    counts["egfr_gt60_string"] = (int(gt60.sum()), int((value >= 60).sum()))

    rows: list[_Row] = []
    for j in range(p.size):
        i = int(p[j])
        pid = f"pt-{nums[i]}"
        days, minute, seq = int(sch.days_before[j]), int(sch.minute_of_day[j]), int(sch.seq[j])
        when = clock.instant(days, minute)
        egfr = _observation(f"obs-{nums[i]}-egfr-{seq}", pid, codes[code_idx[j]], when)
        if gt60[j]:
            egfr["valueString"] = ">60"
        else:
            egfr["valueQuantity"] = _quantity(int(value[j]), EGFR_UNIT)
        creat = _observation(f"obs-{nums[i]}-creat-{seq}", pid, "2160-0", when)
        if umol[j]:
            creat["valueQuantity"] = _quantity(int(round(scr[j] * MG_DL_TO_UMOL_L)), "umol/L")
        else:
            creat["valueQuantity"] = _quantity(round(float(scr[j]), 2), "mg/dL")
        rows.append((i, -days, minute, egfr["id"], egfr))
        rows.append((i, -days, minute, creat["id"], creat))
    return rows


def _uacr_rows(rng: np.random.Generator, pop: _Population, nums: list[str], clock: _Clock,
               measured: np.ndarray) -> list[_Row]:
    n = pop.uacr.size
    sch = _schedule(rng, np.where(measured, rng.integers(1, 4, n), 0), 365, 3 * 365)
    p = sch.patient
    noise = np.where(sch.is_last, 1.0, np.exp(rng.normal(0.0, UACR_LOG_NOISE, p.size)))
    mg_g = np.clip(np.round(pop.uacr[p] * noise, 1), 1.0, 8000.0)
    variant = rng.random(p.size)
    rows: list[_Row] = []
    for j in range(p.size):
        i = int(p[j])
        days, minute = int(sch.days_before[j]), int(sch.minute_of_day[j])
        code = "14959-1" if variant[j] < P_UACR_14959 else "9318-7"
        obs = _observation(f"obs-{nums[i]}-uacr-{int(sch.seq[j])}", f"pt-{nums[i]}", code,
                           clock.instant(days, minute))
        if P_UACR_14959 <= variant[j] < P_UACR_14959 + P_UACR_MG_MMOL:
            obs["valueQuantity"] = _quantity(round(float(mg_g[j]) / MG_G_PER_MG_MMOL, 2),
                                             "mg/mmol")
        else:
            obs["valueQuantity"] = _quantity(float(mg_g[j]), "mg/g")
        rows.append((i, -days, minute, obs["id"], obs))
    return rows


def _bp_rows(rng: np.random.Generator, pop: _Population, nums: list[str],
             clock: _Clock) -> list[_Row]:
    n = pop.sbp.size
    sch = _schedule(rng, rng.integers(1, 5, n), 365, 2 * 365)
    p = sch.patient
    sbp = np.rint(np.clip(pop.sbp[p] + rng.normal(0.0, 9.0, p.size), 80, 240))
    dbp = np.rint(np.clip(pop.dbp[p] + rng.normal(0.0, 6.0, p.size), 40, sbp - 10))
    systolic_only = rng.random(p.size) < P_BP_SYSTOLIC_ONLY
    rows: list[_Row] = []
    for j in range(p.size):
        i = int(p[j])
        days, minute = int(sch.days_before[j]), int(sch.minute_of_day[j])
        when = clock.instant(days, minute)
        obs_id = f"obs-{nums[i]}-bp-{int(sch.seq[j])}"
        if systolic_only[j]:
            obs = _observation(obs_id, f"pt-{nums[i]}", "8480-6", when, vital=True)
            obs["valueQuantity"] = _quantity(int(sbp[j]), "mm[Hg]")
        else:
            obs = _observation(obs_id, f"pt-{nums[i]}", "85354-9", when, vital=True)
            obs["component"] = [
                {"code": _loinc("8480-6"), "valueQuantity": _quantity(int(sbp[j]), "mm[Hg]")},
                {"code": _loinc("8462-4"), "valueQuantity": _quantity(int(dbp[j]), "mm[Hg]")},
            ]
        rows.append((i, -days, minute, obs_id, obs))
    return rows


def _hba1c_rows(rng: np.random.Generator, pop: _Population, nums: list[str],
                clock: _Clock) -> list[_Row]:
    n = pop.hba1c.size
    counts = np.where(pop.diabetes, rng.integers(1, 4, n), rng.integers(0, 2, n))
    sch = _schedule(rng, counts, 365, 3 * 365)
    p = sch.patient
    pct = np.round(np.clip(pop.hba1c[p] + rng.normal(0.0, 0.3, p.size), 4.0, 15.0), 1)
    ifcc = rng.random(p.size) < P_HBA1C_IFCC
    rows: list[_Row] = []
    for j in range(p.size):
        i = int(p[j])
        days, minute = int(sch.days_before[j]), int(sch.minute_of_day[j])
        when = clock.instant(days, minute)
        obs_id = f"obs-{nums[i]}-hba1c-{int(sch.seq[j])}"
        if ifcc[j]:  # IFCC-NGSP master equation (Hoelzel 2004)
            obs = _observation(obs_id, f"pt-{nums[i]}", "59261-8", when)
            obs["valueQuantity"] = _quantity(int(round((pct[j] - 2.152) / 0.09148)), "mmol/mol")
        else:
            obs = _observation(obs_id, f"pt-{nums[i]}", "4548-4", when)
            obs["valueQuantity"] = _quantity(float(pct[j]), "%")
        rows.append((i, -days, minute, obs_id, obs))
    return rows


def _entered_in_error_rows(rng: np.random.Generator, flagged: np.ndarray, nums: list[str],
                           clock: _Clock) -> list[_Row]:
    n = flagged.size
    as_egfr = rng.random(n) < 0.5
    days = rng.integers(1, 31, n)
    minute = rng.integers(7 * 60, 18 * 60, n)
    rows: list[_Row] = []
    for i in np.flatnonzero(flagged):
        i = int(i)
        when = clock.instant(int(days[i]), int(minute[i]))
        obs_id = f"obs-{nums[i]}-eie-1"
        if as_egfr[i]:
            obs = _observation(obs_id, f"pt-{nums[i]}", "98979-8", when,
                               status="entered-in-error")
            obs["valueQuantity"] = _quantity(999, EGFR_UNIT)
        else:  # a umol/L number keyed in as mg/dL
            obs = _observation(obs_id, f"pt-{nums[i]}", "2160-0", when,
                               status="entered-in-error")
            obs["valueQuantity"] = _quantity(88.4, "mg/dL")
        rows.append((i, -int(days[i]), int(minute[i]), obs_id, obs))
    return rows


def _condition_resources(rng: np.random.Generator, pop: _Population, nums: list[str],
                         clock: _Clock) -> list[dict]:
    n = pop.age_days.size
    age = pop.age
    dm_icd = rng.random(n) < P_CONDITION_ICD10
    dm_code = rng.integers(0, len(DIABETES_ICD10), n)
    dm_onset = np.rint(365.25 * (1.0 + rng.random(n) * (np.minimum(15.0, age - 25.0) - 1.0)))
    htn_icd = rng.random(n) < P_CONDITION_ICD10
    htn_onset = np.rint(365.25 * (1.0 + rng.random(n) * (np.minimum(20.0, age - 20.0) - 1.0)))
    icd_codes = list(DIABETES_ICD10)
    out: list[dict] = []
    for i in range(n):
        pid = f"pt-{nums[i]}"
        if pop.diabetes[i]:
            if dm_icd[i]:
                code = icd_codes[dm_code[i]]
                coded = (ICD10CM, code, DIABETES_ICD10[code])
            else:
                coded = (SNOMED, "44054006", "Diabetes mellitus type 2")
            out.append(_condition(f"cond-{nums[i]}-t2dm", pid, *coded,
                                  clock.day(int(dm_onset[i]))))
        if pop.hypertension[i]:
            coded = ((ICD10CM, "I10", "Essential (primary) hypertension") if htn_icd[i]
                     else (SNOMED, "38341003", "Hypertensive disorder, systemic arterial"))
            out.append(_condition(f"cond-{nums[i]}-htn", pid, *coded,
                                  clock.day(int(htn_onset[i]))))
    return out


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------

def generate_cohort(n_patients: int = 4000, seed: int = 20261121,
                    index_date: date = date(2025, 1, 1)) -> Cohort:
    """Draw a cohort of ``n_patients`` as of ``index_date``; deterministic in all three."""
    if isinstance(n_patients, bool) or not isinstance(n_patients, int) or n_patients < 1:
        raise ValueError("n_patients must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError("seed must be a non-negative integer")
    if not isinstance(index_date, date):
        raise ValueError("index_date must be a datetime.date")
    if isinstance(index_date, datetime):
        index_date = index_date.date()

    n = n_patients
    rng = np.random.default_rng(seed)
    pop = _draw_population(rng, n)
    risk = _five_year_risk(pop)
    label = rng.random(n) < risk  # Bernoulli(risk): the outcome, from clean values only

    width = max(6, len(str(n)))
    nums = [f"{i + 1:0{width}d}" for i in range(n)]
    clock = _Clock(index_date)
    counts: dict[str, tuple[int, int]] = {}

    missing_uacr = rng.random(n) < DEFECTS["missing_uacr"][0]
    no_gender = rng.random(n) < DEFECTS["patient_missing_gender"][0]
    entered_in_error = rng.random(n) < DEFECTS["entered_in_error"][0]
    counts["missing_uacr"] = (int(missing_uacr.sum()), n)
    counts["patient_missing_gender"] = (int(no_gender.sum()), n)
    counts["entered_in_error"] = (int(entered_in_error.sum()), n)

    patients: list[dict] = []
    for i in range(n):
        patient: dict[str, Any] = {"resourceType": "Patient", "id": f"pt-{nums[i]}",
                                   "meta": _meta(),
                                   "birthDate": clock.day(int(pop.age_days[i]))}
        if not no_gender[i]:
            patient["gender"] = "male" if pop.male[i] else "female"
        patients.append(patient)

    rows = _egfr_rows(rng, pop, nums, clock, counts)
    rows += _uacr_rows(rng, pop, nums, clock, ~missing_uacr)
    rows += _bp_rows(rng, pop, nums, clock)
    rows += _hba1c_rows(rng, pop, nums, clock)
    rows.sort(key=lambda r: r[:4])
    observations = [r[4] for r in rows]

    # numeric value sent as a string: drawn over every final top-level valueQuantity
    as_string = rng.random(len(observations)) < DEFECTS["numeric_as_string"][0]
    eligible = 0
    hit = 0
    for obs, flag in zip(observations, as_string, strict=True):
        if "valueQuantity" in obs:
            eligible += 1
            if flag:
                hit += 1
                obs["valueQuantity"]["value"] = str(obs["valueQuantity"]["value"])
    counts["numeric_as_string"] = (hit, eligible)

    rows += _entered_in_error_rows(rng, entered_in_error, nums, clock)
    rows.sort(key=lambda r: r[:4])
    observations = [r[4] for r in rows]
    duplicated = rng.random(len(observations)) < DEFECTS["duplicate_line"][0]
    observations += [copy.deepcopy(o) for o, d in zip(observations, duplicated, strict=True)
                     if d]
    counts["duplicate_line"] = (int(duplicated.sum()), len(rows))

    conditions = _condition_resources(rng, pop, nums, clock)
    labels = [(f"pt-{nums[i]}", int(label[i])) for i in range(n)]
    resources = {"Patient": patients, "Observation": observations, "Condition": conditions}
    metadata = _metadata(n, seed, index_date, pop, risk, label, counts, resources)
    return Cohort(seed=seed, index_date=index_date, resources=resources, labels=labels,
                  metadata=metadata)


def _metadata(n: int, seed: int, index_date: date, pop: _Population, risk: np.ndarray,
              label: np.ndarray, counts: dict[str, tuple[int, int]],
              resources: dict[str, list[dict]]) -> dict:
    def r4(x: float) -> float:
        return round(float(x), 4)

    defects = []
    for name, (rate, over, description) in DEFECTS.items():
        count, denominator = counts[name]
        defects.append({"name": name, "description": description, "rate": rate,
                        "denominator_of": over, "denominator": denominator, "count": count})
    return {
        "generator": "cds_service.training.cohort",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n_patients": n,
        "index_date": index_date.isoformat(),
        "disclaimer": DISCLAIMER,
        "format": "FHIR R4 resources as Bulk Data NDJSON, one file per resource type",
        "files": {**{t: f"{t}.ndjson" for t in RESOURCE_TYPES},
                  "labels": LABELS_FILE, "metadata": METADATA_FILE},
        "resource_counts": {t: len(resources[t]) for t in RESOURCE_TYPES},
        "outcome": {
            "name": LABEL_NAME,
            "definition": "kidney failure (eGFR <15 sustained or kidney replacement therapy) "
                          f"within {HORIZON_YEARS} years after index_date",
            "horizon_years": HORIZON_YEARS,
            "prevalence": r4(label.mean()),
            "n_positive": int(label.sum()),
            "expected_prevalence": r4(risk.mean()),
        },
        "risk_model": {
            "form": "risk = 1 - S0 ** exp(KFRE_LP + extra + calibration_shift)",
            "kfre_4_variable": dict(KFRE),
            "extra_log_hazard_ratio": {k: r4(v) for k, v in EXTRA_LOG_HR.items()},
            "calibration_shift": CALIBRATION_SHIFT,
        },
        "population": {
            "age_mean": r4(pop.age.mean()),
            "male_fraction": r4(pop.male.mean()),
            "diabetes_fraction": r4(pop.diabetes.mean()),
            "hypertension_fraction": r4(pop.hypertension.mean()),
            "egfr_median": r4(np.median(pop.egfr)),
            "egfr_stage_3_fraction": r4(((pop.egfr >= 30) & (pop.egfr < 60)).mean()),
            "uacr_median_mg_g": r4(np.median(pop.uacr)),
            "sbp_mean": r4(pop.sbp.mean()),
            "egfr_slope_mean": r4(pop.slope.mean()),
        },
        "coding_variants": {
            "egfr_loinc": dict(P_EGFR_CODE),
            "creatinine_umol_per_l": P_CREATININE_UMOL,
            "uacr_loinc_14959_1": P_UACR_14959,
            "uacr_mg_per_mmol": P_UACR_MG_MMOL,
            "hba1c_ifcc_mmol_per_mol": P_HBA1C_IFCC,
            "bp_systolic_only": P_BP_SYSTOLIC_ONLY,
            "condition_icd10cm": P_CONDITION_ICD10,
        },
        "defects": defects,
    }


def _ndjson(resources: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n"
                   for r in resources)


def write_cohort(cohort: Cohort, out_dir: Path) -> dict[str, Path]:
    """Write the NDJSON files, ``labels.csv`` and ``cohort.json`` into ``out_dir`` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for resource_type in RESOURCE_TYPES:
        path = out_dir / f"{resource_type}.ndjson"
        path.write_text(_ndjson(cohort.resources[resource_type]), encoding="utf-8", newline="")
        paths[resource_type] = path

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patient_id", "index_date", "label"])
    index = cohort.index_date.isoformat()
    writer.writerows((patient_id, index, label) for patient_id, label in cohort.labels)
    paths["labels"] = out_dir / LABELS_FILE
    paths["labels"].write_text(buffer.getvalue(), encoding="utf-8", newline="")

    paths["metadata"] = out_dir / METADATA_FILE
    paths["metadata"].write_text(json.dumps(cohort.metadata, sort_keys=True, indent=2) + "\n",
                                 encoding="utf-8", newline="")
    return paths


def read_labels(path: Path) -> dict[str, tuple[date, int]]:
    """``labels.csv`` -> ``{patient_id: (index_date, label)}``; rejects malformed files."""
    out: dict[str, tuple[date, int]] = {}
    with Path(path).open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["patient_id", "index_date", "label"]:
            raise ValueError(f"{path}: expected header patient_id,index_date,label")
        for line_no, row in enumerate(reader, start=2):
            if len(row) != 3:
                raise ValueError(f"{path}:{line_no}: expected 3 fields")
            patient_id, index, label = row
            if not patient_id or label not in ("0", "1"):
                raise ValueError(f"{path}:{line_no}: bad patient_id or label")
            if patient_id in out:
                raise ValueError(f"{path}:{line_no}: duplicate patient_id {patient_id}")
            try:
                out[patient_id] = (date.fromisoformat(index), int(label))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: bad index_date") from exc
    return out
