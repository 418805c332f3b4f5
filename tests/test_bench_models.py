"""The model micro-benchmark runs end to end (quick mode) and writes complete results.

No timing is asserted: the numbers depend on the machine; only their presence and shape are.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from bench import models_bench
from bench.models_bench import CASES, main, model_dirs

STATS = ("median_us", "p95_us", "mean_us", "min_us")


def test_quick_run_writes_every_model_and_case(tmp_path: Path, capsys) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "models.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "models.md").read_text(encoding="utf-8")
    shipped = {d.name for d in model_dirs()}
    assert shipped >= {"kfre-4var", "ckd-progression-lr"}
    assert set(report["models"]) == shipped
    assert report["mode"] == "quick"
    for key in ("python", "numpy", "scikit-learn", "platform", "cpu_count", "date"):
        assert report["environment"][key]
    assert report["inputs"]["obs_1000"]["observations"] == 1000
    assert report["inputs"]["obs_100"]["observations"] == 100
    assert report["inputs"]["typical"]["patients"] == models_bench.TYPICAL_PATIENTS

    for model_id, entry in report["models"].items():
        assert set(entry["cases"]) == set(CASES), model_id
        assert entry["inputs_used"]["scoreable_patients"] > 0
        for case, result in entry["cases"].items():
            assert result["runs"] == models_bench.QUICK.min_runs, (model_id, case)
            for stat in STATS:
                assert result[stat] > 0, (model_id, case, stat)
            assert result["min_us"] <= result["median_us"] <= result["p95_us"]
            assert f"| {model_id} | {case} |" in markdown
        step = report["context"]["typical_model_step"][model_id]
        assert step["predict_full_median_us"] > 0
        assert step["fraction_of_target"] > 0
    assert "1 ms" in markdown
    assert str(tmp_path / "models.json") in capsys.readouterr().out


def test_large_prefetch_is_mostly_unrelated_results() -> None:
    from cds_service.features import flatten, group_by_patient
    from cds_service.training.cohort import generate_cohort

    cohort = generate_cohort(3, seed=models_bench.COHORT_SEED)
    groups = group_by_patient(r for v in cohort.resources.values() for r in v)
    patient_id = sorted(groups)[0]
    now = datetime(2025, 1, 1, tzinfo=UTC)
    bundle, info = models_bench.large_prefetch(groups[patient_id], 1000, now=now)

    observations = [r for r in flatten(bundle) if r["resourceType"] == "Observation"]
    assert len(observations) == 1000
    assert len({o["id"] for o in observations}) == 1000
    assert info["unrelated_labs"] > info["replicated_from_patient"] > 0
    dates = sorted(o["effectiveDateTime"] for o in observations)
    assert dates[0] >= "2022-01-01" and dates[-1] < "2025-01-01"
    assert all(o["subject"]["reference"] == f"Patient/{patient_id}" for o in observations)
