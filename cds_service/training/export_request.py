"""What one Bulk Data export asks for: the Group, the resource types and `_since`, as the
command line gives them, and the kick-off URL they make."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode

from cds_service.training.errors import ExportError

# What the CKD models and their cohort read: eGFR/creatinine/ACR (Observation), diagnoses,
# dialysis and transplant (Condition, Procedure), medicines, contacts, death (Patient).
DEFAULT_TYPES = ("Patient", "Condition", "Observation", "MedicationRequest", "Procedure",
                 "Encounter")
RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")


@dataclass(frozen=True)
class ExportRequest:
    """What to export; a rerun with the same request resumes, another one is refused."""

    fhir_url: str
    group: str
    types: tuple[str, ...] = DEFAULT_TYPES
    since: str | None = None

    def kickoff_url(self) -> str:
        query = {"_type": ",".join(self.types)}  # comma-joined: not every server reads repeats
        if self.since:
            query["_since"] = self.since
        # urlencode would escape `$`; the operation name goes in the path as it is.
        return f"{self.fhir_url.rstrip('/')}/Group/{self.group}/$export?{urlencode(query)}"


def parse_since(text: str) -> str:
    """`--since` as a FHIR instant: a date is midnight UTC; a date-time needs its offset."""
    try:
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ExportError(f"--since: {text!r} is not a date (2024-01-31) or date-time") from exc
    if moment.tzinfo is None:
        raise ExportError(f"--since: {text!r} needs a UTC offset (Z or +01:00)")
    return moment.isoformat()


def parse_types(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_TYPES
    types = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in types if not RESOURCE_TYPE.match(t)]
    if bad or not types:
        raise ExportError(f"--type: {', '.join(bad) or text!r} is not a FHIR resource type")
    return types
