"""The Bulk Data asynchronous request pattern: kick-off, polling the status URL until the
manifest is ready, the files it lists, and releasing the job on the server at the end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin

from cds_service.training.errors import ExportError, ServerError
from cds_service.training.export_http import FhirSession, outcome_text
from cds_service.training.export_request import RESOURCE_TYPE, ExportRequest
from cds_service.training.export_state import STATE_FILE, ExportLog


def kick_off(request: ExportRequest, http: FhirSession, log: ExportLog) -> str:
    url = request.kickoff_url()
    http.report(f"Kick-off: {url}")
    response = http.request("GET", url, what="kick-off", headers={
        "Accept": "application/fhir+json", "Prefer": "respond-async"})
    location = response.headers.get("Content-Location")
    log.event("kickoff", {"exportUrl": url, "errorCode": None if response.status_code == 202
                          else response.status_code,
                          "requestParameters": {"_type": ",".join(request.types),
                                                "_since": request.since}})
    if response.status_code != 202 or not location:
        raise ServerError(f"kick-off: {url} answered {response.status_code}"
                          f"{outcome_text(response)}"
                          + ("" if response.status_code != 202 else " without Content-Location"))
    return urljoin(url, location)


def wait_for_manifest(status_url: str, http: FhirSession) -> dict[str, Any]:
    started = time.monotonic()
    while True:
        response = http.request("GET", status_url, what="status",
                                headers={"Accept": "application/json"})
        if response.status_code == 200:
            try:
                manifest = response.json()
            except ValueError as exc:
                raise ServerError(f"status: {status_url} sent a manifest that is not JSON"
                                  ) from exc
            if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                raise ServerError(f"status: {status_url} sent a manifest without `output`")
            return manifest
        if response.status_code != 202:
            gone = response.status_code in (404, 410)
            raise ServerError(
                f"status: {status_url} answered {response.status_code}"
                f"{outcome_text(response)}"
                + (f"; the server no longer has this export: move {STATE_FILE} away (or use a "
                   "new directory) to start a new one" if gone else ""))
        delay = http.waits.after(response)
        progress = response.headers.get("X-Progress")
        http.report(f"  export in progress{f' ({progress})' if progress else ''}; "
                    f"{time.monotonic() - started:.0f} s so far, next check in {delay:g} s")
        http.sleep(delay)


def manifest_files(manifest: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(url, kind, type, local name) for each `output`, `error` and `deleted` entry."""
    for kind, folder in (("output", ""), ("error", "error/"), ("deleted", "deleted/")):
        seen: dict[str, int] = {}
        for entry in manifest.get(kind) or ():
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            resource_type = entry.get("type") if isinstance(entry.get("type"), str) else "Unknown"
            if not RESOURCE_TYPE.match(resource_type):
                resource_type = "Unknown"
            n = seen.get(resource_type, 0)
            seen[resource_type] = n + 1
            yield entry["url"], kind, resource_type, f"{folder}{resource_type}.{n:03d}.ndjson.gz"


def delete_export(status_url: str | None, http: FhirSession) -> None:
    """Tell the server it may drop the files (Bulk Data IG: "Delete a Bulk Data Request").
    Epic runs one export per client and Group at a time, so a job left behind blocks the next
    one. A failure here loses nothing: it is reported and the export still completes."""
    if not status_url:
        return
    try:
        response = http.request("DELETE", status_url, what="delete export")
    except ExportError as exc:
        http.report(f"  could not release the export on the server: {exc}")
        return
    if response.status_code not in (200, 202, 204, 404, 410):
        http.report(f"  could not release the export on the server: {response.status_code}")
