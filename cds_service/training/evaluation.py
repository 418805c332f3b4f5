"""The evaluation engine: how well one or more risk models predict a binary outcome at a fixed
horizon, on the same patients, with bootstrap confidence intervals.

Pure numpy (scipy's `expit` and `rankdata`, scikit-learn's `roc_curve` for the plotted curve): no
plotting here (`validation_report` draws and writes), no files, no network. Every number is a
function of the inputs and the seed, and `EvaluationResult.to_json()` is byte-identical for the
same inputs.

What is measured, each with its published definition at the line that computes it:

- discrimination: AUROC, AUPRC (average precision), Brier score;
- calibration: slope and calibration-in-the-large intercept (Cox 1958; Van Calster 2016/2019),
  the observed/expected ratio, and grouped observed-vs-predicted points for the plot;
- clinical usefulness: net benefit (Vickers & Elkin 2006) over a threshold grid and at named
  thresholds (the KDIGO 2024 ones for the model's horizon), with treat-all and treat-none;
- a paired comparison of each model with a comparator: the difference in AUROC and in net
  benefit, resampling the same patients for both (paired bootstrap);
- the same per subgroup level, with a marker instead of a number where there are too few events.

Intervals are bootstrap percentile intervals (Efron & Tibshirani 1993, ch. 13): patients are
resampled with replacement; a resample holding only one outcome class is skipped and counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from cds_service.models.errors import ModelError
from cds_service.training.measures import (
    auroc,
    average_precision,
    brier,
    calibration,
    net_benefit,
    net_benefit_treat_all,
    observed_expected,
    percentile_interval,
)

DEFAULT_BOOTSTRAP = 1000
DEFAULT_MIN_EVENTS = 10
# Decision-curve thresholds: 1 % to 50 % by 1 %. Kidney-failure risks that matter clinically are
# well below 50 % (KDIGO's highest is 40 %); above it the curves carry no decision.
DEFAULT_GRID: tuple[float, ...] = tuple(round(k / 100, 2) for k in range(1, 51))

STATUS_OK = "ok"
STATUS_ONE_CLASS = "one class"
STATUS_FEW_EVENTS = "too few events"
STATUS_FEW_NON_EVENTS = "too few non-events"


# ---------------------------------------------------------------------------------------------
# Named thresholds


@dataclass(frozen=True)
class NamedThreshold:
    """A decision threshold with its source. A patient is "treated" (flagged) when p >= value,
    or p > value when `above` (a bound published as "> x", as the cards read it)."""

    name: str
    value: float
    above: bool = False
    source: str = ""

    def treated(self, p: np.ndarray) -> np.ndarray:
        return p > self.value if self.above else p >= self.value


_KDIGO = "KDIGO 2024 CKD guideline, Kidney Int 2024;105(4S):S117-S314"
KDIGO_2024: Mapping[int, tuple[NamedThreshold, ...]] = {
    # Practice point 2.2.1: a 5-year kidney failure risk of 3-5 % to decide on nephrology
    # referral. The card's info threshold is the bottom of the range (docs/clinical.md); the top
    # is evaluated too, since a site may choose it.
    5: (NamedThreshold("PP 2.2.1 (3%)", 0.03, False,
                       f"{_KDIGO}, practice point 2.2.1: 5-year risk 3-5% -> nephrology referral"),
        NamedThreshold("PP 2.2.1 (5%)", 0.05, False,
                       f"{_KDIGO}, practice point 2.2.1: top of the 3-5% range")),
    # Practice points 2.2.2 and 2.2.3, both published as "> x" (exactly 10 % / 40 % do not reach
    # them, as on the cards).
    2: (NamedThreshold("PP 2.2.2 (>10%)", 0.10, True,
                       f"{_KDIGO}, practice point 2.2.2: 2-year risk > 10% -> multidisciplinary "
                       "care"),
        NamedThreshold("PP 2.2.3 (>40%)", 0.40, True,
                       f"{_KDIGO}, practice point 2.2.3: 2-year risk > 40% -> kidney replacement "
                       "therapy planning")),
}


def kdigo_thresholds(horizon_years: int) -> tuple[NamedThreshold, ...]:
    """The KDIGO 2024 thresholds published for a risk at this horizon (2 or 5 years)."""
    try:
        return KDIGO_2024[int(horizon_years)]
    except KeyError:
        raise ModelError(f"KDIGO 2024 publishes risk thresholds for 2- and 5-year risks, not "
                         f"{horizon_years}-year") from None


def _point(y: np.ndarray, p: np.ndarray, thresholds: Sequence[NamedThreshold]
           ) -> dict[str, float]:
    """The bootstrapped metrics of one model on one (re)sample, by name."""
    slope, intercept = calibration(y, p)
    out = {"auroc": auroc(y, p), "auprc": average_precision(y, p), "brier": brier(y, p),
           "calibration_slope": slope, "calibration_intercept": intercept,
           "observed_expected": observed_expected(y, p)}
    for t in thresholds:
        out[f"nb:{t.name}"] = net_benefit(y, t.treated(p), t.value)
    return out


# ---------------------------------------------------------------------------------------------
# Result structure


@dataclass(frozen=True)
class Estimate:
    """A point estimate on all patients and its bootstrap percentile interval. `resamples` is
    how many resamples gave a finite value (one-class resamples are skipped before; a
    calibration fit that does not converge, e.g. under separation, gives none)."""

    value: float | None
    lower: float | None
    upper: float | None
    resamples: int


@dataclass(frozen=True)
class CalibrationBin:
    """One group of patients by predicted risk: its range of predictions, size, events, mean
    prediction and observed event rate."""

    p_min: float
    p_max: float
    n: int
    events: int
    mean_predicted: float
    observed: float


@dataclass(frozen=True)
class DecisionPoint:
    """Net benefit at one threshold, for the model and for treating everyone (treat-none is
    0). `name` is set for a named threshold; `flagged` is how many patients the model treats."""

    threshold: float
    net_benefit: float
    treat_all: float
    flagged: int
    true_positives: int
    name: str | None = None


@dataclass(frozen=True)
class ThresholdEstimate:
    """Net benefit at a named threshold with its bootstrap interval."""

    name: str
    threshold: float
    above: bool
    net_benefit: Estimate
    treat_all: float
    flagged: int
    true_positives: int


@dataclass(frozen=True)
class ModelMetrics:
    """One model on one population. The curves (`roc`, `calibration_bins`, `decision_curve`)
    are filled for the whole cohort and left empty for subgroups."""

    model: str
    mean_predicted: float
    auroc: Estimate
    auprc: Estimate
    brier: Estimate
    calibration_slope: Estimate
    calibration_intercept: Estimate
    observed_expected: Estimate
    thresholds: tuple[ThresholdEstimate, ...]
    roc: tuple[tuple[float, float], ...] = ()  # (1 - specificity, sensitivity)
    calibration_bins: tuple[CalibrationBin, ...] = ()
    decision_curve: tuple[DecisionPoint, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """model minus comparator on the same patients; intervals from the paired bootstrap (each
    resample scores both models on the same resampled patients)."""

    model: str
    comparator: str
    auroc_difference: Estimate
    net_benefit_difference: tuple[tuple[str, Estimate], ...]  # (threshold name, difference)


@dataclass(frozen=True)
class Population:
    """Metrics of every model (and comparisons) on one set of patients. `status` is "ok" or why
    no number is given ("one class", "too few events", "too few non-events"); then `models` and
    `comparisons` are empty."""

    n: int
    events: int
    status: str
    skipped_resamples: int = 0
    models: tuple[ModelMetrics, ...] = ()
    comparisons: tuple[Comparison, ...] = ()

    @property
    def prevalence(self) -> float:
        return self.events / self.n if self.n else math.nan


@dataclass(frozen=True)
class Subgroup:
    variable: str
    level: str
    result: Population


@dataclass(frozen=True)
class EvaluationResult:
    horizon_years: float | None
    models: tuple[str, ...]
    comparator: str | None
    thresholds: tuple[NamedThreshold, ...]
    n_bootstrap: int
    seed: int
    confidence: float
    min_events: int
    overall: Population
    subgroups: tuple[Subgroup, ...] = field(default=())

    def model(self, name: str) -> ModelMetrics:
        for m in self.overall.models:
            if m.model == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["overall"]["prevalence"] = self.overall.prevalence
        for sub, raw in zip(self.subgroups, data["subgroups"], strict=True):
            raw["result"]["prevalence"] = sub.result.prevalence
        return _clean(data)

    def to_json(self) -> str:
        """Sorted keys, floats to 6 decimals, NaN as null: the same result gives the same bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float | np.floating):
        return round(float(value), 6) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Bootstrap


