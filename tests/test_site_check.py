"""`cds-service site check SITE` against a real local FHIR server
(tests/helpers/fhir_server.py) serving CapabilityStatements and JWK Sets, with real site YAML
files and the registered services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cds_service.cli import main
from cds_service.config import Site
from cds_service.ops.sitecheck import FAIL, OK, WARN, Capabilities, SiteCheckError, check_template
from cds_service.ops.sitecheck import fhir_bases as bases_of
from cds_service.trust.site_issuers import IssuerSpec
from tests.conftest import TEST_ISS
from tests.helpers.fhir_server import operation_outcome

CLI = str(Path(sys.executable).parent / "cds-service")

_PARAM_TYPES = {"patient": "reference", "date": "date", "_count": "number", "_sort": "string"}
# What an Epic R4 endpoint declares for the resources the kidney services read: `_count` on
# Observation, no `_sort` anywhere.
EPIC_LIKE = {
    "Observation": (("read", "search-type"), ("patient", "code", "category", "date", "_count")),
    "Patient": (("read",), ()),
    "MedicationRequest": (("read", "search-type"), ("patient", "status")),
    "Condition": (("read", "search-type"), ("patient", "clinical-status")),
}
ALL_ORDERABLES = """\
orderables:
  nephrology-referral:
    system: urn:com.epic.cdshooks.action.code.system.preference-list-item
    code: "118732"
    display: AMB REFERRAL TO NEPHROLOGY
  urine-acr:
    system: urn:com.epic.cdshooks.action.code.system.preference-list-item
    code: "52104"
    display: MICROALBUMIN/CREATININE RATIO, RANDOM URINE
  acetaminophen:
    system: urn:com.epic.cdshooks.action.code.system.preference-list-item
    code: "31001"
    display: acetaminophen (TYLENOL) 500 MG tablet
"""


def statement(resources=EPIC_LIKE, *, common=(), version="4.0.1") -> dict:
    def params(names):
        return [{"name": n, "type": _PARAM_TYPES.get(n, "token")} for n in names]

    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2024-11-01",
        "kind": "instance",
        "software": {"name": "Epic", "version": "November 2024"},
        "fhirVersion": version,
        "format": ["json", "xml"],
        "rest": [{
            "mode": "server",
            "searchParam": params(common),
            "resource": [{"type": t, "interaction": [{"code": c} for c in interactions],
                          "searchParam": params(names)}
                         for t, (interactions, names) in resources.items()],
        }],
    }


# Every parameter the templates use, with `_sort` and `_count` declared for all resources.
FULL = statement(
    {t: (interactions, [p for p in names if p != "_count"])
     for t, (interactions, names) in EPIC_LIKE.items()}, common=("_sort", "_count"))


@pytest.fixture
def make_site(tmp_path, test_jwks_file):
    """Write a real site file; the default issuer trusts the session's test JWK Set."""

    def make(*, fhir_server: str | None = None, issuers: str | None = None,
             orderables: str = ALL_ORDERABLES, allow_http: bool = True, extra: str = "") -> str:
        issuers = issuers or f"  - iss: {TEST_ISS}\n    jwks_file: {test_jwks_file}\n"
        text = ("# go-live check test site\nsite: go-live\n"
                + (f"fhir_server: {fhir_server}\n" if fhir_server else "")
                + f"prefetch:\n  allow_http_loopback: {str(allow_http).lower()}\n"
                + "issuers:\n" + issuers + orderables + extra)
        path = tmp_path / "go-live.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return make


@pytest.fixture
def site_config_env(monkeypatch):
    """main() exports --site-config as CDS_SITE_CONFIG: restore it after the test (setenv
    records the original state, which a delenv of an unset variable would not)."""
    monkeypatch.setenv("CDS_SITE_CONFIG", "")
    monkeypatch.delenv("CDS_SITE_CONFIG")


@pytest.fixture
def run(capsys, site_config_env):
    """`cds-service site check ...` in-process; `--json` output is parsed."""

    def _run(site_config: str, *args: str) -> tuple[int, object, str]:
        code = main(["site", "check", "go-live", "--site-config", site_config, *args])
        captured = capsys.readouterr()
        out = json.loads(captured.out) if "--json" in args and captured.out else captured.out
        return code, out, captured.err

    return _run


def rows(report: dict, *statuses: str) -> set[tuple[str, str, str]]:
    return {(c["service"], c["key"], c["check"]) for c in report["checks"]
            if c["status"] in statuses}


