"""scikit-learn compatible estimators we ship, and the one transformer our trained pipelines use.

They are plain `BaseEstimator` subclasses so skops can persist them; `cds_service.models.artifact`
lists them as trusted types by name. Changing a class's attributes changes the artifact format:
bump the model version and re-export.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted

# Kidney Failure Risk Equation, 4 variables (age, sex, eGFR, urine ACR).
# Tangri N, Stevens LA, Griffith J, et al. A predictive model for progression of chronic kidney
# disease to kidney failure. JAMA. 2011;305(15):1553-1559. doi:10.1001/jama.2011.451
# Tangri N, Grams ME, Levey AS, et al. Multinational assessment of accuracy of equations for
# predicting risk of kidney failure: a meta-analysis. JAMA. 2016;315(2):164-174.
# doi:10.1001/jama.2015.18202 (recalibrated baseline survival, North America vs elsewhere).
#
#   risk(t) = 1 - S0(t) ** exp(-0.2201 (age/10 - 7.036) + 0.2467 (male - 0.5642)
#                              - 0.5567 (eGFR/5 - 7.222) + 0.4510 (ln ACR[mg/g] - 5.137))
KFRE_FEATURES = ("age", "male", "egfr", "uacr")
KFRE_COEFFICIENTS = (-0.2201, 0.2467, -0.5567, 0.4510)  # per age/10, male, eGFR/5, ln ACR
KFRE_CENTERS = (7.036, 0.5642, 7.222, 5.137)
KFRE_BASELINE_SURVIVAL = {
    ("north_america", 2): 0.9750,
    ("north_america", 5): 0.9240,
    ("other", 2): 0.9832,
    ("other", 5): 0.9365,
}
# ln(0) is undefined; labs report an undetectable albumin as "<3 mg/g" or similar, and the
# feature engine keeps the bound. Anything below this floor is treated as the floor.
MIN_ACR_MG_G = 0.1


class KidneyFailureRiskEquation(ClassifierMixin, BaseEstimator):
    """The published 4-variable KFRE as an estimator: columns age, male (0/1), eGFR, UACR mg/g.

    `predict_proba(X)[:, 1]` is the risk of kidney failure (dialysis or transplant) within
    `horizon_years` (2 or 5). Nothing is learned: `fit` only checks the input shape, so the
    estimator can go through the same train/evaluate/export path as a fitted model.
    """

    def __init__(self, horizon_years: int = 5, region: str = "north_america"):
        self.horizon_years = horizon_years
        self.region = region

    def fit(self, X, y=None):  # noqa: N803 - scikit-learn's argument names
        X = self._check(X, reset=True)
        self._baseline(self.horizon_years)
        self.classes_ = np.array([0, 1])
        return self

    def _check(self, X, *, reset: bool = False):  # noqa: N803
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != len(KFRE_FEATURES):
            raise ValueError(f"KFRE takes {len(KFRE_FEATURES)} columns {KFRE_FEATURES}, "
                             f"got {X.shape[1]}")
        if reset:
            self.n_features_in_ = X.shape[1]
        return X

    def _baseline(self, horizon_years: int) -> float:
        try:
            return KFRE_BASELINE_SURVIVAL[(self.region, int(horizon_years))]
        except KeyError:
            raise ValueError(f"KFRE is published for horizons 2 and 5 years and regions "
                             f"north_america/other, not ({self.region!r}, {horizon_years!r})"
                             ) from None

    def terms(self, X) -> np.ndarray:  # noqa: N803
        """Each variable's term of the linear predictor (log hazard ratio vs the centroid)."""
        check_is_fitted(self, "classes_")
        X = self._check(X)
        scaled = np.column_stack([X[:, 0] / 10.0, X[:, 1], X[:, 2] / 5.0,
                                  np.log(np.maximum(X[:, 3], MIN_ACR_MG_G))])
        return (scaled - np.asarray(KFRE_CENTERS)) * np.asarray(KFRE_COEFFICIENTS)

    def risk(self, X, horizon_years: int | None = None) -> np.ndarray:  # noqa: N803
        s0 = self._baseline(self.horizon_years if horizon_years is None else horizon_years)
        return 1.0 - s0 ** np.exp(self.terms(X).sum(axis=1))

    def predict_proba(self, X) -> np.ndarray:  # noqa: N803
        risk = self.risk(X)
        return np.column_stack([1.0 - risk, risk])

    def predict(self, X) -> np.ndarray:  # noqa: N803
        return (self.risk(X) >= 0.5).astype(int)


class LogColumns(TransformerMixin, BaseEstimator):
    """Natural log of the given columns (floored at `floor`); other columns pass through.

    Used for right-skewed labs such as urine ACR, whose effect is log-linear in the literature.
    """

    def __init__(self, columns: tuple[int, ...] = (), floor: float = 0.1):
        self.columns = columns
        self.floor = floor

    def fit(self, X, y=None):  # noqa: N803
        X = check_array(X, dtype=np.float64, ensure_all_finite="allow-nan")
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):  # noqa: N803
        check_is_fitted(self, "n_features_in_")
        X = check_array(X, dtype=np.float64, ensure_all_finite="allow-nan", copy=True)
        for column in self.columns:
            X[:, column] = np.log(np.maximum(X[:, column], self.floor))
        return X