def _estimate(value: float, resampled: np.ndarray, confidence: float) -> Estimate:
    lower, upper, count = percentile_interval(resampled, confidence)
    return Estimate(value if math.isfinite(value) else None, lower, upper, count)


def _bootstrap(y: np.ndarray, scores: Mapping[str, np.ndarray],
               thresholds: Sequence[NamedThreshold], n_bootstrap: int,
               rng: np.random.Generator) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """Resample patients with replacement `n_bootstrap` times (Efron B, Ann Stat 1979;7:1);
    every model is scored on the same indices, so differences between models are paired.
    Returns model -> metric -> values over the kept resamples, and how many were skipped
    (one outcome class only)."""
    n = len(y)
    kept: dict[str, dict[str, list[float]]] = {name: {} for name in scores}
    skipped = 0
    for _ in range(n_bootstrap):
        index = rng.integers(0, n, size=n)
        yb = y[index]
        events = int(yb.sum())
        if events == 0 or events == n:
            skipped += 1
            continue
        for name, p in scores.items():
            for metric, value in _point(yb, p[index], thresholds).items():
                kept[name].setdefault(metric, []).append(value)
    return ({name: {k: np.asarray(v, dtype=float) for k, v in metrics.items()}
             for name, metrics in kept.items()}, skipped)