# -- the CapabilityStatement ----------------------------------------------------------------


def test_the_shipped_templates_pass_an_epic_like_statement(fhir_server, make_site, run):
    # No template sends `_sort` (Epic lists none) or `_count`: nothing depends on the order.
    fhir_server.add("metadata", json=statement())
    code, report, err = run(make_site(fhir_server=fhir_server.url), "--json")

    assert code == 0, err
    assert (report["failures"], report["warnings"]) == (0, 0)
    assert not any(c["check"].startswith(("_sort", "_count")) for c in report["checks"])
    assert ("kidney-risk", "egfr", "param code") in rows(report, OK)
    assert ("kidney-risk", "patient", "Patient read") in rows(report, OK)
    assert ("kidney-risk", "conditions", "param clinical-status") in rows(report, OK)
    assert report["servers"] == [{"base": fhir_server.url, "software": "Epic November 2024",
                                  "fhirVersion": "4.0.1"}]
    # One unauthenticated GET, asking for FHIR JSON.
    [request] = fhir_server.requests
    assert (request.method, request.path) == ("GET", "metadata")
    assert request.headers["accept"] == "application/fhir+json"
    assert "authorization" not in request.headers


# Templates as an Epic team might have typed them into the OPA record.
EGFR_CODES = "http://loinc.org|62238-1,http://loinc.org|98979-8"
SORTED_TEMPLATES = f"""\
services:
  kidney-risk:
    prefetch:
      egfr: "Observation?patient={{{{context.patientId}}}}&code={EGFR_CODES}&_sort=-date&_count=5"
      creatinine: "Observation?patient={{{{context.patientId}}}}&code=http://loinc.org|2160-0&_sort=-date"
  nephrotoxic-order-check:
    prefetch:
      egfr: "Observation?patient={{{{context.patientId}}}}&code={EGFR_CODES}&_count=5"
"""


def test_an_ignored_sort_fails_only_where_count_pages_the_servers_order(
        fhir_server, make_site, run):
    fhir_server.add("metadata", json=statement())
    code, report, err = run(make_site(fhir_server=fhir_server.url, extra=SORTED_TEMPLATES),
                            "--json")

    assert code == 1, err
    assert rows(report, FAIL) == {("kidney-risk", "egfr", "_sort -date")}
    assert rows(report, WARN) == {("kidney-risk", "creatinine", "_sort -date"),
                                  ("nephrotoxic-order-check", "egfr", "_count 5")}
    assert ("kidney-risk", "egfr", "_count 5") in rows(report, OK)
    detail = {(c["service"], c["key"], c["check"]): c["detail"] for c in report["checks"]}
    assert "drop `_sort` and `_count`" in detail["kidney-risk", "egfr", "_sort -date"]
    assert "the services take the newest by date" in detail["kidney-risk", "creatinine",
                                                            "_sort -date"]
    assert "drop `_count`" in detail["nephrotoxic-order-check", "egfr", "_count 5"]


def test_the_text_table_names_the_failure_and_counts(fhir_server, make_site, run):
    fhir_server.add("metadata", json=statement())
    code, out, _ = run(make_site(fhir_server=fhir_server.url, extra=SORTED_TEMPLATES))

    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("site go-live (")
    assert f"FHIR server {fhir_server.url} (Epic November 2024)" in lines
    failing = [line.split() for line in lines if " FAIL " in line]
    assert [f[:5] for f in failing] == [["kidney-risk", "egfr", "_sort", "-date", "FAIL"]]
    assert "prefetch.max_pages" in " ".join(failing[0][5:])
    assert lines[-1] == "1 failure, 2 warnings"


def test_a_full_statement_passes(fhir_server, make_site, run):
    fhir_server.add("metadata", json=FULL)
    code, out, err = run(make_site(fhir_server=fhir_server.url))

    assert code == 0, out + err
    assert out.splitlines()[-1] == "0 failures, 0 warnings"
    assert "FAIL" not in out


def test_a_missing_search_parameter_fails_required_keys_only(fhir_server, make_site, run):
    resources = dict(EPIC_LIKE, Observation=(("read", "search-type"), ("patient", "_count")))
    fhir_server.add("metadata", json=statement(resources, common=("_sort",)))
    code, report, _ = run(make_site(fhir_server=fhir_server.url), "--json")

    assert code == 1
    # Without `code` the server would answer every Observation of the patient as "eGFR".
    assert rows(report, FAIL) == {("kidney-risk", "egfr", "param code"),
                                  ("nephrotoxic-order-check", "egfr", "param code")}
    assert ("kidney-risk", "hba1c", "param code") in rows(report, WARN)


