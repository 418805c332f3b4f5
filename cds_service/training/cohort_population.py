"""Synthetic cohort, step 1: the population at the index date, drawn from the cohort's one
Generator (`cds_service.training.cohort` documents the whole generation). SYNTHETIC DATA.
Numbers are assumptions chosen to be of the size reported in the cited literature; they are
not estimates fitted to any data set.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EGFR_BINS = ((10, 15, 0.04), (15, 30, 0.18), (30, 45, 0.30), (45, 60, 0.28),
             (60, 90, 0.15), (90, 100, 0.05))
P_MALE = 0.5
P_DIABETES = 0.37
P_HYPERTENSION = 0.70
P_STABLE_SLOPE = 0.20


@dataclass(frozen=True)
class Population:
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



def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def draw_population(rng: np.random.Generator, n: int) -> Population:
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
    return Population(age_days, male, egfr, diabetes, hypertension, uacr, sbp, dbp, hba1c,
                      slope)

