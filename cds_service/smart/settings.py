"""A site's `smart_app:` section: the SMART on FHIR companion app as registered with the EHR.

Validated with the rest of the site file at start-up (site_config/README.md documents each key).
The confidential client's private key file is named here and read when the app first needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from marshmallow import ValidationError, fields, validate

from cds_service.data.fhir import InsecureFhirServer, check_fhir_server_url
from cds_service.protocol.errors import ConfigError
from cds_service.schema_errors import describe_errors
from cds_service.site_section import SiteSection
from cds_service.training.export_settings import DEFAULT_ALGORITHM, SIGNING_ALGORITHMS

# The routes this service serves (cds_service/smart/views.py); the redirect URI registered with
# the EHR must be ours, and the launch URL Epic opens is its sibling.
CALLBACK_PATH = "/smart/callback"
LAUNCH_PATH = "/smart/launch"

# What the app reads: the kidney-risk card's data (hooks/kidney_risk.py) and the Medication
# resources its MedicationRequests name. SMART App Launch 2.x §Scopes: v2 `.rs` = read + search;
# v1 `.read` for servers that speak only v1. `launch` takes the EHR's launch context; `openid
# fhirUser` asks who the clinician is (an id_token with a fhirUser claim); `online_access` a
# refresh token that lives while the clinician is signed in (§Scopes for requesting a refresh
# token), so a page reloaded after the 5-minute Epic token does not need a new launch. A server
# that grants none simply ends the session with the access token.
RESOURCE_TYPES = ("Patient", "Observation", "Condition", "MedicationRequest", "Medication")
BASE_SCOPES = ("launch", "openid", "fhirUser", "online_access")


@dataclass(frozen=True)
class SmartAppSettings:
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...] | None = None   # None: chosen from the server's capabilities
    scope_version: str = "auto"             # auto | v2 | v1
    client_auth: str = "public"             # public (PKCE) | private_key_jwt
    private_key_file: Path | None = None
    kid: str | None = None
    algorithm: str = DEFAULT_ALGORITHM
    session_lifetime: timedelta = timedelta(minutes=60)
    cookie_samesite: str = "Lax"
    frame_ancestors: tuple[str, ...] = ()
    allow_http_loopback: bool = False

    @property
    def launch_url(self) -> str:
        """The URL the EHR opens (and the kidney-risk card links to): beside the callback."""
        return self.redirect_uri[: -len(CALLBACK_PATH)] + LAUNCH_PATH

    def scope_for(self, smart_configuration: Mapping[str, Any]) -> str:
        if self.scopes is not None:
            return " ".join(self.scopes)
        version = self.scope_version
        if version == "auto":
            capabilities = smart_configuration.get("capabilities") or []
            version = "v2" if "permission-v2" in capabilities else "v1"
        suffix = "rs" if version == "v2" else "read"
        return " ".join([*BASE_SCOPES, *(f"patient/{t}.{suffix}" for t in RESOURCE_TYPES)])


# `Strict` is not offered: the authorization server's redirect to /smart/callback is a
# cross-site navigation, and a Strict cookie would not come with it.
class _SmartAppSchema(SiteSection):
    client_id = fields.String(required=True, validate=validate.Length(min=1, max=256))
    redirect_uri = fields.Url(required=True, schemes={"https", "http"}, require_tld=False)
    scopes = fields.List(fields.String(validate=validate.Regexp(r"^\S+$")),
                         validate=validate.Length(min=1))
    scope_version = fields.String(load_default="auto",
                                  validate=validate.OneOf(("auto", "v2", "v1")))
    client_auth = fields.String(load_default="public",
                                validate=validate.OneOf(("public", "private_key_jwt")))
    private_key_file = fields.String(validate=validate.Length(min=1))
    kid = fields.String(validate=validate.Length(min=1))
    algorithm = fields.String(load_default=DEFAULT_ALGORITHM,
                              validate=validate.OneOf(SIGNING_ALGORITHMS))
    session_minutes = fields.Float(load_default=60, validate=validate.Range(min=1, max=24 * 60))
    cookie_samesite = fields.String(load_default="Lax",
                                    validate=validate.OneOf(("Lax", "None")))
    frame_ancestors = fields.List(fields.String(validate=validate.Regexp(
        r"^https://[^/\s*;,']+$", error="must be an https origin like https://epic.example.org")))


def parse_smart_app(raw: Any, source: str, *, allow_http_loopback: bool = False
                    ) -> SmartAppSettings | None:
    """The section as settings (None when absent); ConfigError names the file and key."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: smart_app: expected a mapping")
    try:
        data = _SmartAppSchema().load(dict(raw))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_errors(exc, 'smart_app')}") from exc
    redirect_uri = data["redirect_uri"]
    parts = urlsplit(redirect_uri)
    if parts.query or parts.fragment or not parts.path.endswith(CALLBACK_PATH):
        # RFC 6749 §3.1.2: no fragment; and it must be this service's callback route.
        raise ConfigError(f"{source}: smart_app.redirect_uri: {redirect_uri!r} must be this "
                          f"service's callback, https://<host>[/prefix]{CALLBACK_PATH}, with "
                          "no query or fragment")
    try:
        check_fhir_server_url(redirect_uri, allow_http_loopback=allow_http_loopback)
    except InsecureFhirServer as exc:
        # SMART App Launch §App protection: the redirect carries the authorization code.
        raise ConfigError(f"{source}: smart_app.redirect_uri: {redirect_uri!r} must be https "
                          "(plain http only on a loopback address with "
                          "prefetch.allow_http_loopback)") from exc
    key_file = None
    if data["client_auth"] == "private_key_jwt":
        missing = [k for k in ("private_key_file", "kid") if k not in data]
        if missing:
            raise ConfigError(f"{source}: smart_app: client_auth private_key_jwt needs "
                              + " and ".join(missing))
        key_file = Path(data["private_key_file"])
        if not key_file.is_absolute() and not source.startswith("<"):
            key_file = Path(source).parent / key_file  # relative to the site file
    elif "private_key_file" in data or "kid" in data:
        raise ConfigError(f"{source}: smart_app: private_key_file and kid are for "
                          "client_auth: private_key_jwt")
    return SmartAppSettings(
        client_id=data["client_id"], redirect_uri=redirect_uri,
        scopes=tuple(data["scopes"]) if "scopes" in data else None,
        scope_version=data["scope_version"], client_auth=data["client_auth"],
        private_key_file=key_file, kid=data.get("kid"), algorithm=data["algorithm"],
        session_lifetime=timedelta(minutes=data["session_minutes"]),
        cookie_samesite=data["cookie_samesite"],
        frame_ancestors=tuple(data.get("frame_ancestors") or ()),
        allow_http_loopback=allow_http_loopback)