def test_a_non_r4_server_fails(fhir_server, make_site, run):
    fhir_server.add("metadata", json={**FULL, "fhirVersion": "1.0.2"})
    code, report, _ = run(make_site(fhir_server=fhir_server.url), "--json")

    assert code == 1
    assert rows(report, FAIL) == {("server", "-", "fhirVersion")}


def test_fhir_base_option_overrides_the_site(fhir_server_factory, make_site, run):
    configured, other = fhir_server_factory(), fhir_server_factory()
    other.add("metadata", json=FULL)
    code, report, _ = run(make_site(fhir_server=configured.url), "--json",
                          "--fhir-base", other.url + "/")

    assert code == 0
    assert [s["base"] for s in report["servers"]] == [other.url]
    assert configured.requests == []


@pytest.mark.parametrize(("answer", "message"), [
    ({"status": 500, "json": operation_outcome()}, "FHIR server answered 500"),
    ({"body": "<html>Service Unavailable</html>"}, "body that is not JSON"),
    ({"json": operation_outcome("error", "security")},
     "resourceType 'OperationOutcome', not a CapabilityStatement"),
    ({"json": ["CapabilityStatement"]}, "JSON that is not a FHIR resource"),
    ({"json": {**FULL, "rest": [{"mode": "client"}]}}, "no rest entry with mode `server`"),
    ({"delay": 2, "json": FULL}, "did not answer within the deadline"),
])
def test_unusable_metadata_is_a_clear_error(fhir_server, make_site, run, answer, message):
    fhir_server.add("metadata", **answer)
    # Only the slow server needs a short deadline; the others get one a loaded machine (CI's
    # two cores, a cold first connection) cannot overrun, or they fail as "did not answer".
    timeout = "0.5" if "delay" in answer else "10"
    code, out, err = run(make_site(fhir_server=fhir_server.url), "--timeout", timeout)

    assert code == 2
    assert out == ""
    [line] = [line for line in err.splitlines() if line.startswith("site check: ")]
    assert f"{fhir_server.url}/metadata" in line
    assert message in line
    assert "Traceback" not in err


def test_an_unreachable_server_is_a_clear_error(fhir_server_factory, make_site, run):
    gone = fhir_server_factory()
    gone.close()
    code, _, err = run(make_site(fhir_server=gone.url))

    assert code == 2
    assert f"site check: cannot read {gone.url}/metadata: FHIR server could not be reached" in err


def test_json_output_reports_a_check_that_cannot_run(fhir_server_factory, make_site, run):
    gone = fhir_server_factory()
    gone.close()
    code, out, err = run(make_site(fhir_server=gone.url), "--json")

    assert code == 2
    assert out == {"site": "go-live", "error": f"cannot read {gone.url}/metadata: FHIR server "
                                               "could not be reached"}
    # The log names the URL that failed (no `?`), as the error does.
    assert f"FHIR GET {gone.url}/metadata failed after " in err
    assert "Traceback" not in err


def test_json_output_reports_a_failing_server(fhir_server, make_site, run):
    fhir_server.add("metadata", status=503, json=operation_outcome("error", "transient"))
    code, out, err = run(make_site(fhir_server=fhir_server.url), "--json")

    assert code == 2
    assert out["error"] == f"cannot read {fhir_server.url}/metadata: FHIR server answered 503"
    assert f"FHIR GET {fhir_server.url}/metadata -> 503 in " in err


@pytest.mark.parametrize(("site", "extra", "message"), [
    ("no-such-site", "", "no site 'no-such-site' in "),
    ("go-live", "sandbx: true\n", "sandbx: unknown key; did you mean `sandbox`?"),
])
def test_json_output_reports_configuration_errors(make_site, capsys, site_config_env, site,
                                                  extra, message):
    code = main(["site", "check", site, "--json", "--site-config", make_site(extra=extra)])
    captured = capsys.readouterr()

    assert code == 2
    report = json.loads(captured.out)
    assert report["site"] == site and message in report["error"]
    assert f"site check: {report['error']}" in captured.err


