"""What extraction returns (`FeatureValue`, `Reading`, `FeatureVector`) and how one feature's
usable results become its value: aggregation, plausibility, missing policy, notes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from functools import cached_property
from typing import Any

from cds_service.features.compiled import _Feature
from cds_service.features.resources import _resource_id
from cds_service.features.specs import (
    AGE_RANGE,
    SLOPE_MIN_RESULTS,
    SLOPE_MIN_SPAN_DAYS,
    FeatureSpec,
)
from cds_service.features.units import _fmt, _show

_BIRTH_DATE = re.compile(r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")


_SECONDS_PER_YEAR = 365.25 * 86_400


@dataclass(frozen=True)
class FeatureValue:
    name: str
    value: float | None        # what the model gets: observed, else imputed, else None
    status: str                # "observed" | "imputed" | "missing"
    observed: float | None     # the observed value (canonical unit) before imputation
    unit: str | None
    date: str | None           # YYYY-MM-DD of the result used (latest/min/max), else the latest
    source: str | None         # "Observation/<id>" (or "Patient/<id>") of the result used
    n: int                     # usable results (in the window) / resources the value rests on
    notes: tuple[str, ...]
    required: bool = False     # missing policy "required": missing means no prediction
    # "<", "<=", ">" or ">=" when the result used (latest/min/max) was reported as a bound
    # ("<15"): `value` is then the bound itself, not a measured value.
    comparator: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "status": self.status,
                "observed": self.observed, "unit": self.unit, "date": self.date,
                "source": self.source, "n": self.n, "notes": list(self.notes),
                "required": self.required, "comparator": self.comparator}


@dataclass(frozen=True)
class Reading:
    """One usable numeric result of an Observation feature (`readings`)."""

    instant: datetime          # UTC
    date: str                  # YYYY-MM-DD as the result states it (its local date)
    value: float               # in the spec's canonical unit
    comparator: str | None     # "<", "<=", ">", ">=" when reported as a bound, else None
    source: str | None         # "Observation/<id>"
    code: str | None           # the matched code, "system|code" (after the site's code map)
    notes: tuple[str, ...]     # reinterpretations: conversion, bound, assumed unit


@dataclass(frozen=True)
class FeatureVector:
    values: tuple[FeatureValue, ...]

    def row(self) -> list[float]:
        """Model input in spec order; NaN where there is no value."""
        return [math.nan if v.value is None else v.value for v in self.values]

    def __getitem__(self, name: str) -> FeatureValue:
        return self.values[self._index[name]]

    @cached_property
    def _index(self) -> dict[str, int]:
        # A hook reads a vector by name a dozen times a call; the first of equal names wins.
        index: dict[str, int] = {}
        for i, v in enumerate(self.values):
            index.setdefault(v.name, i)
        return index

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.values)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.values if v.status == "missing")

    @property
    def imputed(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.values if v.status == "imputed")

    @property
    def missing_required(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.values if v.status == "missing" and v.required)

    def to_dict(self) -> dict[str, Any]:
        return {"features": [v.to_dict() for v in self.values], "missing": list(self.missing),
                "imputed": list(self.imputed), "missing_required": list(self.missing_required)}


class _Acc:
    """What one feature collected: usable items by dedup key, and counted reasons."""

    __slots__ = ("items", "counts", "texts")

    def __init__(self) -> None:
        # key → (instant | None, value | None, id | None, day | None, notes, comparator,
        #        element): the last two for numeric results only
        self.items: dict[Any, tuple[Any, ...]] = {}
        # defaultdict(int), not Counter: a pass builds two per feature, and Counter() is a
        # Python-level constructor three times slower.
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.texts: defaultdict[str, int] = defaultdict(int)

    def add(self, key: Any, item: tuple[Any, ...]) -> None:
        held = self.items.get(key)
        # Same instant and value: one result (an interface resend, or a panel component and
        # its standalone twin). Keep the larger id so the choice does not depend on order.
        if held is None or (item[2] or "") > (held[2] or ""):
            self.items[key] = item


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _reason_notes(feature: _Feature, acc: _Acc, used: int) -> list[str]:
    if not acc.counts and not acc.texts:
        return []
    noun = "condition" if feature.spec.resource == "Condition" else "result"
    notes = []
    counts = acc.counts
    for key, n in sorted(counts.items()):
        if key.startswith("status:"):
            notes.append(f"{_plural(n, key[7:] + ' ' + noun)} excluded")
        elif key.startswith("clinical:"):
            notes.append(f"{_plural(n, key[9:] + ' ' + noun)} not counted")
    if counts.get("future"):
        notes.append(f"{_plural(counts['future'], 'future-dated ' + noun)} ignored")
    if counts.get("undated"):
        notes.append(f"{_plural(counts['undated'], 'undated ' + noun)} excluded")
    if counts.get("old") and not used:
        notes.append(f"{_plural(counts['old'], noun)} before the "
                     f"{feature.spec.lookback_days}-day window not used")
    for text, n in sorted(acc.texts.items()):
        notes.append(text if n == 1 else f"{text} ({n} {noun}s)")
    return notes


def _ordered(items: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(items, key=lambda item: (item[0], item[2] or ""))


def _count_feature(feature: _Feature, acc: _Acc) -> FeatureValue:
    spec = feature.spec
    n = len(acc.items)
    dated = _ordered(item for item in acc.items.values() if item[0] is not None)
    value = float(n) if spec.aggregation == "count" else float(n > 0)
    return FeatureValue(spec.name, value, "observed", value, None,
                        dated[-1][3] if dated else None, None, n,
                        tuple(_reason_notes(feature, acc, n)), False)


def _numeric_feature(feature: _Feature, acc: _Acc) -> FeatureValue:
    spec = feature.spec
    items = _ordered(acc.items.values())
    value: float | None = None
    day = source = comparator = None
    notes: list[str] = []
    if items:
        chosen = None
        if spec.aggregation == "latest":
            chosen = items[-1]
        elif spec.aggregation == "min":
            chosen = min(reversed(items), key=lambda item: item[1])  # ties: the latest
        elif spec.aggregation == "max":
            chosen = max(reversed(items), key=lambda item: item[1])
        elif spec.aggregation == "mean":
            value = sum(item[1] for item in items) / len(items)
        else:
            value = _slope(items, notes)
        if chosen is not None:
            value, day, used, comparator = chosen[1], chosen[3], (chosen,), chosen[5]
            source = f"Observation/{chosen[2]}" if chosen[2] else None
        else:
            day, used = items[-1][3], items if value is not None else ()
        for item in used:
            notes.extend(note for note in item[4] if note not in notes)
        if value is not None and not math.isfinite(value):
            notes.append(f"{spec.aggregation} out of range")
            value = comparator = None
    notes.extend(_reason_notes(feature, acc, len(items)))
    resolved = _resolve(spec, value, day, source, len(items), notes)
    if comparator is not None and resolved.status == "observed":
        resolved = dataclasses.replace(resolved, comparator=comparator)
    return resolved


def _slope(items: list[tuple[Any, ...]], notes: list[str]) -> float | None:
    """Ordinary least-squares slope, canonical units per year."""
    span = (items[-1][0] - items[0][0]).total_seconds() / 86_400
    if len(items) < SLOPE_MIN_RESULTS or span < SLOPE_MIN_SPAN_DAYS:
        notes.append(f"slope needs ≥{SLOPE_MIN_RESULTS} results spanning ≥{SLOPE_MIN_SPAN_DAYS} "
                     f"days; have {_plural(len(items), 'result')} over {span:.0f} days")
        return None
    first = items[0][0]
    xs = [(item[0] - first).total_seconds() / _SECONDS_PER_YEAR for item in items]
    ys = [item[1] for item in items]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx


def _resolve(spec: FeatureSpec, observed: float | None, day: str | None, source: str | None,
             n: int, notes: list[str]) -> FeatureValue:
    """Apply the missing policy."""
    policy = spec.missing
    required = policy.strategy == "required"
    if observed is not None:
        return FeatureValue(spec.name, observed, "observed", observed, spec.unit, day, source, n,
                            tuple(notes), required)
    if not n and spec.resource != "Patient":
        notes.insert(0, "no usable result")
    if policy.strategy == "impute" and policy.value is not None:
        notes.append(f"imputed {_fmt(policy.value)}")
        return FeatureValue(spec.name, policy.value, "imputed", None, spec.unit, None, None, n,
                            tuple(notes), required)
    if policy.strategy == "impute":
        notes.append("imputation value not fitted")
    return FeatureValue(spec.name, None, "missing", None, spec.unit, None, None, n, tuple(notes),
                        required)


def vector_from_values(specs: Iterable[FeatureSpec], observed: Mapping[str, float | None],
                       source: str | None = None) -> FeatureVector:
    """The vector `extract` would give for features already observed elsewhere (a cohort file's
    columns): each spec's missing policy applied by the same `_resolve` serving uses, so scoring
    stored values imputes exactly as scoring a chart does. A name absent from `observed`, or
    None/NaN, is not observed."""
    values = []
    for spec in specs:
        value = observed.get(spec.name)
        if value is not None and not math.isfinite(value):
            value = None
        values.append(_resolve(spec, value, None, source, 0 if value is None else 1, []))
    return FeatureVector(tuple(values))


def _patient_feature(feature: _Feature, patient: Mapping | None, now: datetime) -> FeatureValue:
    spec = feature.spec
    if patient is None:
        return _resolve(spec, None, None, None, 0, ["no Patient resource"])
    rid = _resource_id(patient)
    source = f"Patient/{rid}" if rid else None
    notes: list[str] = []
    value: float | None = None
    if spec.attribute == "male":
        gender = patient.get("gender")
        gender = gender.strip().lower() if isinstance(gender, str) else None
        if gender in ("male", "female"):
            value = 1.0 if gender == "male" else 0.0
        elif gender is None:
            notes.append("gender missing")
        else:
            # R4 AdministrativeGender other/unknown: the models' equations are sex-specific.
            notes.append(f"gender {_show(gender)} is neither male nor female")
    else:
        value = _age(patient.get("birthDate"), now, notes)
    if value is None:
        return _resolve(spec, None, None, None, 0, notes)
    return FeatureValue(spec.name, value, "observed", value, spec.unit, None, source, 1,
                        tuple(notes), spec.missing.strategy == "required")


def _age(raw: Any, now: datetime, notes: list[str]) -> float | None:
    """Whole years at `now` (UTC date). A partial birthDate stands for the start of its period."""
    text = raw.strip() if isinstance(raw, str) and len(raw) <= 64 else None
    if text is not None and len(text) > 10 and text[10] in "T ":
        text = text[:10]  # a dateTime where a date belongs
    found = _BIRTH_DATE.fullmatch(text) if text is not None else None
    born = None
    if found:
        try:
            born = date(int(found[1]), int(found[2] or 1), int(found[3] or 1))
        except ValueError:
            born = None
    if born is None:
        # Absent, or only `_birthDate` (an extension such as data-absent-reason).
        notes.append("birthDate missing" if raw is None else f"birthDate {_show(raw)} unparseable")
        return None
    if found[3] is None:
        notes.append(f"birthDate {text} partial; assumed {born.isoformat()}")
    today = now.date()
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        notes.append(f"implausible age {age} from birthDate {text}")
        return None
    return float(age)
