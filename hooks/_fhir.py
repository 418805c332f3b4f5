"""Small pure helpers over FHIR R4 JSON shared by the services.

Tolerance policy: missing or unparseable data gives `None` (or is skipped), never an exception:
Epic payloads carry local codes, numbers as strings and partial resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

# eGFR by any method: CKD-EPI creatinine (33914-3 MDRD-labelled, 62238-1, 98979-8 2021
# race-free) and 48642-3 (non-Black MDRD). LOINC: https://loinc.org/
EGFR_LOINC = frozenset({"33914-3", "62238-1", "98979-8", "48642-3"})

# Results that must not be used (R4 ObservationStatus).
_UNUSABLE_STATUS = frozenset({"entered-in-error", "cancelled", "registered", "preliminary"})


@dataclass(frozen=True)
class LabValue:
    value: float
    unit: str | None
    when: date | None


def codes(concept: Any) -> set[tuple[str | None, str]]:
    """(system, code) pairs of a CodeableConcept; empty for anything else."""
    if not isinstance(concept, Mapping):
        return set()
    return {
        (c.get("system"), str(c["code"]))
        for c in concept.get("coding") or ()
        if isinstance(c, Mapping) and c.get("code") is not None
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _date(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).date()
    except ValueError:
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            return None


def latest_lab(observations: Iterable[Any], loinc_codes: frozenset[str]) -> LabValue | None:
    """Most recent usable numeric result whose code is one of `loinc_codes`."""
    best: LabValue | None = None
    for obs in observations or ():
        if not isinstance(obs, Mapping) or obs.get("resourceType") != "Observation":
            continue
        if obs.get("status") in _UNUSABLE_STATUS:
            continue
        if not any(system == LOINC and code in loinc_codes for system, code in
                   codes(obs.get("code"))):
            continue
        quantity = obs.get("valueQuantity")
        if not isinstance(quantity, Mapping) or quantity.get("comparator"):
            continue
        value = _number(quantity.get("value"))
        if value is None:
            continue
        when = _date(obs.get("effectiveDateTime") or obs.get("issued"))
        if when is not None and when > date.today():
            continue  # future-dated results are data errors
        candidate = LabValue(value, quantity.get("unit") or quantity.get("code"), when)
        if best is None or (when or date.min) > (best.when or date.min):
            best = candidate
    return best


def resources_of(bundle: Any, resource_type: str) -> list[Mapping]:
    """Resources of one type in a Bundle's entries (draftOrders), skipping malformed entries."""
    if not isinstance(bundle, Mapping):
        return []
    out = []
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if isinstance(resource, Mapping) and resource.get("resourceType") == resource_type:
            out.append(resource)
    return out
