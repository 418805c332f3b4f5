"""Loaded models: one `ModelSet` per worker, built at start-up, read-only afterwards.

Loading checks, in order, and refuses the model with a message naming the file when any fails:
the manifest schema and feature contract; the runtime's library versions against the ones the
artifact was exported with (scikit-learn does not promise that a fitted estimator survives a
version change: https://scikit-learn.org/stable/model_persistence.html); the artifact's format and
sha256; the estimator's input width; and a smoke prediction on the reference patient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from marshmallow import ValidationError

from cds_service.features import CodeMap, FeatureVector, extract, vector_from_values
from cds_service.models import artifact
from cds_service.models.errors import ModelError
from cds_service.models.explain import Contribution, additive_terms, explain
from cds_service.models.fast import compile_estimator, verified
from cds_service.models.manifest import (
    INDICATORS,
    Manifest,
    Threshold,
    check_thresholds,
    load_manifest,
)
from cds_service.schema_errors import describe_errors

log = logging.getLogger(__name__)

# Distribution name → how much of the version must match between export and runtime.
# scikit-learn: same minor (estimator internals change between minors); numpy: same major
# (array pickling changed at 2.0); skops: same minor (its format is versioned per protocol).
RUNTIME_LIBRARIES = {"scikit-learn": 2, "numpy": 1, "skops": 2}


def runtime_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in RUNTIME_LIBRARIES}


def check_requirements(manifest: Manifest, versions: Mapping[str, str] | None = None) -> None:
    versions = versions or runtime_versions()
    problems = []
    for name, parts in RUNTIME_LIBRARIES.items():
        wanted = manifest.requirements.get(name)
        if wanted is None:
            problems.append(f"requirements.{name} is missing")
        elif wanted.split(".")[:parts] != versions[name].split(".")[:parts]:
            problems.append(f"built with {name} {wanted}, this runtime has {versions[name]} "
                            f"(the first {parts} version part(s) must match)")
    if problems:
        raise ModelError(f"{manifest.source}: model {manifest.id} {manifest.version} does not "
                         f"match this runtime: {'; '.join(problems)}. Retrain or re-export it "
                         "with `cds-service models train`.")


def indicator_for(scores: float | Mapping[str, float | None],
                  thresholds: Mapping[str, Threshold | float],
                  primary: str | None = None) -> str | None:
    """The most severe indicator whose threshold its output's score reaches; None below all.

    `scores`: each output's score by name (`Prediction.scores`), or the primary output's score
    alone. A threshold naming no output reads `primary`'s score; a bare number is `≥` on it.
    """
    return _reached(scores, thresholds, primary)[0]


def _reached(scores: float | Mapping[str, float | None],
             thresholds: Mapping[str, Threshold | float],
             primary: str | None) -> tuple[str | None, Threshold | None]:
    if not isinstance(scores, Mapping):
        scores = {primary: scores}
    chosen: tuple[str | None, Threshold | None] = (None, None)
    for indicator in INDICATORS:
        if indicator not in thresholds:
            continue
        t = thresholds[indicator]
        if not isinstance(t, Threshold):
            t = Threshold(float(t))
        name = t.output if t.output is not None else primary
        if t.reached(scores.get(name)):
            chosen = (indicator, t)
    return chosen


def check_use(model: LoadedModel, use: str, where: str) -> None:
    """Refuse a site making `model` its `use` (active/shadow) when the manifest's
    `approved_use` does not list it; the message names the site key and the manifest field."""
    m = model.manifest
    if m.approves(use):
        return
    advice = (" Make it the shadow_model, or choose a model approved for active use."
              if use == "active" and m.approves("shadow") else "")
    raise ModelError(f"{where}: {m.id} is not approved for {use} use "
                     f"({m.source}: approved_use: [{', '.join(m.approved_use)}]).{advice}")


def check_site_thresholds(model: LoadedModel, thresholds: Mapping[str, Threshold] | None,
                          where: str) -> None:
    """A site's `thresholds` against the model they apply to: named outputs exist, and the
    thresholds rise per output with the model's primary output for the unnamed ones."""
    if not thresholds:
        return
    try:
        check_thresholds(thresholds, model.manifest)
    except ValidationError as exc:
        raise ModelError(f"{where}: {describe_errors(exc, 'thresholds')}") from exc


