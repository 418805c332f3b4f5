"""`models train --cohort` and `models evaluate --cohort`: labels at the horizon, the split in
time, never overwriting, determinism, a comparator on the same patients, and the CLI's messages.

Cohorts are written by hand (tests/helpers/cohorts.py) with dates as offsets from T0, a fixed
date inside the test data. Expected values are worked out by hand from the definitions
(cds_service/training/cohort_labels.py) in the comments beside them.
"""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pytest
import yaml

from cds_service.cli import main
from cds_service.models.errors import ModelError
from cds_service.models.loaded import load_model
from cds_service.models.manifest import load_spec
from cds_service.training.cohort_evaluation import age_band, score_cohort
from cds_service.training.cohort_labels import (
    CENSORED_BEFORE,
    CohortRow,
    label,
    label_cohort,
    read_cohort,
    time_split,
)
from cds_service.training.cohort_training import train_from_cohort
from cds_service.training.export_cohort import load_cohort_specs
from tests.helpers.cohorts import (
    KFRE_SPEC,
    LR_SPEC,
    ROOT,
    T0,
    cohort_row,
    day,
    kfre_rows,
    seeded_export,
    write_cohort,
)

KFRE_DIR = ROOT / "models" / "kfre-4var"
TODAY = date(2026, 11, 21)  # the `created` date written into trained manifests below


def run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def row(event: str, followup: int) -> CohortRow:
    return CohortRow("p", T0, event, followup, 70, "male", {})


# ---------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize(("event", "followup", "horizon", "expected"), [
    # 5 years = 5 x 365.25 = 1826.25 days.
    ("kidney_failure", 1826, 5, 1),     # 1826 <= 1826.25: kidney failure within the horizon
    ("kidney_failure", 1827, 5, 0),     # 1827 > 1826.25: followed past it without failure
    ("kidney_failure", 1, 5, 1),
    ("death", 100, 5, 0),               # death first: competing event, a non-event
    ("death", 1826, 5, 0),
    ("death", 2000, 5, 0),              # followed past the horizon
    ("censored", 1826, 5, None),        # censored at 1826 <= 1826.25: unknown at 5 years
    ("censored", 1827, 5, 0),           # last seen after 5 years, no failure by then
    # 2 years = 730.5 days.
    ("kidney_failure", 730, 2, 1),      # 730 <= 730.5
    ("kidney_failure", 731, 2, 0),      # 731 > 730.5: failure after the horizon
    ("censored", 730, 2, None),
    ("censored", 731, 2, 0),
    ("death", 730, 2, 0),
])
def test_each_label_rule_at_the_horizon(event, followup, horizon, expected):
    assert label(row(event, followup), horizon) == expected


def test_labelling_counts_the_censored_and_those_missing_a_required_feature(tmp_path):
    full = {"age": 70.0, "male": 1.0, "egfr": 30.0, "uacr": 300.0}
    rows = [
        cohort_row("kf", 0, "kidney_failure", 500, features=full),        # 1
        cohort_row("late-kf", 0, "kidney_failure", 2000, features=full),  # 0: after 1826.25 days
        cohort_row("died", 0, "death", 300, features=full),               # 0: competing
        cohort_row("cens-early", 0, "censored", 900, features=full),      # excluded: censored
        cohort_row("cens-late", 0, "censored", 1900, features=full),      # 0
        cohort_row("no-uacr", 0, "kidney_failure", 100, features={**full, "uacr": None}),
        # censored early and missing uacr: counted under the first reason, censoring.
        cohort_row("both", 0, "censored", 10, features={**full, "uacr": None}),
    ]
    cohort = read_cohort(write_cohort(tmp_path / "c", rows))
    data = label_cohort(cohort, load_spec(KFRE_SPEC).features, 5, "kfre")
    assert [r.patient_id for r in data.rows] == ["kf", "late-kf", "died", "cens-late"]
    assert data.y.tolist() == [1, 0, 0, 0]
    assert dict(data.excluded) == {CENSORED_BEFORE: 2, "missing uacr": 1}
    assert data.deaths_before_horizon == 1
    # Columns in the spec's order (age, male, egfr, uacr).
    assert data.observed[0].tolist() == [70.0, 1.0, 30.0, 300.0]


