"""Synthetic cohort, step 3: each patient's history before the index date, as the FHIR R4
resources an Epic Bulk export would hold (Patient, Observation, Condition), with the coding and
unit variants a consumer must normalise (`cds_service.training.cohort` documents the whole
generation). SYNTHETIC DATA: every resource is tagged ``synthetic``.
Numbers are assumptions chosen to be of the size reported in the cited literature; they are
not estimates fitted to any data set.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np

from cds_service.training.cohort_population import Population

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

class Clock:
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


def quantity(value: float | int, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _category(vital: bool) -> list[dict]:
    code, display = ("vital-signs", "Vital Signs") if vital else ("laboratory", "Laboratory")
    return [{"coding": [{"system": OBS_CATEGORY, "code": code, "display": display}]}]


def observation(obs_id: str, patient_id: str, code: str, when: str, *, vital: bool = False,
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
Row = tuple[int, int, int, str, dict]


def egfr_rows(rng: np.random.Generator, pop: Population, nums: list[str], clock: Clock,
              counts: dict[str, Any], gt60_rate: float) -> list[Row]:
    """eGFR results and a paired serum creatinine for each; applies the ">60" defect (the
    `egfr_gt60_string` rate of `cohort_defects.DEFECTS`)."""
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
    gt60 = (rng.random(p.size) < gt60_rate) & (value >= 60)
    counts["egfr_gt60_string"] = (int(gt60.sum()), int((value >= 60).sum()))

    rows: list[Row] = []
    for j in range(p.size):
        i = int(p[j])
        pid = f"pt-{nums[i]}"
        days, minute, seq = int(sch.days_before[j]), int(sch.minute_of_day[j]), int(sch.seq[j])
        when = clock.instant(days, minute)
        egfr = observation(f"obs-{nums[i]}-egfr-{seq}", pid, codes[code_idx[j]], when)
        if gt60[j]:
            egfr["valueString"] = ">60"
        else:
            egfr["valueQuantity"] = quantity(int(value[j]), EGFR_UNIT)
        creat = observation(f"obs-{nums[i]}-creat-{seq}", pid, "2160-0", when)
        if umol[j]:
            creat["valueQuantity"] = quantity(int(round(scr[j] * MG_DL_TO_UMOL_L)), "umol/L")
        else:
            creat["valueQuantity"] = quantity(round(float(scr[j]), 2), "mg/dL")
        rows.append((i, -days, minute, egfr["id"], egfr))
        rows.append((i, -days, minute, creat["id"], creat))
    return rows


def uacr_rows(rng: np.random.Generator, pop: Population, nums: list[str], clock: Clock,
              measured: np.ndarray) -> list[Row]:
    n = pop.uacr.size
    sch = _schedule(rng, np.where(measured, rng.integers(1, 4, n), 0), 365, 3 * 365)
    p = sch.patient
    noise = np.where(sch.is_last, 1.0, np.exp(rng.normal(0.0, UACR_LOG_NOISE, p.size)))
    mg_g = np.clip(np.round(pop.uacr[p] * noise, 1), 1.0, 8000.0)
    variant = rng.random(p.size)
    rows: list[Row] = []
    for j in range(p.size):
        i = int(p[j])
        days, minute = int(sch.days_before[j]), int(sch.minute_of_day[j])
        code = "14959-1" if variant[j] < P_UACR_14959 else "9318-7"
        obs = observation(f"obs-{nums[i]}-uacr-{int(sch.seq[j])}", f"pt-{nums[i]}", code,
                          clock.instant(days, minute))
        if P_UACR_14959 <= variant[j] < P_UACR_14959 + P_UACR_MG_MMOL:
            obs["valueQuantity"] = quantity(round(float(mg_g[j]) / MG_G_PER_MG_MMOL, 2),
                                            "mg/mmol")
        else:
            obs["valueQuantity"] = quantity(float(mg_g[j]), "mg/g")
        rows.append((i, -days, minute, obs["id"], obs))
    return rows


def bp_rows(rng: np.random.Generator, pop: Population, nums: list[str],
            clock: Clock) -> list[Row]:
    n = pop.sbp.size
    sch = _schedule(rng, rng.integers(1, 5, n), 365, 2 * 365)
    p = sch.patient
    sbp = np.rint(np.clip(pop.sbp[p] + rng.normal(0.0, 9.0, p.size), 80, 240))
    dbp = np.rint(np.clip(pop.dbp[p] + rng.normal(0.0, 6.0, p.size), 40, sbp - 10))
    systolic_only = rng.random(p.size) < P_BP_SYSTOLIC_ONLY
    rows: list[Row] = []
    for j in range(p.size):
        i = int(p[j])
        days, minute = int(sch.days_before[j]), int(sch.minute_of_day[j])
        when = clock.instant(days, minute)
        obs_id = f"obs-{nums[i]}-bp-{int(sch.seq[j])}"
        if systolic_only[j]:
            obs = observation(obs_id, f"pt-{nums[i]}", "8480-6", when, vital=True)
            obs["valueQuantity"] = quantity(int(sbp[j]), "mm[Hg]")
        else:
            obs = observation(obs_id, f"pt-{nums[i]}", "85354-9", when, vital=True)
            obs["component"] = [
                {"code": _loinc("8480-6"), "valueQuantity": quantity(int(sbp[j]), "mm[Hg]")},
                {"code": _loinc("8462-4"), "valueQuantity": quantity(int(dbp[j]), "mm[Hg]")},
            ]
        rows.append((i, -days, minute, obs_id, obs))
    return rows


def hba1c_rows(rng: np.random.Generator, pop: Population, nums: list[str],
               clock: Clock) -> list[Row]:
    n = pop.hba1c.size
    counts = np.where(pop.diabetes, rng.integers(1, 4, n), rng.integers(0, 2, n))
    sch = _schedule(rng, counts, 365, 3 * 365)
    p = sch.patient
    pct = np.round(np.clip(pop.hba1c[p] + rng.normal(0.0, 0.3, p.size), 4.0, 15.0), 1)
    ifcc = rng.random(p.size) < P_HBA1C_IFCC
    rows: list[Row] = []
    for j in range(p.size):
        i = int(p[j])
        days, minute = int(sch.days_before[j]), int(sch.minute_of_day[j])
        when = clock.instant(days, minute)
        obs_id = f"obs-{nums[i]}-hba1c-{int(sch.seq[j])}"
        if ifcc[j]:  # IFCC-NGSP master equation (Hoelzel 2004)
            obs = observation(obs_id, f"pt-{nums[i]}", "59261-8", when)
            obs["valueQuantity"] = quantity(int(round((pct[j] - 2.152) / 0.09148)), "mmol/mol")
        else:
            obs = observation(obs_id, f"pt-{nums[i]}", "4548-4", when)
            obs["valueQuantity"] = quantity(float(pct[j]), "%")
        rows.append((i, -days, minute, obs_id, obs))
    return rows



def patient_resources(pop: Population, nums: list[str], clock: Clock,
                      no_gender: np.ndarray) -> list[dict]:
    patients: list[dict] = []
    for i in range(pop.age_days.size):
        patient: dict[str, Any] = {"resourceType": "Patient", "id": f"pt-{nums[i]}",
                                   "meta": _meta(),
                                   "birthDate": clock.day(int(pop.age_days[i]))}
        if not no_gender[i]:
            patient["gender"] = "male" if pop.male[i] else "female"
        patients.append(patient)
    return patients


def condition_resources(rng: np.random.Generator, pop: Population, nums: list[str],
                        clock: Clock) -> list[dict]:
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

