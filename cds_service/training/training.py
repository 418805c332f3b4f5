"""Train, evaluate and export a model from FHIR Bulk Data NDJSON and a labels CSV.

The features come from `cds_service.features.extract`, the function the service calls online, on
each patient's resources as of the label's index date: what a model is trained on is exactly what
it will see in Epic (train/serve parity). The export is checked by reloading the artifact from
disk and asserting identical predictions, then by loading the whole directory the way a worker
does.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from cds_service.features import FeatureSpec, MissingPolicy, extract, group_by_patient
from cds_service.models import artifact
from cds_service.models.drift import training_reference
from cds_service.models.errors import ModelError
from cds_service.models.estimators import KidneyFailureRiskEquation, LogColumns
from cds_service.models.explain import default_method
from cds_service.models.loaded import LoadedModel, load_model, runtime_versions
from cds_service.models.manifest import Manifest, write_manifest
from cds_service.training.measures import calibration

ARTIFACT_FILE = "model.skops"


# ---------------------------------------------------------------------------------------------
# Data


def read_ndjson_dir(directory: Path) -> Iterator[dict]:
    """Every resource of every `*.ndjson` file (Bulk Data export layout), in file order."""
    files = sorted(directory.glob("*.ndjson"))
    if not files:
        raise ModelError(f"{directory}: no .ndjson files (expected a FHIR Bulk Data export)")
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    resource = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ModelError(f"{path.name}:{number}: not JSON: {exc.msg}") from exc
                yield resource


def read_labels(path: Path) -> dict[str, tuple[date, int]]:
    """patient_id → (index_date, label) from `patient_id,index_date,label`."""
    labels: dict[str, tuple[date, int]] = {}
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            wanted = {"patient_id", "index_date", "label"}
            if not wanted <= set(reader.fieldnames or ()):
                raise ModelError(f"{path}: header must have {', '.join(sorted(wanted))}")
            for row in reader:
                try:
                    label = int(row["label"])
                    if label not in (0, 1):
                        raise ValueError(row["label"])
                    labels[row["patient_id"]] = (date.fromisoformat(row["index_date"]), label)
                except ValueError as exc:
                    raise ModelError(f"{path}:{reader.line_num}: bad row: {exc}") from exc
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from exc
    return labels


def as_of(index_date: date) -> datetime:
    """Predictions are made at the end of the index date (UTC): that day's results count."""
    return datetime.combine(index_date, time(23, 59, 59), tzinfo=UTC)


@dataclass
class Dataset:
    """Rows of observed features (NaN = not observed) for labelled patients."""

    patient_ids: list[str]
    observed: np.ndarray
    labels: np.ndarray
    excluded: dict[str, int]
    resources: dict[str, list[dict]]  # by patient id, as read
    index_dates: dict[str, date]


def build_dataset(features: Sequence[FeatureSpec], ndjson_dir: Path,
                  labels_csv: Path) -> Dataset:
    labels = read_labels(labels_csv)
    by_patient = group_by_patient(read_ndjson_dir(ndjson_dir))
    ids, rows, ys = [], [], []
    excluded: dict[str, int] = {}
    for patient_id, (index_date, label) in labels.items():
        resources = by_patient.get(patient_id)
        if not resources:
            excluded["no resources"] = excluded.get("no resources", 0) + 1
            continue
        vector = extract(features, resources, now=as_of(index_date))
        required_missing = [v.name for v, f in zip(vector.values, features, strict=True)
                            if v.status != "observed" and f.missing.strategy == "required"]
        if required_missing:
            key = "missing " + ", ".join(required_missing)
            excluded[key] = excluded.get(key, 0) + 1
            continue
        ids.append(patient_id)
        rows.append([v.observed if v.status == "observed" and v.observed is not None
                     else math.nan for v in vector.values])
        ys.append(label)
    if not ids:
        raise ModelError("no labelled patient has the required features; check the labels' "
                         "patient ids against the NDJSON and the spec's codes")
    return Dataset(ids, np.array(rows, dtype=float), np.array(ys, dtype=int), excluded,
                   by_patient, {pid: index_date for pid, (index_date, _) in labels.items()})