def test_plain_http_needs_the_sites_loopback_allowance(fhir_server, make_site, run):
    fhir_server.add("metadata", json=FULL)
    code, _, err = run(make_site(fhir_server=fhir_server.url, allow_http=False))

    assert code == 2
    assert "fhir_server: fhirServer is not https" in err
    assert "prefetch.allow_http_loopback" in err
    assert fhir_server.requests == []


# -- configuration errors -------------------------------------------------------------------


def test_an_unknown_site_is_a_usage_error(make_site, capsys, site_config_env):
    code = main(["site", "check", "no-such-site", "--site-config", make_site()])
    err = capsys.readouterr().err

    assert code == 2
    assert "site check: no site 'no-such-site' in " in err
    assert "(configured: go-live)" in err


def test_an_invalid_fhir_server_key_names_the_key(make_site, run):
    code, _, err = run(make_site(fhir_server="not a url"))

    assert code == 2
    assert "fhir_server" in err and "Traceback" not in err


def test_a_site_without_a_fhir_base_is_a_usage_error(make_site, run, test_jwks_file):
    # No fhir_server, and the only issuer's iss is not an https FHIR base.
    code, out, err = run(make_site(
        issuers=f"  - iss: urn:example:ehr\n    jwks_file: {test_jwks_file}\n"))

    assert (code, out) == (2, "")
    assert "site check: site go-live: no FHIR server to check: pass --fhir-base URL" in err


# -- FHIR base selection --------------------------------------------------------------------


def _site(*isss: str, fhir_server: str | None = None) -> Site:
    issuers = tuple(IssuerSpec(iss=i, jku=("https://ehr.example/jwks",)) for i in isss)
    return Site(id="s", source="s.yaml", services={}, issuers=issuers, fhir_server=fhir_server)


def test_epic_issuers_are_the_fhir_bases():
    site = _site("https://ehr.example.org/api/FHIR/R4/", "https://ehr.example.org/api/FHIR/R4",
                 "urn:oid:1.2.3", "https://other.example.org/FHIR/R4")
    assert bases_of(site) == [
        ("s.yaml: issuers[0].iss", "https://ehr.example.org/api/FHIR/R4"),
        ("s.yaml: issuers[3].iss", "https://other.example.org/FHIR/R4"),
    ]


def test_fhir_server_and_the_option_take_precedence():
    site = _site("https://ehr.example.org/api/FHIR/R4", fhir_server="https://fhir.example/R4")
    assert bases_of(site) == [("s.yaml: fhir_server", "https://fhir.example/R4")]
    assert bases_of(site, "https://x.example/R4") == [("--fhir-base", "https://x.example/R4")]


def test_no_https_issuer_and_no_fhir_server_is_an_error():
    with pytest.raises(SiteCheckError, match="pass --fhir-base URL or set `fhir_server`"):
        bases_of(_site("http://ehr.example.org/api/FHIR/R4", "urn:example"))


# -- one template against the capabilities --------------------------------------------------

EGFR = ("Observation?patient={{context.patientId}}&code=http://loinc.org|33914-3"
        "&_sort=-date&_count=5")


@pytest.mark.parametrize(("template", "required", "expected"), [
    (EGFR, True, [("Observation search-type", OK), ("param patient", OK), ("param code", OK),
                  ("_sort -date", FAIL), ("_count 5", OK)]),
    (EGFR, False, [("Observation search-type", OK), ("param patient", OK),
                   ("param code", OK), ("_sort -date", WARN), ("_count 5", OK)]),
    # Without `_count` an ignored `_sort` loses nothing: the services order by date.
    (EGFR.replace("&_count=5", ""), True,
     [("Observation search-type", OK), ("param patient", OK), ("param code", OK),
      ("_sort -date", WARN)]),
    # `_count` alone pages the server's order.
    (EGFR.replace("&_sort=-date", ""), True,
     [("Observation search-type", OK), ("param patient", OK), ("param code", OK),
      ("_count 5", WARN)]),
    ("Patient/{{context.patientId}}", True, [("Patient read", OK)]),
    ("Practitioner/{{userPractitionerId}}", True, [("Practitioner read", FAIL)]),
    ("Practitioner/{{userPractitionerId}}", False, [("Practitioner read", WARN)]),
    ("Patient?identifier=urn:mrn|1", True, [("Patient search-type", FAIL)]),
    ("Condition?patient={{context.patientId}}&category=problem-list-item", True,
     [("Condition search-type", OK), ("param patient", OK), ("param category", FAIL)]),
    ("MedicationRequest?patient={{context.patientId}}&_count=10", True,
     [("MedicationRequest search-type", OK), ("param patient", OK), ("_count 10", WARN)]),
    ("Observation?patient={{context.patientId}}&code:in=http://example.org/vs", True,
     [("Observation search-type", OK), ("param patient", OK), ("param code:in", WARN)]),
    ("Observation?patient={{context.patientId}}&code:text=egfr", True,
     [("Observation search-type", OK), ("param patient", OK), ("param code:text", WARN)]),
    ("Observation?subject.name=x", True,
     [("Observation search-type", OK), ("param subject.name", WARN)]),
    ("{{context.userId}}", True, [("read", WARN)]),
])
def test_template_checks(template, required, expected):
    caps = Capabilities.parse(statement(), "test")
    result = check_template("svc", "key", template, caps, required=required)
    assert [(r.check, r.status) for r in result] == expected


