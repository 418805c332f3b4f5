"""`cds-service models evaluate MODEL_DIR --cohort COHORT_DIR --report OUT_DIR`: a model, and
optionally a comparator, on the same patients of a `models cohort` directory.

The outcome is labelled at the model's horizon as for training (`cohort_labels`). Each model is
scored from cohort.csv's columns by name through `LoadedModel.predict_values`, so each applies
its own manifest's missing policy exactly as serving does; the comparator is read at its output
of the same horizon (kfre-4var: risk_5y for a 5-year model, risk_2y for a 2-year one). Only
patients both can score are evaluated; the others are counted. Net benefit is reported at the
KDIGO 2024 thresholds for the horizon (`evaluation.kdigo_thresholds`).

Subgroups:
- sex, as recorded (KFRE has sex-specific terms; Tangri 2016 reports both);
- age at index < 65, 65-74, ≥ 75: 65 is the cut Tangri 2016 (JAMA 2016;315:164) reports KFRE's
  accuracy by; ≥ 75 is where competing mortality is highest and KFRE overestimates risk most
  (Ramspek CL et al. J Am Soc Nephrol 2021;32:1174; docs/clinical.md, "Equations"), so it is not
  pooled with 65-74;
- diabetes, from a `diabetes` column when the cohort has one (yes: value > 0), else left out and
  the report says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.models.errors import ModelError
from cds_service.models.loaded import LoadedModel
from cds_service.training.cohort_labels import (
    CENSORED_BEFORE,
    CohortRow,
    label,
    read_cohort,
)
from cds_service.training.evaluation import DEFAULT_BOOTSTRAP, evaluate_models, kdigo_thresholds
from cds_service.training.evidence import write_provenance
from cds_service.training.validation_report import write_report

SPLITS = ("all", "test")
AGE_BANDS = ((65, "< 65"), (75, "65-74"), (None, "≥ 75"))
BEFORE_BOUNDARY = "index date on or before the model's training boundary"


def age_band(age: int) -> str:
    for upper, name in AGE_BANDS:
        if upper is None or age < upper:
            return name
    raise AssertionError("unreachable")


def output_at(model: LoadedModel, horizon: float) -> str:
    """The name of `model`'s output at `horizon` years; ModelError lists what it has."""
    m = model.manifest
    outputs = [m.output, *m.secondary_outputs]
    for output in outputs:
        if output.horizon_years == horizon:
            return output.name
    have = ", ".join(f"{o.name} ({o.horizon_years:g} years)" for o in outputs)
    raise ModelError(f"{m.id} has no output at {horizon:g} years (it has {have}); compare "
                     "models of the same horizon")


def boundary_of(model: LoadedModel) -> date:
    split = model.manifest.training_data.get("split") or {}
    raw = split.get("boundary_date") if isinstance(split, Mapping) else None
    if not raw:
        raise ModelError(f"{model.manifest.source}: no training boundary recorded "
                         "(training_data.split.boundary_date: the model was not trained with "
                         "`models train --cohort`); use --split all")
    return date.fromisoformat(raw)


@dataclass
class Scored:
    rows: list[CohortRow]
    y: np.ndarray
    scores: dict[str, np.ndarray]
    counts: dict[str, Any]


