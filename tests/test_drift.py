"""PSI and the training reference (cds_service/models/drift.py): expected values by hand."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cds_service.models.drift import (
    SCORE_EDGES,
    band,
    bin_proportions,
    missing_psi,
    parse_reference,
    psi,
    training_reference,
)
from cds_service.models.errors import ModelError
from cds_service.models.loaded import load_model
from cds_service.models.manifest import load_manifest, load_spec
from cds_service.training.cohort import generate_cohort, write_cohort
from cds_service.training.training import train

ROOT = Path(__file__).resolve().parent.parent


def test_psi_by_hand():
    # (0.25 − 0.5)·ln(0.25/0.5) + (0.75 − 0.5)·ln(0.75/0.5)
    #   = 0.25·0.693147 + 0.25·0.405465 = 0.173287 + 0.101366 = 0.274653
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.274653, abs=1e-6)
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0
    # An empty live bin is floored at 1e-4: (1e-4 − 0.5)·ln(1e-4/0.5) + (1 − 0.5)·ln(1/0.5)
    #   = 0.4999·8.517193 + 0.5·0.693147 = 4.257745 + 0.346574 = 4.604319
    assert psi([0.5, 0.5], [0.0, 1.0]) == pytest.approx(4.604319, abs=1e-5)
    with pytest.raises(ValueError, match="same, non-zero number of bins"):
        psi([1.0], [0.5, 0.5])


def test_missingness_psi_is_the_two_bin_psi():
    # reference 10 % missing, live 30 %: 0.2·ln(3) + (−0.2)·ln(0.7/0.9)
    #   = 0.2·1.098612 + 0.2·0.251314 = 0.219722 + 0.050263 = 0.269985
    assert missing_psi(0.1, 0.3) == pytest.approx(0.269985, abs=1e-6)
    assert missing_psi(0.3, 0.3) == 0


def test_bands_follow_the_rule_of_thumb():
    assert [band(v) for v in (None, 0.05, 0.1, 0.25, 0.26)] == [
        "n/a", "stable", "moderate shift", "moderate shift", "significant shift"]


def test_bins_have_inclusive_upper_bounds_like_prometheus_le():
    # 0 and 0.01 in [0, 0.01]; 0.015 in (0.01, 0.02]; 0.5 in (0.4, 0.5] (bin 7); 1.0 in
    # (0.9, 1.0] (bin 12): 2, 1, 1, 1 of 5.
    expected = [0.0] * 13
    expected[0], expected[1], expected[7], expected[12] = 0.4, 0.2, 0.2, 0.2
    assert bin_proportions([0, 0.01, 0.015, 0.5, 1.0]) == pytest.approx(expected)
    assert bin_proportions([]) == [0.0] * 13


def test_training_reference_by_hand():
    scores = np.array([0.005, 0.03, 0.03, 0.25])
    observed = np.array([[1, math.nan], [2, 3], [math.nan, math.nan], [4, 5]])
    ref = training_reference(scores, observed, ["a", "b"])
    # a missing in 1 of 4 rows, b in 2 of 4; scores: bin 0, bin 2 (0.02, 0.05] twice, bin 5
    # (0.2, 0.3].
    assert ref["missing_rate"] == {"a": 0.25, "b": 0.5}
    assert ref["n"] == 4
    assert ref["score_bins"]["edges"] == list(SCORE_EDGES)
    assert ref["score_bins"]["proportions"][:6] == [0.25, 0, 0.5, 0, 0, 0.25]
    parsed = parse_reference(ref, "m.yaml")
    assert parsed.missing_rate == {"a": 0.25, "b": 0.5}
    with pytest.raises(ModelError, match="one row of observed features per score"):
        training_reference(scores, observed[:2], ["a", "b"])


@pytest.mark.parametrize(("raw", "message"), [
    ({"n": 3}, "expected n, score_bins"),
    ({"n": 3, "score_bins": {"edges": [0, 1], "proportions": [0.5]}, "missing_rate": {}},
     "sum to 1"),
    ({"n": 3, "score_bins": {"edges": [1, 0], "proportions": [1]}, "missing_rate": {}},
     "increasing edges"),
    ({"n": 3, "score_bins": {"edges": [0, 1], "proportions": [1]}, "missing_rate": {"a": 2}},
     "missing rates must be in"),
])
def test_a_bad_reference_is_refused_with_the_key(raw, message):
    with pytest.raises(ModelError, match=f"m.yaml: monitoring_reference: .*{message}"):
        parse_reference(raw, "m.yaml")


def test_old_manifests_without_a_reference_still_load():
    model = load_model(ROOT / "models" / "kfre-4var")
    assert dict(model.manifest.monitoring_reference) == {}
    assert parse_reference(model.manifest.monitoring_reference, "x") is None


def test_training_writes_the_reference_into_the_manifest(tmp_path):
    cohort = generate_cohort(n_patients=300, seed=3)
    write_cohort(cohort, tmp_path / "cohort")
    spec = load_spec(ROOT / "models" / "specs" / "ckd-progression-lr.yaml")
    out = tmp_path / "ckd-progression-lr"
    result = train(spec, tmp_path / "cohort", tmp_path / "cohort" / "labels.csv", out)
    reference = parse_reference(load_manifest(out).monitoring_reference, "manifest")
    assert reference.n == result.model.manifest.training_data["n_train"]
    assert sum(reference.proportions) == pytest.approx(1, abs=1e-3)
    # The same rates training_data already reports, from the same training split.
    assert reference.missing_rate == pytest.approx(
        dict(result.model.manifest.training_data["missing_rate"]), abs=1e-4)
    shutil.rmtree(out)
