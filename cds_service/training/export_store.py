"""A FHIR Bulk Data export (`cds-service data export`, docs/export.md) read in bounded memory:
every resource is spilled, as its NDJSON line, into an on-disk SQLite database keyed by patient,
and read back one patient at a time. Memory holds one patient's resources, never the export.

Layout read: every `*.ndjson` and `*.ndjson.gz` file at the top of the directory (one or more per
resource type, `Medication.referenced.ndjson.gz` included), and `log.ndjson` (the export's events,
summarised, never read as resources). `error/` and `deleted/` are the server's issues and
deletions, not data, and are not read.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds_service.features import group_by_patient
from cds_service.models.errors import ModelError
from cds_service.training.export_medications import medication_id
from cds_service.training.export_state import LOG_FILE

_BATCH = 2_000
# Resources that name their drug by `medicationReference` (docs/export.md, "Medications").
_MEDICATION_USERS = frozenset({"MedicationRequest", "MedicationDispense",
                               "MedicationAdministration", "MedicationStatement"})


@dataclass
class SpillSummary:
    files: dict[str, int] = field(default_factory=dict)          # file name → resources
    by_type: Counter[str] = field(default_factory=Counter)
    without_patient: Counter[str] = field(default_factory=Counter)  # not linked to a patient
    medications: int = 0
    patients: int = 0                                               # distinct patient ids


def export_files(export_dir: Path) -> list[Path]:
    if not export_dir.is_dir():
        raise ModelError(f"{export_dir}: not a directory (expected a Bulk Data export, the "
                         "output of `cds-service data export`)")
    files = sorted(p for p in export_dir.iterdir()
                   if p.is_file() and p.name != LOG_FILE
                   and (p.name.endswith(".ndjson") or p.name.endswith(".ndjson.gz")))
    if not files:
        raise ModelError(f"{export_dir}: no .ndjson or .ndjson.gz files (expected a Bulk Data "
                         "export, the output of `cds-service data export`)")
    return files


def ndjson_lines(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, line, resource) of one NDJSON(.gz) file, streamed; blank lines skipped.
    A line that is not a JSON object is a ModelError naming the file and the line."""
    opener = gzip.open if path.name.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):  # noqa: B007 (read in the except clause)
                text = line.strip()
                if not text:
                    continue
                try:
                    resource = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ModelError(f"{path.name}:{number}: not JSON: {exc.msg} (column "
                                     f"{exc.colno})") from exc
                if not isinstance(resource, dict):
                    raise ModelError(f"{path.name}:{number}: not a FHIR resource (a JSON "
                                     f"{type(resource).__name__}, not an object)")
                yield number, text, resource
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        # gzip.BadGzipFile is an OSError; a cut-off .gz ends in EOFError.
        where = f"{path.name}:{number + 1}" if number else path.name
        raise ModelError(f"{where}: cannot read: {exc}") from exc


def read_log(export_dir: Path) -> dict[str, Any]:
    """What `log.ndjson` (Bulk Data client log items) says about the export; {} without one."""
    path = export_dir / LOG_FILE
    if not path.is_file():
        return {}
    summary: dict[str, Any] = {"file": LOG_FILE}
    for _, _, item in ndjson_lines(path):
        event, detail = item.get("eventId"), item.get("eventDetail")
        detail = detail if isinstance(detail, dict) else {}
        if event == "kickoff":
            summary["export_url"] = detail.get("exportUrl")
            summary["request"] = detail.get("requestParameters")
            summary["started"] = item.get("timestamp")
        elif event == "status_complete":
            summary["transaction_time"] = detail.get("transactionTime")
        elif event == "_medications_referenced":
            summary["medications_referenced"] = detail
        elif event == "export_complete":
            summary["completed"] = item.get("timestamp")
            summary["server"] = detail.get("_server")
            summary["group"] = detail.get("_group")
            summary["resources_by_type"] = detail.get("_resourcesByType")
    return summary


class ExportStore:
    """The spilled export: `load` once, then `patients()` yields (id, resources) in id order."""

    def __init__(self, path: Path, fhir_url: str = ""):
        self.path = path
        self.fhir_url = fhir_url
        self.db = sqlite3.connect(path)
        self.db.executescript("""
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -16000;
            PRAGMA temp_store = FILE;
            CREATE TABLE resource (patient TEXT NOT NULL, body TEXT NOT NULL);
            CREATE TABLE medication (id TEXT PRIMARY KEY, body TEXT NOT NULL);
        """)

    def close(self) -> None:
        self.db.close()

    def load(self, files: list[Path]) -> SpillSummary:
        summary = SpillSummary()
        rows: list[tuple[str, str]] = []
        for path in files:
            count = 0
            for _, text, resource in ndjson_lines(path):
                count += 1
                rtype = resource.get("resourceType")
                rtype = rtype if isinstance(rtype, str) else "(no resourceType)"
                summary.by_type[rtype] += 1
                if rtype == "Medication":
                    rid = resource.get("id")
                    if isinstance(rid, str) and rid:
                        # The same Medication in the export and read afterwards: one copy.
                        self.db.execute("INSERT OR REPLACE INTO medication VALUES (?, ?)",
                                        (rid, text))
                        summary.medications += 1
                    continue
                # The engine's own rule: a Patient by its id, anything else by its
                # subject/patient reference (relative, absolute or versioned).
                owner = next(iter(group_by_patient((resource,))), None)
                if owner is None:
                    summary.without_patient[rtype] += 1
                    continue
                rows.append((owner, text))
                if len(rows) >= _BATCH:
                    self.db.executemany("INSERT INTO resource VALUES (?, ?)", rows)
                    rows.clear()
            summary.files[path.name] = count
        if rows:
            self.db.executemany("INSERT INTO resource VALUES (?, ?)", rows)
        # Indexed once after loading: cheaper than maintaining it row by row.
        self.db.execute("CREATE INDEX resource_patient ON resource (patient)")
        self.db.commit()
        summary.patients = self.db.execute(
            "SELECT count(DISTINCT patient) FROM resource").fetchone()[0]
        return summary

    def patients(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """Each patient's resources (rows in load order), with the Medications their medication
        resources reference appended (a Group export has none in the Patient compartment)."""
        current: str | None = None
        batch: list[dict[str, Any]] = []
        cursor = self.db.execute("SELECT patient, body FROM resource ORDER BY patient, rowid")
        for patient, body in cursor:
            if patient != current:
                if current is not None:
                    yield current, self._hydrated(batch)
                current, batch = patient, []
            batch.append(json.loads(body))
        if current is not None:
            yield current, self._hydrated(batch)

    def _hydrated(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = set()
        for resource in resources:
            if resource.get("resourceType") in _MEDICATION_USERS:
                reference = resource.get("medicationReference")
                if isinstance(reference, dict):
                    mid = medication_id(reference.get("reference"), self.fhir_url)
                    if mid is not None:
                        wanted.add(mid)
        for mid in sorted(wanted):
            row = self.db.execute("SELECT body FROM medication WHERE id = ?", (mid,)).fetchone()
            if row is not None:
                resources.append(json.loads(row[0]))
        return resources