def score_cohort(cohort_dir: Path, model: LoadedModel, comparator: LoadedModel | None,
                 split: str = "all") -> tuple[Scored, dict[str, Any]]:
    """Label at the model's horizon and score every model on the same patients. Returns the
    scored patients and the cohort document."""
    if split not in SPLITS:
        raise ModelError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    horizon = model.manifest.output.horizon_years
    if not horizon:
        raise ModelError(f"{model.manifest.source}: output.horizon_years is needed to label")
    models = [(model, model.manifest.output.name)]
    if comparator is not None:
        models.append((comparator, output_at(comparator, horizon)))
    names = [_name(m, models) for m, _ in models]
    if len(set(names)) != len(names):
        raise ModelError(f"the model and the comparator are the same ({names[0]})")
    cohort = read_cohort(cohort_dir)
    for m, _ in models:
        cohort.check_features(m.manifest.features, f"model {m.id}")
    boundary = boundary_of(model) if split == "test" else None

    excluded: Counter[str] = Counter()
    rows, ys = [], []
    scores: dict[str, list[float]] = {name: [] for name in names}
    for row in cohort.rows:
        if boundary is not None and row.index_date <= boundary:
            excluded[BEFORE_BOUNDARY] += 1
            continue
        y = label(row, horizon)
        if y is None:
            excluded[CENSORED_BEFORE] += 1
            continue
        got = []
        for (m, output), name in zip(models, names, strict=True):
            prediction = m.predict_values(row.values)
            score = prediction.score_of(output)
            if score is None:
                why = prediction.unavailable or "no score"
                excluded[f"not scored by {name} ({why})"] += 1
                break
            got.append(score)
        else:
            rows.append(row)
            ys.append(y)
            for name, score in zip(names, got, strict=True):
                scores[name].append(score)
    if not rows:
        raise ModelError(f"{cohort_dir}: no patient is labelled at {horizon:g} years and scored "
                         f"by {' and '.join(names)} ({dict(excluded)})")
    counts: dict[str, Any] = {
        "cohort": str(cohort_dir),
        "patients in cohort.csv": len(cohort.rows),
        "evaluated on": "all patients" if boundary is None else
                        f"index dates after {boundary.isoformat()} (the model's test split)",
    }
    counts.update({f"excluded: {why}": n for why, n in sorted(excluded.items())})
    counts["evaluated (both models scored)" if comparator else "evaluated"] = len(rows)
    for (_, output), name in zip(models, names, strict=True):
        counts[f"{name} output"] = output
    return Scored(rows, np.array(ys, dtype=int),
                  {k: np.array(v, dtype=float) for k, v in scores.items()}, counts), (
        cohort.document)


def _name(model: LoadedModel, models: list[tuple[LoadedModel, str]]) -> str:
    same_id = sum(m.id == model.id for m, _ in models) > 1
    return f"{model.id} {model.version}" if same_id else model.id


def evaluate_cohort(model: LoadedModel, cohort_dir: Path, report_dir: Path, *,
                    comparator: LoadedModel | None = None, split: str = "all",
                    n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                    site: str | None = None) -> list[Path]:
    """Score, evaluate and write the validation report; returns the files written (report.md
    first). With `site`, also provenance.json: which builds were scored on whose patients, the
    evidence `models promote` checks."""
    scored, _ = score_cohort(cohort_dir, model, comparator, split)
    horizon = model.manifest.output.horizon_years
    thresholds = kdigo_thresholds(horizon)
    subgroups: dict[str, list[Any]] = {
        "sex": [r.sex for r in scored.rows],
        "age at index": [age_band(r.age) for r in scored.rows],
    }
    if all("diabetes" in r.values for r in scored.rows):
        subgroups["diabetes"] = [None if r.values["diabetes"] is None
                                 else ("yes" if r.values["diabetes"] > 0 else "no")
                                 for r in scored.rows]
        scored.counts["diabetes subgroup"] = "from cohort.csv's diabetes column"
    else:
        scored.counts["diabetes subgroup"] = ("not reported: cohort.csv has no diabetes column "
                                              "(build the cohort with a spec that has one)")
    names = list(scored.scores)
    result = evaluate_models(scored.y, scored.scores, thresholds=thresholds,
                             horizon_years=horizon, comparator=names[1] if comparator else None,
                             subgroups=subgroups, n_bootstrap=n_bootstrap, seed=seed)
    title = f"{names[0]} {model.version}" + (f" vs {names[1]}" if comparator else "")
    paths = write_report(result, report_dir, title=title, cohort=scored.counts)
    if site is not None:
        models = dict(zip(names, [model, comparator] if comparator else [model], strict=True))
        paths.append(write_provenance(report_dir, site=site, models=models,
                                      cohort_dir=cohort_dir))
    return paths
