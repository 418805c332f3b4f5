"""Drift of a model's live inputs and scores from its training cohort: the training reference
kept in the manifest (`monitoring_reference`), and the population stability index (PSI).

PSI = Σ_bins (a_i − e_i) · ln(a_i / e_i), with e the reference (training) proportions and a the
live ones over the same fixed bins (Siddiqi N, Credit Risk Scorecards, Wiley 2006, ch. 8;
Yurdakul B, Statistical properties of the population stability index, PhD thesis, Western
Michigan University 2018). The usual reading, a rule of thumb from credit scoring rather than a
statistical test: < 0.1 no material shift, 0.1-0.25 moderate shift (look), > 0.25 significant
shift (act). Yurdakul shows PSI grows with the number of bins and shrinks with sample size, so
the bins are fixed here (never re-cut on live data) and a PSI from few predictions is not
alerted on.

An input's missingness is a two-bin distribution (missing, present), so its PSI is the same
formula on (r, 1 − r).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cds_service.models.errors import ModelError

# The bin edges of the `cds_model_score` histogram (cds_service/ops/metrics.py): fine at the low
# risks where most CKD patients are (KDIGO's thresholds are 3-5 % at 5 years, 10 % and 40 % at 2
# years), so the live histogram and the reference can be read side by side.
SCORE_EDGES: tuple[float, ...] = (0.0, .01, .02, .05, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1.0)
# An empty bin would make ln(a/e) infinite, so proportions are floored first (common practice in
# PSI implementations; the choice is ours). With 1e-4 a reference bin of 5 % that empties live
# adds (0.05 − 0.0001) · ln(0.05 / 0.0001) ≈ 0.31: significant on its own, as it should be.
FLOOR = 1e-4
PSI_MODERATE = 0.10
PSI_SIGNIFICANT = 0.25
FORMAT = 1


def bin_proportions(scores: Sequence[float] | np.ndarray,
                    edges: Sequence[float] = SCORE_EDGES) -> list[float]:
    """Share of `scores` in [e0, e1], (e1, e2], ..., (e_k-1, e_k]: upper bounds inclusive, as a
    Prometheus histogram's `le` buckets."""
    p = np.asarray(scores, dtype=float)
    if p.size == 0:
        return [0.0] * (len(edges) - 1)
    which = np.clip(np.searchsorted(np.asarray(edges), p, side="left") - 1, 0, len(edges) - 2)
    counts = np.bincount(which, minlength=len(edges) - 1)
    return [float(c) / p.size for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = FLOOR) -> float:
    """Population stability index of `actual` against `expected` (proportions over the same
    bins, each summing to 1)."""
    if len(expected) != len(actual) or not expected:
        raise ValueError("psi: expected and actual need the same, non-zero number of bins")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, floor), max(a, floor)
        total += (a - e) * math.log(a / e)
    return total


def missing_psi(expected_rate: float, actual_rate: float, floor: float = FLOOR) -> float:
    return psi([expected_rate, 1 - expected_rate], [actual_rate, 1 - actual_rate], floor)


def band(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value > PSI_SIGNIFICANT:
        return "significant shift"
    return "moderate shift" if value >= PSI_MODERATE else "stable"


@dataclass(frozen=True)
class Reference:
    """A model's training distribution: score proportions over `edges`, each input's missing
    rate, and the number of training patients they came from."""

    n: int
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    missing_rate: Mapping[str, float]

    def to_doc(self) -> dict[str, Any]:
        return {"format": FORMAT, "n": self.n,
                "score_bins": {"edges": list(self.edges),
                               "proportions": [round(p, 6) for p in self.proportions]},
                "missing_rate": {k: round(v, 6) for k, v in self.missing_rate.items()}}


def training_reference(scores: np.ndarray, observed: np.ndarray,
                       feature_names: Sequence[str]) -> dict[str, Any]:
    """The manifest's `monitoring_reference` from the training split: primary-output scores,
    and the observed feature matrix before imputation (NaN = not observed)."""
    observed = np.asarray(observed, dtype=float)
    if observed.ndim != 2 or observed.shape != (len(scores), len(feature_names)):
        raise ModelError("monitoring reference: one row of observed features per score needed")
    rates = {name: float(np.isnan(observed[:, i]).mean()) for i, name in
             enumerate(feature_names)}
    return Reference(len(scores), SCORE_EDGES, tuple(bin_proportions(scores)), rates).to_doc()


def parse_reference(raw: Mapping[str, Any] | None, source: str) -> Reference | None:
    """The manifest's `monitoring_reference`, checked; None when the manifest has none (models
    trained before it existed still load)."""
    if not raw:
        return None
    where = f"{source}: monitoring_reference"
    try:
        bins = raw["score_bins"]
        edges = tuple(float(e) for e in bins["edges"])
        proportions = tuple(float(p) for p in bins["proportions"])
        rates = {str(k): float(v) for k, v in raw["missing_rate"].items()}
        n = int(raw["n"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{where}: expected n, score_bins.edges/proportions and missing_rate "
                         f"({exc.__class__.__name__}: {exc})") from None
    if len(edges) < 2 or list(edges) != sorted(set(edges)) or len(proportions) != len(edges) - 1:
        raise ModelError(f"{where}: score_bins needs increasing edges and one proportion per "
                         "bin")
    if abs(sum(proportions) - 1) > 1e-3 or any(p < 0 for p in proportions):
        raise ModelError(f"{where}: score_bins.proportions must be >= 0 and sum to 1")
    if any(not 0 <= r <= 1 for r in rates.values()) or n < 1:
        raise ModelError(f"{where}: missing rates must be in [0, 1] and n positive")
    return Reference(n, edges, proportions, rates)
