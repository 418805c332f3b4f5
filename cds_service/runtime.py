"""Per-app state built once by `create_app`, kept in `app.extensions["cds"]`.

gunicorn forks workers after importing nothing of ours (no preload), so each worker builds its
own runtime; the thread pool is still created lazily and re-created after a fork, because
threads do not survive one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

import jwt
from flask import Flask, Request, current_app, g

from cds_service.config import Site, SiteService
from cds_service.models.binding import ModelBinding
from cds_service.models.errors import ModelError
from cds_service.models.loaded import (
    ModelSet,
    check_site_thresholds,
    check_use,
    load_model_by_id,
)
from cds_service.ops import metrics
from cds_service.protocol.errors import ConfigError
from cds_service.records import spool
from cds_service.records.database import redacted_url
from cds_service.records.store import Store
from cds_service.service import CdsService
from cds_service.trust.auth import TokenVerifier, VerifiedCaller
from cds_service.trust.errors import AuthError
from cds_service.trust.issuers import TrustedIssuer
from cds_service.trust.jwks import JwksCache
from cds_service.trust.jwks_shared import RedisJwksStore
from cds_service.trust.replay import replay_cache_from_url
from cds_service.trust.settings import AuthSettings

log = logging.getLogger("cds_service.runtime")


@dataclass
class CdsRuntime:
    services: Mapping[str, CdsService]
    sites: Mapping[str, Site]
    default_site: Site | None  # answers unauthenticated calls (AUTH_REQUIRED false)
    store: Store
    store_url_redacted: str
    verifier: TokenVerifier | None = None  # None only when AUTH_REQUIRED is explicitly false
    # PUBLIC_URL, checked: the base of the endpoint URL a token's `aud` may name.
    public_url: str | None = None
    models: ModelSet = field(default_factory=ModelSet)
    # "Now" for models (ages, look-back windows). Tests pass CLOCK to freeze it.
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    fhir_max_workers: int = 16
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    _executor_pid: int | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def cors_origins(self) -> frozenset[str]:
        """Origins any site allows: a preflight carries no token, so no site is known yet."""
        return frozenset(o for site in self.sites.values() for o in site.cors_origins)

    def authenticate(self, request: Request) -> tuple[Site, VerifiedCaller | None]:
        """The caller's site, selected by the verified `iss` (tenancy); raises AuthError."""
        if self.verifier is None:
            return self.default_site, None
        authorization = request.headers.get("Authorization")
        # The endpoint invoked, as configured: `request.base_url` would be built from the Host
        # (and, behind gunicorn, X-Forwarded-Proto) header, so a token minted for another
        # vendor's endpoint would pass by naming that vendor's host. `request.path` is the route
        # matched, which the caller cannot point elsewhere.
        endpoint = self.public_url + request.path if self.public_url else None
        try:
            caller = self.verifier.verify(authorization, endpoint)
        except AuthError as exc:
            g.claimed_site = self.claimed_site(authorization)
            metrics.rejected(g.claimed_site, exc.reason)
            raise
        return self.sites[caller.site_id], caller

    def claimed_site(self, authorization: str | None) -> str | None:
        """The site whose trusted issuer a refused token names, for metrics and alerts ("auth
        failures at site X"). Unverified, so only ever a configured site id, never the claim."""
        try:
            token = (authorization or "").split(" ", 1)[1].strip()
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except Exception:  # noqa: BLE001 - anything unreadable claims no site
            return None
        return self._site_by_issuer.get(iss) if isinstance(iss, str) else None

    @cached_property
    def _site_by_issuer(self) -> dict[str, str]:
        return {spec.iss: site.id for site in self.sites.values() for spec in site.issuers}

    def model_binding(self, site: Site, enabled: SiteService) -> ModelBinding | None:
        """A fresh per-request binding of the site's active (and shadow) model for a service."""
        if enabled.model is None:
            return None
        shadow = self.models.get(enabled.shadow_model) if enabled.shadow_model else None
        return ModelBinding(self.models.get(enabled.model), shadow, enabled.thresholds,
                            site.code_map, clock=self.clock)

    @property
    def executor(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        if self._executor is None or self._executor_pid != pid:
            with self._lock:
                if self._executor is None or self._executor_pid != pid:
                    self._executor = ThreadPoolExecutor(
                        max_workers=self.fhir_max_workers, thread_name_prefix="fhir"
                    )
                    self._executor_pid = pid
        return self._executor

    def close(self) -> None:
        if self._executor is not None and self._executor_pid == os.getpid():
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        self.store.dispose()


def check_public_url(value: object) -> str | None:
    """PUBLIC_URL without its trailing slash, or None; ConfigError naming what is wrong."""
    if value is None or value == "":
        return None
    problem = None
    if not isinstance(value, str):
        problem = "is not a URL"
    else:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            parts, problem = None, "is not a valid URL"
        if parts is not None:
            if parts.scheme not in ("https", "http") or not parts.hostname:
                problem = "must be an http(s) URL with a host, e.g. https://cds.example.org"
            elif parts.username is not None or parts.password is not None:
                problem = "must not carry credentials"
            elif parts.query or parts.fragment or value.endswith("?") or "#" in value:
                problem = "must not carry a query or fragment"
    if problem:
        raise ConfigError(f"PUBLIC_URL (CDS_PUBLIC_URL, serve --public-url): {value!r} {problem}")
    return value.rstrip("/")


def check_audiences(sites: Mapping[str, Site], public_url: str | None) -> None:
    """A site that trusts issuers must be able to accept some `aud`: without PUBLIC_URL and
    without `audiences` every token would be refused, so refuse to start instead."""
    if public_url:
        return
    for site in sites.values():
        if site.issuers and not site.audiences:
            raise ConfigError(
                f"{site.source}: site {site.id!r} trusts issuers but accepts no JWT audience: "
                "set the URL Epic calls this service at with CDS_PUBLIC_URL (or `cds-service "
                "serve --public-url`), e.g. https://cds.example.org, or list the `aud` values "
                "the hospital typed into Epic in the site's `audiences`"
            )


def build_verifier(app: Flask, sites: Mapping[str, Site]) -> TokenVerifier | None:
    if not app.config["AUTH_REQUIRED"]:
        log.warning("AUTH_REQUIRED is false: CDS endpoints accept unauthenticated callers. "
                    "Never run like this where Epic or any network can reach the service.")
        return None
    issuers = []
    allow_http = False
    for site in sites.values():
        allow_http = allow_http or site.allow_http_loopback_jku
        for spec in site.issuers:
            issuers.append(TrustedIssuer(iss=spec.iss, site_id=site.id, jku=spec.jku,
                                         jwks=spec.jwks, audiences=site.audiences,
                                         algorithms=site.algorithms))
    if not issuers:
        log.warning("no site trusts any issuer: every CDS call will be refused with 401")
    settings = AuthSettings(leeway_s=int(app.config["JWT_LEEWAY_SECONDS"]),
                            allow_http_loopback_jku=allow_http)
    replay = replay_cache_from_url(app.config["REPLAY_CACHE_URL"], "var/jti-replay.sqlite3")
    shared = None
    if app.config["JWKS_CACHE_URL"]:
        try:
            shared = RedisJwksStore(app.config["JWKS_CACHE_URL"])
        except ValueError as exc:
            raise ConfigError(f"JWKS_CACHE_URL: {exc}") from exc
    try:
        return TokenVerifier(issuers, replay, settings, JwksCache(settings, shared=shared))
    except ValueError as exc:
        raise ConfigError(f"issuers: {exc}") from exc


def build_models(models_dir: str | Path, sites: Mapping[str, Site]) -> ModelSet:
    """Load every model any site names, once; a bad one stops start-up naming site and key."""
    wanted: dict[str, str] = {}
    for site in sites.values():
        for service_id, enabled in site.services.items():
            for key, model_id in (("model", enabled.model), ("shadow_model", enabled.shadow_model)):
                if model_id:
                    wanted.setdefault(model_id, f"{site.source}: services.{service_id}.{key}")
    loaded = {}
    for model_id, where in wanted.items():
        try:
            loaded[model_id] = load_model_by_id(models_dir, model_id)
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from exc
    # Each use against the manifest's `approved_use`, and a site's thresholds against the
    # outputs of the model they apply to.
    for site in sites.values():
        for service_id, enabled in site.services.items():
            where = f"{site.source}: services.{service_id}"
            if enabled.model:
                check_use(loaded[enabled.model], "active", f"{where}.model")
                check_site_thresholds(loaded[enabled.model], enabled.thresholds, where)
            if enabled.shadow_model:
                check_use(loaded[enabled.shadow_model], "shadow", f"{where}.shadow_model")
    return ModelSet(loaded)


def build_runtime(app: Flask, deployment) -> CdsRuntime:
    """The worker's runtime over a loaded `app.Deployment`: store, verifier, thread pool."""
    url = app.config["DATABASE_URL"]
    verifier = build_verifier(app, deployment.sites)
    rt = CdsRuntime(
        verifier=verifier,
        public_url=check_public_url(app.config["PUBLIC_URL"]),
        models=deployment.models,
        services=deployment.services,
        sites=deployment.sites,
        default_site=deployment.default_site,
        store=Store(url, spool_dir=app.config["SPOOL_DIR"] or spool.default_directory(url)),
        store_url_redacted=redacted_url(url),
        fhir_max_workers=int(app.config["FHIR_MAX_WORKERS"]),
    )
    if app.config.get("CLOCK") is not None:
        rt.clock = app.config["CLOCK"]
    metrics.models_loaded(deployment.models)
    app.extensions["cds"] = rt
    return rt


def runtime() -> CdsRuntime:
    return current_app.extensions["cds"]
