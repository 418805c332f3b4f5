"""A site's `bulk_export:` section: who we are to the EHR's Bulk Data server (SMART Backend
Services client), which key signs our client assertions, and which Group to export.

Validated with the rest of the site file at start-up; the private key file itself is read only
when an export runs (it lives on the machine that exports, never on the serving hosts).
Every key is documented in site_config/README.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marshmallow import ValidationError, fields, validate

from cds_service.data.fhir import InsecureFhirServer, check_fhir_server_url
from cds_service.protocol.errors import ConfigError
from cds_service.schema_errors import describe_errors
from cds_service.site_section import SiteSection

# SMART App Launch 2.x, Backend Services §Authenticating: servers SHALL support RS384 and ES384;
# Epic registers RS384 keys by default.
SIGNING_ALGORITHMS = ("RS384", "ES384", "RS256", "RS512", "ES256", "ES512", "PS384")
DEFAULT_ALGORITHM = "RS384"


@dataclass(frozen=True)
class BulkExportSettings:
    """`bulk_export:` as loaded; `fhir_url` None means the site's FHIR base."""

    client_id: str
    private_key_file: Path
    kid: str
    algorithm: str = DEFAULT_ALGORITHM
    fhir_url: str | None = None
    group: str | None = None
    scope: str | None = None
    allow_http_loopback: bool = False


class _BulkExportSchema(SiteSection):
    fhir_url = fields.Url(schemes={"https", "http"}, require_tld=False)
    client_id = fields.String(required=True, validate=validate.Length(min=1))
    private_key_file = fields.String(required=True, validate=validate.Length(min=1))
    kid = fields.String(required=True, validate=validate.Length(min=1))
    algorithm = fields.String(load_default=DEFAULT_ALGORITHM,
                              validate=validate.OneOf(SIGNING_ALGORITHMS))
    group = fields.String(validate=validate.Length(min=1))
    scope = fields.String(validate=validate.Length(min=1))


def parse_bulk_export(raw: Any, source: str, *, allow_http_loopback: bool = False
                      ) -> BulkExportSettings | None:
    """The section as settings (None when absent); ConfigError names the file and key.

    `allow_http_loopback` is the site's `prefetch.allow_http_loopback`: the one test setting
    that lets a token go to a plain-http FHIR server, and only on a loopback address.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: bulk_export: expected a mapping")
    try:
        data = _BulkExportSchema().load(dict(raw))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_errors(exc, 'bulk_export')}") from exc
    if "fhir_url" in data:
        try:
            check_fhir_server_url(data["fhir_url"], allow_http_loopback=allow_http_loopback)
        except InsecureFhirServer as exc:
            raise ConfigError(f"{source}: bulk_export.fhir_url: {data['fhir_url']!r} must be "
                              "https (plain http only on a loopback address with "
                              "prefetch.allow_http_loopback)") from exc
    key_file = Path(data["private_key_file"])
    if not key_file.is_absolute() and not source.startswith("<"):
        key_file = Path(source).parent / key_file  # relative to the site file
    return BulkExportSettings(
        client_id=data["client_id"], private_key_file=key_file, kid=data["kid"],
        algorithm=data["algorithm"], fhir_url=data.get("fhir_url"), group=data.get("group"),
        scope=data.get("scope"), allow_http_loopback=allow_http_loopback)