@dataclass(frozen=True)
class Prediction:
    """One model's answer for one patient, with everything a card or an audit needs."""

    model_id: str
    model_version: str
    sha256: str
    output: str
    score: float | None
    indicator: str | None
    features: FeatureVector
    contributions: tuple[Contribution, ...] = ()
    secondary: Mapping[str, float] = field(default_factory=dict)
    unavailable: str | None = None  # why there is no score (missing required inputs)
    # The threshold that set `indicator` (which output, which bound), None without one.
    threshold: Threshold | None = None

    @property
    def scores(self) -> dict[str, float]:
        """Every output's score by name, the primary one first; empty without a score."""
        if self.score is None:
            return {}
        return {self.output: self.score, **self.secondary}

    def score_of(self, output: str) -> float | None:
        """One output's score (`score_of("risk_2y")`), None when not scored or not an output."""
        return self.scores.get(output)

    @property
    def missing(self) -> tuple[str, ...]:
        return self.features.missing

    @property
    def imputed(self) -> tuple[str, ...]:
        return self.features.imputed

    def top(self, n: int = 3) -> tuple[Contribution, ...]:
        return self.contributions[:n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"id": self.model_id, "version": self.model_version, "sha256": self.sha256},
            "output": self.output,
            "score": self.score,
            "indicator": self.indicator,
            # What set the indicator, e.g. "risk_2y > 0.4"; None without one.
            "threshold": self.threshold.describe(self.output) if self.threshold else None,
            "secondary": dict(self.secondary),
            "unavailable": self.unavailable,
            "missing": list(self.missing),
            "imputed": list(self.imputed),
            "contributions": [c.to_dict() for c in self.contributions],
            "features": self.features.to_dict(),
        }


