"""What an export leaves beside its data: `export-state.json`, which a rerun resumes from, and
`log.ndjson`, its events in the Bulk Data client log format."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cds_service.training.errors import OutDirInUse
from cds_service.training.export_request import ExportRequest

STATE_FILE = "export-state.json"
LOG_FILE = "log.ndjson"


@dataclass
class ExportSummary:
    out_dir: str
    server: str
    group: str
    kickoff_url: str
    status_url: str | None = None
    kicked_off_at: str | None = None
    transaction_time: str | None = None
    completed_at: str | None = None
    # local name → {url, kind, type, count}. Keyed by name, not URL: names follow the manifest's
    # order, while a server may sign its file URLs afresh on every status answer.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    medications: dict[str, int] | None = None  # referenced, fetched, missing
    tokens: int = 0

    def counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for entry in self.files.values():
            if entry["kind"] == "output":
                totals[entry["type"]] = totals.get(entry["type"], 0) + entry["count"]
        if self.medications and self.medications["fetched"]:
            totals["Medication"] = totals.get("Medication", 0) + self.medications["fetched"]
        return totals


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ExportLog:
    """Appends Bulk Data client log items (one JSON object per line) to `log.ndjson`."""

    def __init__(self, path: Path, export_id: str | None):
        self.path = path
        self.export_id = export_id

    def event(self, event_id: str, detail: dict[str, Any]) -> None:
        row = {"exportId": self.export_id, "timestamp": now(), "eventId": event_id,
               "eventDetail": detail}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


class ExportState:
    """`export-state.json`: written whole (to a temporary file, then renamed) after every step,
    so an interruption leaves the last finished step on disk."""

    def __init__(self, out_dir: Path, summary: ExportSummary):
        self.path = out_dir / STATE_FILE
        self.summary = summary

    @classmethod
    def open(cls, out_dir: Path, request: ExportRequest) -> ExportState:
        path = out_dir / STATE_FILE
        fresh = ExportSummary(out_dir=str(out_dir), server=request.fhir_url,
                              group=request.group, kickoff_url=request.kickoff_url())
        if not path.exists():
            others = [p.name for p in out_dir.iterdir()] if out_dir.exists() else []
            if others:
                raise OutDirInUse(f"{out_dir} is not empty and holds no {STATE_FILE}: choose a "
                                  "new directory for this export")
            out_dir.mkdir(parents=True, exist_ok=True)
            return cls(out_dir, fresh)
        try:
            saved = ExportSummary(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise OutDirInUse(f"{path} is unreadable; move it away to start over") from exc
        if saved.kickoff_url != fresh.kickoff_url:
            raise OutDirInUse(f"{out_dir} holds an export of {saved.kickoff_url}, not "
                              f"{fresh.kickoff_url}: choose a new directory for this one")
        saved.out_dir = str(out_dir)
        return cls(out_dir, saved)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.summary), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
