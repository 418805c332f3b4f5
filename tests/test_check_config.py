"""`cds-service check-config`: the effective configuration per site, secrets masked, and
configuration errors as one clear line."""

from __future__ import annotations

import json

import pytest

from cds_service.cli import main
from tests.conftest import TEST_ISS, TEST_KID

SITE = """\
audiences: [https://cds.riverside.example.org/cds-services]
fhir_server: https://fhir.riverside.example.org/api/FHIR/R4
prefetch: {deadline_seconds: 3, allow_http_loopback: true}
cors: {origins: ["https://sandbox.cds-hooks.org"]}
alert_fatigue: {override_window_hours: 6}
code_mappings:
  - {from: "urn:oid:1.2.840.114350.1.13.999.7.2.768282|1558024", to: "http://loinc.org|98979-8"}
orderables:
  urine-acr: {system: urn:x, code: "52104", display: UACR}
services:
  kidney-risk:
    shadow_model: ckd-progression-lr
    thresholds: {info: 0.02, warning: 0.04, critical: 0.3}
    settings: {referral: {risk: 0.03}}
    prefetch:
      egfr: "Observation?patient={{context.patientId}}&category=laboratory&code=http://loinc.org|98979-8"
"""
DB_PASSWORD = "hunter2-db"
REDIS_PASSWORD = "s3cret-redis"


