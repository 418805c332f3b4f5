"""Deployment settings and per-site configuration.

Order of precedence (lowest first), applied once in `create_app`: `DEFAULTS` below, then
`CDS_`-prefixed environment variables (values parsed as JSON when they can be, so
`CDS_MAX_CONTENT_LENGTH=1048576` is an int), then the explicit mapping passed to
`create_app(config)`. The site configuration is read from the path in `SITE_CONFIG`
(`CDS_SITE_CONFIG`): one YAML file or a directory of them, one site per file. Every key is
documented in `site_config/README.md`. Nothing here is read inside a request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from marshmallow import ValidationError, fields, validate

from cds_service.data.fhir import (
    MIB,
    FhirBase,
    InsecureFhirServer,
    check_fhir_server_url,
)
from cds_service.data.prefetch import PrefetchSettings, lint_template
from cds_service.features import CodeMap, FeatureSpecError, parse_code_map
from cds_service.models.acceptance import Acceptance, AcceptanceSchema, parse_acceptance
from cds_service.models.manifest import MODEL_ID, Threshold, ordered_thresholds, thresholds_field
from cds_service.protocol.errors import ConfigError
from cds_service.schema_errors import describe_errors
from cds_service.service import CdsService, Orderable
from cds_service.site_section import SiteSection
from cds_service.smart.settings import SmartAppSettings, parse_smart_app
from cds_service.training.export_settings import BulkExportSettings, parse_bulk_export
from cds_service.trust.site_issuers import (
    DEFAULT_ALGORITHMS,
    IssuerSchema,
    IssuerSpec,
    JwtSchema,
    parse_issuer,
)

DEFAULTS: dict[str, Any] = {
    # Path to one site YAML file or a directory of them; None = one built-in site ("default")
    # with every registered service enabled on its declared prefetch templates.
    "SITE_CONFIG": None,
    # Site answering requests when several are configured (issuer-based tenancy comes with JWTs).
    "DEFAULT_SITE": None,
    # Feedback store. SQLite (embedded, zero set-up) unless a PostgreSQL URL is configured.
    "DATABASE_URL": "sqlite:///var/cds-service.sqlite3",
    # Request body limit; Flask answers 413 above it.
    "MAX_CONTENT_LENGTH": 5 * 1024 * 1024,
    # Threads per worker process for parallel FHIR fallback reads.
    "FHIR_MAX_WORKERS": 16,
    "LOG_LEVEL": "INFO",
    # Every endpoint requires a verified JWT unless this is explicitly false (tests, a trusted
    # proxy doing it for us); the service logs a warning at every start when it is off.
    "AUTH_REQUIRED": True,
    # jti replay cache shared by all workers: a SQLite file (one machine) or redis://… (hosts).
    "REPLAY_CACHE_URL": "sqlite:///var/jti-replay.sqlite3",
    # JWK Sets fetched from `jku` URLs: None = each worker keeps its own; redis://… = shared by
    # every worker and host (one fetch per TTL, an Epic key rotation seen everywhere at once).
    "JWKS_CACHE_URL": None,
    # The URL Epic calls this deployment at, e.g. https://cds.example.org (with any path prefix a
    # reverse proxy adds): a JWT's `aud` is accepted when it is `<PUBLIC_URL>/cds-services/<id>`
    # (the endpoint invoked) or one of the site's `audiences`. Never taken from request headers
    # (Host, X-Forwarded-*), which the caller chooses. `cds-service serve --public-url`.
    "PUBLIC_URL": None,
    # Development keys (`issuers[].dev_keypair`) and with them the sandbox: off unless a
    # development deployment turns them on (`make run` does). A site that asks for one while
    # this is false stops start-up: whoever holds that private key could call as the EHR.
    "ALLOW_DEV_KEYS": False,
    # A second listening port for /metrics and detailed health (cds_service/ops/listeners.py); then
    # they answer 404 on the public port. None: everything on the one port.
    "OPS_PORT": None,
    # Clock skew allowed on exp/iat/nbf. Epic sends nbf = iat - 300 and exp = iat + 900.
    "JWT_LEEWAY_SECONDS": 30,
    # Where each worker spools its calls' audit records, issued cards and predictions before
    # they reach the store (cds_service/records/spool.py); None = `spool/` beside a SQLite
    # store's file, `var/spool` with PostgreSQL. Give it a volume that outlives the process
    # (docs/operations.md).
    "SPOOL_DIR": None,
    # Audit records older than this are removed by `cds-service audit purge`.
    "AUDIT_RETENTION_DAYS": 2190,
    # Directory of model directories (`<id>/manifest.yaml` + artifact); None = the `models/`
    # directory shipped beside the package. Only the models a site names are loaded, once per
    # worker.
    "MODELS_DIR": None,
    # The SMART app's server-side sessions (cds_service/smart/sessions.py): redis://… (every
    # host) or sqlite:///path (one machine); None = the replay cache's Redis when it is one, else
    # var/smart-sessions.sqlite3.
    "SMART_SESSION_URL": None,
}

BUILTIN_SITE_ID = "default"
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class SiteService:
    """A service as enabled at one site: the prefetch templates that site actually uses."""

    service: CdsService
    prefetch: Mapping[str, str]
    # The model that scores for this service at this site (default: the service's own), a shadow
    # model scored and recorded but never shown, and the site's own score → indicator cut-offs
    # (checked against the model's outputs, and the models' `approved_use`, when the models
    # load: `runtime.build_models`).
    model: str | None = None
    shadow_model: str | None = None
    thresholds: Mapping[str, Threshold] | None = None
    # `services.<id>.settings` as loaded by the service's settings schema (defaults filled in).
    settings: Mapping[str, Any] = field(default_factory=dict)


# Same user, same patient, same card topic: an override within this window silences the card.
DEFAULT_OVERRIDE_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Site:
    """One hospital's configuration; `raw` keeps the parsed YAML as written (annotations too)."""

    id: str
    source: str
    services: Mapping[str, SiteService]
    epic_compatibility: bool = True
    prefetch_settings: PrefetchSettings = field(default_factory=PrefetchSettings)
    issuers: tuple[IssuerSpec, ...] = ()
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    allow_http_loopback_jku: bool = False
    cors_origins: tuple[str, ...] = ()
    # Local (system, code) → standard codes, applied by the feature engine (`code_mappings`).
    code_map: CodeMap = field(default_factory=dict)
    # Named orderables suggestions may create (`orderables`), e.g. "nephrology-referral".
    orderables: Mapping[str, Orderable] = field(default_factory=dict)
    # `alert_fatigue.override_window_hours`; zero turns suppression off.
    override_window: timedelta = DEFAULT_OVERRIDE_WINDOW
    # The site's FHIR R4 base (`fhir_server`), read by `cds-service site check`; calls use the
    # fhirServer each carries, when `prefetch_settings.fhir_servers` allows it.
    fhir_server: str | None = None
    # `sandbox`: serve the developer sandbox page at /sandbox (cds_service/tools/sandbox.py).
    sandbox: bool = False
    # `bulk_export`: the SMART Backend Services client for `cds-service data export`.
    bulk_export: BulkExportSettings | None = None
    # `model_acceptance`: what `cds-service models promote` requires of an evaluation.
    acceptance: Acceptance = field(default_factory=Acceptance)
    # `smart_app`: the SMART on FHIR companion app at /smart (cds_service/smart/).
    smart_app: SmartAppSettings | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


