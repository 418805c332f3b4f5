"""Which models and whose patients an evaluation is about: `provenance.json` beside a validation
report's metrics.json, and the checks `cds-service models promote` makes of it.

metrics.json names models only by the label they were evaluated under. Promotion needs more: the
exact model (id, version, artifact sha256, so a retrained model cannot borrow its predecessor's
evaluation) and the site whose patients were scored (a model is accepted for a hospital on that
hospital's own cohort). Both are written at evaluation time by `write_provenance`; the site is
declared by whoever ran the evaluation, and cross-checked against the FHIR server the cohort's
Bulk Data export came from when both sides record one (cohort.json `export.log.server`; the
site file's `fhir_server`, `fhir_servers` and `bulk_export.fhir_url`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cds_service.models.errors import ModelError

PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.json"
FORMAT = "cds-service-evaluation-provenance/1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_provenance(out_dir: Path, *, site: str, models: Mapping[str, Any],
                     cohort_dir: Path | None = None) -> Path:
    """Write OUT_DIR/provenance.json: `models` maps each label used in metrics.json to its
    loaded model (`.id`, `.version`, `.sha256`); `cohort_dir`, when given, is the `models
    cohort` output the labels came from (its cohort.csv digest and export server are kept)."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "site": site,
        "models": {label: {"id": m.id, "version": m.version, "sha256": m.sha256}
                   for label, m in models.items()},
    }
    if cohort_dir is not None:
        cohort: dict[str, Any] = {}
        if (cohort_dir / "cohort.csv").is_file():
            cohort["cohort_csv_sha256"] = _sha256(cohort_dir / "cohort.csv")
        if (cohort_dir / "cohort.json").is_file():
            described = json.loads((cohort_dir / "cohort.json").read_text(encoding="utf-8"))
            server = ((described.get("export") or {}).get("log") or {}).get("server")
            if server:
                cohort["fhir_server"] = server
        doc["cohort"] = cohort
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PROVENANCE_FILE
    path.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Evidence:
    directory: Path
    metrics: Mapping[str, Any]
    provenance: Mapping[str, Any]
    digest: str  # sha256 over metrics.json then provenance.json, as read

    @property
    def files(self) -> dict[str, str]:
        return {name: _sha256(self.directory / name) for name in (METRICS_FILE, PROVENANCE_FILE)}


def read_json(path: Path) -> Mapping[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def read_evidence(directory: Path) -> Evidence:
    metrics = read_json(directory / METRICS_FILE)
    provenance = read_json(directory / PROVENANCE_FILE)
    if provenance.get("format") != FORMAT:
        raise ModelError(f"{directory / PROVENANCE_FILE}: format must be {FORMAT!r}")
    digest = hashlib.sha256()
    for name in (METRICS_FILE, PROVENANCE_FILE):
        digest.update((directory / name).read_bytes())
    return Evidence(directory, metrics, provenance, digest.hexdigest())


def label_of(evidence: Evidence, model: Any) -> str:
    """The label `model` (id, version, sha256) was evaluated under; ModelError when the
    evaluation is of another model or another version or build of it."""
    where = evidence.directory / PROVENANCE_FILE
    found = []
    for label, ident in (evidence.provenance.get("models") or {}).items():
        if not isinstance(ident, Mapping) or ident.get("id") != model.id:
            continue
        found.append(f"{ident.get('version')} sha256 {str(ident.get('sha256'))[:12]}")
        if ident.get("version") == model.version and ident.get("sha256") in (None, model.sha256):
            if label not in (evidence.metrics.get("models") or ()):
                raise ModelError(f"{where}: {label!r} is not among metrics.json's models")
            return label
    if found:
        raise ModelError(f"{where}: evaluates {model.id} {', '.join(found)}, not "
                         f"{model.version} sha256 {model.sha256[:12]}")
    raise ModelError(f"{where}: this evaluation is not of {model.id}")


def check_site(evidence: Evidence, site: Any) -> None:
    """ModelError unless the evaluation ran on `site`'s data (see the module docstring)."""
    where = evidence.directory / PROVENANCE_FILE
    recorded = evidence.provenance.get("site")
    if recorded != site.id:
        raise ModelError(f"{where}: site is {recorded!r}, not {site.id!r}: a model is accepted "
                         "on the site's own patients")
    server = (evidence.provenance.get("cohort") or {}).get("fhir_server")
    known = {*site.prefetch_settings.fhir_servers, *([site.fhir_server] if site.fhir_server
                                                     else [])}
    if site.bulk_export is not None and site.bulk_export.fhir_url:
        known.add(site.bulk_export.fhir_url)
    norm = {k.rstrip("/") for k in known}
    if server and norm and server.rstrip("/") not in norm:
        raise ModelError(f"{where}: the cohort was exported from {server}, which is not one of "
                         f"{site.id}'s FHIR servers ({', '.join(sorted(norm))})")
