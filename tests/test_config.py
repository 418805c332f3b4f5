"""Site configuration: per-site services and prefetch, and start-up errors naming file and key."""

from __future__ import annotations

import textwrap

import pytest

from cds_service import create_app
from cds_service.protocol.errors import ConfigError
from hooks import SERVICES


def write(path, text):
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_site_enables_a_subset_and_discovery_shows_its_templates(make_app, site_file):
    site = site_file(textwrap.dedent("""\
        services:
          nephrotoxic-order-check:
            prefetch:
              egfr: "Observation?patient={{context.patientId}}&code=http://loinc.org|62238-1"
        """))
    client = make_app(SERVICES=SERVICES, SITE_CONFIG=site).test_client()
    services = client.get("/cds-services").get_json()["services"]
    assert [(s["id"], s["hook"]) for s in services] == [
        ("nephrotoxic-order-check", "order-select"),
        ("nephrotoxic-order-check", "order-sign"),
    ]
    from hooks.nephrotoxic_order_check import SERVICE

    assert services[0]["prefetch"] == {
        **SERVICE.prefetch,
        "egfr": "Observation?patient={{context.patientId}}&code=http://loinc.org|62238-1",
    }
    # Not enabled at this site: 404, even though the registry has it.
    response = client.post("/cds-services/kidney-risk", json={})
    assert response.status_code == 404


def test_disabled_service_is_not_served(make_app, site_file):
    site = site_file(textwrap.dedent("""\
        services:
          kidney-risk: {enabled: false}
          nephrotoxic-order-check: {}
        """))
    client = make_app(SERVICES=SERVICES, SITE_CONFIG=site).test_client()
    ids = {s["id"] for s in client.get("/cds-services").get_json()["services"]}
    assert ids == {"nephrotoxic-order-check"}


def test_directory_of_sites_with_default_site(make_app, tmp_path):
    write(tmp_path / "a.yaml", "site: a\nservices:\n  kidney-risk: {}\n")
    write(tmp_path / "b.yml", "site: b\nepic_compatibility: false\n")
    write(tmp_path / "notes.txt", "ignored")
    app = make_app(SERVICES=SERVICES, SITE_CONFIG=str(tmp_path), DEFAULT_SITE="b")
    rt = app.extensions["cds"]
    assert sorted(rt.sites) == ["a", "b"]
    assert rt.default_site.id == "b" and rt.default_site.epic_compatibility is False
    assert set(rt.sites["a"].services) == {"kidney-risk"}


def test_shipped_demo_site_is_valid(make_app):
    from tests.conftest import ROOT

    app = make_app(SERVICES=SERVICES, SITE_CONFIG=str(ROOT / "site_config"))
    assert app.extensions["cds"].default_site.id == "demo-hospital"