# ---------------------------------------------------------------------------------------------
# The split in time


def test_the_time_split_keeps_a_boundary_date_on_one_side():
    # Index days 0, 10, 20, 30, 30, 30, 40, 50 (given out of order).
    days = [30, 0, 50, 30, 10, 40, 30, 20]
    dates = [day(d) for d in days]
    # 0.5 x 8 = 4: the 4th earliest date is day 30; all three patients of day 30 train with it.
    train, test, boundary = time_split(dates, 0.5)
    assert boundary == day(30)
    assert sorted(days[i] for i in train) == [0, 10, 20, 30, 30, 30]
    assert sorted(days[i] for i in test) == [40, 50]
    # 0.25 x 8 = 2: the 2nd earliest is day 10.
    train, test, boundary = time_split(dates, 0.25)
    assert boundary == day(10) and len(train) == 2 and len(test) == 6
    # 0.3 x 8 = 2.4 -> ceil 3: the 3rd earliest is day 20.
    assert time_split(dates, 0.3)[2] == day(20)
    # 0.9 x 8 = 7.2 -> 8: the last date, nobody left to test.
    with pytest.raises(ModelError, match="no patient to test"):
        time_split(dates, 0.9)
    with pytest.raises(ModelError, match="between 0 and 1"):
        time_split(dates, 1.0)