def test_sort_and_count_in_rest_search_param_count_for_every_resource():
    caps = Capabilities.parse(statement(common=("_sort",)), "test")
    assert [r.status for r in check_template("svc", "k", EGFR, caps, required=True)] == [OK] * 5


def test_a_resource_listed_without_interactions_is_not_assumed_searchable():
    caps = Capabilities.parse(statement({"Observation": ((), ("patient",))}), "test")
    [row] = check_template("svc", "k", EGFR, caps, required=True)
    assert (row.check, row.status) == ("Observation search-type", FAIL)
    assert "interactions: none" in row.detail


# -- models ---------------------------------------------------------------------------------


def test_a_model_not_approved_for_its_use_fails_the_check(fhir_server, make_site, run):
    # ckd-progression-lr's manifest: approved_use [shadow] (synthetic training data).
    fhir_server.add("metadata", json=FULL)
    extra = ("services:\n  kidney-risk:\n    model: ckd-progression-lr\n"
             "    shadow_model: kfre-4var\n  nephrotoxic-order-check:\n"
             "    thresholds: {critical: {output: risk_9y, above: 0.4}}\n")
    code, report, _ = run(make_site(fhir_server=fhir_server.url, extra=extra), "--json")

    assert code == 1
    models = {(c["service"], c["key"]): (c["status"], c["detail"])
              for c in report["checks"] if c["section"] == "models"}
    status, detail = models[("kidney-risk", "model")]
    assert status == FAIL and detail.startswith(
        "ckd-progression-lr is not approved for active use ("), detail
    assert detail.endswith("ckd-progression-lr/manifest.yaml: approved_use: [shadow])"), detail
    assert models[("kidney-risk", "shadow_model")] == (
        OK, "kfre-4var 1.0.0: approved_use: [active, shadow]")
    assert models[("nephrotoxic-order-check", "model")][0] == OK
    status, detail = models[("nephrotoxic-order-check", "thresholds")]
    assert status == FAIL and "thresholds.critical.output" in detail
    assert "no output 'risk_9y'" in detail


# -- orderables -----------------------------------------------------------------------------


def test_a_missing_orderable_is_a_warning(fhir_server, make_site, run):
    fhir_server.add("metadata", json=FULL)
    only_referral = ALL_ORDERABLES.split("  urine-acr:")[0]
    code, report, _ = run(make_site(fhir_server=fhir_server.url, orderables=only_referral),
                          "--json")

    assert code == 0
    orderables = {(c["service"], c["key"]): (c["status"], c["detail"])
                  for c in report["checks"] if c["section"] == "orderables"}
    assert orderables[("kidney-risk", "nephrology-referral")] == (
        OK, "118732 AMB REFERRAL TO NEPHROLOGY")
    status, detail = orderables[("kidney-risk", "urine-acr")]
    assert status == WARN and "urine albumin/creatinine ratio' suggestion is left out" in detail
    status, detail = orderables[("nephrotoxic-order-check", "acetaminophen")]
    assert status == WARN and "drafts RxNorm ingredient 161" in detail
    assert report["warnings"] == 2


# -- JWT issuers ----------------------------------------------------------------------------


def _jku_site(make_site, url: str, fhir_url: str) -> str:
    return make_site(fhir_server=fhir_url, issuers=f"  - iss: {TEST_ISS}\n    jku: [{url}]\n",
                     extra="jwt:\n  allow_http_loopback_jku: true\n")


