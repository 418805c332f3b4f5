"""The published measures of a risk model's performance on one sample, one function each:
discrimination (AUROC, AUPRC, Brier), calibration (slope, calibration-in-the-large, observed /
expected), net benefit, and the bootstrap percentile interval. Each cites its definition; the
evaluation engine (`evaluation`) applies them to the whole cohort, its resamples and subgroups.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit
from scipy.stats import rankdata

LOGIT_CLIP = 1e-6  # predictions are clipped to [1e-6, 1 - 1e-6] before the logit



def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(p / (1 - p))


def newton_logistic(design: np.ndarray, y: np.ndarray, offset: np.ndarray, *,
                    max_iter: int = 50, tol: float = 1e-10) -> tuple[np.ndarray, bool]:
    """Unpenalised maximum-likelihood logistic regression, logit P(y=1) = design·beta + offset,
    by Newton-Raphson (a few well-conditioned parameters). Returns (beta, converged): under
    complete separation the likelihood has no maximum and the steps never shrink."""
    beta = np.zeros(design.shape[1])
    for _ in range(max_iter):
        mu = expit(design @ beta + offset)
        weights = mu * (1 - mu)
        hessian = design.T @ (design * weights[:, None])
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(beta)), design.T @ (y - mu))
        beta = beta + step
        if not np.all(np.isfinite(beta)):
            return beta, False
        if np.max(np.abs(step)) < tol:
            return beta, True
    return beta, False


def calibration(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(calibration slope, calibration-in-the-large intercept); NaN where not estimable.

    Slope: b in logit P(y=1) = a + b·logit(p), Cox DR, Biometrika 1958;45:562 ("two further
    applications of a model for binary regression"). Intercept: a in logit P(y=1) = a +
    logit(p), i.e. logit(p) as an offset with the slope fixed at 1 (calibration-in-the-large).
    Slope 1 and intercept 0 are perfect; slope < 1 means predictions too extreme (overfitting),
    intercept < 0 predictions too high on average. Van Calster B et al., J Clin Epidemiol
    2016;74:167 (the calibration hierarchy) and BMC Med 2019;17:230 (calibration: the Achilles
    heel of predictive analytics).
    """
    y = np.asarray(y, dtype=float)
    lp = logit(p)
    ones = np.ones_like(lp)
    if np.ptp(lp) == 0:  # one predicted value: no slope to fit
        slope = math.nan
    else:
        beta, ok = newton_logistic(np.column_stack([ones, lp]), y, np.zeros_like(lp))
        slope = float(beta[1]) if ok else math.nan
    beta, ok = newton_logistic(ones[:, None], y, lp)
    intercept = float(beta[0]) if ok else math.nan
    return slope, intercept


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic: the probability that a random
    event has a higher prediction than a random non-event, ties counting 1/2 (Bamber D, J Math
    Psychol 1975;12:387; Hanley JA, McNeil BJ, Radiology 1982;143:29). With midranks r of p:
    (sum of r over events - n1(n1+1)/2) / (n1·n0)."""
    y = np.asarray(y)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = rankdata(p)  # midranks for ties
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """AUPRC as average precision, AP = sum over distinct thresholds t (descending) of
    (R_t - R_prev)·P_t, precision P_t and recall R_t of "p >= t": the step-wise area, without
    the linear interpolation that overstates it (Davis J, Goadrich M, ICML 2006; the definition
    of scikit-learn's average_precision_score)."""
    y = np.asarray(y, dtype=float)
    n1 = y.sum()
    if n1 == 0:
        return math.nan
    order = np.argsort(-np.asarray(p, dtype=float), kind="mergesort")
    p_sorted, y_sorted = np.asarray(p, dtype=float)[order], y[order]
    # the last index of each run of equal predictions: one threshold per distinct value
    last = np.r_[np.nonzero(np.diff(p_sorted))[0], len(p_sorted) - 1]
    tp = np.cumsum(y_sorted)[last]
    flagged = last + 1.0
    precision, recall = tp / flagged, tp / n1
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between prediction and outcome (Brier GW, Mon Weather Rev
    1950;78:1); 0 is perfect, prevalence·(1 - prevalence) is what a constant prevalence earns."""
    return float(np.mean((np.asarray(p, dtype=float) - np.asarray(y, dtype=float)) ** 2))


def observed_expected(y: np.ndarray, p: np.ndarray) -> float:
    """O/E ratio, sum(y) / sum(p): observed events over the events the model expects (Debray
    TPA et al., BMJ 2017;356:i6460). 1 is perfect; > 1 the model under-predicts."""
    expected = float(np.sum(p))
    return float(np.sum(y)) / expected if expected > 0 else math.nan


def net_benefit(y: np.ndarray, treated: np.ndarray, threshold: float) -> float:
    """NB = TP/n - FP/n · pt/(1 - pt) (Vickers AJ, Elkin EB, Med Decis Making 2006;26:565): the
    true positives gained, less the false positives weighted by the odds at the threshold
    probability pt at which a patient is indifferent between treatment and none."""
    y = np.asarray(y)
    n = len(y)
    tp = int(np.sum(treated & (y == 1)))
    fp = int(np.sum(treated & (y == 0)))
    return tp / n - fp / n * threshold / (1 - threshold)


def net_benefit_treat_all(y: np.ndarray, threshold: float) -> float:
    """Net benefit of treating everyone (Vickers & Elkin 2006): prevalence - (1 - prevalence) ·
    pt/(1 - pt). Treating no one has net benefit 0 at every threshold."""
    prevalence = float(np.mean(y))
    return prevalence - (1 - prevalence) * threshold / (1 - threshold)


def percentile_interval(values: np.ndarray, confidence: float
                         ) -> tuple[float | None, float | None, int]:
    """Bootstrap percentile interval: the (1-c)/2 and (1+c)/2 quantiles of the resampled
    statistic (Efron B, Tibshirani RJ, An Introduction to the Bootstrap, 1993, ch. 13)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None, 0
    alpha = (1 - confidence) / 2
    lower, upper = np.quantile(finite, [alpha, 1 - alpha])
    return float(lower), float(upper), int(finite.size)