def fit_imputation(features: Sequence[FeatureSpec], observed: np.ndarray) -> tuple[FeatureSpec,
                                                                                    ...]:
    """Resolve `impute: median` from the training rows only (no leakage from the test split)."""
    fitted = []
    for column, spec in enumerate(features):
        if spec.missing.strategy == "impute" and spec.missing.value is None:
            values = observed[:, column]
            values = values[~np.isnan(values)]
            if values.size == 0:
                raise ModelError(f"feature {spec.name}: never observed in the training split; "
                                 "cannot fit its imputation value")
            median = round(float(np.median(values)), 4)
            spec = dataclasses.replace(spec, missing=MissingPolicy("impute", median, fit="median"))
        fitted.append(spec)
    return tuple(fitted)


def impute(features: Sequence[FeatureSpec], observed: np.ndarray) -> np.ndarray:
    filled = observed.copy()
    for column, spec in enumerate(features):
        gaps = np.isnan(filled[:, column])
        if gaps.any():
            filled[gaps, column] = spec.missing.value
    return filled


# ---------------------------------------------------------------------------------------------
# Metrics


def evaluate_scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    if len(set(y.tolist())) < 2:
        raise ModelError("evaluation needs both outcomes in the labelled set")
    slope, intercept = calibration(y, p)
    return {
        "n": int(len(y)),
        "events": int(y.sum()),
        "prevalence": round(float(y.mean()), 4),
        "auroc": round(float(roc_auc_score(y, p)), 4),
        "auprc": round(float(average_precision_score(y, p)), 4),
        "brier": round(float(brier_score_loss(y, p)), 4),
        "calibration_slope": round(slope, 4),
        "calibration_intercept": round(intercept, 4),
        "mean_predicted": round(float(p.mean()), 4),
    }