class _PrefetchSettingsSchema(SiteSection):

    deadline_seconds = fields.Float(validate=validate.Range(min=0.05, max=60))
    max_pages = fields.Integer(validate=validate.Range(min=1, max=1000))
    # Plain-http FHIR servers are refused (rule 20: https for production data); this opens
    # loopback addresses only, for local test servers.
    allow_http_loopback = fields.Boolean()
    # Bytes one FHIR answer, and one call's answers together, may take (decoded), in MiB.
    max_response_mib = fields.Float(validate=validate.Range(min=0.01, max=1024))
    max_total_mib = fields.Float(validate=validate.Range(min=0.01, max=4096))
    # Reads one call runs at a time (the worker has FHIR_MAX_WORKERS threads for all calls).
    max_parallel_reads = fields.Integer(validate=validate.Range(min=1, max=64))


class _ServiceEntrySchema(SiteSection):
    enabled = fields.Boolean(load_default=True)
    prefetch = fields.Dict(keys=fields.String(), values=fields.String())
    model = fields.String(validate=validate.Regexp(MODEL_ID))
    shadow_model = fields.String(allow_none=True, validate=validate.Regexp(MODEL_ID))
    thresholds = thresholds_field()
    # Validated by the service's own `settings_schema`.
    settings = fields.Dict(keys=fields.String())


