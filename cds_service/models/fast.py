"""One-row scoring for the linear models we ship, without scikit-learn's per-call validation.

scikit-learn validates and copies its input on every call (about 0.3 ms for a three-step
pipeline on one row, most of a request's budget). At load, a supported estimator is compiled to
its arithmetic: KFRE's published terms, or a column-wise pipeline ending in a logistic
regression (log → standardise → coefficients). The compiled form is checked against the
estimator itself on the reference patient and on perturbed rows before it is used; anything else
keeps the estimator's own `predict_proba`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from cds_service.models.estimators import (
    KFRE_CENTERS,
    KFRE_COEFFICIENTS,
    MIN_ACR_MG_G,
    KidneyFailureRiskEquation,
    LogColumns,
)


@dataclass(frozen=True)
class CompiledLinear:
    """score = link(intercept + Σ coef_i · (t_i(x_i) − center_i) / scale_i)."""

    log_floor: tuple[float | None, ...]  # per column: floor for ln(max(x, floor)), None = as is
    divisor: tuple[float, ...]           # applied before the log columns (KFRE's age/10, eGFR/5)
    center: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    link: str                            # "logistic" | "kfre"
    baselines: tuple[tuple[int, float], ...] = ()  # KFRE: (horizon years, S0)
    horizon: int | None = None

    def terms(self, row: Sequence[float]) -> list[float]:
        out = []
        for x, floor, div, c, s, b in zip(row, self.log_floor, self.divisor, self.center,
                                          self.scale, self.coef, strict=True):
            t = x / div
            if floor is not None:
                t = math.log(max(t, floor))
            out.append(b * (t - c) / s)
        return out

    def score(self, row: Sequence[float], horizon: int | None = None) -> float:
        eta = self.intercept + math.fsum(self.terms(row))
        if self.link == "logistic":
            return 1.0 / (1.0 + math.exp(-eta)) if eta >= 0 else \
                math.exp(eta) / (1.0 + math.exp(eta))
        s0 = dict(self.baselines)[horizon or self.horizon]
        return 1.0 - s0 ** math.exp(eta)


def compile_estimator(estimator: Any) -> CompiledLinear | None:
    if isinstance(estimator, KidneyFailureRiskEquation):
        baselines = tuple((h, estimator._baseline(h)) for h in (2, 5))
        return CompiledLinear(
            log_floor=(None, None, None, MIN_ACR_MG_G), divisor=(10.0, 1.0, 5.0, 1.0),
            center=KFRE_CENTERS, scale=(1.0,) * 4, coef=KFRE_COEFFICIENTS, intercept=0.0,
            link="kfre", baselines=baselines, horizon=int(estimator.horizon_years))
    if not (isinstance(estimator, Pipeline) and isinstance(estimator[-1], LogisticRegression)):
        return None
    model = estimator[-1]
    if model.coef_.shape[0] != 1 or list(model.classes_) != [0, 1]:
        return None
    width = model.coef_.shape[1]
    floors: list[float | None] = [None] * width
    center, scale = [0.0] * width, [1.0] * width
    seen_scaler = False
    for step in estimator[:-1].named_steps.values():
        if isinstance(step, LogColumns) and not seen_scaler:
            for column in step.columns:
                floors[column] = float(step.floor)
        elif isinstance(step, StandardScaler) and not seen_scaler:
            seen_scaler = True
            if step.with_mean:
                center = [float(v) for v in step.mean_]
            if step.with_std:
                scale = [float(v) for v in step.scale_]
        else:
            return None
    return CompiledLinear(
        log_floor=tuple(floors), divisor=(1.0,) * width, center=tuple(center),
        scale=tuple(scale), coef=tuple(float(v) for v in model.coef_[0]),
        intercept=float(model.intercept_[0]), link="logistic")


def verified(compiled: CompiledLinear | None, estimator: Any,
             rows: np.ndarray) -> CompiledLinear | None:
    """`compiled` if it reproduces the estimator on `rows` (to 1e-9), else None."""
    if compiled is None:
        return None
    expected = estimator.predict_proba(rows)[:, 1]
    got = np.array([compiled.score(row) for row in rows.tolist()])
    return compiled if np.allclose(got, expected, rtol=1e-9, atol=1e-12) else None
