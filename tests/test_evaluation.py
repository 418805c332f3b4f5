"""The evaluation engine (issue 18): each metric against its published definition, worked by
hand on tiny arrays (the arithmetic is in the comments), and the statistical behaviour on
synthetic data drawn from known probabilities."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.special import expit
from sklearn.metrics import average_precision_score, roc_auc_score

from cds_service.config import SHIPPED_MODELS_DIR
from cds_service.models.errors import ModelError
from cds_service.training.evaluation import (
    STATUS_FEW_EVENTS,
    STATUS_OK,
    STATUS_ONE_CLASS,
    NamedThreshold,
    calibration_bins,
    evaluate_models,
    kdigo_thresholds,
)
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

# Six patients: three events. Sorted by p: 0.1(0) 0.35(1) 0.4(0) 0.7(1) 0.8(0) 0.9(1).
Y6 = np.array([0, 0, 1, 0, 1, 1])
P6 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])


def test_auroc_is_the_share_of_event_non_event_pairs_ordered_correctly():
    # Events 0.35, 0.7, 0.9 against non-events 0.1, 0.4, 0.8 (9 pairs):
    # 0.35 beats 0.1 only (1); 0.7 beats 0.1, 0.4 (2); 0.9 beats all three (3) -> 6/9.
    assert auroc(Y6, P6) == pytest.approx(6 / 9, abs=1e-12)
    # A tie counts one half: events 0.2, 0.6 vs non-events 0.2, 0.5:
    # (0.2, 0.2) 1/2, (0.2, 0.5) 0, (0.6, 0.2) 1, (0.6, 0.5) 1 -> 2.5/4.
    assert auroc([0, 1, 0, 1], [0.2, 0.2, 0.5, 0.6]) == pytest.approx(0.625, abs=1e-12)
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))


def test_average_precision_is_the_stepwise_area_under_precision_recall():
    # Descending: 0.9(1) 0.8(0) 0.7(1) 0.4(0) 0.35(1) 0.1(0). Recall rises at ranks 1, 3, 5 by
    # 1/3 each, where precision is 1/1, 2/3, 3/5: AP = (1 + 2/3 + 3/5)/3 = 34/45.
    assert average_precision(Y6, P6) == pytest.approx(34 / 45, abs=1e-12)
    # Ties are one threshold: p = 0.5, 0.5 (y 1, 0), then 0.2 (y 1). At 0.5: precision 1/2,
    # recall 1/2; at 0.2: precision 2/3, recall 1 -> AP = 1/2·1/2 + 1/2·2/3 = 7/12.
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(7 / 12, abs=1e-12)


def test_rank_metrics_agree_with_scikit_learn_on_tied_random_data():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300), 1)  # many ties
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_brier_and_observed_expected_by_hand():
    # Squared errors: 0.1² 0.4² 0.65² 0.8² 0.3² 0.1² = 0.01+0.16+0.4225+0.64+0.09+0.01 = 1.3325
    assert brier(Y6, P6) == pytest.approx(1.3325 / 6, abs=1e-12)
    # O/E = 3 events / (0.1+0.4+0.35+0.8+0.7+0.9 = 3.25) = 12/13
    assert observed_expected(Y6, P6) == pytest.approx(12 / 13, abs=1e-12)


def test_net_benefit_at_a_threshold_by_hand():
    # pt = 0.25 (p >= pt): treated 0.4(0) 0.35(1) 0.8(0) 0.7(1) 0.9(1): TP 3, FP 2, n 6.
    # NB = 3/6 - 2/6 · 0.25/0.75 = 1/2 - 1/9 = 7/18.
    assert net_benefit(Y6, P6 >= 0.25, 0.25) == pytest.approx(7 / 18, abs=1e-12)
    # Treat all: prevalence 1/2 - 1/2 · 1/3 = 1/3.
    assert net_benefit_treat_all(Y6, 0.25) == pytest.approx(1 / 3, abs=1e-12)
    # At 0.4 the rule matters. "> 40%": 0.8(0) 0.7(1) 0.9(1), TP 2 FP 1:
    # 2/6 - 1/6 · 0.4/0.6 = 1/3 - 1/9 = 2/9. "≥ 40%" adds 0.4(0): 2/6 - 2/6 · 2/3 = 1/9.
    above, at_least = NamedThreshold("a", 0.4, above=True), NamedThreshold("b", 0.4)
    assert net_benefit(Y6, above.treated(P6), 0.4) == pytest.approx(2 / 9, abs=1e-12)
    assert net_benefit(Y6, at_least.treated(P6), 0.4) == pytest.approx(1 / 9, abs=1e-12)


def test_named_thresholds_in_the_result_match_the_hand_values():
    result = evaluate_models(Y6, {"m": P6}, thresholds=(NamedThreshold("x", 0.25),),
                             n_bootstrap=50, seed=1)
    m = result.model("m")
    (t,) = m.thresholds
    assert t.net_benefit.value == pytest.approx(7 / 18, abs=1e-12)
    assert t.treat_all == pytest.approx(1 / 3, abs=1e-12)
    assert (t.flagged, t.true_positives) == (5, 3)
    assert m.auroc.value == pytest.approx(6 / 9, abs=1e-12)
    assert m.observed_expected.value == pytest.approx(12 / 13, abs=1e-12)
    # the curve holds treat-all too: at pt = 0.5, treated 0.8(0) 0.7(1) 0.9(1) ->
    # NB = 2/6 - 1/6 · 1 = 1/6; treat all 1/2 - 1/2 = 0.
    at_half = next(d for d in m.decision_curve if d.threshold == 0.5)
    assert at_half.net_benefit == pytest.approx(1 / 6, abs=1e-12)
    assert at_half.treat_all == pytest.approx(0.0, abs=1e-12)


def test_calibration_bins_by_hand():
    # Three equal groups by p: (0.1, 0.35) (0.4, 0.7) (0.8, 0.9), one event each.
    groups = calibration_bins(Y6, P6, 3)
    assert [(g.n, g.events) for g in groups] == [(2, 1)] * 3
    assert [g.mean_predicted for g in groups] == pytest.approx([0.225, 0.55, 0.85])
    assert [g.observed for g in groups] == pytest.approx([0.5, 0.5, 0.5])
    # Fixed edges [0, 0.5) [0.5, 1]: (0.1, 0.4, 0.35) with one event, (0.8, 0.7, 0.9) with two.
    low, high = calibration_bins(Y6, P6, [0.0, 0.5, 1.0])
    assert (low.n, low.events, low.mean_predicted) == (3, 1, pytest.approx(0.85 / 3))
    assert (high.n, high.events, high.mean_predicted) == (3, 2, pytest.approx(0.8))


def test_calibration_intercept_by_hand_for_a_constant_prediction():
    # Every p = 0.5 (logit 0) and 1 event in 4: the offset model logit P = a + 0 is solved by
    # expit(a) = 1/4, a = logit(1/4) = ln(1/3). A constant has no slope.
    slope, intercept = calibration(np.array([1, 0, 0, 0]), np.full(4, 0.5))
    assert intercept == pytest.approx(math.log(1 / 3), abs=1e-9)
    assert math.isnan(slope)


def test_calibration_slope_under_complete_separation_is_not_a_number():
    # Every event has a higher p than every non-event: the likelihood of logit P = a + b·lp
    # keeps increasing as b grows, there is no maximum, and no slope is reported. The
    # intercept alone (slope fixed at 1) still has one.
    slope, intercept = calibration(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert math.isnan(slope)
    assert math.isfinite(intercept)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from known probabilities: y ~ Bernoulli(expit(lp)), lp ~ N(-2, 1)."""
    rng = np.random.default_rng(seed)
    lp = rng.normal(-2.0, 1.0, n)
    return (rng.random(n) < expit(lp)).astype(int), lp


