"""Synthetic cohort, step 2: each patient's true 5-year risk of kidney failure, from which the
label is drawn (`cds_service.training.cohort` documents the whole generation). SYNTHETIC DATA.
Numbers are assumptions chosen to be of the size reported in the cited literature; they are
not estimates fitted to any data set.

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
"""

from __future__ import annotations

import math

import numpy as np

from cds_service.training.cohort_population import Population

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


def _kfre_linear_predictor(age: np.ndarray, male: np.ndarray, egfr: np.ndarray,
                           acr_mg_g: np.ndarray) -> np.ndarray:
    k = KFRE
    return (k["age_per_10y"] * (age / 10.0 - k["age_mean"])
            + k["male"] * (male - k["male_mean"])
            + k["egfr_per_5"] * (egfr / 5.0 - k["egfr_mean"])
            + k["ln_acr"] * (np.log(acr_mg_g) - k["ln_acr_mean"]))


def _egfr_decline_pct_2y(pop: Population) -> np.ndarray:
    """Percentage eGFR decline over the 2 years before index implied by the slope (>= 0)."""
    before = pop.egfr - 2.0 * pop.slope
    return np.maximum(100.0 * (before - pop.egfr) / before, 0.0)


def five_year_risk(pop: Population) -> np.ndarray:
    e = EXTRA_LOG_HR
    extra = (e["per_pct_egfr_decline_2y"] * _egfr_decline_pct_2y(pop)
             + e["diabetes"] * pop.diabetes
             + e["hypertension"] * pop.hypertension
             + e["per_10mmHg_sbp_above_130"] * np.maximum(pop.sbp - 130.0, 0.0) / 10.0
             + e["per_1pct_hba1c_above_7_diabetic"] * np.maximum(pop.hba1c - 7.0, 0.0)
             * pop.diabetes)
    lp = _kfre_linear_predictor(pop.age, pop.male, pop.egfr, pop.uacr)
    return 1.0 - KFRE["baseline_survival_5y"] ** np.exp(lp + extra + CALIBRATION_SHIFT)

