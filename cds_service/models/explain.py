"""Per-prediction explanations: which inputs pushed this patient's score up or down.

Two deterministic methods, chosen by the estimator at export and recorded in the manifest:

* `additive` (exact): the model's linear predictor is a sum of per-feature terms, so each
  feature's contribution is its term for this patient minus its term for the reference patient.
  The KFRE's terms are log hazard ratios against the published cohort centroid (reference = the
  centroid itself); a logistic-regression pipeline's are log-odds against the training medians.
* `occlusion` (any model): the change in predicted probability when the feature alone is replaced
  by its reference value (the training median), everything else held fixed. It is deterministic
  and cheap (one extra prediction per feature), ignores interactions, and its contributions need
  not sum to the score; the card says "about".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from cds_service.models.errors import ModelError
from cds_service.models.estimators import LogColumns

# Pipeline steps that act column by column, so a linear final step stays additive per feature.
_COLUMNWISE = ("StandardScaler", "RobustScaler", "MinMaxScaler", "MaxAbsScaler", "LogColumns")


@dataclass(frozen=True)
class Contribution:
    name: str
    value: float | None
    contribution: float

    @property
    def direction(self) -> str:
        return "raises" if self.contribution > 0 else "lowers"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value,
                "contribution": round(self.contribution, 6), "direction": self.direction}


def additive_terms(estimator: Any) -> Any | None:
    """A function X → per-feature terms when the estimator is additive, else None."""
    if hasattr(estimator, "terms"):
        return estimator.terms
    if isinstance(estimator, Pipeline) and isinstance(estimator[-1], LogisticRegression):
        steps = estimator[:-1]
        if all(type(step).__name__ in _COLUMNWISE or isinstance(step, LogColumns)
               for step in steps.named_steps.values()):
            coef = estimator[-1].coef_[0]
            return lambda X: steps.transform(X) * coef  # noqa: N803
    return None


def default_method(estimator: Any) -> tuple[str, str]:
    """(method, units) for a freshly trained or built estimator."""
    if hasattr(estimator, "terms"):
        return "additive", "log hazard ratio vs the published cohort centroid"
    if additive_terms(estimator) is not None:
        return "additive", "log-odds vs the reference (training median) patient"
    return "occlusion", "change in probability when set to the reference (training median)"


def reference_row(feature_names: Sequence[str], reference: Mapping[str, float]) -> np.ndarray:
    return np.array([[float(reference.get(name, np.nan)) for name in feature_names]])


def explain(estimator: Any, method: str, x: np.ndarray, feature_names: Sequence[str],
            reference: Mapping[str, float], score: float) -> list[Contribution]:
    """Contributions for one row `x` (shape 1×n), largest absolute effect first."""
    if method == "additive":
        terms_fn = additive_terms(estimator)
        if terms_fn is None:
            raise ModelError("explanation method 'additive' needs a linear model")
        terms = terms_fn(x)[0]
        if reference:
            terms = terms - terms_fn(reference_row(feature_names, reference))[0]
    elif method == "occlusion":
        ref = reference_row(feature_names, reference)[0]
        batch = np.repeat(x, len(feature_names), axis=0)
        idx = np.arange(len(feature_names))
        batch[idx, idx] = ref
        occluded = estimator.predict_proba(batch)[:, 1]
        terms = score - occluded
    else:
        raise ModelError(f"unknown explanation method {method!r}")
    out = [Contribution(name, None if np.isnan(v) else float(v), float(t))
           for name, v, t in zip(feature_names, x[0], terms, strict=True)]
    out.sort(key=lambda c: (-abs(c.contribution), c.name))
    return out
