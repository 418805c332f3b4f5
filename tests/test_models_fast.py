"""The compiled one-row path gives the estimator's own answers (scores, horizons, terms)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from cds_service.config import SHIPPED_MODELS_DIR
from cds_service.features import extract, group_by_patient
from cds_service.models.estimators import LogColumns
from cds_service.models.fast import compile_estimator, verified
from cds_service.models.loaded import load_model
from cds_service.training.cohort import generate_cohort
from cds_service.training.training import as_of


@pytest.fixture(scope="module")
def patients():
    cohort = generate_cohort(n_patients=120, seed=11)
    grouped = group_by_patient(r for rs in cohort.resources.values() for r in rs)
    return [(resources, as_of(cohort.index_date)) for resources in grouped.values()]


@pytest.mark.parametrize("model_id", ["kfre-4var", "ckd-progression-lr"])
def test_compiled_path_matches_the_estimator_on_a_cohort(model_id, patients):
    model = load_model(SHIPPED_MODELS_DIR / model_id)
    assert model.fast is not None
    slow = copy.copy(model)
    slow.fast = None
    compared = 0
    for resources, now in patients:
        vector = extract(model.manifest.features, resources, now=now)
        fast, reference = model.predict_vector(vector), slow.predict_vector(vector)
        assert (fast.score is None) == (reference.score is None)
        if fast.score is None:
            continue
        compared += 1
        assert fast.score == pytest.approx(reference.score, rel=1e-9, abs=1e-12)
        assert fast.secondary.keys() == reference.secondary.keys()
        for name in fast.secondary:
            assert fast.secondary[name] == pytest.approx(reference.secondary[name], rel=1e-9)
        assert [c.name for c in fast.contributions] == [c.name for c in reference.contributions]
        assert [c.contribution for c in fast.contributions] == pytest.approx(
            [c.contribution for c in reference.contributions], rel=1e-9, abs=1e-12)
    assert compared > 100


def test_unsupported_estimators_keep_the_scikit_learn_path():
    x = np.random.default_rng(0).uniform(1, 5, size=(60, 3))
    y = (x[:, 0] > 3).astype(int)
    assert compile_estimator(HistGradientBoostingClassifier(max_iter=3).fit(x, y)) is None
    minmax = Pipeline([("s", MinMaxScaler()), ("m", LogisticRegression())]).fit(x, y)
    assert compile_estimator(minmax) is None


def test_a_compiled_form_that_disagrees_is_not_used():
    x = np.random.default_rng(1).uniform(1, 5, size=(60, 3))
    y = (x[:, 1] > 3).astype(int)
    pipe = Pipeline([("log", LogColumns(columns=(2,))), ("s", StandardScaler()),
                     ("m", LogisticRegression())]).fit(x, y)
    compiled = compile_estimator(pipe)
    assert verified(compiled, pipe, x[:5]) is compiled
    wrong = dataclasses.replace(compiled, intercept=compiled.intercept + 1e-3)
    assert verified(wrong, pipe, x[:5]) is None
