"""Model artifacts: skops only, sha256-checked, trusted types named in code, pickle refused."""

from __future__ import annotations

import gzip
import pickle  # noqa: S403 - writing (never loading) pickles to prove they are refused

import numpy as np
import pytest
import skops.io as sio
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from cds_service.models import artifact
from cds_service.models.errors import ModelError
from cds_service.models.estimators import KidneyFailureRiskEquation, LogColumns


class NotTrusted(BaseEstimator):
    """A type no allow-list names: loading it could mean running its code."""

    def __init__(self, a=1):
        self.a = a


def _pipeline():
    x = np.random.default_rng(0).normal(size=(50, 3))
    y = (x[:, 0] > 0).astype(int)
    return Pipeline([("log", LogColumns(columns=(2,))), ("scale", StandardScaler()),
                     ("model", LogisticRegression())]).fit(np.abs(x), y), np.abs(x)


def test_round_trip_gives_identical_predictions(tmp_path):
    model, x = _pipeline()
    sha = artifact.save(model, tmp_path / "model.skops", ["a", "b", "c"])
    loaded, names = artifact.load(tmp_path / "model.skops", sha)
    assert np.array_equal(loaded.predict_proba(x), model.predict_proba(x))
    assert names == ("a", "b", "c")


def test_our_kfre_estimator_loads_as_a_trusted_type(tmp_path):
    kfre = KidneyFailureRiskEquation(horizon_years=2).fit(np.ones((1, 4)))
    sha = artifact.save(kfre, tmp_path / "kfre.skops", ["age", "male", "egfr", "uacr"])
    loaded, _ = artifact.load(tmp_path / "kfre.skops", sha)
    assert loaded.horizon_years == 2
    assert loaded.risk([[60, 1, 25, 300]]) == pytest.approx(kfre.risk([[60, 1, 25, 300]]))


@pytest.mark.parametrize("name", ["model.pkl", "model.pickle", "model.joblib"])
def test_pickle_files_are_refused_by_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ModelError, match="pickle-based.*skops"):
        artifact.load(path, artifact.sha256_file(path))


@pytest.mark.parametrize("payload", [pickle.dumps([1, 2]), gzip.compress(pickle.dumps([1]))],
                         ids=["pickle", "joblib-gzip"])
def test_pickle_content_disguised_as_skops_is_refused(tmp_path, payload):
    path = tmp_path / "model.skops"
    path.write_bytes(payload)
    with pytest.raises(ModelError, match="pickle/joblib stream"):
        artifact.load(path, artifact.sha256_file(path))


def test_a_zip_that_is_not_skops_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "model.skops"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", b"\x80\x04K\x01.")
    with pytest.raises(ModelError, match="no schema.json"):
        artifact.load(path, artifact.sha256_file(path))


def test_sha256_mismatch_is_refused_before_loading(tmp_path):
    model, _ = _pipeline()
    sha = artifact.save(model, tmp_path / "model.skops", ["a", "b", "c"])
    with open(tmp_path / "model.skops", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelError, match="does not match the manifest"):
        artifact.load(tmp_path / "model.skops", sha)


def test_untrusted_types_are_refused_and_named(tmp_path):
    path = tmp_path / "model.skops"
    sio.dump(NotTrusted(), path)
    with pytest.raises(ModelError, match=r"not trusted: tests\.test_model_artifact\.NotTrusted"):
        artifact.load(path, artifact.sha256_file(path))


def test_a_bare_estimator_without_its_feature_names_is_refused(tmp_path):
    path = tmp_path / "model.skops"
    sio.dump(KidneyFailureRiskEquation().fit(np.ones((1, 4))), path)
    with pytest.raises(ModelError, match="not a cds-model/1 artifact"):
        artifact.load(path, artifact.sha256_file(path))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        artifact.load(tmp_path / "absent.skops", "0" * 64)


def test_save_refuses_other_formats(tmp_path):
    with pytest.raises(ModelError, match=".skops"):
        artifact.save(LogisticRegression(), tmp_path / "model.joblib", [])