def test_true_probabilities_are_calibrated_and_stretched_logits_are_not():
    y, lp = synthetic(20000, seed=18)
    slope, intercept = calibration(y, expit(lp))
    # The true model: slope 1, intercept 0 up to sampling error (SE about 0.03 at this n).
    assert slope == pytest.approx(1.0, abs=0.1)
    assert intercept == pytest.approx(0.0, abs=0.1)
    assert observed_expected(y, expit(lp)) == pytest.approx(1.0, abs=0.05)
    # Overfitted: logits doubled around their mean, so the fitted slope is about 1/2.
    slope, _ = calibration(y, expit(-2.0 + 2 * (lp + 2.0)))
    assert slope == pytest.approx(0.5, abs=0.1)


def test_bootstrap_intervals_of_the_overfitted_model_exclude_a_slope_of_1():
    y, lp = synthetic(3000, seed=7)
    result = evaluate_models(y, {"true": expit(lp), "overfit": expit(-2 + 2 * (lp + 2))},
                             n_bootstrap=200, seed=3)
    true, overfit = result.model("true"), result.model("overfit")
    assert overfit.calibration_slope.upper < 1.0
    assert true.calibration_slope.lower < 1.0 < true.calibration_slope.upper
    assert true.calibration_intercept.lower < 0.0 < true.calibration_intercept.upper
    for m in (true, overfit):
        for e in (m.auroc, m.auprc, m.brier, m.observed_expected):
            assert e.lower <= e.value <= e.upper
            assert e.resamples == 200
    # a monotone transform keeps the ranking: same AUROC, point and interval
    assert overfit.auroc == true.auroc


