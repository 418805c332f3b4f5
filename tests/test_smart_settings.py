"""The site file's `smart_app:` section (cds_service/smart/settings.py, site_config/README.md)."""

from __future__ import annotations

import pytest

from cds_service.protocol.errors import ConfigError
from cds_service.smart.settings import parse_smart_app

OK = {"client_id": "kidney-app", "redirect_uri": "https://cds.example.org/smart/callback"}


def test_minimal_section_and_its_defaults():
    app = parse_smart_app(OK, "site.yaml")
    assert app.client_auth == "public"
    assert app.launch_url == "https://cds.example.org/smart/launch"
    assert app.cookie_samesite == "Lax"
    assert app.session_lifetime.total_seconds() == 3600
    assert parse_smart_app(None, "site.yaml") is None


def test_launch_url_keeps_a_proxy_prefix():
    app = parse_smart_app({**OK, "redirect_uri": "https://h.example.org/cds/smart/callback"}, "s")
    assert app.launch_url == "https://h.example.org/cds/smart/launch"


@pytest.mark.parametrize(("uri", "fragment"), [
    ("http://cds.example.org/smart/callback", "must be https"),
    ("http://127.0.0.1:8000/smart/callback", "must be https"),
    ("https://cds.example.org/callback", "must be this service's callback"),
    ("https://cds.example.org/smart/callback?next=https://evil.example", "no query"),
    ("https://cds.example.org/smart/callback#x", "no query or fragment"),
])
def test_a_redirect_uri_that_is_not_our_https_callback_is_refused(uri, fragment):
    with pytest.raises(ConfigError, match="smart_app.redirect_uri") as info:
        parse_smart_app({**OK, "redirect_uri": uri}, "site.yaml")
    assert fragment in str(info.value)


def test_loopback_http_only_with_the_test_setting():
    uri = "http://127.0.0.1:8000/smart/callback"
    app = parse_smart_app({**OK, "redirect_uri": uri}, "s", allow_http_loopback=True)
    assert app.redirect_uri == uri


def test_a_confidential_client_needs_its_key_and_kid(tmp_path):
    with pytest.raises(ConfigError, match="private_key_file and kid"):
        parse_smart_app({**OK, "client_auth": "private_key_jwt"}, "site.yaml")
    with pytest.raises(ConfigError, match="are for client_auth: private_key_jwt"):
        parse_smart_app({**OK, "kid": "k1"}, "site.yaml")
    app = parse_smart_app({**OK, "client_auth": "private_key_jwt", "private_key_file": "k.jwks",
                           "kid": "k1"}, str(tmp_path / "site.yaml"))
    assert app.private_key_file == tmp_path / "k.jwks"  # relative to the site file


def test_an_unknown_key_names_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean `client_id`"):
        parse_smart_app({**OK, "clientid": "x"}, "site.yaml")


def test_scopes_follow_the_servers_smart_version():
    app = parse_smart_app(OK, "s")
    v2 = app.scope_for({"capabilities": ["launch-ehr", "permission-v2", "permission-v1"]})
    v1 = app.scope_for({"capabilities": ["launch-ehr", "permission-v1"]})
    # SMART App Launch 2.x §Scopes: `.rs` = read and search (v2); `.read` (v1).
    assert v2.split() == ["launch", "openid", "fhirUser", "online_access", "patient/Patient.rs",
                          "patient/Observation.rs", "patient/Condition.rs",
                          "patient/MedicationRequest.rs", "patient/Medication.rs"]
    assert v1.split()[4:] == ["patient/Patient.read", "patient/Observation.read",
                              "patient/Condition.read", "patient/MedicationRequest.read",
                              "patient/Medication.read"]
    forced = parse_smart_app({**OK, "scope_version": "v1"}, "s")
    assert forced.scope_for({"capabilities": ["permission-v2"]}) == v1
    own = parse_smart_app({**OK, "scopes": ["launch", "patient/*.rs"]}, "s")
    assert own.scope_for({}) == "launch patient/*.rs"


def test_frame_ancestors_are_https_origins():
    with pytest.raises(ConfigError, match="frame_ancestors"):
        parse_smart_app({**OK, "frame_ancestors": ["*"]}, "s")
    app = parse_smart_app({**OK, "frame_ancestors": ["https://epic.example.org"]}, "s")
    assert app.frame_ancestors == ("https://epic.example.org",)
