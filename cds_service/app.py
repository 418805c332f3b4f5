"""The application factory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Config, Flask

from cds_service.config import DEFAULTS, SHIPPED_MODELS_DIR, Site, choose_default_site, load_sites
from cds_service.features import prepare as prepare_features
from cds_service.models.loaded import ModelSet
from cds_service.ops import listeners, logs, memory
from cds_service.protocol import swagger_ui
from cds_service.protocol.errors import ConfigError
from cds_service.protocol.http import Api, App, JsonProvider, register_error_handlers
from cds_service.runtime import build_models, build_runtime, check_audiences, check_public_url
from cds_service.service import CdsService, index_services

OPENAPI = {
    "API_TITLE": "CDS Hooks service",
    "API_VERSION": "0.1.0",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "docs",
    "OPENAPI_SWAGGER_UI_URL": swagger_ui.ASSETS_URL,
}


@dataclass(frozen=True)
class Deployment:
    """Everything a worker serves that is read from files: settings, sites, services, models.

    `cds-service serve` loads it once in the gunicorn master (and again on SIGHUP, only if the
    new files are valid); workers are forked with it. A worker that gunicorn restarts (max
    requests, a crash) therefore serves the validated configuration the others serve, not
    whatever the files on disk say at that moment: a site file edited in place, or a Kubernetes
    ConfigMap updated under a running pod, only takes effect on a reload that validates it.
    """

    config: Mapping[str, Any]
    services: Mapping[str, CdsService]
    sites: Mapping[str, Site]
    default_site: Site | None  # None: authentication on, several sites
    models: ModelSet


def resolve_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`DEFAULTS`, then `CDS_*` environment variables, then `config`."""
    resolved = Config(".")
    resolved.update(DEFAULTS)
    resolved.from_prefixed_env("CDS")
    if config:
        resolved.update(config)
    return dict(resolved)


def load_deployment(config: Mapping[str, Any] | None = None) -> Deployment:
    """Read and validate the configuration; raises `ConfigError` naming the file and key."""
    resolved = resolve_config(config)
    if "SERVICES" in resolved:  # tests register their own services
        services = index_services(resolved["SERVICES"])
    else:
        from hooks import SERVICES

        services = index_services(SERVICES)
    if not isinstance(resolved["ALLOW_DEV_KEYS"], bool):
        # CDS_ALLOW_DEV_KEYS=no would be a truthy string: only JSON true/false are taken.
        raise ConfigError(f"ALLOW_DEV_KEYS (CDS_ALLOW_DEV_KEYS): {resolved['ALLOW_DEV_KEYS']!r} "
                          "is not true or false")
    sites = load_sites(resolved["SITE_CONFIG"], services,
                       allow_dev_keys=resolved["ALLOW_DEV_KEYS"])
    public_url = check_public_url(resolved["PUBLIC_URL"])
    try:
        listeners.check_ops_port(resolved["OPS_PORT"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if resolved["AUTH_REQUIRED"]:
        check_audiences(sites, public_url)
    # The site that answers without a verified token. With authentication on (the default) the
    # token's `iss` picks the site, so several sites need no default.
    default_site = (choose_default_site(sites, resolved["DEFAULT_SITE"])
                    if resolved["DEFAULT_SITE"] or not resolved["AUTH_REQUIRED"] or len(sites) == 1
                    else None)
    models = build_models(resolved["MODELS_DIR"] or SHIPPED_MODELS_DIR, sites)
    prepare_features([*(group for service in services.values() for group in service.feature_groups),
                      *(model.manifest.features for model in models)])
    return Deployment(resolved, services, sites, default_site, models)


def create_app(config: Mapping[str, Any] | None = None, *,
               deployment: Deployment | None = None) -> Flask:
    """Build the app: defaults, then `CDS_*` environment variables, then `config`; or from a
    `deployment` already loaded (gunicorn workers).

    Raises `ConfigError` (naming the file and key) when the site configuration is invalid, so
    a bad deployment stops at start-up instead of failing requests.
    """
    if deployment is None:
        deployment = load_deployment(config)
    app = App("cds_service")
    app.json = JsonProvider(app)
    app.config.update(deployment.config)
    app.config.update(OPENAPI)
    logging.getLogger("cds_service").setLevel(app.config["LOG_LEVEL"])

    logs.init_app(app)  # first: the request id is set before anything logs
    memory.init_app(app)
    api = Api(app)
    app.extensions["cds_api"] = api
    register_error_handlers(app)

    from cds_service.protocol.views import blp, health

    api.register_blueprint(blp)
    api.register_blueprint(health)
    app.register_blueprint(swagger_ui.bp)
    build_runtime(app, deployment)
    listeners.init_app(app)  # /metrics and detailed health on the ops port, when there is one
    # A sandbox site has a dev_keypair issuer, which loads only with ALLOW_DEV_KEYS: both hold.
    if app.config["ALLOW_DEV_KEYS"] and any(site.sandbox for site in deployment.sites.values()):
        from cds_service.tools import (
            sandbox,  # a developer tool: mounted only where a site enables it
        )

        sandbox.init_app(app, deployment.sites)
    if any(site.smart_app for site in deployment.sites.values()):
        from cds_service.smart import views as smart  # mounted only where a site enables it

        smart.init_app(app, deployment.sites)
    return app
