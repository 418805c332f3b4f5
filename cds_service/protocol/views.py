"""CDS Hooks endpoints: discovery, service invocation, feedback; and health.

Request path, with no extra layers: view → prefetch resolution → service handler → cards.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from flask import Response, g, request

from cds_service.data.fhir import origin_for_audit
from cds_service.data.prefetch_resolve import resolve_prefetch
from cds_service.ops import metrics
from cds_service.protocol.cards import render_response
from cds_service.protocol.errors import RequestInvalid, ServiceNotFound
from cds_service.protocol.http import Blueprint, json_body, require_json_body
from cds_service.protocol.schemas import (
    CardsResponseSchema,
    CdsRequestSchema,
    DiscoverySchema,
    FeedbackAckSchema,
)
from cds_service.records import suppression
from cds_service.records.audit import FEEDBACK
from cds_service.records.call import CallRecord, kind_of
from cds_service.records.database import StoreUnavailable
from cds_service.records.feedback import FeedbackRequestSchema
from cds_service.runtime import runtime
from cds_service.service import HookRequest

if TYPE_CHECKING:
    from cds_service.config import Site, SiteService
    from cds_service.data.prefetch import Prefetch

log = logging.getLogger("cds_service.protocol.views")

# Feedback is committed before its 200; a store that has not answered in this long gets the EHR
# a 503 to retry on (a repeat is stored once), not a call held open until its own timeout.
FEEDBACK_STORE_TIMEOUT_S = 3.0

blp = Blueprint(
    "cds-hooks", __name__, description="CDS Hooks 2.0: discovery, services and feedback."
)


@blp.before_request
def _authenticate_and_precheck():
    metrics.end_call()  # a thread's previous request never lends this one its timer
    if request.method == "OPTIONS":  # CORS preflight carries no credentials
        return
    g.call = call = CallRecord(kind=kind_of(request.path), started=time.perf_counter(),
                               target=f"{request.method} {request.path}",
                               audit={"service_id": (request.view_args or {}).get("service_id")})
    # Authenticate first: an unauthenticated caller learns nothing, not even which ids exist.
    call.note_caller(*runtime().authenticate(request))
    if request.method == "POST":
        metrics.start_call(call.site.id, _service_label()).add(
            "auth", time.perf_counter() - call.started)
    # Then the cheap, most specific problems, before parsing a (possibly large) body.
    if request.method != "POST":
        return
    require_json_body()
    service_id = (request.view_args or {}).get("service_id")
    if service_id is not None:
        site_service(service_id)


def site_service(service_id: str):
    site = g.call.site
    enabled = site.services.get(service_id)
    if enabled is None:
        raise ServiceNotFound(f"No CDS service {service_id!r} is enabled for this site.")
    return site, enabled


@blp.route("/cds-services", methods=["GET"])
@blp.response(200, DiscoverySchema)
def discovery():
    """List this site's CDS services (one entry per service and hook) with its prefetch."""
    site = g.call.site
    entries = []
    for site_service_ in site.services.values():
        service = site_service_.service
        for hook in service.hooks:
            entry = {"hook": hook, "id": service.id, "title": service.title,
                     "description": service.description}
            if site_service_.prefetch:
                entry["prefetch"] = dict(site_service_.prefetch)
            if service.usage_requirements:
                entry["usageRequirements"] = service.usage_requirements
            entries.append(entry)
    return {"services": entries}


@blp.route("/cds-services/<service_id>", methods=["POST"])
# Schema instances, not classes: webargs would build a new schema for every call (a tenth of a
# millisecond); these hold no per-call state.
@blp.arguments(CdsRequestSchema(), location="json", error_status_code=400)
@blp.response(200, CardsResponseSchema)
@blp.alt_response(400, description="Invalid request (OperationOutcome)")
@blp.alt_response(404, description="Service not enabled for this site (OperationOutcome)")
@blp.alt_response(412, description="Required FHIR data unavailable (OperationOutcome)")
def invoke(body: dict, service_id: str):
    """Invoke a CDS service with a hook request; answers cards (possibly none)."""
    started = time.perf_counter()
    site, enabled = site_service(service_id)
    service = enabled.service
    if body["hook"] not in service.hooks:
        raise RequestInvalid(
            f"Service {service_id!r} answers {', '.join(service.hooks)}, not {body['hook']!r}.",
        )
    call = g.call
    call.note_request(body)
    prefetch = _prefetch_for(body, site, enabled)
    hook_request = _hook_request(body, site, enabled, prefetch)
    call.model_binding = hook_request.model
    call.note_prefetch(prefetch)
    cards, decision, rendered = _cards_for(service, hook_request)
    metrics.count_cards(site.id, service.id, cards, decision.kept)
    call.note_cards(decision, rendered)
    log.info(
        "hook=%s service=%s site=%s hookInstance=%s cards=%d elapsed_ms=%.1f",
        body["hook"], service.id, site.id, body["hookInstance"], len(rendered["cards"]),
        (time.perf_counter() - started) * 1000,
    )
    return Response(json_body(rendered), status=200, mimetype="application/json")


