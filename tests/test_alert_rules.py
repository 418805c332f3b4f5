"""The alert rules, their promtool unit tests, the Grafana dashboard and docs/operations.md agree.

promtool (Debian package `prometheus`, installed by `make test-tools`) checks the rules and runs
ops/prometheus/cds-alerts.test.yml. The rest is drift: every alert has a runbook entry its
annotation links to, every metric a rule or panel reads is in the catalogue, every catalogued
metric is on the dashboard, and every panel has a query that parses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "ops/prometheus/cds-alerts.yml"
RULE_TESTS = ROOT / "ops/prometheus/cds-alerts.test.yml"
DASHBOARD = ROOT / "ops/grafana/cds-dashboard.json"
OPERATIONS = ROOT / "docs/operations.md"

HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")
# Grafana's variables, replaced by values PromQL accepts so promtool can parse a panel's query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h",
                     "$site": ".*", "$model": "kfre-4var"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; CI must run `make test-tools` first")
        pytest.skip("promtool is not installed: `make test-tools` installs it (Debian prometheus)")
    return path


def run_promtool(promtool: str, *args: str | Path) -> None:
    result = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, (
        f"promtool {' '.join(map(str, args))} exited {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}")


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]


def rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def query_panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in query_panels() for target in panel.get("targets", ())]


def template_queries() -> list[str]:
    variables = dashboard()["templating"]["list"]
    return [v["query"]["query"] for v in variables if v["type"] == "query"]


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def section(markdown: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"docs/operations.md has no '## {title}' section"
    return match.group(1)


def catalogue() -> dict[str, str]:
    """Metric name → type, from the table in the Metrics section of docs/operations.md."""
    text = section(OPERATIONS.read_text(encoding="utf-8"), "Metrics")
    return dict(re.findall(r"^\| `(cds_\w+)` \| (\w+) \|", text, re.M))


def monitor_catalogue() -> dict[str, str]:
    """The gauges `cds-service models monitor` writes, from docs/operations.md "Model
    monitoring" (a separate table: a scheduled job exports them, not the service)."""
    text = section(OPERATIONS.read_text(encoding="utf-8"), "Model monitoring")
    return dict(re.findall(r"^\| `(cds_\w+)` \| (\w+) \|", text, re.M))


def metric_names(expr: str) -> set[str]:
    """Series a PromQL expression reads: `cds_*` metric names and recorded `level:metric:op`
    names. Quoted strings (label values, regexes) are left out."""
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    unquoted = re.sub(r"\[[^\]]*\]", "", unquoted)  # ranges and subqueries: [5m], [7d:1h]
    tokens = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", unquoted)
    return {t for t in tokens if t.startswith("cds_") or ":" in t}


def catalogued(name: str, known: dict[str, str]) -> bool:
    if name in known:
        return True
    base, _, suffix = name.rpartition("_")
    return f"_{suffix}" in HISTOGRAM_SERIES and known.get(base) == "histogram"


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (le) (rate(cds_x_seconds_bucket{site=~"$site", hook!="cds_y"}[5m]))',
     {"cds_x_seconds_bucket"}),
    ("site:cds_requests:rate5m * 300 >= 10 unless on (site) cds_requests_total",
     {"site:cds_requests:rate5m", "cds_requests_total"}),
    ("label_values(cds_requests_total, site)", {"cds_requests_total"}),
    ("avg_over_time(site:cds_x:24h[7d:1h] offset 1d)", {"site:cds_x:24h"}),
])
def test_metric_names_reads_metrics_and_recorded_series_only(expr, names):
    assert metric_names(expr) == names


def test_catalogue_lists_every_metric_with_its_type():
    from prometheus_client.metrics import MetricWrapperBase

    from cds_service.ops import metrics

    known = catalogue()
    exported = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            suffix = "_total" if metric._type == "counter" else ""
            exported[metric._name + suffix] = metric._type
    assert known == exported  # the docs name exactly what the service exports
    assert known["cds_requests_total"] == "counter"
    assert known["cds_request_duration_seconds"] == "histogram"
    assert catalogued("cds_request_duration_seconds_bucket", known)
    assert not catalogued("cds_requests_total_bucket", known)
    assert not catalogued("cds_request_seconds_count", known)


def test_monitor_catalogue_lists_every_gauge_the_monitor_writes():
    from cds_service.ops.model_monitor import METRICS

    assert monitor_catalogue() == dict.fromkeys(METRICS, "gauge")
    assert not set(monitor_catalogue()) & set(catalogue())


def test_promtool_check_rules(promtool):
    run_promtool(promtool, "check", "rules", RULES)


def test_promtool_test_rules(promtool):
    """Every alert fires on a bad series and stays silent on healthy ones; the traffic alert
    fires when a site's calls stop or its series vanish, not while they flow, not after a
    counter reset, and not for a site that never had traffic."""
    run_promtool(promtool, "test", "rules", RULE_TESTS)


def test_every_alert_is_unit_tested_firing_and_silent():
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", ())]
    for alert in alerts():
        mine = [case for case in cases if case["alertname"] == alert["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{alert['alert']}: never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{alert['alert']}: never silent"


def test_every_site_alert_names_the_site_and_every_alert_links_its_runbook_entry():
    doc = OPERATIONS.read_text(encoding="utf-8")
    headings = {heading_anchor(h): h for h in re.findall(r"^### (.+)$", doc, re.M)}
    names = [alert["alert"] for alert in alerts()]
    assert len(names) == 12
    for alert in alerts():
        name, annotations = alert["alert"], alert["annotations"]
        assert heading_anchor(name) in headings, f"{name}: no '### {name}' in docs/operations.md"
        assert annotations["runbook_url"] == f"docs/operations.md#{heading_anchor(name)}"
        # The shared store's alerts are about every site at once: they name none.
        if re.search(r"\bby \(site\b", alert["expr"]) or "site:" in alert["expr"] \
                or "site_" in alert["expr"]:
            assert "{{ $labels.site }}" in annotations["summary"], name
        assert annotations["description"].strip(), name
        assert alert["labels"]["severity"] in ("page", "ticket"), name


def test_every_metric_in_rules_and_dashboard_is_catalogued():
    known = catalogue() | monitor_catalogue()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set()
    for expr in [rule["expr"] for rule in rules()] + dashboard_queries() + template_queries():
        used |= metric_names(expr)
    unknown = sorted(name for name in used
                     if (name not in recorded if ":" in name else not catalogued(name, known)))
    assert unknown == []
    assert recorded <= used, "a recording rule nothing reads"


def test_every_catalogued_metric_is_on_the_dashboard():
    used = set()
    for expr in dashboard_queries():
        used |= metric_names(expr)
    missing = sorted(name for name in catalogue() | monitor_catalogue()
                     if name not in used
                     and not any(name + suffix in used for suffix in HISTOGRAM_SERIES))
    assert missing == []


def test_dashboard_uses_the_datasource_input_and_the_site_variable():
    board = dashboard()
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["site"]["query"]["query"] == "label_values(cds_requests_total, site)"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in query_panels():
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        exprs = [target.get("expr", "").strip() for target in panel.get("targets", ())]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no query"
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in panel["targets"])


def test_dashboard_queries_parse_as_promql(promtool, tmp_path):
    queries = []
    for expr in dashboard_queries():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        queries.append(expr)
    recorded = [{"record": f"dashboard:query_{n}:check", "expr": q}
                for n, q in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}),
                    encoding="utf-8")
    run_promtool(promtool, "check", "rules", path)
