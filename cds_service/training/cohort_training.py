"""`cds-service models train --cohort COHORT_DIR`: a model from a `models cohort` directory.

Labels at the spec's horizon (`cohort_labels`: kidney failure within H → 1, followed past H or
dead before it without kidney failure → 0, censored before H → left out), features from
cohort.csv's columns (extracted by the service's engine when the cohort was built), split in
time (the earliest index dates train, the later ones test), then the same fit, export and
reload as `models train --ndjson` (`training.fit_export`).

Parity: with no FHIR resources at hand, the check is that the exported directory, loaded as a
worker loads it and fed each row's observed values by name (`LoadedModel.predict_values`, the
serving imputation), gives the scores of the training rows.
"""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.models.errors import ModelError
from cds_service.models.loaded import LoadedModel
from cds_service.models.manifest import Manifest
from cds_service.training.cohort_labels import (
    DAYS_PER_YEAR,
    Labelled,
    label_cohort,
    read_cohort,
    time_split,
)
from cds_service.training.training import TrainResult, check_out_dir, fit_export

DEFAULT_TRAIN_FRACTION = 0.75
SPLIT_RULE = ("train: index_date <= boundary_date (the first train_fraction of patients by "
              "index date, ties on the boundary date with them); test: index_date after it")


def train_from_cohort(spec: Manifest, cohort_dir: Path, out_dir: Path, *,
                      train_fraction: float = DEFAULT_TRAIN_FRACTION, replace: bool = False,
                      today: date | None = None) -> TrainResult:
    check_out_dir(out_dir, replace)
    horizon = spec.output.horizon_years
    if not horizon:
        raise ModelError(f"{spec.source}: output.horizon_years is needed to label a cohort")
    cohort = read_cohort(cohort_dir)
    data = label_cohort(cohort, spec.features, horizon, f"spec {spec.source}")
    train_idx, test_idx, boundary = time_split(data.index_dates, train_fraction)
    for part, rows in (("training", train_idx), ("test", test_idx)):
        if len(set(data.y[rows].tolist())) < 2:
            raise ModelError(f"the {part} split (index dates {_span(data, rows)}) has only one "
                             f"outcome at {horizon:g} years; it needs both to "
                             f"{'fit' if part == 'training' else 'be measured'}")
    training_data = {
        "source": str(cohort_dir),
        "cohort": _cohort_summary(cohort.document),
        "label": {
            "horizon_years": horizon,
            "horizon_days": DAYS_PER_YEAR * horizon,
            "rule": "1: kidney failure with followup_days <= horizon_days; 0: followed past "
                    "horizon_days without kidney failure by then, or death (competing) before "
                    "it; censored before it: excluded",
        },
        "patients_in_cohort": len(cohort.rows),
        "patients_used": len(data.y),
        "excluded": dict(sorted(data.excluded.items())),
        "events": int(data.y.sum()),
        "deaths_before_horizon": data.deaths_before_horizon,
        "split": {
            "method": "temporal",
            "train_fraction": train_fraction,
            "boundary_date": boundary.isoformat(),
            "rule": SPLIT_RULE,
            "train_index_dates": _span(data, train_idx),
            "test_index_dates": _span(data, test_idx),
        },
        "prevalence_test": round(float(data.y[test_idx].mean()), 4),
    }
    result, x = fit_export(spec, data.observed, data.y, train_idx, test_idx, out_dir,
                           training_data=training_data, split="temporal", today=today)
    _check_parity(result.model, data, x)
    return result


def _span(data: Labelled, rows: np.ndarray) -> str:
    dates = [data.rows[i].index_date for i in rows]
    return f"{min(dates).isoformat()} to {max(dates).isoformat()}"


def _cohort_summary(document: dict[str, Any]) -> dict[str, Any]:
    return {"format": document.get("format"), "spec_files": document.get("spec_files"),
            "index_dates": document.get("index_dates"),
            "export_transaction_time": (document.get("export", {}).get("log") or {}).get(
                "transaction_time")}


def _check_parity(model: LoadedModel, data: Labelled, x: np.ndarray) -> None:
    """The served model, given each row's observed values by name, scores as trained."""
    names = model.manifest.feature_names
    expected = model.score_rows(x[:200])
    for row, score in zip(range(len(expected)), expected, strict=True):
        values = {n: None if math.isnan(v) else float(v)
                  for n, v in zip(names, data.observed[row], strict=True)}
        served = model.predict_values(values).score
        if served is None or not math.isclose(served, float(score), rel_tol=1e-9,
                                              abs_tol=1e-12):
            raise ModelError(f"train/serve parity broken for patient "
                             f"{data.rows[row].patient_id}: served {served}, trained {score}")