def test_identical_models_differ_by_exactly_zero_in_every_resample():
    y, lp = synthetic(800, seed=2)
    p = expit(lp)
    result = evaluate_models(y, {"a": p, "comparator": p.copy()}, comparator="comparator",
                             thresholds=kdigo_thresholds(2), n_bootstrap=100, seed=9)
    (c,) = result.overall.comparisons
    assert (c.model, c.comparator) == ("a", "comparator")
    assert (c.auroc_difference.value, c.auroc_difference.lower,
            c.auroc_difference.upper) == (0.0, 0.0, 0.0)
    for _, e in c.net_benefit_difference:
        assert (e.value, e.lower, e.upper) == (0.0, 0.0, 0.0)


def test_the_comparison_is_paired():
    # p² ranks patients exactly as p does, so the AUROC difference is 0 in every resample only
    # if both are scored on the same resampled patients; unpaired resamples would spread it.
    # Net benefit differs (p² flags fewer), and its interval is not degenerate.
    y, lp = synthetic(800, seed=4)
    p = expit(lp)
    result = evaluate_models(y, {"squared": p ** 2, "p": p}, comparator="p",
                             thresholds=(NamedThreshold("t", 0.1),), n_bootstrap=100, seed=9)
    (c,) = result.overall.comparisons
    assert (c.auroc_difference.lower, c.auroc_difference.upper) == (0.0, 0.0)
    (_, nb), = c.net_benefit_difference
    assert nb.lower < nb.upper


def test_subgroups_report_n_events_and_mark_too_few_events():
    y, lp = synthetic(1200, seed=11)
    p = expit(lp)
    # group "small": the first 30 patients with exactly 3 events; "none": 20 non-events;
    # "rest": everyone else.
    events, non_events = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    small = np.r_[events[:3], non_events[:27]]
    none = non_events[27:47]
    group = np.full(len(y), "rest", dtype=object)
    group[small], group[none] = "small", "none"
    result = evaluate_models(y, {"m": p}, subgroups={"g": group.tolist()}, n_bootstrap=50,
                             seed=1, thresholds=kdigo_thresholds(2))
    by_level = {s.level: s.result for s in result.subgroups}
    assert list(by_level) == ["none", "rest", "small"]  # sorted
    assert (by_level["small"].n, by_level["small"].events) == (30, 3)
    assert by_level["small"].status == STATUS_FEW_EVENTS and by_level["small"].models == ()
    assert (by_level["none"].n, by_level["none"].events) == (20, 0)
    assert by_level["none"].status == STATUS_ONE_CLASS
    rest = by_level["rest"]
    assert rest.status == STATUS_OK
    assert (rest.n, rest.events) == (1200 - 50, int(y.sum()) - 3)
    assert rest.models[0].auroc.value == pytest.approx(auroc(y[group == "rest"],
                                                             p[group == "rest"]))
    data = json.loads(result.to_json())
    small_json = next(s for s in data["subgroups"] if s["level"] == "small")["result"]
    assert small_json["status"] == "too few events" and small_json["models"] == []


