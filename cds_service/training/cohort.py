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

1. Population at the index date: age, sex, eGFR, diabetes, hypertension, UACR, blood pressure,
   HbA1c and the eGFR slope (`cohort_population`).
2. Outcome: each patient's 5-year risk of kidney failure from the published KFRE plus extra
   effects, and the label drawn from it (`cohort_outcome`).
3. History before the index date, as FHIR resources with their coding and unit variants
   (`cohort_fhir`).
4. Injected real-world defects, which change only what is written, never labels
   (`cohort_defects`).

Each module's docstring documents its step, with the literature it draws on. This one draws the
steps in their fixed order, describes the result in ``cohort.json`` and writes the files.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np

from cds_service.training import cohort_defects
from cds_service.training.cohort_fhir import (
    P_BP_SYSTOLIC_ONLY,
    P_CONDITION_ICD10,
    P_CREATININE_UMOL,
    P_EGFR_CODE,
    P_HBA1C_IFCC,
    P_UACR_14959,
    P_UACR_MG_MMOL,
    Clock,
    bp_rows,
    condition_resources,
    egfr_rows,
    hba1c_rows,
    patient_resources,
    uacr_rows,
)
from cds_service.training.cohort_outcome import (
    CALIBRATION_SHIFT,
    EXTRA_LOG_HR,
    HORIZON_YEARS,
    KFRE,
    five_year_risk,
)
from cds_service.training.cohort_population import Population, draw_population

GENERATOR_VERSION = "1"

RESOURCE_TYPES = ("Patient", "Observation", "Condition")
LABELS_FILE = "labels.csv"
METADATA_FILE = "cohort.json"
LABEL_NAME = "kidney_failure_within_5y"
DISCLAIMER = (
    "Synthetic data drawn from a seeded random generator; not derived from any real patient; "
    "the generating risk model is literature-based and not clinically validated."
)


@dataclass(frozen=True)
class Cohort:
    """A generated cohort: the resources as they will be written (defects included)."""

    seed: int
    index_date: date                  # predictions are made as of this date
    resources: dict[str, list[dict]]  # "Patient" | "Observation" | "Condition" -> resources
    labels: list[tuple[str, int]]     # (patient_id, kidney_failure_within_5y), patient order
    metadata: dict                    # what cohort.json holds


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
    pop = draw_population(rng, n)
    risk = five_year_risk(pop)
    label = rng.random(n) < risk  # Bernoulli(risk): the outcome, from clean values only

    width = max(6, len(str(n)))
    nums = [f"{i + 1:0{width}d}" for i in range(n)]
    clock = Clock(index_date)
    counts: dict[str, tuple[int, int]] = {}

    missing_uacr, no_gender, entered_in_error = cohort_defects.patient_flags(rng, n)
    counts["missing_uacr"] = (int(missing_uacr.sum()), n)
    counts["patient_missing_gender"] = (int(no_gender.sum()), n)
    counts["entered_in_error"] = (int(entered_in_error.sum()), n)

    patients = patient_resources(pop, nums, clock, no_gender)

    rows = egfr_rows(rng, pop, nums, clock, counts,
                     cohort_defects.DEFECTS["egfr_gt60_string"][0])
    rows += uacr_rows(rng, pop, nums, clock, ~missing_uacr)
    rows += bp_rows(rng, pop, nums, clock)
    rows += hba1c_rows(rng, pop, nums, clock)
    rows.sort(key=lambda r: r[:4])
    observations = [r[4] for r in rows]
    counts["numeric_as_string"] = cohort_defects.numbers_as_strings(rng, observations)

    rows += cohort_defects.entered_in_error_rows(rng, entered_in_error, nums, clock)
    rows.sort(key=lambda r: r[:4])
    observations = [r[4] for r in rows]
    duplicates = cohort_defects.duplicate_lines(rng, observations)
    observations += duplicates
    counts["duplicate_line"] = (len(duplicates), len(rows))

    conditions = condition_resources(rng, pop, nums, clock)
    labels = [(f"pt-{nums[i]}", int(label[i])) for i in range(n)]
    resources = {"Patient": patients, "Observation": observations, "Condition": conditions}
    metadata = _metadata(n, seed, index_date, pop, risk, label, counts, resources)
    return Cohort(seed=seed, index_date=index_date, resources=resources, labels=labels,
                  metadata=metadata)


def _metadata(n: int, seed: int, index_date: date, pop: Population, risk: np.ndarray,
              label: np.ndarray, counts: dict[str, tuple[int, int]],
              resources: dict[str, list[dict]]) -> dict:
    def r4(x: float) -> float:
        return round(float(x), 4)

    defects = []
    for name, (rate, over, description) in cohort_defects.DEFECTS.items():
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
