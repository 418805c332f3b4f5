"""The data scientist's loop from models/README.md, run as written: cohort → train → validate →
explain → evaluate → serve. Only the cohort size and the paths are changed, to fit in a test."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from cds_service.cli import main
from cds_service.models.loaded import load_model
from cds_service.protocol.errors import ConfigError
from hooks import SERVICES
from tests.helpers.charts import NOW
from tests.helpers.golden import patient_request
from tests.helpers.http import post
from tests.helpers.store_queries import list_predictions

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "models" / "README.md"


def guide_commands() -> list[str]:
    """`cds-service models …` commands of the guide's first shell block (continuations joined)."""
    block = re.search(r"```sh\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith(
        "cds-service models")]


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """Run every command of the guide once; keep outputs for the tests below."""
    work = tmp_path_factory.mktemp("guide")
    outputs = {}
    for command in guide_commands():
        command = (command.replace("--patients 4000", "--patients 900")
                   .replace("var/cohort", str(work / "cohort"))
                   .replace("other/cohort", str(work / "cohort"))
                   .replace("models/ckd-progression-lr", str(work / "models" /
                                                            "ckd-progression-lr"))
                   .replace("models/specs/", str(ROOT / "models" / "specs") + "/")
                   .replace("examples/", str(ROOT / "examples") + "/"))
        argv = shlex.split(command)[1:]
        outputs[argv[1]] = (argv, command)
    return work, outputs


def run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_guide_runs_end_to_end_and_the_result_serves(loop, capsys, make_app):
    work, outputs = loop
    assert list(outputs) == ["generate-cohort", "train", "validate", "explain", "evaluate"]

    code, out, err = run(capsys, outputs["generate-cohort"][0])
    assert code == 0, err
    cohort = work / "cohort"
    assert sorted(p.name for p in cohort.iterdir()) == [
        "Condition.ndjson", "Observation.ndjson", "Patient.ndjson", "cohort.json", "labels.csv"]

    code, out, err = run(capsys, outputs["train"][0])
    assert code == 0, err
    held_out = json.loads(out[out.index("{"):out.rindex("}") + 1])["held_out"]
    assert held_out["auroc"] > 0.8, held_out  # a learnable, literature-shaped process
    model_dir = work / "models" / "ckd-progression-lr"
    for name in ("manifest.yaml", "model.skops", "model_card.md", "roc.png", "calibration.png"):
        assert (model_dir / name).is_file(), name
    manifest = yaml.safe_load((model_dir / "manifest.yaml").read_text(encoding="utf-8"))
    assert manifest["metrics"]["auroc"] == held_out["auroc"]
    assert manifest["training_data"]["cohort"]["n_patients"] == 900

    code, out, err = run(capsys, outputs["validate"][0])
    assert code == 0, err
    assert out.startswith("ok ckd-progression-lr 0.1.0 sha256 ")

    code, out, err = run(capsys, outputs["explain"][0])
    assert code == 0, err
    explained = json.loads(out)
    assert 0 < explained["score"] < 1
    assert explained["model"]["id"] == "ckd-progression-lr"
    assert "uacr" not in explained["imputed"]  # the example bundle has a urine ACR
    assert "sbp" in explained["imputed"]  # and no blood pressure
    assert {c["name"] for c in explained["contributions"]} == set(manifest_names(manifest))

    code, out, err = run(capsys, outputs["evaluate"][0])
    assert code == 0, err
    assert json.loads(out)["metrics"]["n"] > 800

    # Serve it: the spec's `approved_use: [shadow]` reached the manifest, so a site may make it
    # its shadow model, scored and recorded on every call, but not its active one.
    assert manifest["approved_use"] == ["shadow"]
    with pytest.raises(ConfigError, match=r"services\.kidney-risk\.model: ckd-progression-lr is "
                                          r"not approved for active use"):
        make_app(SERVICES=SERVICES, CLOCK=lambda: NOW, MODELS_DIR=str(work / "models"),
                 SITE_YAML="services:\n  kidney-risk:\n    model: ckd-progression-lr\n")
    shutil.copytree(ROOT / "models" / "kfre-4var", work / "models" / "kfre-4var")
    app = make_app(SERVICES=SERVICES, CLOCK=lambda: NOW, MODELS_DIR=str(work / "models"),
                   SITE_YAML="services:\n  kidney-risk:\n    shadow_model: ckd-progression-lr\n")
    body = patient_request()
    response = post(app.test_client(), "/cds-services/kidney-risk", body)
    assert response.status_code == 200
    loaded = app.test_client().get("/readyz").get_json()["checks"]["models"]["loaded"]
    assert {m["id"]: m["sha256"] for m in loaded}["ckd-progression-lr"] == load_model(
        model_dir).sha256
    rows = list_predictions(app.extensions["cds"].store, hook_instance=body["hookInstance"])
    assert [(r["role"], r["model_id"]) for r in rows] == [
        ("active", "kfre-4var"), ("shadow", "ckd-progression-lr")]


