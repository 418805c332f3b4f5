"""`cds-service models promote`: the site's acceptance criteria, the evaluation's provenance,
shadow first, a reviewable one-line edit of the site file and the promotion record.

The models are copies of the shipped ones in a temporary MODELS_DIR (the shipped directories are
never written); the evaluations are hand-written metrics.json files, so every expected number
below is read off the fixture, not computed by the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cds_service.cli import main
from cds_service.config import ConfigError
from cds_service.models.acceptance import Acceptance, check_metrics, parse_acceptance
from cds_service.models.loaded import load_model
from cds_service.site_edit import edit_service_models
from cds_service.training.evidence import write_provenance

ROOT = Path(__file__).resolve().parent.parent

SITE = """\
site: test-hospital
fhir_server: https://fhir.test-hospital.example/api/FHIR/R4
# Models reviewed by the hospital's CDS committee (ticket CDS-12).
services:
  kidney-risk: {}   # on the service's default model
  nephrotoxic-order-check: {}
model_acceptance:
  min_events: 20    # a small pilot cohort
"""


def estimate(value, lower=None, upper=None):
    return {"value": value, "lower": lower, "upper": upper, "resamples": 1000}


def model_metrics(name, auroc, lower, slope, intercept):
    return {"model": name, "auroc": estimate(auroc, lower, auroc + 0.03),
            "calibration_slope": estimate(slope), "calibration_intercept": estimate(intercept)}


def metrics_doc(*, events=40, auroc=0.80, slope=1.0, intercept=0.0, kfre_auroc=0.82,
                kfre_lower=0.78):
    return {"models": ["candidate", "kfre-4var"], "comparator": "kfre-4var",
            "overall": {"n": 400, "events": events, "status": "ok", "models": [
                model_metrics("candidate", auroc, auroc - 0.04, slope, intercept),
                model_metrics("kfre-4var", kfre_auroc, kfre_lower, 1.0, 0.0)]}}


@pytest.fixture
def world(tmp_path, monkeypatch):
    models = tmp_path / "models"
    for name in ("kfre-4var", "ckd-progression-lr"):
        shutil.copytree(ROOT / "models" / name, models / name)
    # approved_use is not covered by the artifact's sha256: a site-validated copy may say active.
    manifest = models / "ckd-progression-lr" / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("approved_use:\n- shadow",
                                                     "approved_use:\n- active\n- shadow"))
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "test-hospital.yaml").write_text(SITE)
    monkeypatch.setenv("CDS_SITE_CONFIG", str(sites))
    monkeypatch.setenv("CDS_MODELS_DIR", str(models))
    candidate = load_model(models / "ckd-progression-lr")
    kfre = load_model(models / "kfre-4var")

    def evaluation(name="eval", site="test-hospital", model=candidate, **metrics):
        out = tmp_path / name
        out.mkdir()
        (out / "metrics.json").write_text(json.dumps(metrics_doc(**metrics)))
        write_provenance(out, site=site, models={"candidate": model, "kfre-4var": kfre})
        return out

    return SimpleNamespace(models=models, site_file=sites / "test-hospital.yaml",
                           log=sites / "test-hospital.yaml.promotions.jsonl",
                           candidate=models / "ckd-progression-lr", evaluation=evaluation)


def promote(world, evaluation, *extra):
    return main(["models", "promote", str(world.candidate), "--site", "test-hospital",
                 "--evaluation", str(evaluation), "--by", "data-scientist", *extra])


def test_shadow_then_active_edits_one_key_each_time_and_records_it(world, capsys):
    assert promote(world, world.evaluation()) == 0
    text = world.site_file.read_text()
    # The one line changed; the comments stay.
    assert "  kidney-risk:   # on the service's default model\n" \
           "    shadow_model: ckd-progression-lr\n" in text
    assert "# Models reviewed by the hospital's CDS committee (ticket CDS-12)." in text
    assert text.replace("  kidney-risk:   # on the service's default model\n"
                        "    shadow_model: ckd-progression-lr\n",
                        "  kidney-risk: {}   # on the service's default model\n") == SITE
    record = json.loads(world.log.read_text())
    assert record["role"] == "shadow" and record["by"] == "data-scientist"
    assert record["model"]["id"] == "ckd-progression-lr"
    assert record["changed"] == {"shadow_model": {"from": None, "to": "ckd-progression-lr"}}
    assert len(record["evidence"]["sha256"]) == 64

    assert promote(world, world.evaluation("eval2"), "--role", "active") == 0
    services = yaml.safe_load(world.site_file.read_text())["services"]
    # The previous active model (the service default) is kept as the shadow to watch the swap.
    assert services["kidney-risk"] == {"model": "ckd-progression-lr", "shadow_model": "kfre-4var"}
    records = [json.loads(line) for line in world.log.read_text().splitlines()]
    assert [r["role"] for r in records] == ["shadow", "active"]
    assert "promoted ckd-progression-lr" in capsys.readouterr().out


def test_paths_in_the_site_file_stay_relative_to_it(world):
    # The edited file is checked where it lives: a jwks_file beside it must still be found.
    from tests.helpers.jwks import jwks, rsa_key

    (world.site_file.parent / "epic-keys.json").write_text(json.dumps(jwks(rsa_key())))
    world.site_file.write_text(SITE + "issuers:\n  - iss: https://fhir.test-hospital.example/"
                               "api/FHIR/R4\n    jwks_file: epic-keys.json\n"
                               "audiences: [https://cds.example/cds-services]\n")
    assert promote(world, world.evaluation()) == 0
    assert sorted(p.name for p in world.site_file.parent.iterdir()) == [
        "epic-keys.json", "test-hospital.yaml", "test-hospital.yaml.promotions.jsonl"]


def test_active_needs_the_model_to_be_the_shadow_first(world, capsys):
    assert promote(world, world.evaluation(), "--role", "active") == 2
    assert "must be the site's shadow_model first" in capsys.readouterr().err
    assert world.site_file.read_text() == SITE
    assert not world.log.exists()


def test_every_failed_criterion_is_printed_with_value_and_limit(world, capsys):
    # events 12 < min_events 20; AUROC 0.75 < kfre's lower bound 0.78; slope 0.70 outside
    # [0.8, 1.2]; intercept 0.25 outside [-0.2, 0.2].
    evaluation = world.evaluation(events=12, auroc=0.75, slope=0.70, intercept=0.25)
    assert promote(world, evaluation) == 2
    err = capsys.readouterr().err
    assert "criterion min_events: measured 12 events, limit at least 20" in err
    assert ("criterion auroc_not_below: measured AUROC 0.750, limit at least 0.780 "
            "(kfre-4var AUROC lower 95% bound)") in err
    assert "criterion calibration_slope: measured 0.700, limit [0.8, 1.2]" in err
    assert "criterion calibration_intercept: measured 0.250, limit [-0.2, 0.2]" in err
    assert world.site_file.read_text() == SITE


def test_evaluation_of_another_site_or_build_is_refused(world, capsys):
    assert promote(world, world.evaluation(site="other-hospital")) == 2
    assert "site is 'other-hospital', not 'test-hospital'" in capsys.readouterr().err
    fake = SimpleNamespace(id="ckd-progression-lr", version="0.9.0", sha256="ab" * 32)
    assert promote(world, world.evaluation("old", model=fake)) == 2
    assert "evaluates ckd-progression-lr 0.9.0 sha256 abababababab" in capsys.readouterr().err
    assert world.site_file.read_text() == SITE


def test_a_model_not_approved_for_the_role_is_refused(world, capsys):
    manifest = world.candidate / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("- active\n", ""))
    assert promote(world, world.evaluation()) == 0  # shadow is approved
    assert promote(world, world.evaluation("e2"), "--role", "active") == 2
    assert "is not approved for active use" in capsys.readouterr().err


def test_a_copy_outside_models_dir_is_refused(world, tmp_path, capsys):
    copy = tmp_path / "elsewhere" / "ckd-progression-lr"
    shutil.copytree(world.candidate, copy)
    (world.models / "ckd-progression-lr" / "manifest.yaml").write_text(
        (world.models / "ckd-progression-lr" / "manifest.yaml").read_text().replace(
            "\nversion: ", "\nversion: 9", 1))
    world.candidate = copy
    assert promote(world, world.evaluation()) == 2
    assert "install this build there first" in capsys.readouterr().err


def test_missing_evaluation_files_are_said_plainly(world, tmp_path, capsys):
    assert promote(world, tmp_path / "nowhere") == 2
    assert "metrics.json: not found" in capsys.readouterr().err


def test_acceptance_defaults_and_comparator_point_rule():
    assert Acceptance() == parse_acceptance(None)
    assert Acceptance().min_events == 100 and Acceptance().calibration_slope == (0.8, 1.2)
    doc = metrics_doc(events=200, auroc=0.80)  # kfre point 0.82, lower bound 0.78
    assert check_metrics(Acceptance(), doc, "candidate") == []
    strict = Acceptance(auroc_not_below="comparator")
    [failure] = check_metrics(strict, doc, "candidate")
    assert str(failure) == ("auroc_not_below: measured AUROC 0.800, limit at least 0.820 "
                            "(kfre-4var AUROC point estimate)")
    off = Acceptance(auroc_not_below=None, calibration_slope=None, calibration_intercept=None,
                     min_events=None)
    assert check_metrics(off, metrics_doc(events=1, slope=5.0), "candidate") == []
    no_comparator = {**doc, "overall": {**doc["overall"],
                                        "models": doc["overall"]["models"][:1]}}
    [failure] = check_metrics(Acceptance(), no_comparator, "candidate")
    assert "comparator kfre-4var must be evaluated on the same patients" in str(failure)


@pytest.mark.parametrize(("text", "why"), [
    ("site: a\n", "no `services:` block"),
    ("site: a\nservices: {kidney-risk: {}}\n", "not written in block style"),
    ("site: a\nservices:\n  nephrotoxic-order-check: {}\n", "services.kidney-risk is not listed"),
    ("site: a\nservices:\n  kidney-risk: {model: kfre-4var}\n", "not in block style"),
])
def test_layouts_the_editor_cannot_change_safely_are_refused(text, why):
    with pytest.raises(ConfigError, match=why):
        edit_service_models(text, "kidney-risk", {"shadow_model": "x"}, "a.yaml")


def test_an_existing_key_keeps_its_comment_and_quoting_elsewhere():
    text = ("site: a\nservices:\n  kidney-risk:\n    model: kfre-4var  # published KFRE\n"
            "    thresholds:\n      info: 0.03\n  other:\n    model: 'x'\n")
    edited = edit_service_models(text, "kidney-risk", {"model": "new-model"}, "a.yaml")
    assert edited == text.replace("model: kfre-4var  #", "model: new-model  #")


def stamp(world, evaluation, server, *models):
    cohort = evaluation / "cohort"
    cohort.mkdir(exist_ok=True)
    (cohort / "cohort.csv").write_text("patient_id,index_date\n")
    (cohort / "cohort.json").write_text(json.dumps({"export": {"log": {"server": server}}}))
    return main(["models", "provenance", str(evaluation), *models, "--site", "test-hospital",
                 "--cohort", str(cohort)])


def test_provenance_command_records_the_builds_and_the_export_server(world, tmp_path, capsys):
    evaluation = tmp_path / "by-command"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps(metrics_doc()))
    models = (f"candidate={world.candidate}", str(world.models / "kfre-4var"))
    # Exported from another hospital's FHIR server: not this site's data.
    assert stamp(world, evaluation, "https://fhir.elsewhere.example/R4", *models) == 0
    recorded = json.loads((evaluation / "provenance.json").read_text())
    assert recorded["site"] == "test-hospital"
    assert recorded["models"]["kfre-4var"]["id"] == "kfre-4var"
    assert len(recorded["cohort"]["cohort_csv_sha256"]) == 64
    assert promote(world, evaluation) == 2
    assert ("the cohort was exported from https://fhir.elsewhere.example/R4, which is not one of "
            "test-hospital's FHIR servers") in capsys.readouterr().err
    # The site's own server (trailing slash aside): accepted.
    assert stamp(world, evaluation, "https://fhir.test-hospital.example/api/FHIR/R4/",
                 *models) == 0
    assert promote(world, evaluation) == 0


def test_provenance_needs_the_labels_of_metrics_json(world, tmp_path, capsys):
    evaluation = tmp_path / "labels"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps(metrics_doc()))
    assert main(["models", "provenance", str(evaluation), str(world.candidate),
                 "--site", "test-hospital"]) == 2
    assert ("'ckd-progression-lr' is not among" in capsys.readouterr().err)
    assert main(["models", "provenance", str(evaluation), f"candidate={world.candidate}",
                 "--site", "nowhere"]) == 2
    assert "site 'nowhere' is not configured" in capsys.readouterr().err