@pytest.fixture
def check_config(capsys, monkeypatch, tmp_path):
    """`cds-service check-config ARGS` in-process with a deployment whose storage URLs carry
    passwords (never connected to: the store and the shared cache connect lazily)."""
    # main() exports --site-config as CDS_SITE_CONFIG: setenv records it for restoring.
    monkeypatch.setenv("CDS_SITE_CONFIG", "")
    monkeypatch.delenv("CDS_SITE_CONFIG")
    monkeypatch.setenv("CDS_DATABASE_URL", f"postgresql://cds:{DB_PASSWORD}@127.0.0.1:1/cds")
    monkeypatch.setenv("CDS_JWKS_CACHE_URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")
    monkeypatch.setenv("CDS_REPLAY_CACHE_URL", f"sqlite:///{tmp_path / 'replay.sqlite3'}")
    monkeypatch.setenv("CDS_UNRELATED_TOKEN", "not-a-setting-of-ours")
    monkeypatch.setenv("CDS_PUBLIC_URL", "https://cds.riverside.example.org/")

    def run(site_config: str | None, *args: str) -> tuple[int, str, str]:
        where = ["--site-config", site_config] if site_config else []
        code = main(["check-config", *where, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def assert_no_secrets(text: str) -> None:
    for secret in (DB_PASSWORD, REDIS_PASSWORD, "not-a-setting-of-ours", "PRIVATE KEY"):
        assert secret not in text


def test_json_shows_the_effective_configuration(check_config, site_file, test_jwks_file):
    code, out, err = check_config(site_file(SITE), "--json")

    assert code == 0, err
    assert_no_secrets(out)
    view = json.loads(out)
    deployment = view["deployment"]
    assert deployment["database_url"] == "postgresql://cds:***@127.0.0.1:1/cds"
    assert deployment["jwks_cache_url"] == "redis://:***@127.0.0.1:1/0"
    assert deployment["auth_required"] is True
    assert deployment["public_url"] == "https://cds.riverside.example.org"
    assert deployment["default_site"] == "test-site"
    assert [m["id"] for m in deployment["models"]] == ["ckd-progression-lr", "kfre-4var"]

    site = view["sites"]["test-site"]
    assert site["issuers"] == [{"iss": TEST_ISS, "jku": [], "jwks_file": str(test_jwks_file),
                                "kids": [TEST_KID]}]
    assert site["audiences"] == ["https://cds.riverside.example.org/cds-services"]
    assert site["jwt"] == {"algorithms": ["RS384", "ES384"], "allow_http_loopback_jku": False}
    assert site["cors_origins"] == ["https://sandbox.cds-hooks.org"]
    assert site["fhir_server"] == "https://fhir.riverside.example.org/api/FHIR/R4"
    assert site["fhir_token"] == ("sent to the request's fhirServer only, over https or plain "
                                  "http to a loopback host, when fhir_servers allows it")
    # Not listed: the site's fhir_server and its issuer's iss.
    assert site["fhir_servers"] == ["https://fhir.riverside.example.org/api/FHIR/R4", TEST_ISS]
    assert site["prefetch"] == {"deadline_seconds": 3, "max_pages": 10,
                                "allow_http_loopback": True, "max_response_mib": 16,
                                "max_total_mib": 32, "max_parallel_reads": 8}
    assert site["alert_fatigue"] == {"override_window_hours": 6}
    assert site["code_mappings"] == [{
        "from": "urn:oid:1.2.840.114350.1.13.999.7.2.768282|1558024",
        "to": ["http://loinc.org|98979-8"]}]
    assert site["orderables"] == {"urine-acr": {"system": "urn:x", "code": "52104",
                                                "display": "UACR"}}

    kidney = site["services"]["kidney-risk"]
    assert kidney["model"]["id"] == "kfre-4var" and len(kidney["model"]["sha256"]) == 64
    assert kidney["shadow_model"]["id"] == "ckd-progression-lr"
    assert (kidney["thresholds"], kidney["thresholds_from"]) == (
        {"info": 0.02, "warning": 0.04, "critical": 0.3}, "site")
    assert kidney["settings"] == {"referral": {"risk": 0.03, "egfr_below": 30,
                                               "uacr_at_least": 300}}
    assert kidney["prefetch"]["egfr"] == ("Observation?patient={{context.patientId}}"
                                          "&category=laboratory&code=http://loinc.org|98979-8")
    assert kidney["prefetch"]["patient"] == "Patient/{{context.patientId}}"  # the default
    assert "egfr" not in kidney["optional_prefetch"]
    # Not listed at this site, so not enabled.
    assert list(site["services"]) == ["kidney-risk"]


def test_text_is_one_yaml_block_per_section(check_config, site_file):
    code, out, err = check_config(site_file(SITE))

    assert code == 0, err
    assert_no_secrets(out)
    lines = out.splitlines()
    assert lines[0] == "deployment"
    assert "  database_url: postgresql://cds:***@127.0.0.1:1/cds" in lines
    site_line = next(n for n, line in enumerate(lines) if line.startswith("site test-site ("))
    body = lines[site_line + 1:]
    assert "    algorithms: [RS384, ES384]" in body
    assert "      hooks: [patient-view]" in body
    assert "      thresholds_from: site" in body
    # The prefetch lines to hand to the Epic team, one per key, as the site file spells them.
    assert ("        egfr: Observation?patient={{context.patientId}}&category=laboratory"
            "&code=http://loinc.org|98979-8") in body


def test_the_built_in_defaults_are_shown_too(check_config, monkeypatch):
    monkeypatch.setenv("CDS_AUTH_REQUIRED", "false")
    code, out, _ = check_config(None, "--json")

    assert code == 0
    view = json.loads(out)
    assert view["deployment"]["auth_required"] is False
    assert view["deployment"]["site_config"].startswith("built-in defaults")
    assert set(view["sites"]["default"]["services"]) == {"kidney-risk",
                                                         "nephrotoxic-order-check"}


def test_a_misspelt_key_is_one_clear_line(check_config, site_file):
    code, out, err = check_config(site_file("code_mapings: []\n"))

    assert (code, out) == (2, "")
    [line] = [line for line in err.splitlines() if line.startswith("configuration error: ")]
    assert line.endswith("site.yaml: code_mapings: unknown key; did you mean `code_mappings`?")
    assert "Traceback" not in err


def test_a_shadow_only_model_made_active_is_one_clear_line(check_config, site_file):
    # models/ckd-progression-lr/manifest.yaml: approved_use [shadow] (synthetic training data).
    path = site_file("services:\n  kidney-risk:\n    model: ckd-progression-lr\n")
    code, out, err = check_config(path)

    assert (code, out) == (2, "")
    [line] = [line for line in err.splitlines() if line.startswith("configuration error: ")]
    assert line.startswith(f"configuration error: {path}: services.kidney-risk.model: "
                           "ckd-progression-lr is not approved for active use ("), line
    assert "ckd-progression-lr/manifest.yaml: approved_use: [shadow])" in line
    assert "Traceback" not in err


def test_thresholds_on_a_named_output_are_shown_as_written(check_config, site_file):
    code, out, err = check_config(site_file(
        "services:\n  kidney-risk:\n    thresholds:\n      info: 0.03\n"
        "      critical: {output: risk_2y, above: 0.4}\n"), "--json")

    assert code == 0, err
    kidney = json.loads(out)["sites"]["test-site"]["services"]["kidney-risk"]
    assert kidney["thresholds"] == {"info": 0.03,
                                    "critical": {"output": "risk_2y", "above": 0.4}}
    assert kidney["model_approved_use"] == ["active", "shadow"]