def write_plots(y: np.ndarray, p: np.ndarray, out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {title}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    roc_path = out_dir / "roc.png"
    fig.savefig(roc_path, metadata={"Software": None})
    plt.close(fig)

    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(predicted, observed, marker="o", label="deciles of predicted risk")
    top = max(float(predicted.max()), float(observed.max())) * 1.05
    ax.plot([0, top], [0, top], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="predicted risk", ylabel="observed rate", title=f"Calibration: {title}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    cal_path = out_dir / "calibration.png"
    fig.savefig(cal_path, metadata={"Software": None})
    plt.close(fig)
    return [roc_path, cal_path]


# ---------------------------------------------------------------------------------------------
# Training


def build_estimator(spec: Manifest) -> Any:
    training = spec.training
    params = dict(training.get("params") or {})
    names = spec.feature_names
    if training["estimator"] == "kfre-4var":
        if names != ("age", "male", "egfr", "uacr"):
            raise ModelError(f"{spec.source}: kfre-4var needs features age, male, egfr, uacr in "
                             f"that order, not {list(names)}")
        return KidneyFailureRiskEquation(**params)
    if training["estimator"] == "logistic_regression":
        log_features = params.pop("log_features", [])
        unknown = sorted(set(log_features) - set(names))
        if unknown:
            raise ModelError(f"{spec.source}: training.params.log_features names unknown "
                             f"features {unknown}")
        columns = tuple(names.index(n) for n in log_features)
        return Pipeline([("log", LogColumns(columns=columns)), ("scale", StandardScaler()),
                         ("model", LogisticRegression(max_iter=2000, **params))])
    return HistGradientBoostingClassifier(random_state=training["seed"], **params)


@dataclass
class TrainResult:
    model: LoadedModel
    metrics: dict[str, float]
    directory: Path
    files: list[Path]


def check_out_dir(out_dir: Path, replace: bool) -> None:
    """A model directory is never overwritten by accident: its manifest is what workers load and
    what a validation report names."""
    if (out_dir / "manifest.yaml").exists() and not replace:
        raise ModelError(f"{out_dir}: already holds a model (manifest.yaml); choose another "
                         "--out, or pass --replace to overwrite it")


def train(spec: Manifest, ndjson_dir: Path, labels_csv: Path, out_dir: Path, *,
          today: date | None = None, replace: bool = False) -> TrainResult:
    check_out_dir(out_dir, replace)
    seed = int(spec.training["seed"])
    data = build_dataset(spec.features, ndjson_dir, labels_csv)
    if len(set(data.labels.tolist())) < 2:
        raise ModelError("the labels need both outcomes to train and evaluate")
    train_idx, test_idx = train_test_split(
        np.arange(len(data.labels)), test_size=float(spec.training["test_fraction"]),
        random_state=seed, stratify=data.labels)
    excluded_total = sum(data.excluded.values())
    training_data = {
        "source": str(ndjson_dir),
        "labels": str(labels_csv.name),
        "cohort": _cohort_summary(ndjson_dir),
        "patients_labelled": len(data.labels) + excluded_total,
        "patients_used": len(data.labels),
        "excluded": dict(sorted(data.excluded.items())),
    }
    result, x = fit_export(spec, data.observed, data.labels, train_idx, test_idx, out_dir,
                           training_data=training_data, split="held-out", today=today)
    _check_parity(result.model, data, x)
    return result


def fit_export(spec: Manifest, observed: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
               test_idx: np.ndarray, out_dir: Path, *, training_data: Mapping[str, Any],
               split: str, today: date | None = None) -> tuple[TrainResult, np.ndarray]:
    """Fit imputation and estimator on the training rows, measure on the test rows, export and
    reload the directory as a worker would. Returns the result and the imputed rows."""
    features = fit_imputation(spec.features, observed[train_idx])
    x = impute(features, observed)
    estimator = build_estimator(spec)
    estimator.fit(x[train_idx], labels[train_idx])
    p_test = estimator.predict_proba(x[test_idx])[:, 1]
    metrics = evaluate_scores(labels[test_idx], p_test)

    out_dir.mkdir(parents=True, exist_ok=True)
    sha256 = artifact.save(estimator, out_dir / ARTIFACT_FILE, spec.feature_names)
    reloaded, _ = artifact.load(out_dir / ARTIFACT_FILE, sha256)
    if not np.array_equal(reloaded.predict_proba(x[test_idx])[:, 1], p_test):
        raise ModelError("the exported artifact does not reproduce the trained model's "
                         "predictions")

    method, units = default_method(estimator)
    # Additive KFRE terms are already relative to the published centroid; everything else is
    # explained against the median training patient.
    reference = {} if hasattr(estimator, "terms") else {
        f.name: round(float(np.median(x[train_idx, i])), 4) for i, f in enumerate(features)}
    manifest = dataclasses.replace(
        spec,
        features=features,
        artifact_file=ARTIFACT_FILE,
        artifact_sha256=sha256,
        explanation={"method": method, "units": units, "reference": reference},
        metrics={"split": split, **metrics},
        training_data={
            **training_data,
            "n_train": len(train_idx),
            "n_test": len(test_idx),
            "prevalence_train": round(float(labels[train_idx].mean()), 4),
            "missing_rate": {f.name: round(float(np.isnan(observed[train_idx, i]).mean()),
                                           4) for i, f in enumerate(features)},
        },
        monitoring_reference=training_reference(estimator.predict_proba(x[train_idx])[:, 1],
                                                observed[train_idx], spec.feature_names),
        requirements=runtime_versions(),
        created=(today or date.today()).isoformat(),
    )
    write_manifest(manifest, out_dir)
    files = write_plots(labels[test_idx], p_test, out_dir, spec.id)
    loaded = load_model(out_dir)
    (out_dir / "model_card.md").write_text(model_card(loaded.manifest), encoding="utf-8")
    return TrainResult(loaded, metrics, out_dir, [out_dir / "manifest.yaml",
                                                  out_dir / ARTIFACT_FILE,
                                                  out_dir / "model_card.md", *files]), x


def _check_parity(model: LoadedModel, data: Dataset, x: np.ndarray) -> None:
    """The served model's features (with its fitted imputation) are the training rows."""
    for row, patient_id in list(enumerate(data.patient_ids))[:200]:
        vector = extract(model.manifest.features, data.resources[patient_id],
                         now=as_of(data.index_dates[patient_id]))
        if not np.allclose(vector.row(), x[row], equal_nan=True):
            raise ModelError(f"train/serve parity broken for patient {patient_id}: online "
                             f"features {vector.row()} vs training {x[row].tolist()}")


def _cohort_summary(ndjson_dir: Path) -> dict[str, Any]:
    meta = ndjson_dir / "cohort.json"
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keep = ("synthetic", "generator", "generator_version", "seed", "n_patients", "index_date",
            "prevalence")
    return {k: data[k] for k in keep if k in data}


def evaluate(model: LoadedModel, ndjson_dir: Path, labels_csv: Path) -> dict[str, Any]:
    """The model's metrics on a labelled cohort (external validation when it is new data)."""
    data = build_dataset(model.manifest.features, ndjson_dir, labels_csv)
    x = impute(model.manifest.features, data.observed)
    metrics = evaluate_scores(data.labels, model.score_rows(x))
    return {"model": model.describe(), "metrics": metrics,
            "excluded": dict(sorted(data.excluded.items()))}


def model_card(m: Manifest) -> str:
    def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)

    feature_rows = []
    for f in m.features:
        policy = "required" if f.missing.strategy == "required" else f"impute {f.missing.value}"
        codes = ", ".join(f.codes) if f.codes else (f.attribute or "")
        window = f"{f.lookback_days} d" if f.lookback_days else "all"
        feature_rows.append((f.name, f.resource, f.aggregation, f.unit or "", window, policy,
                             codes))
    metric_rows = [(k, v) for k, v in m.metrics.items()]
    data_rows = [(k, json.dumps(v) if isinstance(v, Mapping | list) else v)
                 for k, v in m.training_data.items()]
    parts = [
        f"# Model card: {m.id} {m.version}",
        f"_Written by `cds-service models train` on {m.created}. Artifact sha256 "
        f"`{m.artifact_sha256}`._",
        m.description,
        "## Intended use\n\n" + m.intended_use,
        "## Population\n\n" + m.population,
        f"## Output\n\n`{m.output.name}`: {m.output.meaning}" + "".join(
            f"\n\n`{o.name}`: {o.meaning}" for o in m.secondary_outputs),
        "## Approved use\n\n" + ", ".join(f"`{u}`" for u in m.approved_use) + (
            "" if m.approves("active") else " only: a site cannot make it the active model"),
        "## Decision thresholds\n\n" + table(
            [(i, t.describe(m.output.name)) for i, t in m.thresholds.items()],
            ("indicator", "card when")),
        "## Features\n\n" + table(feature_rows, ("name", "resource", "aggregation", "unit",
                                                 "look-back", "missing", "codes")),
        f"## Evaluation ({m.metrics.get('split', 'held-out')} split)\n\n"
        + table(metric_rows, ("metric", "value"))
        + "\n\n![ROC](roc.png) ![Calibration](calibration.png)",
        "## Training data\n\n" + table(data_rows, ("item", "value")),
        f"## Explanations\n\n{m.explanation.get('method')}: {m.explanation.get('units')}",
        "## Notes and limitations\n\n" + m.model_card,
    ]
    if m.citations:
        parts.append("## References\n\n" + "\n".join(f"- {c}" for c in m.citations))
    parts.append("## Runtime\n\n" + table(list(m.requirements.items()), ("library", "version")))
    return "\n\n".join(parts) + "\n"