class _OrderableSchema(SiteSection):
    system = fields.String(required=True, validate=validate.Length(min=1))
    code = fields.String(required=True, validate=validate.Length(min=1))
    display = fields.String(required=True, validate=validate.Length(min=1))


class _AlertFatigueSchema(SiteSection):
    override_window_hours = fields.Float(validate=validate.Range(min=0, max=24 * 365))


class _CorsSchema(SiteSection):
    # Exact origins of browser-based clients (e.g. the CDS Hooks sandbox); never "*".
    origins = fields.List(fields.String(validate=validate.Regexp(
        r"^https?://[^/\s*]+$", error="must be an origin like https://sandbox.cds-hooks.org")))


class _SiteSchema(SiteSection):
    site = fields.String(
        required=True, validate=validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    )
    epic_compatibility = fields.Boolean(load_default=True)
    prefetch = fields.Nested(_PrefetchSettingsSchema, load_default=dict)
    services = fields.Dict(
        keys=fields.String(), values=fields.Nested(_ServiceEntrySchema, allow_none=True)
    )
    issuers = fields.List(fields.Nested(IssuerSchema))
    audiences = fields.List(fields.Url(schemes={"https", "http"}, require_tld=False))
    jwt = fields.Nested(JwtSchema, load_default=dict)
    cors = fields.Nested(_CorsSchema, load_default=dict)
    orderables = fields.Dict(
        keys=fields.String(validate=validate.Regexp(
            r"^[a-z0-9][a-z0-9-]{0,63}$", error="orderable names are lower-case-with-dashes")),
        values=fields.Nested(_OrderableSchema))
    alert_fatigue = fields.Nested(_AlertFatigueSchema, load_default=dict)
    fhir_server = fields.Url(schemes={"https", "http"}, require_tld=False)
    # FHIR bases the calls' fhirServer may name (checked in `_fhir_servers`).
    fhir_servers = fields.List(fields.String(), validate=validate.Length(min=1))
    sandbox = fields.Boolean(load_default=False)
    # Validated by the feature engine (`parse_code_map`).
    code_mappings = fields.Raw(allow_none=True)
    # Validated by `cds_service.training.export_settings`.
    bulk_export = fields.Raw(allow_none=True)
    model_acceptance = fields.Nested(AcceptanceSchema, load_default=dict)
    # Validated by `cds_service.smart.settings`.
    smart_app = fields.Raw(allow_none=True)


def _service_settings(service: CdsService, raw: Mapping[str, Any] | None, source: str
                      ) -> Mapping[str, Any]:
    where = f"services.{service.id}.settings"
    if service.settings_schema is None:
        if raw:
            raise ConfigError(f"{source}: {where}: this service has no settings")
        return MappingProxyType({})
    try:
        return MappingProxyType(service.settings_schema().load(dict(raw or {})))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_errors(exc, where)}") from exc


