"""`cds-service models monitor` on SQLite and on a real PostgreSQL (the `store` fixtures): score
and missingness PSI against a hand-written training reference, and the cards each active
version drove. Times are relative to now, so the window never ages out; every expected number is
worked out by hand in the comments."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cds_service.cli import main
from cds_service.commands.monitor import parse_duration
from cds_service.models.loaded import load_model
from cds_service.records.call import Call
from cds_service.records.feedback import FeedbackItem
from cds_service.records.usage import usage_since

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "kidney-risk"
# Training: half the scores in [0, 0.01], half in (0.02, 0.05]; hba1c missing for 10 %, uacr never.
PROPORTIONS = [0.5, 0, 0.5] + [0] * 10
REFERENCE = {"format": 1, "n": 1000,
             "score_bins": {"edges": [0.0, .01, .02, .05, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1.0],
                            "proportions": PROPORTIONS},
             "missing_rate": {"hba1c": 0.1, "uacr": 0.0}}


@pytest.fixture
def models_dir(tmp_path):
    models = tmp_path / "models"
    for name in ("kfre-4var", "ckd-progression-lr"):
        shutil.copytree(ROOT / "models" / name, models / name)
    manifest = models / "ckd-progression-lr" / "manifest.yaml"
    doc = yaml.safe_load(manifest.read_text())
    doc["monitoring_reference"] = REFERENCE  # not covered by the artifact's sha256
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return models


def prediction(model, role, hook_instance, time, score, *, missing=(), imputed=(),
               site="site-a"):
    return {"time": time, "site": site, "service_id": SERVICE, "hook_instance": hook_instance,
            "role": role, "model_id": model.id, "model_version": model.version,
            "sha256": model.sha256, "output": "risk_5y", "score": score, "indicator": None,
            "unavailable": "missing uacr" if score is None else None,
            "missing": list(missing), "imputed": list(imputed), "contributions": []}


def card(hook_instance, uuid, time, site="site-a"):
    return {"time": time, "site": site, "service_id": SERVICE, "hook_instance": hook_instance,
            "card_uuid": uuid, "user_id": "u1", "patient_id": "p1",
            "topic_system": "http://example.org", "topic_code": "kfre", "indicator": "warning"}


def feedback(uuid, outcome, n=0):
    return FeedbackItem(card=uuid, outcome=outcome, outcome_timestamp=datetime.now(UTC),
                        raw={"card": uuid, "outcome": outcome, "n": n})


@pytest.fixture
def recorded(store, models_dir):
    lr = load_model(models_dir / "ckd-progression-lr")
    kfre = load_model(models_dir / "kfre-4var")
    now = datetime.now(UTC)
    recent, old = now - timedelta(hours=1), now - timedelta(days=3)
    calls = [
        Call(None, [card("h1", "c1", recent)],
             [prediction(lr, "active", "h1", recent, 0.005, imputed=["hba1c"]),
              prediction(kfre, "shadow", "h1", recent, 0.02)]),
        Call(None, [card("h2", "c2", recent)],
             [prediction(lr, "active", "h2", recent, 0.005, imputed=["hba1c"]),
              prediction(kfre, "shadow", "h2", recent, 0.04)]),
        Call(None, [card("h3", "c3", recent)], [prediction(lr, "active", "h3", recent, 0.03)]),
        Call(None, [card("h4", "c4", recent)], [prediction(lr, "active", "h4", recent, 0.25)]),
        Call(None, [], [prediction(lr, "active", "h5", recent, None, missing=["uacr"])]),
        # Outside a 24-hour window, and another site: neither counts below.
        Call(None, [card("h6", "c6", old)], [prediction(lr, "active", "h6", old, 0.9)]),
        Call(None, [card("h7", "c7", recent, "site-b")],
             [prediction(lr, "active", "h7", recent, 0.9, site="site-b")]),
    ]
    store.add_calls(calls)
    store.insert_feedback("site-a", SERVICE, [
        feedback("c1", "accepted"), feedback("c2", "overridden"),
        # c3 overridden twice (two different feedback items): one card.
        feedback("c3", "overridden", 1), feedback("c3", "overridden", 2),
        feedback("c6", "overridden")])
    return lr, kfre


def test_usage_joins_cards_to_the_active_version_that_drove_them(store, recorded):
    lr, kfre = recorded
    usage = usage_since(store, datetime.now(UTC) - timedelta(hours=24), "site-a")
    active = usage[("site-a", SERVICE, lr.id, lr.version, lr.sha256, "active")]
    assert active.predictions == 5 and sorted(active.scores) == [0.005, 0.005, 0.03, 0.25]
    assert active.missing == {"hba1c": 2, "uacr": 1}
    # c1..c4 issued; c1 accepted; c2 and c3 overridden (c3 counted once); c4 no feedback.
    assert (active.cards, active.accepted, active.overridden) == (4, 1, 2)
    shadow = usage[("site-a", SERVICE, kfre.id, kfre.version, kfre.sha256, "shadow")]
    assert shadow.predictions == 2 and shadow.cards == 0
    assert len(usage) == 2
    with pytest.raises(ValueError, match="timezone-aware"):
        usage_since(store, datetime.now(), None)  # noqa: DTZ005


def test_monitor_report_and_gauges(store_url, store, recorded, models_dir, tmp_path,
                                   monkeypatch, capsys):
    monkeypatch.setenv("CDS_DATABASE_URL", store_url)
    monkeypatch.setenv("CDS_MODELS_DIR", str(models_dir))
    out, prom = tmp_path / "report.md", tmp_path / "textfile" / "cds_models.prom"
    assert main(["models", "monitor", "--site", "site-a", "--since", "24h", "--out", str(out),
                 "--prom-file", str(prom)]) == 0
    report = out.read_text()
    lr, _ = recorded
    assert f"## ckd-progression-lr {lr.version} (active) — site-a / kidney-risk" in report
    # Live scores 0.005, 0.005, 0.03, 0.25: bins [0, .01] 50 %, (.02, .05] 25 %, (.2, .3] 25 %.
    # PSI = 0 (first bin equal) + (0.25 − 0.5)·ln(0.25/0.5) [= 0.173287]
    #     + (0.25 − 0.0001)·ln(0.25/0.0001) [reference empty, floored; = 0.2499·7.824046 =
    #       1.955229] = 2.128516
    assert "score PSI: **2.129** (significant shift)" in report
    assert "| (0.2, 0.3] | 0.0 % | 25.0 % |" in report
    # hba1c missing in 2 of 5 predictions (imputed), reference 10 %:
    #   0.3·ln(4) + (−0.3)·ln(0.6/0.9) = 0.415888 + 0.121640 = 0.537528
    assert "| hba1c | 10.0 % | 40.0 % | 0.538 |" in report
    # uacr missing in 1 of 5 (the unscored call), reference 0 (floored at 1e-4):
    #   0.1999·ln(2000) + (−0.2)·ln(0.8) = 1.519420 + 0.044629 = 1.564049
    assert "| uacr | 0.0 % | 20.0 % | 1.564 |" in report
    # 1 accepted and 2 overridden of 3 cards with feedback: 33.3 % and 66.7 %.
    assert "Cards: 4 issued, 3 with feedback: 1 accepted (33.3 %), 2 overridden (66.7 %)." \
        in report
    assert "kfre-4var" in report and "no monitoring_reference in the manifest" in report

    samples = {(s.name, s.labels.get("role"), s.labels.get("input")): s.value
               for family in text_string_to_metric_families(prom.read_text())
               for s in family.samples if s.labels.get("site", "site-a") == "site-a"}
    assert samples[("cds_model_score_psi", "active", None)] == pytest.approx(2.128516, abs=1e-5)
    assert samples[("cds_model_input_missing_psi", "active", "hba1c")] == pytest.approx(
        0.537528, abs=1e-6)
    assert samples[("cds_model_input_missing_ratio", "active", "uacr")] == pytest.approx(0.2)
    assert samples[("cds_model_card_override_ratio", "active", None)] == pytest.approx(2 / 3)
    assert samples[("cds_model_card_feedback", "active", None)] == 3
    assert samples[("cds_model_predictions", "shadow", None)] == 2
    assert ("cds_model_score_psi", "shadow", None) not in samples  # no reference: no PSI
    last_run = samples[("cds_model_monitor_last_run_timestamp_seconds", None, None)]
    assert abs(last_run - datetime.now(UTC).timestamp()) < 600


def test_an_empty_window_is_a_report_too(store_url, store, models_dir, monkeypatch, capsys):
    monkeypatch.setenv("CDS_DATABASE_URL", store_url)
    monkeypatch.setenv("CDS_MODELS_DIR", str(models_dir))
    assert main(["models", "monitor", "--since", "90m"]) == 0
    assert "No predictions in the window." in capsys.readouterr().out


@pytest.mark.parametrize(("text", "hours"), [("90m", 1.5), ("24h", 24), ("7d", 168),
                                             ("2w", 336)])
def test_durations(text, hours):
    assert parse_duration(text) == timedelta(hours=hours)


@pytest.mark.parametrize("text", ["", "0h", "24", "1y", "-3d", "1.5h"])
def test_a_bad_duration_is_refused_with_examples(text, capsys):
    with pytest.raises(SystemExit):
        main(["models", "monitor", f"--since={text}"])
    assert "a duration is a whole number and m, h, d or w" in capsys.readouterr().err