@pytest.mark.parametrize(
    ("files", "fragments"),
    [
        ({"x.yaml": "site: [1, 2]\n"}, ["x.yaml", "site"]),
        ({"x.yaml": "epic_compatibility: true\n"}, ["x.yaml", "site", "Missing"]),
        ({"x.yaml": "site: x\nservices:\n  nope: {}\n"}, ["x.yaml", "services.nope",
                                                         "no such service"]),
        ({"x.yaml": "site: x\nservices:\n  kidney-risk:\n    prefetch:\n      xray: Patient/1\n"},
         ["x.yaml", "services.kidney-risk.prefetch.xray", "no such prefetch key"]),
        ({"x.yaml": "site: x\nservices:\n  kidney-risk:\n    prefetch:\n"
                    "      egfr: \"Observation?patient={{context.patientId}}&_include=x\"\n"},
         ["x.yaml", "services.kidney-risk.prefetch.egfr", "_include"]),
        ({"x.yaml": "site: x\nservices:\n  kidney-risk:\n    colour: blue\n"},
         ["x.yaml", "colour"]),
        ({"x.yaml": "site: x\nprefetch:\n  deadline_seconds: 0\n"},
         ["x.yaml", "prefetch.deadline_seconds"]),
        ({"x.yaml": "site: x\n  bad: indentation\n"}, ["x.yaml", "invalid YAML"]),
        ({"a.yaml": "site: same\n", "b.yaml": "site: same\n"}, ["b.yaml", "already defined",
                                                                "a.yaml"]),
        ({"x.yaml": "- just\n- a list\n"}, ["x.yaml", "mapping"]),
        ({"x.yaml": "site: x\nservices:\n  kidney-risk:\n    settings:\n      referral:\n"
                    "        risk: 5\n"},
         ["x.yaml", "services.kidney-risk.settings.referral.risk"]),
        # KDIGO 2024 practice point 2.2.1: a 5-year risk of 3-5%; 10% is outside the range.
        ({"x.yaml": "site: x\nservices:\n  kidney-risk:\n    settings:\n      referral:\n"
                    "        risk: 0.1\n"},
         ["x.yaml", "services.kidney-risk.settings.referral.risk"]),
        ({"x.yaml": "site: x\nservices:\n  kidney-risk:\n    settings:\n      smart_link:\n"
                    "        label: App\n        url: http://apps.example.org/launch\n"},
         ["x.yaml", "services.kidney-risk.settings.smart_link.url"]),
        ({"x.yaml": "site: x\nservices:\n  kidney-risk:\n    settings:\n      colour: 1\n"},
         ["x.yaml", "services.kidney-risk.settings.colour"]),
        ({"x.yaml": "site: x\nservices:\n  nephrotoxic-order-check:\n    settings:\n"
                    "      a: 1\n"},
         ["x.yaml", "services.nephrotoxic-order-check.settings", "no settings"]),
        ({"x.yaml": "site: x\norderables:\n  nephrology-referral:\n    code: '1'\n"},
         ["x.yaml", "orderables.nephrology-referral.system", "Missing"]),
        ({"x.yaml": "site: x\norderables:\n  Bad Name:\n    system: s\n    code: c\n"
                    "    display: d\n"}, ["x.yaml", "orderables", "lower-case-with-dashes"]),
        ({"x.yaml": "site: x\nalert_fatigue:\n  override_window_hours: -1\n"},
         ["x.yaml", "alert_fatigue.override_window_hours"]),
    ],
)
def test_configuration_errors_name_file_and_key(make_app, tmp_path, files, fragments):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError) as caught:
        make_app(SERVICES=SERVICES, SITE_CONFIG=str(tmp_path))
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(("text", "message"), [
    # A typo at the top level used to be ignored: the eGFR mapping, and with it the card, gone.
    ("code_mapings:\n  - {from: 'urn:oid:1.2.3|1558024', to: 'http://loinc.org|98979-8'}\n",
     "x.yaml: code_mapings: unknown key; did you mean `code_mappings`?"),
    ("servcies: {}\n", "x.yaml: servcies: unknown key; did you mean `services`?"),
    ("colour: blue\n", "x.yaml: colour: unknown key (valid keys: alert_fatigue, audiences, "),
    ("services:\n  kidney-risk:\n    thresholsd: {info: 0.1}\n",
     "x.yaml: services.kidney-risk.thresholsd: unknown key; did you mean `thresholds`?"),
    ("services:\n  kidney-risk:\n    settings:\n      referal: {risk: 0.03}\n",
     "x.yaml: services.kidney-risk.settings.referal: unknown key; did you mean `referral`?"),
    ("services:\n  kidney-risk:\n    settings:\n      referral: {egfr_bellow: 25}\n",
     "services.kidney-risk.settings.referral.egfr_bellow: unknown key; did you mean "
     "`egfr_below`?"),
    ("prefetch:\n  deadline_secs: 3\n",
     "x.yaml: prefetch.deadline_secs: unknown key; did you mean `deadline_seconds`?"),
    ("issuers:\n  - iss: https://a.example/fhir\n    jwks_flie: keys.json\n",
     "x.yaml: issuers[0].jwks_flie: unknown key; did you mean `jwks_file`?"),
    ("alert_fatigue:\n  override_window: 4\n",
     "alert_fatigue.override_window: unknown key; did you mean `override_window_hours`?"),
])
def test_an_unknown_key_names_file_key_and_the_closest_valid_one(make_app, tmp_path, text,
                                                                 message):
    write(tmp_path / "x.yaml", "site: x\n" + text)
    with pytest.raises(ConfigError) as caught:
        make_app(SERVICES=SERVICES, SITE_CONFIG=str(tmp_path / "x.yaml"))
    assert message in str(caught.value)


