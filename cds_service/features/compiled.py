"""Specs compiled once (cached per spec tuple) into a dict from normalised (system, code)
to feature indexes, with each feature's units and conversions resolved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cds_service.features.codes import _MAPPING, _code, _coding, _coding_key, _system
from cds_service.features.specs import COUNTING_AGGREGATIONS, FeatureSpec
from cds_service.features.units import _ucum_unit, _unit


class _Lookup:
    """(system, code) → feature indexes, exact codes in one dict and prefixes by length."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, entries: Iterable[tuple[int, str]]):
        exact: dict[tuple[str, str], list[int]] = {}
        prefixes: dict[str, dict[int, dict[str, list[int]]]] = {}
        for index, text in entries:
            system, sep, code = text.partition("|")
            if not sep:
                continue
            system = _system(system)
            if code.endswith("*"):
                prefix = _code(system, code[:-1])
                by_length = prefixes.setdefault(system, {}).setdefault(len(prefix), {})
                by_length.setdefault(prefix, []).append(index)
            elif key := _coding(system, code):
                exact.setdefault(key, []).append(index)
        self.exact = {key: tuple(v) for key, v in exact.items()}
        self.prefixes = {system: tuple((length, {p: tuple(v) for p, v in table.items()})
                                       for length, table in sorted(by_length.items()))
                         for system, by_length in prefixes.items()}

    def _add(self, key: tuple[str, str], out: set[int]) -> None:
        hit = self.exact.get(key)
        if hit:
            out.update(hit)
        by_length = self.prefixes.get(key[0])
        if by_length:
            code = key[1]
            for length, table in by_length:
                if len(code) < length:
                    break
                hit = table.get(code[:length])
                if hit:
                    out.update(hit)

    def match(self, concept: Any, code_map: Mapping | None) -> set[int]:
        """Features whose codes match ANY coding of a CodeableConcept (directly or mapped)."""
        out: set[int] = set()
        if not isinstance(concept, _MAPPING):
            return out
        codings = concept.get("coding")
        if not isinstance(codings, list):
            return out
        for coding in codings:
            if not isinstance(coding, _MAPPING):
                continue
            key = _coding_key(coding.get("system"), coding.get("code"))
            if key is None:
                continue
            self._add(key, out)
            if code_map:
                mapped = code_map.get(key)
                if mapped:
                    for target in mapped:
                        if isinstance(target, tuple) and len(target) == 2:
                            self._add(target, out)
        return out


@dataclass(frozen=True)
class _Feature:
    spec: FeatureSpec
    kind: str                        # "patient" | "numeric" | "count"
    unit_key: str | None
    conversions: Mapping[str, tuple[float, float]]
    molar_mass: float | None = None
    # All that `resources._numeric_value` reads of a feature: two features with the same key
    # read the same value from a result (a service's input and its model's feature of the same
    # test), so a pass computes it once for both.
    value_key: Any = None


@dataclass(frozen=True)
class _Compiled:
    features: tuple[_Feature, ...]
    observation: _Lookup
    condition: _Lookup
    # Feature index -> its FeatureValue when nothing in a chart touched it (values._vector):
    # that value depends on the spec alone, and most of a small chart's features are such.
    untouched: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)


def _compile_uncached(specs: tuple[FeatureSpec, ...]) -> _Compiled:
    features = []
    for spec in specs:
        if spec.resource == "Patient":
            kind = "patient"
        elif spec.aggregation in COUNTING_AGGREGATIONS:
            kind = "count"
        else:
            kind = "numeric"
        unit_key = _unit(spec.unit) if isinstance(spec.unit, str) else None
        conversions = {_unit(u): conv for u, conv in spec.conversions.items()}
        value_key = (spec.unit, spec.plausible, unit_key, frozenset(conversions.items()),
                     spec.molar_mass)
        try:
            hash(value_key)
        except TypeError:  # a hand-built spec holding something unhashable: never shared
            value_key = None
        features.append(_Feature(spec, kind, unit_key, conversions, spec.molar_mass, value_key))
        if kind == "numeric" and isinstance(spec.unit, str):
            _ucum_unit(spec.unit)  # parse the canonical unit (and build the registry) now
    return _Compiled(
        tuple(features),
        _Lookup((i, c) for i, s in enumerate(specs) if s.resource == "Observation"
                for c in s.codes),
        _Lookup((i, c) for i, s in enumerate(specs) if s.resource == "Condition"
                for c in s.codes),
    )


_compile = lru_cache(maxsize=64)(_compile_uncached)


def prepare(groups: Iterable[Sequence[FeatureSpec]]) -> None:
    """Compile spec lists ahead of the calls that read them: their units are parsed, which
    builds the UCUM registry. Built lazily, that took a worker's first call 0.6 to 3 s (issue 20);
    `load_deployment` runs this in the gunicorn master, so every worker is forked with it."""
    for specs in groups:
        _compiled(tuple(specs))


def _compiled(specs: tuple[FeatureSpec, ...]) -> _Compiled:
    try:
        return _compile(specs)
    except TypeError:  # a hand-built spec holding something unhashable: compile uncached
        return _compile_uncached(specs)
