"""Synthetic cohort, step 4: the real-world data defects injected into what is written, each at
the rate in ``DEFECTS`` (`cds_service.training.cohort` documents the whole generation; the
realised counts go to ``cohort.json``). SYNTHETIC DATA.

4. Injected real-world defects (rates in ``DEFECTS``; realised counts in ``cohort.json``):
   numeric value sent as a JSON string; eGFR >= 60 sent as ``valueString ">60"`` (the NKDEP
   recommendation for reporting, Myers GL et al., Clin Chem 2006;52:5); an Observation line
   repeated at the end of the file (as a retried page would); an extra ``entered-in-error``
   Observation with an absurd value dated just before index; patients whose UACR was never
   measured; a Patient without ``gender``. Defects change only what is written, never labels.
"""

from __future__ import annotations

import copy

import numpy as np

from cds_service.training.cohort_fhir import EGFR_UNIT, Clock, Row, observation, quantity

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


def patient_flags(rng: np.random.Generator, n: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The patient-level defects: (missing_uacr, patient_missing_gender, entered_in_error)."""
    missing_uacr = rng.random(n) < DEFECTS["missing_uacr"][0]
    no_gender = rng.random(n) < DEFECTS["patient_missing_gender"][0]
    entered_in_error = rng.random(n) < DEFECTS["entered_in_error"][0]
    return missing_uacr, no_gender, entered_in_error


def numbers_as_strings(rng: np.random.Generator, observations: list[dict]) -> tuple[int, int]:
    """Send some numeric values as strings, in place; (count, denominator)."""
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
    return hit, eligible


def entered_in_error_rows(rng: np.random.Generator, flagged: np.ndarray, nums: list[str],
                          clock: Clock) -> list[Row]:
    n = flagged.size
    as_egfr = rng.random(n) < 0.5
    days = rng.integers(1, 31, n)
    minute = rng.integers(7 * 60, 18 * 60, n)
    rows: list[Row] = []
    for i in np.flatnonzero(flagged):
        i = int(i)
        when = clock.instant(int(days[i]), int(minute[i]))
        obs_id = f"obs-{nums[i]}-eie-1"
        if as_egfr[i]:
            obs = observation(obs_id, f"pt-{nums[i]}", "98979-8", when,
                              status="entered-in-error")
            obs["valueQuantity"] = quantity(999, EGFR_UNIT)
        else:  # a umol/L number keyed in as mg/dL
            obs = observation(obs_id, f"pt-{nums[i]}", "2160-0", when,
                              status="entered-in-error")
            obs["valueQuantity"] = quantity(88.4, "mg/dL")
        rows.append((i, -int(days[i]), int(minute[i]), obs_id, obs))
    return rows



def duplicate_lines(rng: np.random.Generator, observations: list[dict]) -> list[dict]:
    """The Observations written a second time, at the end of the file."""
    duplicated = rng.random(len(observations)) < DEFECTS["duplicate_line"][0]
    return [copy.deepcopy(o) for o, d in zip(observations, duplicated, strict=True) if d]