# ---------------------------------------------------------------------------------------------
# Curves


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int | Sequence[float] = 10
                     ) -> tuple[CalibrationBin, ...]:
    """Grouped observed vs predicted risk for the calibration plot: `bins` groups of (nearly)
    equal size by predicted risk (deciles for 10, as in Hosmer DW, Lemeshow S, Commun Stat
    1980;A9:1043), or fixed edges [e0, e1), ..., [e_k-1, e_k] when a sequence. Empty groups are
    left out."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    if isinstance(bins, int):
        order = np.argsort(p, kind="mergesort")
        groups = [g for g in np.array_split(order, bins) if g.size]
    else:
        edges = np.asarray(bins, dtype=float)
        which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
        groups = [np.nonzero(which == k)[0] for k in range(len(edges) - 1)]
        groups = [g for g in groups if g.size]
    return tuple(CalibrationBin(float(p[g].min()), float(p[g].max()), int(g.size),
                                int(y[g].sum()), float(p[g].mean()), float(y[g].mean()))
                 for g in groups)


def decision_curve(y: np.ndarray, p: np.ndarray, grid: Sequence[float] = DEFAULT_GRID
                   ) -> tuple[DecisionPoint, ...]:
    """Net benefit of the model (treat when p >= pt) and of treat-all over a grid of pt."""
    points = []
    for pt in grid:
        treated = p >= pt
        points.append(DecisionPoint(float(pt), net_benefit(y, treated, pt),
                                    net_benefit_treat_all(y, pt), int(treated.sum()),
                                    int(np.sum(treated & (y == 1)))))
    return tuple(points)


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[tuple[float, float], ...]:
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=True)
    return tuple((float(a), float(b)) for a, b in zip(fpr, tpr, strict=True))


# ---------------------------------------------------------------------------------------------
# Evaluation


def _population(y: np.ndarray, scores: Mapping[str, np.ndarray],
                thresholds: Sequence[NamedThreshold], comparator: str | None, *,
                n_bootstrap: int, rng: np.random.Generator, confidence: float,
                min_events: int, curves: bool, bins: int | Sequence[float],
                grid: Sequence[float]) -> Population:
    n, events = len(y), int(y.sum())
    if events == 0 or events == n:
        return Population(n, events, STATUS_ONE_CLASS)
    if events < min_events:
        return Population(n, events, STATUS_FEW_EVENTS)
    if n - events < min_events:
        return Population(n, events, STATUS_FEW_NON_EVENTS)
    resampled, skipped = _bootstrap(y, scores, thresholds, n_bootstrap, rng)
    points = {name: _point(y, p, thresholds) for name, p in scores.items()}
    empty = np.asarray([], dtype=float)

    def est(name: str, metric: str) -> Estimate:
        return _estimate(points[name][metric], resampled[name].get(metric, empty), confidence)

    models = []
    for name, p in scores.items():
        named = []
        for t in thresholds:
            treated = t.treated(p)
            named.append(ThresholdEstimate(t.name, t.value, t.above, est(name, f"nb:{t.name}"),
                                           net_benefit_treat_all(y, t.value),
                                           int(treated.sum()), int(np.sum(treated & (y == 1)))))
        models.append(ModelMetrics(
            name, float(p.mean()), est(name, "auroc"), est(name, "auprc"), est(name, "brier"),
            est(name, "calibration_slope"), est(name, "calibration_intercept"),
            est(name, "observed_expected"), tuple(named),
            roc_points(y, p) if curves else (),
            calibration_bins(y, p, bins) if curves else (),
            decision_curve(y, p, grid) if curves else ()))

    comparisons = []
    if comparator is not None:
        for name in scores:
            if name == comparator:
                continue

            def diff(metric: str, name: str = name) -> Estimate:
                value = points[name][metric] - points[comparator][metric]
                a = resampled[name].get(metric, empty)
                b = resampled[comparator].get(metric, empty)
                return _estimate(value, a - b, confidence)

            comparisons.append(Comparison(name, comparator, diff("auroc"),
                                          tuple((t.name, diff(f"nb:{t.name}"))
                                                for t in thresholds)))
    return Population(n, events, STATUS_OK, skipped, tuple(models), tuple(comparisons))


def _level(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "(missing)"
    return str(value)


def evaluate_models(y: Sequence[int] | np.ndarray,
                    scores: Mapping[str, Sequence[float] | np.ndarray], *,
                    thresholds: Sequence[NamedThreshold] = (),
                    horizon_years: float | None = None,
                    comparator: str | None = None,
                    subgroups: Mapping[str, Sequence[Any]] | None = None,
                    n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                    confidence: float = 0.95, min_events: int = DEFAULT_MIN_EVENTS,
                    bins: int | Sequence[float] = 10,
                    grid: Sequence[float] = DEFAULT_GRID) -> EvaluationResult:
    """Evaluate named score vectors against outcomes `y` (0/1 at the horizon) on the same
    patients, in the order given.

    `thresholds`: named decision thresholds for net benefit (e.g. `kdigo_thresholds(2)`).
    `comparator`: the name of the reference model (e.g. "kfre-4var"); every other model is
    compared with it. `subgroups`: variable -> one label per patient (None/NaN is
    "(missing)"); each level is evaluated as its own population, or marked when it has fewer
    than `min_events` events or non-events. Deterministic given `seed`.
    """
    y_arr = np.asarray(y)
    if y_arr.ndim != 1 or y_arr.size == 0:
        raise ModelError("outcomes must be a non-empty 1-d array")
    if not np.isin(y_arr, (0, 1)).all():
        raise ModelError("outcomes must be 0 or 1")
    y_arr = y_arr.astype(int)
    if not scores:
        raise ModelError("no model scores to evaluate")
    arrays: dict[str, np.ndarray] = {}
    for name, values in scores.items():
        p = np.asarray(values, dtype=float)
        if p.shape != y_arr.shape:
            raise ModelError(f"{name}: {p.size} scores for {y_arr.size} outcomes; every model "
                             "must be scored on the same patients")
        if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
            raise ModelError(f"{name}: scores must be probabilities in [0, 1] (no missing)")
        arrays[name] = p
    if comparator is not None and comparator not in arrays:
        raise ModelError(f"comparator {comparator!r} is not among the models {list(arrays)}")
    names = [t.name for t in thresholds]
    if len(set(names)) != len(names):
        raise ModelError(f"threshold names must be unique: {names}")
    for t in thresholds:
        if not 0 < t.value < 1:
            raise ModelError(f"threshold {t.name}: {t.value} is not strictly between 0 and 1")
    if not 0 < confidence < 1 or n_bootstrap < 0:
        raise ModelError("confidence must be in (0, 1) and n_bootstrap >= 0")
    for variable, labels in (subgroups or {}).items():
        if len(labels) != y_arr.size:
            raise ModelError(f"subgroup {variable}: {len(labels)} labels for {y_arr.size} "
                             "patients")

    common = dict(n_bootstrap=n_bootstrap, confidence=confidence, min_events=min_events,
                  bins=bins, grid=grid)
    # The whole cohort is reported whatever its size (min_events 1); only subgroups are marked.
    overall = _population(y_arr, arrays, thresholds, comparator,
                          rng=np.random.default_rng([seed, 0]), curves=True,
                          **{**common, "min_events": 1})
    if overall.status == STATUS_ONE_CLASS:
        raise ModelError("evaluation needs both outcomes in the labelled set")

    subgroup_results = []
    stream = 1  # one independent random stream per subgroup level, in a fixed order
    for variable, labels in (subgroups or {}).items():
        levels = np.asarray([_level(v) for v in labels], dtype=object)
        for level in sorted(set(levels.tolist())):
            mask = levels == level
            result = _population(y_arr[mask], {k: v[mask] for k, v in arrays.items()},
                                 thresholds, comparator,
                                 rng=np.random.default_rng([seed, stream]), curves=False,
                                 **common)
            subgroup_results.append(Subgroup(variable, level, result))
            stream += 1
    return EvaluationResult(horizon_years, tuple(arrays), comparator, tuple(thresholds),
                            n_bootstrap, seed, confidence, min_events, overall,
                            tuple(subgroup_results))
