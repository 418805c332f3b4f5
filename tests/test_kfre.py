"""The 4-variable KFRE estimator against the published equation (Tangri 2011; 2016)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cds_service.models.estimators import KidneyFailureRiskEquation, LogColumns


def published(age, male, egfr, acr, s0):
    """The equation exactly as printed (Tangri et al., JAMA 2016;315:164, eTable), by hand."""
    lp = (-0.2201 * (age / 10 - 7.036) + 0.2467 * (male - 0.5642)
          - 0.5567 * (egfr / 5 - 7.222) + 0.4510 * (math.log(acr) - 5.137))
    return 1 - s0 ** math.exp(lp)


@pytest.fixture(scope="module")
def kfre():
    return KidneyFailureRiskEquation().fit(np.ones((1, 4)))


def test_at_the_published_centroid_risk_is_one_minus_baseline_survival(kfre):
    # The covariates are centred on the development cohort's means, so a patient at the means
    # has the baseline risk: 2.5 % at 2 years and 7.6 % at 5 years (North America).
    centroid = [[70.36, 0.5642, 36.11, math.exp(5.137)]]
    assert kfre.risk(centroid, 2)[0] == pytest.approx(1 - 0.9750, abs=1e-12)
    assert kfre.risk(centroid, 5)[0] == pytest.approx(1 - 0.9240, abs=1e-12)
    other = KidneyFailureRiskEquation(region="other").fit(np.ones((1, 4)))
    assert other.risk(centroid, 2)[0] == pytest.approx(1 - 0.9832, abs=1e-12)
    assert other.risk(centroid, 5)[0] == pytest.approx(1 - 0.9365, abs=1e-12)


@pytest.mark.parametrize(
    ("age", "male", "egfr", "acr", "risk_2y", "risk_5y"),
    [
        # Worked through by hand from the printed equation (4 significant figures):
        # 60 y man, eGFR 25, ACR 300 mg/g: LP = 0.2280 + 0.1075 + 1.2370 + 0.2556 = 1.8281;
        # 2 y: 1 - 0.9750^e^1.8281 = 1 - 0.9750^6.222 = 0.1458; 5 y: 1 - 0.9240^6.222 = 0.3885
        (60, 1, 25, 300, 0.1458, 0.3885),
        # 75 y woman, eGFR 45, ACR 30 mg/g: LP = -0.1021 - 0.1392 - 0.9898 - 0.7828 = -2.0140
        (75, 0, 45, 30, 0.0034, 0.0105),
        # 50 y man, eGFR 15, ACR 1500 mg/g: LP = 0.4481 + 0.1075 + 2.3504 + 0.9815 = 3.8875
        (50, 1, 15, 1500, 0.7092, 0.9789),
    ],
    ids=["60M-egfr25-acr300", "75F-egfr45-acr30", "50M-egfr15-acr1500"],
)
def test_worked_examples(kfre, age, male, egfr, acr, risk_2y, risk_5y):
    x = [[age, male, egfr, acr]]
    assert kfre.risk(x, 2)[0] == pytest.approx(published(age, male, egfr, acr, 0.9750))
    assert kfre.risk(x, 5)[0] == pytest.approx(published(age, male, egfr, acr, 0.9240))
    assert kfre.risk(x, 2)[0] == pytest.approx(risk_2y, abs=5e-4)
    assert kfre.risk(x, 5)[0] == pytest.approx(risk_5y, abs=5e-4)
    assert kfre.predict_proba(x)[0, 1] == kfre.risk(x, 5)[0]


def test_direction_of_each_input(kfre):
    base = np.array([[65, 0, 30, 100]], dtype=float)
    risk = kfre.risk(base)[0]
    for column, delta, rises in ((0, 10, False), (1, 1, True), (2, -10, True), (3, 900, True)):
        changed = base.copy()
        changed[0, column] += delta
        assert bool(kfre.risk(changed)[0] > risk) == rises


def test_terms_sum_to_the_linear_predictor(kfre):
    x = np.array([[60, 1, 25, 300]], dtype=float)
    terms = kfre.terms(x)[0]
    assert terms.sum() == pytest.approx(math.log(math.log(1 - 0.3885) / math.log(0.9240)),
                                        abs=2e-3)
    assert terms[2] > 0  # eGFR 25 is below the centroid's 36: raises risk


def test_undetectable_acr_is_floored_not_a_crash(kfre):
    assert np.isfinite(kfre.risk([[60, 1, 25, 0.0]])).all()


@pytest.mark.parametrize("params", [{"horizon_years": 3}, {"region": "mars"}])
def test_unpublished_horizon_or_region_is_refused(params):
    with pytest.raises(ValueError, match="published"):
        KidneyFailureRiskEquation(**params).fit(np.ones((1, 4)))


def test_wrong_width_is_refused(kfre):
    with pytest.raises(ValueError, match="4 columns"):
        kfre.risk([[60, 1, 25]])


def test_log_columns_transforms_only_named_columns():
    t = LogColumns(columns=(1,), floor=0.5).fit(np.ones((1, 3)))
    out = t.transform([[2.0, math.e, 3.0], [2.0, 0.0, np.nan]])
    assert out[0].tolist() == [2.0, pytest.approx(1.0), 3.0]
    assert out[1, 1] == pytest.approx(math.log(0.5))
    assert np.isnan(out[1, 2])