def test_training_records_the_boundary_counts_and_a_temporal_test_split(tmp_path):
    rows = kfre_rows(240, seed=3)
    cohort = write_cohort(tmp_path / "c", rows)
    result = train_from_cohort(load_spec(KFRE_SPEC), cohort, tmp_path / "kfre-4var",
                               train_fraction=0.75, today=TODAY)
    data = result.model.manifest.training_data
    # Recount from the rows by the rules: censored with followup <= 1826.25 is excluded.
    censored = sum(r["event"] == "censored" and r["followup_days"] <= 1826 for r in rows)
    used = [r for r in rows if not (r["event"] == "censored" and r["followup_days"] <= 1826)]
    assert data["excluded"] == {CENSORED_BEFORE: censored}
    assert data["patients_in_cohort"] == 240 and data["patients_used"] == len(used)
    assert data["events"] == sum(r["event"] == "kidney_failure" and r["followup_days"] <= 1826
                                 for r in used)
    split = data["split"]
    dates = sorted(date.fromisoformat(r["index_date"]) for r in used)
    # The boundary is the ceil(0.75 n)-th earliest index date of the labelled patients.
    k = -(-3 * len(used) // 4)
    assert split["boundary_date"] == dates[k - 1].isoformat()
    n_train = sum(d <= dates[k - 1] for d in dates)
    assert data["n_train"] == n_train and data["n_test"] == len(used) - n_train
    assert split["method"] == "temporal" and split["train_fraction"] == 0.75
    assert result.model.manifest.metrics["split"] == "temporal"
    card = (tmp_path / "kfre-4var" / "model_card.md").read_text(encoding="utf-8")
    assert "censored before the horizon" in card and split["boundary_date"] in card


# ---------------------------------------------------------------------------------------------
# Never overwrite; same inputs, same bytes


def test_train_refuses_a_directory_that_holds_a_model_unless_replace(tmp_path, capsys):
    cohort = write_cohort(tmp_path / "c", kfre_rows(200, seed=5))
    out = tmp_path / "kfre-4var"
    argv = ["models", "train", "--cohort", cohort, "--spec", KFRE_SPEC, "--out", out]
    assert run(capsys, argv)[0] == 0
    before = (out / "manifest.yaml").read_bytes()
    code, _, err = run(capsys, argv)
    assert code == 2
    assert f"{out}: already holds a model (manifest.yaml)" in err and "--replace" in err
    assert (out / "manifest.yaml").read_bytes() == before
    assert run(capsys, [*argv, "--replace"])[0] == 0


def test_the_same_inputs_give_the_same_artifact_and_manifest_bytes(tmp_path):
    # The logistic regression (fitted, with median imputation) is the case that can drift; the
    # manifest's `created` is today's date, fixed here (the only field that depends on the day).
    rows = kfre_rows(300, seed=8, diabetes=True)
    for r, k in zip(rows, range(len(rows)), strict=True):
        r.update(egfr_slope=None if k % 3 else -1.5 - k % 5, hypertension=float(k % 2),
                 sbp=120.0 + k % 40, hba1c=None)
    cohort = write_cohort(tmp_path / "c", rows, specs=(LR_SPEC, KFRE_SPEC))
    spec = load_spec(LR_SPEC)
    a = train_from_cohort(spec, cohort, tmp_path / "a" / "ckd-progression-lr", today=TODAY)
    b = train_from_cohort(spec, cohort, tmp_path / "b" / "ckd-progression-lr", today=TODAY)
    for name in ("model.skops", "manifest.yaml", "model_card.md"):
        assert (a.directory / name).read_bytes() == (b.directory / name).read_bytes(), name
    assert a.model.sha256 == b.model.sha256


# ---------------------------------------------------------------------------------------------
# Evaluate with a comparator


def comparator_cohort(tmp_path: Path) -> Path:
    rows = kfre_rows(300, seed=21, diabetes=True)
    # The comparator (kfre-4var) requires uacr; the model trained below imputes it (its spec
    # says impute: median). Patients without uacr can be scored by one model only.
    for r in rows[:25]:
        r["uacr"] = None
    # LR's spec adds its columns (diabetes among them) beside KFRE's.
    return write_cohort(tmp_path / "c", rows, specs=(KFRE_SPEC, LR_SPEC))


def imputing_spec(tmp_path: Path) -> Path:
    raw = yaml.safe_load(KFRE_SPEC.read_text(encoding="utf-8"))
    raw["id"] = "kfre-refit"
    raw["approved_use"] = ["shadow"]
    del raw["secondary_outputs"]  # a logistic regression has one horizon
    raw["thresholds"] = {"info": 0.03}
    raw["features"][3]["missing"] = {"impute": "median"}
    raw["training"] = {"estimator": "logistic_regression", "params": {"log_features": ["uacr"]},
                       "test_fraction": 0.25, "seed": 1}
    path = tmp_path / "kfre-refit.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_evaluate_scores_both_models_on_the_same_patients(tmp_path, capsys):
    cohort = comparator_cohort(tmp_path)
    model_dir = tmp_path / "m" / "kfre-refit"
    train_from_cohort(load_spec(imputing_spec(tmp_path)), cohort, model_dir, today=TODAY)
    model, kfre = load_model(model_dir), load_model(KFRE_DIR)
    rows = read_cohort(cohort).rows
    censored = {r.patient_id for r in rows
                if r.event == "censored" and r.followup_days <= 1826}
    no_uacr = {r.patient_id for r in rows[:25]} - censored

    alone, _ = score_cohort(cohort, model, None)
    both, _ = score_cohort(cohort, model, kfre)
    # Alone, the refit model scores everyone labelled (it imputes uacr); with the comparator,
    # those without uacr are dropped from both and counted.
    assert len(alone.rows) == 300 - len(censored)
    assert len(both.rows) == 300 - len(censored) - len(no_uacr)
    assert {r.patient_id for r in both.rows}.isdisjoint(no_uacr)
    assert both.counts["excluded: not scored by kfre-4var (missing uacr)"] == len(no_uacr)
    assert both.counts["kfre-4var output"] == "risk_5y"
    # Same patients, same order, both models: the comparator's score is the served one.
    assert set(both.scores) == {"kfre-refit", "kfre-4var"}
    first = both.rows[0]
    assert both.scores["kfre-4var"][0] == kfre.predict_values(first.values).score_of("risk_5y")

    report = tmp_path / "report"
    code, out, err = run(capsys, ["models", "evaluate", model_dir, "--cohort", cohort,
                                  "--compare", "kfre-4var", "--report", report,
                                  "--bootstrap", "20"])
    assert code == 0, err
    assert out.strip() == str(report / "report.md")
    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["models"] == ["kfre-refit", "kfre-4var"]
    assert metrics["overall"]["n"] == len(both.rows)
    # 5-year model: KDIGO practice point 2.2.1 thresholds, 3 % and 5 %.
    assert [t["value"] for t in metrics["thresholds"]] == [0.03, 0.05]
    variables = {s["variable"] for s in metrics["subgroups"]}
    assert variables == {"sex", "age at index", "diabetes"}


def test_split_test_keeps_only_patients_after_the_training_boundary(tmp_path):
    cohort = comparator_cohort(tmp_path)
    model_dir = tmp_path / "m" / "kfre-refit"
    train_from_cohort(load_spec(imputing_spec(tmp_path)), cohort, model_dir, today=TODAY)
    model = load_model(model_dir)
    boundary = date.fromisoformat(model.manifest.training_data["split"]["boundary_date"])
    scored, _ = score_cohort(cohort, model, None, split="test")
    assert scored.rows and all(r.index_date > boundary for r in scored.rows)
    # Exactly the model's test patients: n_test of its manifest.
    assert len(scored.rows) == model.manifest.training_data["n_test"]
    before = sum(r.index_date <= boundary for r in read_cohort(cohort).rows)
    assert scored.counts["excluded: index date on or before the model's training boundary"] == (
        before)
    # A model with no recorded boundary (the shipped one) cannot be split.
    with pytest.raises(ModelError, match="no training boundary recorded"):
        score_cohort(cohort, load_model(KFRE_DIR), None, split="test")


def test_age_bands():
    # < 65, 65-74, >= 75 at index.
    assert [age_band(a) for a in (18, 64, 65, 74, 75, 99)] == [
        "< 65", "< 65", "65-74", "65-74", "≥ 75", "≥ 75"]


def test_without_a_diabetes_column_the_report_says_the_subgroup_is_left_out(tmp_path, capsys):
    cohort = write_cohort(tmp_path / "c", kfre_rows(200, seed=4))
    report = tmp_path / "r"
    code, _, err = run(capsys, ["models", "evaluate", KFRE_DIR, "--cohort", cohort,
                                "--report", report, "--bootstrap", "10"])
    assert code == 0, err
    text = (report / "report.md").read_text(encoding="utf-8")
    assert "not reported: cohort.csv has no diabetes column" in text
    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    assert {s["variable"] for s in metrics["subgroups"]} == {"sex", "age at index"}


# ---------------------------------------------------------------------------------------------
# CLI messages


def two_year_model(tmp_path: Path, cohort: Path) -> Path:
    raw = yaml.safe_load(KFRE_SPEC.read_text(encoding="utf-8"))
    raw.update(id="kfre-2y", output={"name": "risk_2y", "meaning": "2-year risk",
                                     "horizon_years": 2}, secondary_outputs=[],
               thresholds={"info": 0.1})
    raw["training"]["params"]["horizon_years"] = 2
    spec = tmp_path / "kfre-2y.yaml"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = tmp_path / "m" / "kfre-2y"
    train_from_cohort(load_spec(spec), cohort, out, today=TODAY)
    return out


def three_year_spec(tmp_path: Path) -> Path:
    raw = yaml.safe_load(imputing_spec(tmp_path).read_text(encoding="utf-8"))
    raw.update(id="lr-3y", output={"name": "risk_3y", "meaning": "3-year risk",
                                   "horizon_years": 3}, thresholds={"info": 0.1})
    spec = tmp_path / "lr-3y.yaml"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return spec


def test_cli_errors_are_messages_with_exit_2(tmp_path, capsys):
    cohort = write_cohort(tmp_path / "c", kfre_rows(200, seed=9))
    no_uacr = write_cohort(tmp_path / "c2", kfre_rows(50, seed=9), drop=("uacr",))
    cases = [
        # A feature column the model needs is not in the cohort.
        (["models", "train", "--cohort", no_uacr, "--spec", KFRE_SPEC, "--out",
          tmp_path / "x" / "kfre-4var"], "no column 'uacr', a feature of spec"),
        (["models", "evaluate", KFRE_DIR, "--cohort", no_uacr, "--report", tmp_path / "r"],
         "no column 'uacr', a feature of model kfre-4var"),
        # Unknown comparator: names what is available.
        (["models", "evaluate", KFRE_DIR, "--cohort", cohort, "--report", tmp_path / "r",
          "--compare", "no-such-model"], "model 'no-such-model' not found in"),
        # The same model as its own comparator.
        (["models", "evaluate", KFRE_DIR, "--cohort", cohort, "--report", tmp_path / "r",
          "--compare", "kfre-4var"], "the model and the comparator are the same"),
        # Inputs: both kinds, or neither; report missing; options of the other path.
        (["models", "train", "--cohort", cohort, "--ndjson", tmp_path, "--labels", "x.csv",
          "--spec", KFRE_SPEC, "--out", tmp_path / "y"], "not both"),
        (["models", "evaluate", KFRE_DIR], "give --cohort COHORT_DIR"),
        (["models", "evaluate", KFRE_DIR, "--cohort", cohort], "--cohort needs --report"),
        (["models", "train", "--cohort", tmp_path / "nowhere", "--spec", KFRE_SPEC, "--out",
          tmp_path / "z" / "kfre-4var"], "cohort.json: cannot read"),
    ]
    for argv, fragment in cases:
        code, out, err = run(capsys, argv)
        assert code == 2, (argv, out, err)
        assert fragment in err, (fragment, err)
        assert "Traceback" not in err


def test_cli_refuses_a_horizon_without_kdigo_thresholds_or_comparator_output(tmp_path, capsys):
    cohort = write_cohort(tmp_path / "c", kfre_rows(240, seed=12))
    # A 3-year model trains (labels at 3 x 365.25 = 1095.75 days) ...
    model = tmp_path / "m" / "lr-3y"
    code, _, err = run(capsys, ["models", "train", "--cohort", cohort, "--spec",
                                three_year_spec(tmp_path), "--out", model])
    assert code == 0, err
    assert load_model(model).manifest.training_data["label"]["horizon_days"] == 1095.75
    # ... but kfre-4var has no 3-year output to compare with ...
    code, _, err = run(capsys, ["models", "evaluate", model, "--cohort", cohort,
                                "--compare", "kfre-4var", "--report", tmp_path / "r"])
    assert code == 2
    assert "kfre-4var has no output at 3 years (it has risk_5y (5 years), risk_2y (2 years))" in (
        err)
    # ... and KDIGO 2024 publishes thresholds for 2- and 5-year risks only.
    code, _, err = run(capsys, ["models", "evaluate", model, "--cohort", cohort,
                                "--report", tmp_path / "r"])
    assert code == 2 and "KDIGO 2024 publishes risk thresholds for 2- and 5-year" in err


def test_a_two_year_model_is_compared_with_kfre_risk_2y(tmp_path):
    cohort = write_cohort(tmp_path / "c", kfre_rows(240, seed=14))
    model = load_model(two_year_model(tmp_path, cohort))
    scored, _ = score_cohort(cohort, model, load_model(KFRE_DIR))
    assert scored.counts["kfre-4var output"] == "risk_2y"
    # Labels at 2 years (730.5 days): kidney failure after day 730 is a 0 here.
    for r, y in zip(scored.rows, scored.y, strict=True):
        assert y == int(r.event == "kidney_failure" and r.followup_days <= 730)


# ---------------------------------------------------------------------------------------------
# Cohort with two specs, then the whole loop


def test_cohort_specs_unite_features_and_refuse_two_definitions_of_a_name(tmp_path):
    spec, definition = load_cohort_specs([LR_SPEC, KFRE_SPEC])
    # LR's nine features, KFRE's four all among them; LR's horizon and cohort section.
    assert [f.name for f in spec.features] == [f.name for f in load_spec(LR_SPEC).features]
    assert spec.id == "ckd-progression-lr" and definition.horizon_years == 5
    # uacr is impute: median in LR and required in KFRE: required in the cohort.
    assert spec.features[4].name == "uacr" and spec.features[4].missing.strategy == "required"
    raw = yaml.safe_load(KFRE_SPEC.read_text(encoding="utf-8"))
    raw["features"][2]["lookback_days"] = 365  # egfr: a one-year window instead of two
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ModelError) as info:
        load_cohort_specs([LR_SPEC, other])
    assert f"feature 'egfr' is defined differently in {LR_SPEC} and {other}" in str(info.value)


