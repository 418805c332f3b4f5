"""The effective configuration, as `cds-service check-config` prints it.

Everything a worker runs with once `DEFAULTS`, `CDS_*` variables and the site files are applied:
the deployment settings, then per site its trust (issuers, audiences, algorithms), FHIR access,
services with their models, thresholds, settings and prefetch templates, orderables and code
mappings. Secrets never appear: storage URLs are shown with passwords masked
(`database.redacted_url`), and trust stores hold public keys only (`site_issuers.read_jwks` refuses
anything else), shown as their key ids. Only the settings named in `DEFAULTS` are shown, so an
unrelated `CDS_*` variable (or a Flask secret) never reaches the output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml
from flask import Flask

from cds_service.config import SHIPPED_MODELS_DIR, Site, SiteService
from cds_service.data.fhir import MIB
from cds_service.models.loaded import ModelSet
from cds_service.records.database import redacted_url


def effective_config(app: Flask) -> dict[str, Any]:
    """`{"deployment": {...}, "sites": {id: {...}}}`, JSON-ready."""
    rt = app.extensions["cds"]
    config = app.config
    replay, jwks_cache = config["REPLAY_CACHE_URL"], config["JWKS_CACHE_URL"]
    deployment = {
        "site_config": config["SITE_CONFIG"] or "built-in defaults (one site, every service)",
        "default_site": rt.default_site.id if rt.default_site else None,
        "auth_required": bool(config["AUTH_REQUIRED"]),
        # A JWT's `aud` may name <public_url>/cds-services/<id>, or a site's `audiences`.
        "public_url": rt.public_url,
        "jwt_leeway_seconds": config["JWT_LEEWAY_SECONDS"],
        "database_url": rt.store_url_redacted,
        "replay_cache_url": redacted_url(replay) if replay else None,
        "jwks_cache_url": redacted_url(jwks_cache) if jwks_cache else None,
        "audit_retention_days": config["AUDIT_RETENTION_DAYS"],
        "models_dir": str(config["MODELS_DIR"] or SHIPPED_MODELS_DIR),
        "models": rt.models.describe(),
        "max_content_length": config["MAX_CONTENT_LENGTH"],
        "fhir_max_workers": config["FHIR_MAX_WORKERS"],
        "log_level": config["LOG_LEVEL"],
    }
    return {"deployment": deployment,
            "sites": {site.id: _site(site, rt.models) for site in rt.sites.values()}}


def _site(site: Site, models: ModelSet) -> dict[str, Any]:
    p = site.prefetch_settings
    return {
        "source": site.source,
        "issuers": [{"iss": i.iss, "jku": list(i.jku), "jwks_file": i.jwks_file,
                     "kids": [k.get("kid") for k in (i.jwks or {}).get("keys", ())]}
                    for i in site.issuers],
        "audiences": list(site.audiences),
        "jwt": {"algorithms": list(site.algorithms),
                "allow_http_loopback_jku": site.allow_http_loopback_jku},
        "cors_origins": list(site.cors_origins),
        "epic_compatibility": site.epic_compatibility,
        "fhir_server": site.fhir_server,
        # data/fhir.py: the token Epic hands over goes only to the origin of the request's
        # fhirServer, over https (or plain http to a loopback host when allowed), and is never
        # logged.
        "fhir_token": "sent to the request's fhirServer only, over https"
                      + (" or plain http to a loopback host" if p.allow_http_loopback else "")
                      + ", when fhir_servers allows it",
        "fhir_servers": list(p.fhir_servers),
        "prefetch": {"deadline_seconds": p.deadline_s, "max_pages": p.max_pages,
                     "allow_http_loopback": p.allow_http_loopback,
                     "max_response_mib": p.max_response_bytes / MIB,
                     "max_total_mib": p.max_total_bytes / MIB,
                     "max_parallel_reads": p.max_parallel_reads},
        "sandbox": site.sandbox,
        "alert_fatigue": {"override_window_hours": site.override_window.total_seconds() / 3600},
        "orderables": {name: {"system": o.system, "code": o.code, "display": o.display}
                       for name, o in site.orderables.items()},
        "code_mappings": [{"from": "|".join(source), "to": ["|".join(t) for t in targets]}
                          for source, targets in site.code_map.items()],
        "services": {service_id: _service(enabled, models)
                     for service_id, enabled in site.services.items()},
    }


def _service(enabled: SiteService, models: ModelSet) -> dict[str, Any]:
    service = enabled.service
    model = models.get(enabled.model) if enabled.model else None
    shadow = models.get(enabled.shadow_model) if enabled.shadow_model else None
    thresholds = enabled.thresholds or (model.manifest.thresholds if model else None)
    return {
        "hooks": list(service.hooks),
        "model": model.describe() if model else None,
        # What the manifests allow (`approved_use`); start-up refuses a use not listed.
        "model_approved_use": list(model.manifest.approved_use) if model else None,
        "shadow_model": shadow.describe() if shadow else None,
        "thresholds": ({i: t.to_doc() for i, t in thresholds.items()} if thresholds
                       else None),
        "thresholds_from": ("site" if enabled.thresholds else "model manifest") if model else None,
        "settings": _plain(enabled.settings),
        "prefetch": dict(enabled.prefetch),
        "optional_prefetch": sorted(service.optional_prefetch),
        "orderables_read": list(service.orderables),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def render(view: Mapping[str, Any], *, as_json: bool = False) -> str:
    """JSON, or for reading: one block per section in the site files' own YAML notation."""
    if as_json:
        return json.dumps(view, indent=2)
    blocks = ["deployment\n" + _yaml(view["deployment"])]
    for site_id, site in view["sites"].items():
        body = {k: v for k, v in site.items() if k != "source"}
        blocks.append(f"site {site_id} ({site['source']})\n" + _yaml(body))
    return "\n".join(blocks).rstrip("\n")


class _Dumper(yaml.SafeDumper):
    """Lists of plain values on one line (`algorithms: [RS384, ES384]`), the rest as blocks."""


def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _list)


def _yaml(data: Mapping[str, Any]) -> str:
    text = yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=1 << 16)
    return "".join(f"  {line}\n" for line in text.splitlines())