def manifest_names(manifest: dict) -> list[str]:
    return [f["name"] for f in manifest["features"]]


def test_gradient_boosting_trains_and_explains_by_occlusion(tmp_path, capsys, loop):
    work, _ = loop
    if not (work / "cohort" / "labels.csv").exists():
        assert main(["models", "generate-cohort", "--out", str(work / "cohort"),
                     "--patients", "900"]) == 0
    spec = yaml.safe_load((ROOT / "models/specs/ckd-progression-lr.yaml").read_text())
    spec.update(id="ckd-progression-gbm", training={
        "estimator": "gradient_boosting", "params": {"max_iter": 60, "learning_rate": 0.1},
        "seed": 3})
    spec_path = tmp_path / "gbm.yaml"
    spec_path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out_dir = tmp_path / "ckd-progression-gbm"
    code, out, err = run(capsys, ["models", "train", "--ndjson", str(work / "cohort"),
                                  "--labels", str(work / "cohort" / "labels.csv"),
                                  "--spec", str(spec_path), "--out", str(out_dir)])
    assert code == 0, err
    model = load_model(out_dir)
    assert model.manifest.explanation["method"] == "occlusion"
    first = model.predict([patient_request()["prefetch"][k] for k in (
        "patient", "egfr", "uacr", "hba1c", "bp", "conditions")], now=NOW)
    again = model.predict([patient_request()["prefetch"][k] for k in (
        "patient", "egfr", "uacr", "hba1c", "bp", "conditions")], now=NOW)
    assert first.contributions == again.contributions  # deterministic
    assert {c.name for c in first.contributions} == set(model.manifest.feature_names)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["models", "validate", "{tmp}/nowhere"], "manifest.yaml: cannot read"),
        (["models", "train", "--ndjson", "{tmp}", "--labels", "{tmp}/labels.csv",
          "--spec", "{tmp}/spec.yaml", "--out", "{tmp}/out"], "spec.yaml: features"),
        (["models", "train", "--ndjson", "{tmp}", "--labels", "{tmp}/labels.csv",
          "--spec", str(ROOT / "models/specs/kfre-4var.yaml"), "--out", "{tmp}/out"],
         "no .ndjson files"),
        (["models", "explain", str(ROOT / "models/kfre-4var"), "--bundle", "{tmp}/x.json"],
         "cannot read"),
    ],
    ids=["validate-missing", "bad-spec", "no-ndjson", "explain-no-bundle"],
)
def test_model_commands_fail_with_a_message_not_a_traceback(tmp_path, capsys, argv, fragment):
    (tmp_path / "labels.csv").write_text("patient_id,index_date,label\np1,2025-01-01,1\n")
    (tmp_path / "spec.yaml").write_text(
        (ROOT / "models/specs/kfre-4var.yaml").read_text().replace(
            "aggregation: latest", "aggregation: newest", 1), encoding="utf-8")
    code, out, err = run(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert err.startswith("models: ") and fragment in err, err
    assert "Traceback" not in err


def test_a_pickle_dropped_into_a_model_directory_is_refused_by_validate(tmp_path, capsys):
    import pickle  # noqa: S403 - written, never loaded, to prove it is refused
    import shutil

    target = tmp_path / "kfre-4var"
    shutil.copytree(ROOT / "models" / "kfre-4var", target)
    (target / "model.pkl").write_bytes(pickle.dumps({"a": 1}))
    manifest = (target / "manifest.yaml").read_text().replace("file: model.skops",
                                                              "file: model.pkl")
    (target / "manifest.yaml").write_text(manifest)
    code, _, err = run(capsys, ["models", "validate", str(target)])
    assert code == 2 and "pickle-based" in err, err


