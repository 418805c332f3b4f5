"""Whether a prefetch value or a FHIR answer can stand for its template's result.

Search results are lists of resources: OperationOutcome entries and `search.mode: outcome`
entries are dropped and pages are merged. Epic's "no results" searchset (total 0, one
OperationOutcome entry, severity warning, code 4101) is therefore an empty list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usable:
    """The key's value as the template expects it, and the searchset's next link if any."""

    value: Any  # dict | list[dict] | None
    next_url: str | None = None


@dataclass(frozen=True)
class Unusable:
    """Why the value cannot stand for the template's result."""

    why: str


# JSON gives dicts: test dict first, the Mapping ABC check is several times slower (a 1,000-entry
# searchset is read entry by entry).
_MAPPING = (dict, Mapping)


def _is_error_outcome(resource: Mapping) -> bool:
    issues = resource.get("issue")
    if not isinstance(issues, list) or not issues:
        return True  # an OperationOutcome that says nothing is not evidence of success
    for issue in issues:
        severity = issue.get("severity") if isinstance(issue, Mapping) else None
        if severity not in ("warning", "information"):
            return True
    return False


def _parse_bundle(bundle: Mapping) -> tuple[list[dict], str | None, bool]:
    """(resources, next link, has an error OperationOutcome) from a Bundle, tolerating junk."""
    resources: list[dict] = []
    error = False
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, _MAPPING):
            continue
        resource = entry.get("resource")
        if not isinstance(resource, _MAPPING) or not isinstance(resource.get("resourceType"), str):
            continue
        search = entry.get("search")
        mode = search.get("mode") if isinstance(search, _MAPPING) else None
        if resource["resourceType"] == "OperationOutcome":
            # Epic answers an empty search with a searchset (total 0) whose only entry is an
            # OperationOutcome, severity warning, code 4101 "Resource request returns no results.",
            # search.mode "outcome" (fhir.epic.com CDS Hooks tutorial, example request, prefetch
            # key "conditions"): information, not an error. Only error/fatal issues are failures.
            error = error or _is_error_outcome(resource)
            continue
        if mode == "outcome":
            continue
        resources.append(resource)  # type: ignore[arg-type]
    next_url = None
    links = bundle.get("link")
    for link in links if isinstance(links, list) else ():
        if (
            isinstance(link, Mapping)
            and link.get("relation") == "next"
            and isinstance(link.get("url"), str)
            and link["url"].strip()
        ):
            next_url = link["url"].strip()
            break
    return resources, next_url, error


def classify(value: Any, *, search: bool, read_type: str | None = None) -> Usable | Unusable:
    """Whether a (non-null) prefetch value or FHIR answer can stand for its template's result.

    Rules 45, 49, 50, 54: a search needs a Bundle; a read needs a resource of `read_type`, or a
    Bundle holding exactly one (unwrapped) or none (None). OperationOutcomes, error-bearing
    Bundles and anything that is not a FHIR resource are unusable.
    """
    if not isinstance(value, Mapping):
        return Unusable(f"is a JSON {_json_type(value)}, not a FHIR resource")
    resource_type = value.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        return Unusable("has no resourceType")
    if resource_type == "OperationOutcome":
        return Unusable("is an OperationOutcome")
    if resource_type == "Bundle":
        resources, next_url, error = _parse_bundle(value)
        if error:
            return Unusable("is a Bundle carrying an error OperationOutcome")
        if search:
            return Usable(resources, next_url)
        if not resources:
            return Usable(None)
        if len(resources) == 1 and read_type in (None, resources[0].get("resourceType")):
            return Usable(resources[0])
        return Unusable(f"is a Bundle that does not hold exactly one {read_type or 'resource'}")
    if search:
        return Unusable(f"is a {resource_type}, not a search Bundle")
    if read_type is not None and resource_type != read_type:
        return Unusable(f"is a {resource_type}, not a {read_type}")
    return Usable(value)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__
