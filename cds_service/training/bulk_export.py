"""`cds-service data export`: a Group-level Bulk Data `$export` from the site's FHIR server into
a directory of gzipped NDJSON, with SMART Backend Services tokens.
Bulk Data Access IG 2.0: https://hl7.org/fhir/uv/bulkdata/export.html

What the output directory holds (part 2, the cohort builder, reads it):

    <Type>.<nnn>.ndjson.gz        one per manifest `output` entry, in manifest order
    Medication.referenced.ndjson.gz   Medications the exported MedicationRequests (and
                                  dispenses, administrations, statements) reference but the
                                  export did not contain (a Group export has no Medications:
                                  they are not in the Patient compartment)
    error/OperationOutcome.<nnn>.ndjson.gz, deleted/Bundle.<nnn>.ndjson.gz   as the server sent
    log.ndjson                    the export's events, in the Bulk Data client log format
                                  (github.com/smart-on-fhir/bulk-data-client, "Bulk Data Export
                                  Log Items"): kick-off, manifest, each file, totals
    export-state.json             what a rerun resumes from: the request, the status URL, the
                                  files finished; at the end, counts per type

An interrupted run (Ctrl-C, a network failure, a server error) is resumed by running the same
command again: it polls the saved status URL instead of kicking off a new export, and downloads
only the files not yet finished.

This module runs the steps in order; each lives beside what it needs: the request
(`export_request`), the HTTP session and its waits (`export_http`), kick-off and status polling
(`export_status`), the files (`export_files`), Medication hydration (`export_medications`), and
the resume state and log (`export_state`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from cds_service.config import Site
from cds_service.training.errors import ExportError
from cds_service.training.export_files import download
from cds_service.training.export_http import FhirSession, Waits
from cds_service.training.export_medications import (
    MEDICATION_REFERRERS,
    fetch_medications,
)
from cds_service.training.export_request import ExportRequest, parse_since, parse_types
from cds_service.training.export_state import (
    LOG_FILE,
    ExportLog,
    ExportState,
    ExportSummary,
    now,
)
from cds_service.training.export_status import (
    delete_export,
    kick_off,
    manifest_files,
    wait_for_manifest,
)
from cds_service.training.smart_auth import (
    BackendServicesToken,
    default_scope,
    discover_token_endpoint,
    load_signing_key,
)


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def export_site(site: Site, out_dir: Path, *, group: str | None = None,
                since: str | None = None, types: str | None = None,
                **options: Any) -> ExportSummary:
    """`cds-service data export SITE`: the site's `bulk_export` settings, with `group`,
    `since` and `types` (comma-separated) given on the command line taking precedence."""
    settings = site.bulk_export
    if settings is None:
        raise ExportError(f"site {site.id}: no `bulk_export` section in {site.source}")
    # Default FHIR base as `cds-service site check` finds it: the site's `fhir_server`, else an
    # issuer's https `iss` (Epic's `iss` is its FHIR R4 base).
    fhir_url = settings.fhir_url or site.fhir_server or next(
        (i.iss for i in site.issuers if i.iss.lower().startswith("https://")), None)
    if not fhir_url:
        raise ExportError(f"site {site.id}: set bulk_export.fhir_url (or fhir_server) in "
                          f"{site.source}")
    group = group or settings.group
    if not group:
        raise ExportError(f"site {site.id}: give --group or set bulk_export.group in "
                          f"{site.source}")
    request = ExportRequest(fhir_url=fhir_url, group=group, types=parse_types(types),
                            since=parse_since(since) if since else None)
    return export(request, out_dir, client_id=settings.client_id,
                  private_key_file=settings.private_key_file, kid=settings.kid,
                  algorithm=settings.algorithm, scope=settings.scope,
                  allow_http_loopback=settings.allow_http_loopback, **options)


def export(request: ExportRequest, out_dir: Path, *, client_id: str, private_key_file: Path,
           kid: str, algorithm: str = "RS384", scope: str | None = None,
           allow_http_loopback: bool = False, waits: Waits = Waits(),  # noqa: B008 (frozen)
           report: Callable[[str], None] = _stderr, sleep: Callable[[float], None] = time.sleep,
           session: requests.Session | None = None) -> ExportSummary:
    """Run (or resume) one export into `out_dir`; see the module docstring. Raises ExportError
    with what was finished saved for a rerun."""
    state = ExportState.open(out_dir, request)
    summary = state.summary
    if summary.completed_at:
        report(f"{out_dir}: export already complete ({summary.completed_at})")
        return summary
    state.save()  # from now on the directory is this export's, even if the kick-off fails
    http = FhirSession(request.fhir_url, session or requests.Session(), waits=waits,
                       allow_http_loopback=allow_http_loopback, report=report, sleep=sleep)
    http.check(request.fhir_url, what="FHIR server")
    smart = discover_token_endpoint(http.session, http.fhir_url)
    http.check(smart["token_endpoint"], what="token endpoint", same_origin=False)
    hydrate = any(t in MEDICATION_REFERRERS for t in request.types)
    scope_types = request.types + (("Medication",) if hydrate else ())
    http.token = BackendServicesToken(
        http.session, token_url=smart["token_endpoint"], client_id=client_id,
        key=load_signing_key(private_key_file, kid=kid, algorithm=algorithm), kid=kid,
        algorithm=algorithm, scope=scope or default_scope(scope_types, smart),
        on_retry=lambda response, attempt: http.wait_retry(response, "token", attempt))
    log = ExportLog(out_dir / LOG_FILE, summary.status_url)
    try:
        _run(request, out_dir, state, http, log, hydrate)
    finally:
        summary.tokens += http.token.issued
        state.save()
    return summary


def _run(request: ExportRequest, out_dir: Path, state: ExportState, http: FhirSession,
         log: ExportLog, hydrate: bool) -> None:
    summary = state.summary
    if summary.status_url:
        http.report(f"Resuming the export of Group {request.group} ({summary.status_url})")
    else:
        summary.status_url = kick_off(request, http, log)
        summary.kicked_off_at = now()
        log.export_id = summary.status_url
        state.save()
    manifest = wait_for_manifest(summary.status_url, http)
    summary.transaction_time = manifest.get("transactionTime")
    if not summary.files:  # first sight of the manifest (not a resumed download)
        log.event("status_complete", {"transactionTime": summary.transaction_time})
    requires_token = bool(manifest.get("requiresAccessToken"))
    entries = list(manifest_files(manifest))
    todo = [e for e in entries if e[3] not in summary.files]
    http.report(f"Export ready: {len(entries)} files ({len(entries) - len(todo)} already "
                "downloaded)")
    for url, kind, resource_type, name in todo:
        count = download(url, out_dir / name, http, with_token=requires_token)
        summary.files[name] = {"url": url, "kind": kind, "type": resource_type, "count": count}
        log.event("download_complete", {"fileUrl": url, "resourceCount": count,
                                        "fileSize": (out_dir / name).stat().st_size})
        http.report(f"  {name}: {count} resources")
        state.save()
    if hydrate and summary.medications is None:
        summary.medications = fetch_medications(out_dir, summary, http)
        log.event("_medications_referenced", dict(summary.medications))
        state.save()
    delete_export(summary.status_url, http)
    summary.completed_at = now()
    counts = summary.counts()
    log.event("export_complete", {
        "files": len(summary.files), "resources": sum(counts.values()),
        "_server": request.fhir_url, "_group": request.group, "_resourcesByType": counts})
    state.save()
    errors = sum(e["count"] for e in summary.files.values() if e["kind"] == "error")
    http.report(f"Done: {sum(counts.values())} resources "
                f"({', '.join(f'{t} {n}' for t, n in counts.items()) or 'none'}) in {out_dir}"
                + (f"; the server reported {errors} issues in error/" if errors else ""))
