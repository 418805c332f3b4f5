"""Medication hydration: a Group export has no Medications (they are not in the Patient
compartment), so the ones exported medication resources reference are read one by one."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from cds_service.training.errors import ServerError
from cds_service.training.export_files import read_ndjson
from cds_service.training.export_http import FhirSession, outcome_text
from cds_service.training.export_state import ExportSummary

# Resources whose `medicationReference` points at a Medication we then read one by one.
MEDICATION_REFERRERS = ("MedicationRequest", "MedicationDispense", "MedicationAdministration",
                        "MedicationStatement")
REFERENCED_MEDICATIONS = "Medication.referenced.ndjson.gz"


def medication_id(reference: Any, fhir_url: str) -> str | None:
    """`Medication/<id>` (relative, or absolute on this server, any `_history` dropped) → id;
    contained (`#…`), other servers' and non-Medication references → None."""
    if not isinstance(reference, str):
        return None
    base = fhir_url.rstrip("/") + "/"
    if reference.startswith(base):
        reference = reference[len(base):]
    parts = reference.split("/")
    if len(parts) in (2, 4) and parts[0] == "Medication" and parts[1]:
        return parts[1]
    return None


def fetch_medications(out_dir: Path, summary: ExportSummary, http: FhirSession
                       ) -> dict[str, int]:
    """Read the Medications that exported medication resources reference and the export did
    not contain, one GET each, into `Medication.referenced.ndjson.gz`."""
    exported: set[str] = set()
    wanted: dict[str, None] = {}  # ordered, for a stable output file
    for name, entry in summary.files.items():
        if entry["kind"] != "output":
            continue
        if entry["type"] == "Medication":
            exported.update(r.get("id") for r in read_ndjson(out_dir / name))
        elif entry["type"] in MEDICATION_REFERRERS:
            for resource in read_ndjson(out_dir / name):
                ref = (resource.get("medicationReference") or {}).get("reference")
                med = medication_id(ref, http.fhir_url)
                if med:
                    wanted[med] = None
    todo = [m for m in wanted if m not in exported]
    http.report(f"Medications referenced but not exported: {len(todo)}")
    fetched = missing = 0
    partial = out_dir / (REFERENCED_MEDICATIONS + ".part")
    with gzip.open(partial, "wt", encoding="utf-8") as out:
        for n, med in enumerate(todo, 1):
            url = f"{http.fhir_url}/Medication/{med}"
            response = http.request("GET", url, what="Medication read",
                                    headers={"Accept": "application/fhir+json"})
            if response.status_code in (404, 410):
                missing += 1
                continue
            if response.status_code != 200:
                raise ServerError(f"Medication read: {url} answered {response.status_code}"
                                  f"{outcome_text(response)}; rerun to resume")
            try:
                resource = response.json()
            except ValueError as exc:
                raise ServerError(f"Medication read: {url} sent no JSON") from exc
            out.write(json.dumps(resource, separators=(",", ":")) + "\n")
            fetched += 1
            if n % 100 == 0:
                http.report(f"  Medications: {n}/{len(todo)}")
    os.replace(partial, out_dir / REFERENCED_MEDICATIONS)
    if missing:
        http.report(f"  {missing} referenced Medications were not found (404/410)")
    return {"referenced": len(todo), "fetched": fetched, "missing": missing}