def test_an_allow_listed_jku_serving_a_jwk_set_is_ok(fhir_server, make_site, run,
                                                     test_jwks_file):
    fhir_server.add("metadata", json=FULL)
    fhir_server.add("keys/530013", json=json.loads(test_jwks_file.read_text()))
    url = fhir_server.url_for("keys/530013")
    code, report, _ = run(_jku_site(make_site, url, fhir_server.url), "--json")

    assert code == 0
    [row] = [c for c in report["checks"] if c["section"] == "issuers"]
    assert (row["key"], row["check"], row["status"]) == (TEST_ISS, "jku[0]", OK)
    assert row["detail"] == f"{url}: 1 signing key"
    assert len(fhir_server.requests_for("keys/530013")) == 1


def test_an_unreachable_jku_fails(fhir_server, make_site, run):
    fhir_server.add("metadata", json=FULL)
    url = fhir_server.url_for("keys/missing")
    code, report, _ = run(_jku_site(make_site, url, fhir_server.url), "--json")

    assert code == 1
    [row] = [c for c in report["checks"] if c["status"] == FAIL]
    assert (row["check"], row["detail"]) == ("jku[0]", f"{url}: HTTP 404")


def test_a_jku_serving_no_usable_key_fails(fhir_server, make_site, run, test_jwks_file):
    fhir_server.add("metadata", json=FULL)
    [key] = json.loads(test_jwks_file.read_text())["keys"]
    fhir_server.add("keys", json={"keys": [{**key, "use": "enc"}]})
    code, report, _ = run(_jku_site(make_site, fhir_server.url_for("keys"), fhir_server.url),
                          "--json")

    assert code == 1
    assert rows(report, FAIL) == {("issuer", TEST_ISS, "jku[0]")}


def test_a_jwks_file_the_verifier_refuses_fails(fhir_server, make_site, run, tmp_path,
                                                test_jwks_file):
    # Loads as configuration (each key public, with a kid) but two keys share one kid, so the
    # verifier would refuse to start with it.
    fhir_server.add("metadata", json=FULL)
    [key] = json.loads(test_jwks_file.read_text())["keys"]
    bad = tmp_path / "rotated.jwks.json"
    bad.write_text(json.dumps({"keys": [key, key]}), encoding="utf-8")
    code, report, _ = run(make_site(fhir_server=fhir_server.url,
                                    issuers=f"  - iss: {TEST_ISS}\n    jwks_file: {bad}\n"),
                          "--json")

    assert code == 1
    [row] = [c for c in report["checks"] if c["status"] == FAIL]
    assert (row["key"], row["check"]) == (TEST_ISS, "jwks_file")
    assert row["detail"].startswith(f"{bad}: JWK Set: keys[1] repeats kid")


def test_a_valid_jwks_file_is_ok(fhir_server, make_site, run, test_jwks_file):
    fhir_server.add("metadata", json=FULL)
    code, report, _ = run(make_site(fhir_server=fhir_server.url), "--json")

    assert code == 0
    assert [(c["check"], c["status"], c["detail"]) for c in report["checks"]
            if c["section"] == "issuers"] == [("jwks_file", OK, f"{test_jwks_file}: 1 signing key")]


def test_a_jwks_file_that_is_not_json_is_a_configuration_error(make_site, run, tmp_path):
    bad = tmp_path / "broken.jwks.json"
    bad.write_text("{not json", encoding="utf-8")
    code, _, err = run(make_site(fhir_server="https://fhir.example.org/R4",
                                 issuers=f"  - iss: {TEST_ISS}\n    jwks_file: {bad}\n"))

    assert code == 2
    assert "issuers[0].jwks_file" in err and "is not JSON" in err


# -- the installed command ------------------------------------------------------------------


def test_the_installed_command_reports_and_exits_1(fhir_server, make_site, tmp_path):
    fhir_server.add("metadata", json=statement())
    env = {k: v for k, v in os.environ.items() if k != "CDS_SITE_CONFIG"}
    site = make_site(fhir_server=fhir_server.url, extra=SORTED_TEMPLATES)
    result = subprocess.run(
        [CLI, "site", "check", "go-live", "--site-config", site],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:5] == ["kidney-risk", "egfr", "_sort", "-date", "FAIL"]
               for line in lines)
    assert lines[-1] == "1 failure, 2 warnings"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "301"])
def test_a_timeout_out_of_range_is_a_usage_error(make_site, run, timeout):
    code, out, err = run(make_site(fhir_server="https://fhir.example.org/R4"), "--timeout", timeout)

    assert (code, out) == (2, "")
    assert "site check: --timeout: give seconds between 0 and 300" in err
