"""What the app page reads for a launched patient: the kidney-risk service's prefetch templates,
resolved from the EHR's FHIR server with the launch's token exactly as a hook call's missing keys
are (same client, same budget and bounds), then the same feature engine, model and rules as the
card (`cds_service.smart.picture.build_picture`)."""

from __future__ import annotations

from typing import Any

from cds_service.config import Site
from cds_service.data.prefetch_resolve import resolve_prefetch
from cds_service.runtime import runtime
from cds_service.smart.picture import Picture, build_picture

SERVICE = "kidney-risk"
# Without the patient there is nothing to show; anything else that fails is named on the page.
REQUIRED = frozenset({"patient"})


def read_picture(site: Site, context: dict[str, Any]) -> Picture:
    rt = runtime()
    enabled = site.services.get(SERVICE)
    templates = dict(enabled.prefetch if enabled else rt.services[SERVICE].prefetch)
    hook_context = {"patientId": context["patient"]}
    if context.get("encounter"):
        hook_context["encounterId"] = context["encounter"]
    prefetch = resolve_prefetch(
        templates, context=hook_context, prefetch=None, fhir_server=context["iss"],
        access_token=context["access_token"], settings=site.prefetch_settings,
        executor=rt.executor, optional=frozenset(templates) - REQUIRED)
    binding = rt.model_binding(site, enabled) if enabled else None
    if binding is not None:
        binding.observed = False  # a view of the chart, not a score the service served
    return build_picture(prefetch, site=site, binding=binding, now=rt.clock())
