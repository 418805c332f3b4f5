"""FHIR resources as the engine reads them: Bundles flattened, resources grouped by patient,
and the dates, numbers and units of one element, missing or unparseable -> None.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from cds_service.features.codes import _MAPPING, UCUM, _system
from cds_service.features.compiled import _Feature
from cds_service.features.units import _fmt, _show, _ucum_factor, _unit

# R4 QuantityComparator; ≤/≥ appear in free-text lab results.
_COMPARATORS = MappingProxyType({"<": "<", "<=": "<=", ">=": ">=", ">": ">", "≤": "<=", "≥": ">="})
_NUMERIC_VALUE_KEYS = ("valueQuantity", "valueInteger", "valueString")

# A number, optionally preceded by a comparator and followed by a unit ("45 mL/min/1.73m2",
# ">= 90", "<0.2"). ASCII digits only; "1,5" and "1.2.3" do not match (ambiguous decimal or
# thousands separators), nor do "NaN"/"inf" (no digits).
_NUMBER = re.compile(
    r"\s*(?P<cmp><=|>=|<|>|≤|≥)?\s*"
    r"(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    r"(?:\s*(?P<unit>[^0-9\s,.;:+\-].*?))?\s*"
)
_MAX_NUMBER_TEXT = 64
_YEAR_MONTH = re.compile(r"([0-9]{4})(?:-([0-9]{2}))?")


# FHIR id: [A-Za-z0-9\-\.]{1,64}; Epic ids can run longer, so no length limit here.
_PATIENT_REFERENCE = re.compile(
    r"(?:^|/)Patient/([A-Za-z0-9.\-]+)(?:/_history/[A-Za-z0-9.\-]+)?/?$")
_MAX_BUNDLE_DEPTH = 16


def flatten(resources: Iterable[Any]) -> Iterator[Mapping]:
    """Resources in order; Bundles (entry[].resource) and lists (prefetch values resolved to
    search results) are expanded, recursively, while OperationOutcomes, non-mappings, mappings
    without a resourceType and entries without a resource are skipped. A single resource or
    Bundle may be passed instead of an iterable."""
    if isinstance(resources, _MAPPING):
        resources = (resources,)
    elif resources is None or isinstance(resources, str | bytes | bytearray):
        return
    elif not isinstance(resources, Iterable):
        return
    yield from _flatten(resources, 0)


def _flatten(items: Iterable[Any], depth: int) -> Iterator[Mapping]:
    for item in items:
        if isinstance(item, list | tuple) and depth < _MAX_BUNDLE_DEPTH:
            yield from _flatten(item, depth + 1)
            continue
        if not isinstance(item, _MAPPING):
            continue
        rtype = item.get("resourceType")
        if rtype == "Bundle":
            entries = item.get("entry")
            if isinstance(entries, list) and depth < _MAX_BUNDLE_DEPTH:
                yield from _flatten((e.get("resource") for e in entries
                                     if isinstance(e, _MAPPING)), depth + 1)
        # Epic's empty searchset carries an OperationOutcome entry (code 4101): not data.
        elif isinstance(rtype, str) and rtype != "OperationOutcome":
            yield item


def _patient_id(resource: Mapping) -> str | None:
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, _MAPPING):
            text = ref.get("reference")
            if isinstance(text, str) and len(text) <= 2048:
                found = _PATIENT_REFERENCE.search(text.strip())
                if found:
                    return found[1]
    return None


def group_by_patient(resources: Iterable[Any]) -> dict[str, list[Mapping]]:
    """Resources by patient id, in input order (training on a Bulk NDJSON export): a Patient by
    its id, anything else by subject/patient reference "Patient/<id>" (relative, absolute or
    versioned). Resources naming no patient are dropped."""
    groups: dict[str, list[Mapping]] = {}
    for resource in flatten(resources):
        if resource.get("resourceType") == "Patient":
            rid = _resource_id(resource)
        else:
            rid = _patient_id(resource)
        if rid is not None:
            groups.setdefault(rid, []).append(resource)
    return groups


def _resource_id(resource: Mapping) -> str | None:
    rid = resource.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= 1024 else None


def _as_utc(now: Any) -> datetime:
    if not isinstance(now, datetime):
        raise TypeError(f"now must be a datetime, got {type(now).__name__}")
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _instant(raw: Any) -> tuple[datetime, str] | None:
    """(UTC instant, local YYYY-MM-DD) of a FHIR date/dateTime/instant. Partial dates stand for
    the start of their period; no timezone means UTC."""
    if not isinstance(raw, str) or not 4 <= len(raw) <= 64:
        return None
    raw = raw.strip()
    try:
        if len(raw) in (4, 7) and (found := _YEAR_MONTH.fullmatch(raw)):
            local = datetime(int(found[1]), int(found[2] or 1), 1)
        else:
            local = datetime.fromisoformat(raw)
        day = local.date().isoformat()
        utc = local.replace(tzinfo=UTC) if local.tzinfo is None else local.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    return utc, day


def _observation_date(obs: Mapping) -> tuple[datetime, str] | None:
    """effective[x] (dateTime, instant, Period start else end), else issued; the first that
    parses."""
    period = obs.get("effectivePeriod")
    if not isinstance(period, _MAPPING):
        period = {}
    for raw in (obs.get("effectiveDateTime"), obs.get("effectiveInstant"), period.get("start"),
                period.get("end"), obs.get("issued")):
        if raw is not None and (when := _instant(raw)) is not None:
            return when
    return None


def _number(raw: Any, *, allow_unit: bool) -> tuple[str | None, float, str | None] | None:
    """(comparator, value, unit text) of a JSON number or numeric string; None if unusable."""
    if isinstance(raw, bool):
        return None  # JSON true/false are not 1/0
    if isinstance(raw, int):
        try:
            return None, float(raw), None
        except OverflowError:
            return None
    if isinstance(raw, float):
        return (None, raw, None) if math.isfinite(raw) else None
    if not isinstance(raw, str) or len(raw) > _MAX_NUMBER_TEXT:
        return None
    found = _NUMBER.fullmatch(raw)
    if found is None or (found["unit"] and not allow_unit):
        return None
    value = float(found["num"])
    if not math.isfinite(value):  # "1e999"
        return None
    comparator = _COMPARATORS[found["cmp"]] if found["cmp"] else None
    return comparator, value, found["unit"] or None


def _quantity_unit(quantity: Mapping) -> str | None:
    """The unit of a Quantity: its UCUM code when system is UCUM, else the human unit, else
    whatever code there is."""
    code, unit, system = quantity.get("code"), quantity.get("unit"), quantity.get("system")
    code = code.strip() if isinstance(code, str) else ""
    if code and isinstance(system, str) and len(system) <= 512 and _system(system) == UCUM:
        return code
    if isinstance(unit, str) and unit.strip():
        return unit.strip()
    return code or None


def _absent_reason(element: Mapping) -> str | None:
    """Why the value is absent (R4 obs-6: dataAbsentReason only when value[x] is absent)."""
    reason = element.get("dataAbsentReason")
    if not reason:
        return None
    codes = sorted(_concept_codes(reason))
    return codes[0] if codes and len(codes[0]) <= 40 else "unspecified"


def _concept_codes(concept: Any) -> set[str]:
    """coding[].code of a CodeableConcept (a bare code string is accepted too)."""
    if isinstance(concept, str):
        return {concept.strip()} if concept.strip() else set()
    out: set[str] = set()
    if isinstance(concept, _MAPPING):
        codings = concept.get("coding")
        if isinstance(codings, list):
            for coding in codings:
                code = coding.get("code") if isinstance(coding, _MAPPING) else None
                if isinstance(code, str) and code.strip():
                    out.add(code.strip())
    return out


def _numeric_value(element: Mapping, feature: _Feature
                   ) -> tuple[float, tuple[str, ...], str | None] | str:
    """(canonical value, notes, comparator) of an Observation or component, or why it is
    unusable."""
    spec = feature.spec
    if (reason := _absent_reason(element)) is not None:
        return f"no value (dataAbsentReason {reason})"
    for key in _NUMERIC_VALUE_KEYS:
        raw = element.get(key)
        if raw is not None:
            break
    else:
        return "no numeric value"
    if key == "valueQuantity":
        if not isinstance(raw, _MAPPING):
            return "malformed valueQuantity"
        number = _number(raw.get("value"), allow_unit=False)
        if number is None:
            return f"value {_show(raw.get('value'))} not a number"
        comparator, value, _ = number
        given = raw.get("comparator")
        if given is not None:
            if not isinstance(given, str) or given not in _COMPARATORS:
                return f"comparator {_show(given)} not understood"
            comparator = _COMPARATORS[given]
        unit = _quantity_unit(raw)
    else:
        number = _number(raw, allow_unit=key == "valueString")
        if number is None:
            return f"value {_show(raw)} not a number"
        comparator, value, unit = number
    notes: list[str] = []
    if comparator:
        notes.append(f"reported as {comparator}{_fmt(value)}; used {_fmt(value)}")
    if unit is None:
        notes.append(f"unit missing; assumed {spec.unit}")
    elif len(unit) > 64:
        return f"unit {_show(unit)} not convertible to {spec.unit}"
    elif (unit_key := _unit(unit)) != feature.unit_key:
        conversion = feature.conversions.get(unit_key)  # the spec's own table first
        if conversion is None:
            factor = _ucum_factor(unit, spec.unit, feature.molar_mass)
            if isinstance(factor, str):
                why = f" ({factor})" if factor else ""
                return f"unit {_show(unit)} not convertible to {spec.unit}{why}"
            conversion = (factor, 0.0)
        factor, offset = conversion
        if factor != 1.0 or offset:
            value = value * factor + offset
            notes.append(f"converted from {unit}")
    if not math.isfinite(value):
        return "value out of range"
    if spec.plausible is not None and not spec.plausible[0] <= value <= spec.plausible[1]:
        lo, hi = spec.plausible
        return (f"implausible value {_fmt(value)} {spec.unit} rejected "
                f"(plausible {_fmt(lo)}-{_fmt(hi)})")
    return value, tuple(notes), comparator


def _value_key(element: Mapping) -> Any:
    """A hashable, shallow identity of an element's value[x], to recognise duplicates."""
    for key, raw in element.items():
        if isinstance(key, str) and key.startswith("value") and raw is not None:
            if isinstance(raw, _MAPPING):
                return key, tuple(sorted(((str(k), v) for k, v in raw.items()
                                          if isinstance(v, str | int | float | bool)),
                                         key=lambda kv: kv[0]))
            if isinstance(raw, str | int | float | bool):
                return key, raw
            return key, None
    return None


def _has_value(element: Mapping, top_level: bool) -> bool:
    if any(isinstance(k, str) and k.startswith("value") and v is not None
           for k, v in element.items()):
        return True
    components = element.get("component") if top_level else None
    return isinstance(components, list) and bool(components)