class LoadedModel:
    """A manifest and its estimator, checked against each other and against this runtime."""

    def __init__(self, manifest: Manifest, estimator: Any, sha256: str,
                 fitted_features: tuple[str, ...]):
        self.manifest = manifest
        self.estimator = estimator
        self.sha256 = sha256
        self.fitted_features = fitted_features
        self.reference: Mapping[str, float] = dict(manifest.explanation.get("reference") or {})
        self.method: str = manifest.explanation.get("method", "occlusion")
        self._check_contract()
        self.fast = verified(compile_estimator(estimator), estimator, self._check_rows())

    def _check_rows(self) -> np.ndarray:
        """The reference patient and deterministic perturbations of it, for equivalence."""
        base = np.array([self.reference.get(f.name, f.missing.value or 1.0)
                         for f in self.manifest.features], dtype=float)
        rng = np.random.default_rng(0)
        return np.vstack([base, *(base * rng.uniform(0.5, 1.5, base.size) for _ in range(8))])

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def version(self) -> str:
        return self.manifest.version

    def _check_contract(self) -> None:
        m = self.manifest
        names = m.feature_names
        width = getattr(self.estimator, "n_features_in_", None)
        if width != len(names):
            raise ModelError(f"{m.source}: the artifact takes {width} inputs but the manifest "
                             f"lists {len(names)} features {list(names)}")
        if self.fitted_features != names:
            raise ModelError(f"{m.source}: features {list(names)} differ from the ones the "
                             f"artifact was fitted on {list(self.fitted_features)} (order "
                             "matters)")
        unfitted = [f.name for f in m.features if f.missing.strategy == "impute"
                    and f.missing.value is None]
        if unfitted:
            raise ModelError(f"{m.source}: imputation values not fitted for {unfitted}")
        if m.secondary_outputs and not hasattr(self.estimator, "risk"):
            raise ModelError(f"{m.source}: secondary_outputs need an estimator with risk(X, "
                             "horizon_years)")
        if self.method == "additive" and additive_terms(self.estimator) is None:
            raise ModelError(f"{m.source}: explanation.method additive needs a linear model")
        smoke = np.array([[self.reference.get(f.name, f.missing.value or 1.0)
                           for f in m.features]], dtype=float)
        try:
            score = float(self.estimator.predict_proba(smoke)[0, 1])
        except Exception as exc:  # noqa: BLE001 - any failure here means an unusable model
            raise ModelError(f"{m.source}: smoke prediction failed: {exc}") from exc
        if not 0.0 <= score <= 1.0:
            raise ModelError(f"{m.source}: smoke prediction {score} is not a probability")

    def score_rows(self, rows: np.ndarray) -> np.ndarray:
        """Primary output for many complete rows (training, evaluation)."""
        return self.estimator.predict_proba(np.asarray(rows, dtype=float))[:, 1]

    def predict_vector(self, vector: FeatureVector,
                       thresholds: Mapping[str, Threshold] | None = None) -> Prediction:
        m = self.manifest
        base = dict(model_id=m.id, model_version=m.version, sha256=self.sha256,
                    output=m.output.name, features=vector)
        if vector.missing_required:
            return Prediction(**base, score=None, indicator=None,
                              unavailable="missing " + ", ".join(vector.missing_required))
        row = vector.row()
        if self.fast is not None:
            score, secondary, contributions = self._fast_predict(row)
        else:
            x = np.array([row], dtype=float)
            score = float(self.estimator.predict_proba(x)[0, 1])
            secondary = {o.name: float(self.estimator.risk(x, horizon_years=o.horizon_years)[0])
                         for o in m.secondary_outputs}
            contributions = None
        if not math.isfinite(score):
            return Prediction(**base, score=None, indicator=None,
                              unavailable="the model returned no finite score")
        if contributions is None:
            contributions = explain(self.estimator, self.method, np.array([row], dtype=float),
                                    m.feature_names, self.reference, score)
        indicator, threshold = _reached({m.output.name: score, **secondary},
                                        thresholds or m.thresholds, m.output.name)
        return Prediction(**base, score=score, indicator=indicator, threshold=threshold,
                          contributions=tuple(contributions), secondary=secondary)

    def _fast_predict(self, row: list[float]) -> tuple[float, dict[str, float],
                                                        list[Contribution] | None]:
        fast = self.fast
        score = fast.score(row)
        secondary = {o.name: fast.score(row, o.horizon_years)
                     for o in self.manifest.secondary_outputs}
        if self.method != "additive":
            return score, secondary, None
        terms = fast.terms(row)
        if self.reference:
            ref = fast.terms([self.reference[n] for n in self.manifest.feature_names])
            terms = [t - r for t, r in zip(terms, ref, strict=True)]
        contributions = [Contribution(name, value, term) for name, value, term in
                         zip(self.manifest.feature_names, row, terms, strict=True)]
        contributions.sort(key=lambda c: (-abs(c.contribution), c.name))
        return score, secondary, contributions

    def predict(self, resources: Iterable[Any], *, now: datetime,
                code_map: CodeMap | None = None,
                thresholds: Mapping[str, Threshold] | None = None) -> Prediction:
        """Features from FHIR resources (the same engine training used), then the score."""
        vector = extract(self.manifest.features, resources, now=now, code_map=code_map)
        return self.predict_vector(vector, thresholds)

    def predict_values(self, observed: Mapping[str, float | None], *,
                       source: str | None = None) -> Prediction:
        """Score features observed elsewhere, by name (a cohort.csv row; None or absent: not
        observed): the manifest's missing policy as serving applies it, then `predict_vector`."""
        return self.predict_vector(vector_from_values(self.manifest.features, observed, source))

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "version": self.version, "sha256": self.sha256}


def load_model(directory: Path, *, versions: Mapping[str, str] | None = None) -> LoadedModel:
    manifest = load_manifest(directory)
    check_requirements(manifest, versions)
    path = directory / manifest.artifact_file
    estimator, fitted_features = artifact.load(path, manifest.artifact_sha256)
    return LoadedModel(manifest, estimator, manifest.artifact_sha256, fitted_features)


def load_model_by_id(models_dir: str | Path, model_id: str) -> LoadedModel:
    """`models_dir/model_id`, checked; ModelError names the model and what is available."""
    root = Path(models_dir)
    directory = root / model_id
    if not (directory / "manifest.yaml").is_file():
        available = sorted(p.parent.name for p in root.glob("*/manifest.yaml"))
        raise ModelError(f"model {model_id!r} not found in {root} (no {model_id}/manifest.yaml;"
                         f" available: {', '.join(available) or 'none'})")
    model = load_model(directory)
    log.info("model %s %s loaded (sha256 %s)", model_id, model.version, model.sha256[:12])
    return model


class ModelSet:
    """The models a worker serves, by id."""

    def __init__(self, models: Mapping[str, LoadedModel] | None = None):
        self._models = dict(models or {})

    def get(self, model_id: str) -> LoadedModel:
        return self._models[model_id]

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

    def describe(self) -> list[dict[str, str]]:
        return [m.describe() for _, m in sorted(self._models.items())]
