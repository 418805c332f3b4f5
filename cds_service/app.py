"""The application factory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from cds_service import logs
from cds_service.config import DEFAULTS, choose_default_site, load_sites
from cds_service.http import Api, register_error_handlers
from cds_service.registry import index_services
from cds_service.runtime import build_runtime

OPENAPI = {
    "API_TITLE": "CDS Hooks service",
    "API_VERSION": "0.1.0",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "docs",
    "OPENAPI_SWAGGER_UI_URL": "https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then `CDS_*` environment variables, then `config`.

    Raises `ConfigError` (naming the file and key) when the site configuration is invalid, so
    a bad deployment stops at start-up instead of failing requests.
    """
    app = Flask("cds_service")
    app.config.update(DEFAULTS)
    app.config.update(OPENAPI)
    app.config.from_prefixed_env("CDS")
    if config:
        app.config.update(config)
    logging.getLogger("cds_service").setLevel(app.config["LOG_LEVEL"])

    if "SERVICES" in app.config:  # tests register their own services
        services = index_services(app.config["SERVICES"])
    else:
        from hooks import SERVICES

        services = index_services(SERVICES)
    sites = load_sites(app.config["SITE_CONFIG"], services)
    default_site = choose_default_site(sites, app.config["DEFAULT_SITE"])

    logs.init_app(app)  # first: the request id is set before anything logs
    api = Api(app)
    app.extensions["cds_api"] = api
    register_error_handlers(app)

    from cds_service.views import blp, health

    api.register_blueprint(blp)
    api.register_blueprint(health)
    build_runtime(app, services, sites, default_site)
    return app