def test_export_to_cohort_to_train_to_evaluate_with_kfre(tmp_path, capsys):
    export = seeded_export(300, seed=11).write(tmp_path / "export")
    cohort, model = tmp_path / "cohort", tmp_path / "models" / "ckd-progression-lr"
    code, _, err = run(capsys, ["models", "cohort", export, "--spec", LR_SPEC,
                                "--spec", KFRE_SPEC, "--out", cohort])
    assert code == 0, err
    document = json.loads((cohort / "cohort.json").read_text(encoding="utf-8"))
    assert document["spec_files"] == [str(LR_SPEC), str(KFRE_SPEC)]
    code, _, err = run(capsys, ["models", "train", "--cohort", cohort, "--spec", LR_SPEC,
                                "--out", model])
    assert code == 0, err
    report = tmp_path / "report"
    code, out, err = run(capsys, ["models", "evaluate", model, "--cohort", cohort,
                                  "--compare", "kfre-4var", "--report", report,
                                  "--bootstrap", "50", "--split", "test", "--site", "riverside"])
    assert code == 0, err
    assert out.strip() == str(report / "report.md")
    # The evidence `models promote` checks: which builds, whose patients, which cohort.
    provenance = json.loads((report / "provenance.json").read_text(encoding="utf-8"))
    trained = yaml.safe_load((model / "manifest.yaml").read_text(encoding="utf-8"))
    assert provenance["site"] == "riverside"
    assert provenance["models"]["ckd-progression-lr"]["sha256"] == trained["artifact"]["sha256"]
    assert set(provenance["models"]) == {"ckd-progression-lr", "kfre-4var"}
    assert "cohort" in provenance
    text = (report / "report.md").read_text(encoding="utf-8")
    assert "`ckd-progression-lr`" in text and "`kfre-4var`" in text
    assert "Comparison with `kfre-4var`" in text
    for png in ("roc.png", "calibration.png", "decision_curve.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ndjson_path_still_trains_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["models", "generate-cohort", "--out", str(tmp_path / "syn"),
                 "--patients", "300", "--seed", "3"]) == 0
    out = tmp_path / "kfre-4var"
    argv = ["models", "train", "--ndjson", tmp_path / "syn", "--labels",
            tmp_path / "syn" / "labels.csv", "--spec", KFRE_SPEC, "--out", out]
    assert run(capsys, argv)[0] == 0
    code, _, err = run(capsys, argv)
    assert code == 2 and "already holds a model" in err
    shutil.rmtree(out)
    code, _, err = run(capsys, [*argv, "--train-fraction", "0.5"])
    assert code == 2 and "--train-fraction is for --cohort" in err
    assert not out.exists()


def test_scoring_named_values_imputes_by_the_manifest_as_serving_does(tmp_path):
    cohort = comparator_cohort(tmp_path)
    model_dir = tmp_path / "m" / "kfre-refit"
    train_from_cohort(load_spec(imputing_spec(tmp_path)), cohort, model_dir, today=TODAY)
    model = load_model(model_dir)
    median = model.manifest.features[3].missing.value  # uacr's fitted training median
    prediction = model.predict_values({"age": 70.0, "male": 1.0, "egfr": 30.0, "uacr": None})
    assert prediction.imputed == ("uacr",) and prediction.features["uacr"].value == median
    assert prediction.score == pytest.approx(
        float(model.score_rows([[70.0, 1.0, 30.0, median]])[0]), rel=1e-12)
    # KFRE requires uacr: no score, and why.
    kfre = load_model(KFRE_DIR).predict_values({"age": 70.0, "male": 1.0, "egfr": 30.0})
    assert kfre.score is None and kfre.unavailable == "missing uacr"