def test_x_keys_are_annotations_at_every_level(make_app, tmp_path):
    write(tmp_path / "x.yaml", """\
        site: x
        x-owner: Epic team, ticket CDS-42
        prefetch: {deadline_seconds: 3, x-why: their FHIR server is slow}
        services:
          kidney-risk:
            x-changed: 2025 go-live
            settings: {referral: {risk: 0.03, x-source: nephrology board}}
        """)
    site = make_app(SERVICES=SERVICES, SITE_CONFIG=str(tmp_path / "x.yaml")
                    ).extensions["cds"].default_site
    assert site.prefetch_settings.deadline_s == 3
    assert site.services["kidney-risk"].settings["referral"]["risk"] == 0.03
    assert site.raw["x-owner"] == "Epic team, ticket CDS-42"


def test_missing_path_and_empty_directory_are_errors(make_app, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_app(SITE_CONFIG=str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match=r"no \*\.yaml"):
        make_app(SITE_CONFIG=str(tmp_path))


def test_unknown_default_site_is_an_error(make_app):
    with pytest.raises(ConfigError, match="DEFAULT_SITE"):
        make_app(DEFAULT_SITE="elsewhere")


def test_environment_variables_configure_the_app(make_app, monkeypatch, tmp_path):
    write(tmp_path / "env.yaml", "site: from-env\n")
    monkeypatch.setenv("CDS_SITE_CONFIG", str(tmp_path / "env.yaml"))
    monkeypatch.setenv("CDS_MAX_CONTENT_LENGTH", "2048")
    app = make_app()
    assert app.config["MAX_CONTENT_LENGTH"] == 2048
    assert app.extensions["cds"].default_site.id == "from-env"
    # An explicit mapping wins over the environment.
    assert make_app(MAX_CONTENT_LENGTH=4096).config["MAX_CONTENT_LENGTH"] == 4096


PRIVATE_JWK = {"kty": "EC", "crv": "P-384", "kid": "k1", "d": "secret-part",
               "x": "AKHkEqcnF2hJ8n3dhMcDQFWx7BBEuZhr9ysp8iJ8eyJnn6hLXnzeYtBkpMJ7RrCT",
               "y": "VmRnJmMBUJMDcvJ0Wd8krfIQxx0IdmMGHkQkqvQaQ6k2GrBBrIN0-RG-dNFv-HBU"}


@pytest.mark.parametrize(
    ("issuer_yaml", "jwks", "fragments"),
    [
        ("  - iss: https://a.example/fhir\n    jwks_file: missing.json\n", None,
         ["x.yaml", "issuers[0].jwks_file", "cannot read"]),
        ("  - iss: https://a.example/fhir\n    jwks_file: keys.json\n", "not json",
         ["x.yaml", "issuers[0].jwks_file", "not JSON"]),
        ("  - iss: https://a.example/fhir\n    jwks_file: keys.json\n", {"keys": []},
         ["issuers[0].jwks_file", "not a JWK Set"]),
        ("  - iss: https://a.example/fhir\n    jwks_file: keys.json\n",
         {"keys": [PRIVATE_JWK]}, ["issuers[0].jwks_file", "secret or private key"]),
        ("  - iss: https://a.example/fhir\n    jwks_file: keys.json\n",
         {"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]},
         ["issuers[0].jwks_file", "secret or private key"]),
        ("  - iss: https://a.example/fhir\n", None,
         ["x.yaml", "issuers[0]", "jku", "jwks_file"]),
        ("  - iss: https://a.example/fhir\n    jku: [not-a-url]\n", None,
         ["x.yaml", "issuers[0].jku[0]", "Not a valid URL"]),
    ],
)
def test_trust_configuration_errors_name_file_and_key(make_app, tmp_path, issuer_yaml, jwks,
                                                      fragments):
    if jwks is not None:
        (tmp_path / "keys.json").write_text(jwks if isinstance(jwks, str) else
                                            __import__("json").dumps(jwks))
    write(tmp_path / "x.yaml", "site: x\nissuers:\n" + issuer_yaml)
    with pytest.raises(ConfigError) as caught:
        make_app(SERVICES=SERVICES, SITE_CONFIG=str(tmp_path / "x.yaml"))
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_an_issuer_may_select_only_one_site(make_app, tmp_path, test_jwks_file):
    for name in ("a", "b"):
        write(tmp_path / f"{name}.yaml", f"site: {name}\nissuers:\n"
              f"  - iss: https://shared.example/fhir\n    jwks_file: {test_jwks_file}\n")
    with pytest.raises(ConfigError, match="already trusted by site 'a'") as caught:
        make_app(SERVICES=SERVICES, SITE_CONFIG=str(tmp_path), DEFAULT_SITE="a")
    assert "b.yaml: issuers" in str(caught.value)


def test_non_https_jku_stops_start_up(make_app, tmp_path):
    write(tmp_path / "x.yaml", "site: x\nissuers:\n  - iss: https://a.example/fhir\n"
          "    jku: [http://keys.example.org/jwks]\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: issuers\[0\]\.jku\[0\]: .* must be https"):
        make_app(SERVICES=SERVICES, SITE_CONFIG=str(tmp_path / "x.yaml"))


def test_service_settings_orderables_and_window_are_loaded_with_defaults(make_app, site_file):
    from datetime import timedelta

    app = make_app(SERVICES=SERVICES, SITE_CONFIG=site_file(textwrap.dedent("""\
        orderables:
          urine-acr: {system: urn:x, code: "52104", display: UACR}
        alert_fatigue: {override_window_hours: 6}
        services:
          kidney-risk:
            settings:
              referral: {egfr_below: 25}
          nephrotoxic-order-check: {}
        """)))
    site = app.extensions["cds"].default_site
    assert site.override_window == timedelta(hours=6)
    assert site.orderables["urine-acr"].concept() == {
        "coding": [{"system": "urn:x", "code": "52104", "display": "UACR"}], "text": "UACR"}
    assert site.services["kidney-risk"].settings == {
        "referral": {"risk": 0.05, "egfr_below": 25, "uacr_at_least": 300}}
    assert site.services["nephrotoxic-order-check"].settings == {}
    defaults = make_app(SERVICES=SERVICES).extensions["cds"].default_site
    assert defaults.override_window == timedelta(hours=24)
    assert defaults.services["kidney-risk"].settings["referral"]["risk"] == 0.05


def test_several_sites_need_a_default_only_when_calls_are_not_authenticated(tmp_path):
    (tmp_path / "a.yaml").write_text("site: a\n")
    (tmp_path / "b.yaml").write_text("site: b\n")
    # Authenticated (the default): each call's verified `iss` picks its site.
    app = create_app({"SERVICES": SERVICES, "SITE_CONFIG": str(tmp_path),
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"})
    assert sorted(app.extensions["cds"].sites) == ["a", "b"]
    app.extensions["cds"].close()
    # Unauthenticated: one site must answer, so it has to be named.
    with pytest.raises(ConfigError, match=r"DEFAULT_SITE.*a, b"):
        create_app({"SERVICES": SERVICES, "SITE_CONFIG": str(tmp_path), "AUTH_REQUIRED": False,
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"})