def _site_from_mapping(data: Any, source: str, registry: Mapping[str, CdsService],
                       allow_dev_keys: bool = True) -> Site:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        parsed = _SiteSchema().load(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_errors(exc)}") from exc

    entries = parsed.get("services")
    if entries is None:  # not listed: every registered service, declared templates
        entries = {service_id: {} for service_id in registry}
    services: dict[str, SiteService] = {}
    for service_id, entry in entries.items():
        entry = entry or {}
        if service_id not in registry:
            raise ConfigError(
                f"{source}: services.{service_id}: no such service "
                f"(registered: {', '.join(registry) or 'none'})"
            )
        if not entry.get("enabled", True):
            continue
        service = registry[service_id]
        templates = dict(service.prefetch)
        for key, template in (entry.get("prefetch") or {}).items():
            if key not in templates:
                raise ConfigError(
                    f"{source}: services.{service_id}.prefetch.{key}: the service reads no such "
                    f"prefetch key (its keys: {', '.join(templates) or 'none'})"
                )
            templates[key] = template
        for key, template in templates.items():
            problems = lint_template(template)
            if problems:
                raise ConfigError(
                    f"{source}: services.{service_id}.prefetch.{key}: {template!r}: "
                    + "; ".join(problems)
                )
        model = entry.get("model", service.model)
        if model is None and (entry.get("shadow_model") or entry.get("thresholds")):
            raise ConfigError(f"{source}: services.{service_id}: shadow_model and thresholds "
                              "need a model, and this service uses none")
        if "model" in entry and service.model is None:
            raise ConfigError(f"{source}: services.{service_id}.model: this service uses no "
                              "model")
        if entry.get("shadow_model") and entry.get("shadow_model") == model:
            raise ConfigError(f"{source}: services.{service_id}.shadow_model: the shadow must "
                              "differ from the active model")
        thresholds = entry.get("thresholds")
        services[service_id] = SiteService(
            service, MappingProxyType(templates), model=model,
            shadow_model=entry.get("shadow_model"),
            thresholds=ordered_thresholds(thresholds) if thresholds else None,
            settings=_service_settings(service, entry.get("settings"), source))

    allow_http_jku = parsed["jwt"].get("allow_http_loopback_jku", False)
    issuers = tuple(
        parse_issuer(entry, index, source, allow_http_jku, allow_dev_keys)
        for index, entry in enumerate(parsed.get("issuers") or [])
    )
    if parsed["sandbox"] and not any(i.get("dev_keypair") for i in parsed.get("issuers") or ()):
        # The sandbox mints tokens with the site's development key; a site trusting only real
        # EHR keys has none, and a production site must never be able to mint one.
        raise ConfigError(f"{source}: sandbox: needs an issuer with `dev_keypair: true` (the "
                          "sandbox signs its calls with the site's development key)")
    try:
        code_map = parse_code_map(parsed.get("code_mappings") or [])
    except FeatureSpecError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    p = parsed["prefetch"]
    allow_http = p.get("allow_http_loopback", PrefetchSettings.allow_http_loopback)
    settings = PrefetchSettings(
        deadline_s=p.get("deadline_seconds", PrefetchSettings.deadline_s),
        max_pages=p.get("max_pages", PrefetchSettings.max_pages),
        allow_http_loopback=allow_http,
        fhir_servers=_fhir_servers(parsed, issuers, source, allow_http),
        max_response_bytes=_bytes(p, "max_response_mib", PrefetchSettings.max_response_bytes),
        max_total_bytes=_bytes(p, "max_total_mib", PrefetchSettings.max_total_bytes),
        max_parallel_reads=p.get("max_parallel_reads", PrefetchSettings.max_parallel_reads),
    )
    bulk_export = parse_bulk_export(parsed.get("bulk_export"), source,
                                    allow_http_loopback=settings.allow_http_loopback)
    return Site(
        id=parsed["site"],
        source=source,
        services=MappingProxyType(services),
        epic_compatibility=parsed["epic_compatibility"],
        prefetch_settings=settings,
        issuers=issuers,
        audiences=tuple(parsed.get("audiences") or ()),
        algorithms=tuple(parsed["jwt"].get("algorithms") or DEFAULT_ALGORITHMS),
        allow_http_loopback_jku=parsed["jwt"].get("allow_http_loopback_jku", False),
        cors_origins=tuple(parsed["cors"].get("origins") or ()),
        code_map=code_map,
        orderables=MappingProxyType({name: Orderable(**spec) for name, spec in
                                     (parsed.get("orderables") or {}).items()}),
        override_window=timedelta(hours=parsed["alert_fatigue"].get(
            "override_window_hours", DEFAULT_OVERRIDE_WINDOW.total_seconds() / 3600)),
        fhir_server=parsed.get("fhir_server"),
        sandbox=parsed["sandbox"],
        bulk_export=bulk_export,
        acceptance=parse_acceptance(parsed["model_acceptance"]),
        smart_app=parse_smart_app(parsed.get("smart_app"), source,
                                  allow_http_loopback=settings.allow_http_loopback),
        raw=MappingProxyType(data),
    )


