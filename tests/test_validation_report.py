"""The validation report (issue 18): report.md, metrics.json and the figures, byte-stable."""

from __future__ import annotations

import json
import re

import numpy as np
from scipy.special import expit

from cds_service.training.evaluation import evaluate_models, kdigo_thresholds
from cds_service.training.validation_report import write_report

MODELS = ("ckd-progression-lr", "kfre-4var")


def result(seed: int = 4):
    """Two models on 400 synthetic patients (drawn from known probabilities), a small
    subgroup that cannot be estimated, and the 2-year KDIGO thresholds."""
    rng = np.random.default_rng(12)
    lp = rng.normal(-2.0, 1.2, 400)
    y = (rng.random(400) < expit(lp)).astype(int)
    sex = np.where(rng.random(400) < 0.5, "female", "male").astype(object)
    sex[np.flatnonzero(y == 1)[:2]] = "other"  # two events, no more
    sex[np.flatnonzero(y == 0)[:10]] = "other"
    noisy = 1.4 * lp + 0.2 + rng.normal(0.0, 0.8, 400)  # overconfident and less discriminating
    return evaluate_models(y, {MODELS[0]: expit(noisy), MODELS[1]: expit(lp)},
                           comparator="kfre-4var", thresholds=kdigo_thresholds(2),
                           horizon_years=2, subgroups={"sex": sex.tolist()},
                           n_bootstrap=40, seed=seed)


def test_the_report_names_every_model_and_references_figures_that_exist(tmp_path):
    evaluated = result()
    written = write_report(evaluated, tmp_path, title="2-year validation",
                           cohort={"excluded: no urine ACR": 7})
    assert sorted(p.name for p in written) == ["calibration.png", "decision_curve.png",
                                               "metrics.json", "report.md", "roc.png"]
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    for model in MODELS:
        assert f"`{model}`" in report
    for section in ("## Cohort", "## Discrimination", "## Calibration",
                    "## Decision curve at the named thresholds", "## Comparison with",
                    "## Subgroups", "## How to read this"):
        assert section in report
    for source in ("Cox", "Van Calster", "Vickers", "Efron", "Hanley", "Brier", "Debray"):
        assert source in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(images) == ["calibration.png", "decision_curve.png", "roc.png"]
    for name in images:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| excluded: no urine ACR | 7 |" in report
    assert "PP 2.2.2 (>10%)" in report and "PP 2.2.3 (>40%)" in report
    # the subgroup with two events shows why instead of numbers
    assert re.search(r"\| sex \| other \| 12 \| 2 \| \*\*too few events \(< 10\)\*\*", report)
    assert json.loads((tmp_path / "metrics.json").read_text()) == evaluated.to_dict()


def test_same_seed_same_bytes_in_every_file(tmp_path):
    write_report(result(seed=4), tmp_path / "a", title="t")
    write_report(result(seed=4), tmp_path / "b", title="t")
    for name in ("report.md", "metrics.json", "roc.png", "calibration.png",
                 "decision_curve.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    png = (tmp_path / "a" / "roc.png").read_bytes()
    # no software version or creation time in the PNG
    assert b"matplotlib" not in png and b"tIME" not in png
    write_report(result(seed=5), tmp_path / "c", title="t")
    assert (tmp_path / "c" / "metrics.json").read_bytes() != (
        tmp_path / "a" / "metrics.json").read_bytes()
