"""A site's trust section as written in its site file: the `issuers:` it trusts (`IssuerSpec`,
their `jku` allow-lists and JWK Set files) and its `jwt:` settings. The verifier's own checks
of the same values are `trust.issuers`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import jwt
from marshmallow import fields, validate

from cds_service.data.fhir import is_loopback_host
from cds_service.protocol.errors import ConfigError
from cds_service.site_section import SiteSection
from cds_service.trust.devkeys import ensure_dev_keypair
from cds_service.trust.keys import SIGNING_ALGORITHMS

# Epic signs with RS384 by default; the spec recommends ES384 and RS384.
DEFAULT_ALGORITHMS = ("RS384", "ES384")


@dataclass(frozen=True)
class IssuerSpec:
    """A JWT issuer this site trusts: its `iss`, allow-listed `jku` URLs and/or a JWK Set."""

    iss: str
    jku: tuple[str, ...] = ()
    jwks: Mapping[str, Any] | None = None
    jwks_file: str | None = None


class IssuerSchema(SiteSection):
    iss = fields.String(required=True, validate=validate.Length(min=1))
    jku = fields.List(fields.Url(schemes={"https", "http"}, require_tld=False))
    jwks_file = fields.String(validate=validate.Length(min=1))
    # Demo only: generate a development key pair at `jwks_file` on first run (kept out of git).
    dev_keypair = fields.Boolean(load_default=False)


class JwtSchema(SiteSection):
    algorithms = fields.List(fields.String(validate=validate.OneOf(SIGNING_ALGORITHMS)),
                             validate=validate.Length(min=1))
    # Tests only: a JWK Set served over plain http from a loopback address.
    allow_http_loopback_jku = fields.Boolean()


def parse_issuer(entry: Mapping[str, Any], index: int, source: str,
                 allow_http_jku: bool, allow_dev_keys: bool = True) -> IssuerSpec:
    where = f"{source}: issuers[{index}]"
    if entry.get("dev_keypair") and not allow_dev_keys:
        raise ConfigError(f"{where}.dev_keypair: development keys are off in this deployment. "
                          "A development deployment turns them on with CDS_ALLOW_DEV_KEYS=true "
                          "(`make run` does); a production site trusts its EHR's keys only "
                          "(`jku` or `jwks_file`)")
    if not entry.get("jku") and not entry.get("jwks_file"):
        raise ConfigError(f"{where}: give `jku` (allow-listed JWK Set URLs) or `jwks_file`")
    for n, url in enumerate(entry.get("jku") or ()):
        parts = urlsplit(url)
        if parts.scheme != "https" and not (allow_http_jku and is_loopback_host(parts.hostname)):
            # Keys fetched over plain http could be swapped in transit (CDS Hooks 2.0 §Security).
            raise ConfigError(f"{where}.jku[{n}]: {url!r} must be https")
    jwks = None
    jwks_file = entry.get("jwks_file")
    if jwks_file:
        path = Path(jwks_file)
        if not path.is_absolute() and not source.startswith("<"):
            path = Path(source).parent / path  # relative to the site file
        if entry.get("dev_keypair"):
            ensure_dev_keypair(path)
        jwks = read_jwks(path, f"{where}.jwks_file")
        jwks_file = str(path)
    return IssuerSpec(iss=entry["iss"], jku=tuple(entry.get("jku") or ()), jwks=jwks,
                      jwks_file=jwks_file)


def read_jwks(path: Path, where: str) -> Mapping[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{where}: {path} is not JSON: {exc}") from exc
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{where}: {path} is not a JWK Set (no `keys` list)")
    for n, key in enumerate(keys):
        if not isinstance(key, dict) or not key.get("kid"):
            raise ConfigError(f"{where}: {path}: keys[{n}] has no `kid`")
        if key.get("kty") == "oct" or "d" in key:
            # A trust store holds public keys only; a symmetric or private key here is a leak.
            raise ConfigError(f"{where}: {path}: keys[{n}] is a secret or private key")
        try:
            jwt.PyJWK(key)
        except jwt.PyJWTError as exc:
            raise ConfigError(f"{where}: {path}: keys[{n}] is not a usable JWK: {exc}") from exc
    return MappingProxyType(data)