def test_missing_subgroup_labels_are_their_own_level():
    result = evaluate_models(Y6, {"m": P6}, subgroups={"sex": ["F", None, "M", "F", None, "M"]},
                             n_bootstrap=10)
    assert [s.level for s in result.subgroups] == ["(missing)", "F", "M"]
    assert all(s.result.status in (STATUS_ONE_CLASS, STATUS_FEW_EVENTS)
               for s in result.subgroups)


def test_one_class_resamples_are_skipped_and_counted():
    # One event in six: a resample misses it with probability (5/6)^6, about 1 in 3.
    y = np.array([1, 0, 0, 0, 0, 0])
    result = evaluate_models(y, {"m": P6}, n_bootstrap=200, seed=5)
    skipped = result.overall.skipped_resamples
    assert 0 < skipped < 200
    assert result.model("m").auroc.resamples == 200 - skipped


def test_same_seed_same_json_and_another_seed_another_interval():
    y, lp = synthetic(500, seed=8)
    scores = {"a": expit(lp), "b": expit(lp * 1.3)}

    def run(seed: int) -> str:
        return evaluate_models(y, scores, comparator="b", thresholds=kdigo_thresholds(5),
                               subgroups={"half": (np.arange(500) % 2).tolist()},
                               n_bootstrap=60, seed=seed).to_json()

    first = run(1)
    assert run(1) == first
    assert run(2) != first
    data = json.loads(first)
    assert data["overall"]["models"][0]["model"] == "a" and data["seed"] == 1
    assert "NaN" not in first


def testpercentile_interval_by_hand():
    # Resampled values 0, 1, ..., 100; a 90% interval is the 5th and 95th percentiles, which
    # with linear interpolation at position q·(n - 1) = 5 and 95 are the values 5 and 95.
    values = np.arange(101, dtype=float)
    assert percentile_interval(values, 0.90) == (pytest.approx(5.0), pytest.approx(95.0), 101)
    # a resample whose statistic is not finite (a calibration fit that did not converge) is
    # left out and not counted
    assert percentile_interval(np.r_[values, np.nan], 0.90)[2] == 101
    assert percentile_interval(np.array([np.nan]), 0.90) == (None, None, 0)


def test_kdigo_thresholds_are_the_ones_the_kfre_cards_use():
    manifest = yaml.safe_load((Path(SHIPPED_MODELS_DIR) / "kfre-4var" / "manifest.yaml")
                              .read_text(encoding="utf-8"))
    cards = manifest["thresholds"]
    two = {(t.value, t.above) for t in kdigo_thresholds(2)}
    five = {(t.value, t.above) for t in kdigo_thresholds(5)}
    assert (cards["warning"]["above"], True) in two and (cards["critical"]["above"], True) in two
    assert (cards["info"]["at_least"], False) in five
    with pytest.raises(ModelError, match="2- and 5-year"):
        kdigo_thresholds(3)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"y": [0, 1, 2], "scores": {"m": [0.1, 0.2, 0.3]}}, "0 or 1"),
    ({"y": [0, 1], "scores": {"m": [0.1, 0.2, 0.3]}}, "same patients"),
    ({"y": [0, 1], "scores": {"m": [0.1, 1.2]}}, "probabilities"),
    ({"y": [0, 0], "scores": {"m": [0.1, 0.2]}}, "both outcomes"),
    ({"y": [0, 1], "scores": {"m": [0.1, 0.2]}, "comparator": "x"}, "comparator"),
    ({"y": [0, 1], "scores": {"m": [0.1, 0.2]}, "subgroups": {"s": ["a"]}}, "subgroup s"),
])
def test_bad_inputs_are_refused_with_a_message(kwargs, fragment):
    y, scores = kwargs.pop("y"), kwargs.pop("scores")
    with pytest.raises(ModelError, match=fragment):
        evaluate_models(y, scores, n_bootstrap=5, **kwargs)