def _prefetch_for(body: dict, site: Site, enabled: SiteService) -> Prefetch:
    """The service's prefetch: what the EHR sent, the rest read from its FHIR server (a server
    the site does not allow is noted on the call's audit record)."""
    fhir_server = body.get("fhirServer")
    authorization = body.get("fhirAuthorization") or {}
    if fhir_server and not site.prefetch_settings.allows(fhir_server):
        g.call.note(fhir_server_refused=origin_for_audit(fhir_server))
    with metrics.stage("prefetch"):
        return resolve_prefetch(
            enabled.prefetch,
            context=body["context"],
            prefetch=body["prefetch"],
            fhir_server=fhir_server,
            access_token=authorization.get("access_token"),
            settings=site.prefetch_settings,
            executor=runtime().executor,
            optional=enabled.service.optional_prefetch,
        )


def _hook_request(body: dict, site: Site, enabled: SiteService, prefetch: Prefetch
                  ) -> HookRequest:
    return HookRequest(
        service_id=enabled.service.id,
        hook=body["hook"],
        hook_instance=body["hookInstance"],
        context=body["context"],
        prefetch=prefetch,
        site=site,
        extension=body["extension"],
        fhir_server=body.get("fhirServer"),
        model=runtime().model_binding(site, enabled),
        settings=enabled.settings,
        now=runtime().clock(),
        stage=metrics.stage,
    )


def _cards_for(service, hook_request: HookRequest):
    """The handler's cards; the decision on which are shown (`suppression`); the response."""
    site, context = hook_request.site, hook_request.context
    with metrics.stage("cards"):  # the handler's own feature and model time is taken out below
        cards = service.handler(hook_request)
        decision = suppression.apply(cards, store=runtime().store, site=site,
                                     service_id=service.id, context=context,
                                     now=hook_request.now)
        rendered = render_response(decision.kept, epic=site.epic_compatibility,
                                   extension=decision.extension())
    return cards, decision, rendered


@blp.route("/cds-services/<service_id>/feedback", methods=["POST"])
@blp.arguments(FeedbackRequestSchema(clock=lambda: runtime().clock()), location="json",
               error_status_code=400)
@blp.response(200, FeedbackAckSchema)
@blp.alt_response(400, description="Malformed feedback (OperationOutcome)")
def feedback(items: list, service_id: str):
    """Record clinicians' accept/override outcomes; stored durably before answering 200."""
    site, _ = site_service(service_id)
    g.call.note(feedback_cards=tuple(item.card for item in items))
    store = runtime().store
    keys = [item.dedupe_key(site.id, service_id) for item in items]
    received_at = runtime().clock()

    def store_feedback() -> set[str]:  # on a store thread: no app context
        new = store.insert_feedback(site.id, service_id, items, keys=keys,
                                    received_at=received_at)
        metrics.count_feedback(site.id, service_id,
                               [item for item, key in zip(items, keys, strict=True) if key in new],
                               store)
        return new

    stored = len(store.within(FEEDBACK_STORE_TIMEOUT_S, store_feedback))
    g.call.note(outcome=f"received={len(items)} stored={stored}")
    log.info("feedback service=%s site=%s received=%d stored=%d",
             service_id, site.id, len(items), stored)
    return {"received": len(items), "stored": stored}