def _bytes(section: Mapping[str, Any], key: str, default: int) -> int:
    return round(section[key] * MIB) if key in section else default


def _fhir_servers(parsed: Mapping[str, Any], issuers: Sequence[IssuerSpec], source: str,
                  allow_http: bool) -> tuple[str, ...]:
    """`fhir_servers` as written, each checked; else the site's `fhir_server` and those issuers'
    `iss` that are FHIR bases (Epic's `iss` is the FHIR R4 base it hands out as fhirServer)."""
    listed = parsed.get("fhir_servers")
    if listed is None:
        candidates = [parsed["fhir_server"]] if parsed.get("fhir_server") else []
        candidates += [issuer.iss for issuer in issuers]
        return tuple(dict.fromkeys(url for url in candidates if _fhir_base_problem(
            url, allow_http) is None))
    for n, url in enumerate(listed):
        problem = _fhir_base_problem(url, allow_http)
        if problem:
            raise ConfigError(f"{source}: fhir_servers[{n}]: {url!r} {problem}")
    return tuple(dict.fromkeys(listed))


def _fhir_base_problem(url: str, allow_http: bool) -> str | None:
    try:
        FhirBase.parse(url)
        check_fhir_server_url(url, allow_http_loopback=allow_http)
    except ValueError as exc:
        return f"is not a usable FHIR base URL: {exc}"
    except InsecureFhirServer:
        return ("must be https (plain http only to a loopback host, with "
                "prefetch.allow_http_loopback)")
    return None


def _read_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read site configuration: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def load_sites(path: str | Path | None, registry: Mapping[str, CdsService], *,
               allow_dev_keys: bool = True) -> dict[str, Site]:
    """Read and validate every site; raises ConfigError naming the file and key at fault.
    `allow_dev_keys` false (a served deployment unless ALLOW_DEV_KEYS): `dev_keypair` is an
    error, and no key pair is generated."""
    if path is None:
        site = _site_from_mapping({"site": BUILTIN_SITE_ID}, "<built-in defaults>", registry)
        return {site.id: site}
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise ConfigError(f"{root}: no *.yaml site files in this directory")
    elif root.is_file():
        files = [root]
    else:
        raise ConfigError(f"{root}: site configuration path does not exist")

    sites: dict[str, Site] = {}
    issuers: dict[str, str] = {}
    for file in files:
        site = _site_from_mapping(_read_yaml(file), str(file), registry, allow_dev_keys)
        if site.id in sites:
            raise ConfigError(
                f"{file}: site: {site.id!r} is already defined in {sites[site.id].source}"
            )
        for issuer in site.issuers:
            # The verified `iss` selects the site (tenancy), so it must name exactly one.
            if issuer.iss in issuers:
                raise ConfigError(
                    f"{file}: issuers: iss {issuer.iss!r} is already trusted by site "
                    f"{issuers[issuer.iss]!r}"
                )
            issuers[issuer.iss] = site.id
        sites[site.id] = site
    return sites


def choose_default_site(sites: Mapping[str, Site], wanted: str | None) -> Site:
    if wanted:
        if wanted not in sites:
            raise ConfigError(
                f"DEFAULT_SITE: {wanted!r} is not a configured site ({', '.join(sites)})"
            )
        return sites[wanted]
    if len(sites) == 1:
        return next(iter(sites.values()))
    raise ConfigError(
        f"DEFAULT_SITE: {len(sites)} sites are configured ({', '.join(sites)}); "
        "set CDS_DEFAULT_SITE to the one that answers requests"
    )


def enabled_service_ids(site: Site) -> Sequence[str]:
    return tuple(site.services)