@blp.after_request
def _cors(response):
    """CORS for browser-based clients (e.g. the CDS Hooks sandbox); off unless a site lists
    origins. Exact origins only, never `*`, never credentials: callers send a bearer JWT, not
    cookies (OWASP HTML5 Security Cheat Sheet, CORS; CDS Hooks 2.0 §CORS, rule 135)."""
    origin = request.headers.get("Origin")
    if not origin:
        return response
    call = g.get("call")
    site = call.site if call is not None else None
    allowed = site.cors_origins if site is not None else runtime().cors_origins
    if origin not in allowed:
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.vary.add("Origin")
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
    return response


def _service_label() -> str:
    service_id = (request.view_args or {}).get("service_id")
    return service_id if service_id in runtime().services else metrics.UNKNOWN


@blp.after_request
def _metrics(response):
    """Request counts and stage times; a refused token counts under the site it claimed."""
    call = g.get("call")
    if request.method != "POST" or call is None:
        return response
    site = call.site.id if call.site is not None else g.get("claimed_site")
    hook = "feedback" if call.kind == FEEDBACK else (call.audit.get("hook") or metrics.UNKNOWN)
    elapsed = time.perf_counter() - call.started
    metrics.count_request(site or metrics.UNKNOWN, _service_label(), hook,
                          response.status_code, elapsed)
    response.headers["Server-Timing"] = metrics.server_timing(elapsed)
    metrics.end_call()
    return response


@blp.after_request
def _audit(response):
    """One append-only audit record per invocation and feedback call, whatever its outcome."""
    call = g.get("call")
    if call is None or request.method != "POST":
        return response
    try:
        call.submit(runtime().store.record, datetime.now(UTC), response.status_code)
    except Exception:  # noqa: BLE001 - the clinician's answer must not wait on the audit log
        log.exception("call record not spooled for %s %s", request.method, request.path)
    return response


health = Blueprint("health", __name__, description="Liveness and readiness probes.")


@health.route("/healthz", methods=["GET"])
def healthz():
    """Liveness: the process is up and serving."""
    return {"status": "ok"}


# /healthz/detail waits this long for the store's answer.
DETAIL_STORE_TIMEOUT_S = 2.0


def _local_checks() -> dict[str, dict]:
    """What this pod needs to answer hooks: its configuration, services, models and a writable
    spool. Not the shared store: while it is down calls are answered and records spooled, and
    every pod failing readiness at once would take the whole service away."""
    rt = runtime()
    recorder = rt.store.recorder
    spool_check = {"status": "ok"}
    if hasattr(recorder, "writable"):
        spool_check = {"status": "ok" if recorder.writable() else "fail",
                       "directory": str(recorder.directory), "backlog": recorder.backlog}
        if recorder.write_error:
            spool_check["error"] = recorder.write_error
    return {
        "config": {"status": "ok", "sites": sorted(rt.sites)},
        "services": {"status": "ok" if rt.services else "fail",
                     "ids": [s.id for s in rt.services.values()]},
        "models": {"status": "ok", "loaded": rt.models.describe()},
        "spool": spool_check,
    }


@health.route("/readyz", methods=["GET"])
def readyz():
    """Readiness: configuration valid, services and models loaded, call-record spool writable."""
    checks = _local_checks()
    ready = all(c["status"] == "ok" for c in checks.values())
    return {"status": "ok" if ready else "fail", "checks": checks}, (200 if ready else 503)


@health.route("/healthz/detail", methods=["GET"])
def healthz_detail():
    """Readiness checks plus the shared store: reachable, and how many records wait for it.
    Always 200 with `status` ok or degraded: for people and dashboards, not for probes."""
    rt = runtime()
    checks = _local_checks()
    try:
        rt.store.within(DETAIL_STORE_TIMEOUT_S, rt.store.ping)
        checks["store"] = {"status": "ok", "url": rt.store_url_redacted}
    except StoreUnavailable as exc:
        log.warning("health: store unreachable: %s", exc)
        checks["store"] = {"status": "fail", "url": rt.store_url_redacted,
                           "error": type(exc.__cause__ or exc).__name__}
    healthy = all(c["status"] == "ok" for c in checks.values())
    return {"status": "ok" if healthy else "degraded", "checks": checks}


@health.route("/metrics", methods=["GET"])
def prometheus_metrics():
    """Prometheus metrics of every worker (docs/operations.md); no PHI in any label. Serve it to
    the scraper only: route /cds-services, not /metrics, through the hospital-facing ingress."""
    body, content_type = metrics.exposition()
    return Response(body, status=200, content_type=content_type)
