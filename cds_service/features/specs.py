"""Feature specifications: a manifest's `features:` list parsed into `FeatureSpec`s and a
site's `code_mappings:` into a `CodeMap`; an invalid one raises `FeatureSpecError` naming
the key path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from cds_service.features.codes import _MAPPING, CodeMap, _code, _system
from cds_service.features.units import _unit

RESOURCES = ("Patient", "Observation", "Condition")
PATIENT_ATTRIBUTES = ("age", "male")
AGGREGATIONS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "Patient": ("value",),
    "Observation": ("latest", "min", "max", "mean", "count", "exists", "slope"),
    "Condition": ("exists", "count"),
})
DEFAULT_AGGREGATION: Mapping[str, str] = MappingProxyType(
    {"Patient": "value", "Observation": "latest", "Condition": "exists"})
NUMERIC_AGGREGATIONS = frozenset({"latest", "min", "max", "mean", "slope"})
COUNTING_AGGREGATIONS = frozenset({"count", "exists"})
# 100 years: longer windows mean "no lower bound" (omit lookback_days), and the cap keeps
# `now - lookback` inside datetime's range.
MAX_LOOKBACK_DAYS = 36_525
SLOPE_MIN_RESULTS = 2
SLOPE_MIN_SPAN_DAYS = 90
AGE_RANGE = (0, 130)


_NAME = re.compile(r"[a-z][a-z0-9_]*")


# A result stamped up to this far after `now` is kept: the EHR's clock and ours differ by seconds
# to minutes, and a result just filed must not read as "future". Later ones are ignored, noted.
FUTURE_SKEW = timedelta(minutes=5)


_FEATURE_KEYS = ("name", "description", "source", "aggregation", "lookback_days", "unit",
                 "conversions", "molar_mass", "plausible", "missing")
_SOURCE_KEYS = ("resource", "codes", "attribute")
_MISSING_KEYS = ("impute", "fit")
_CONVERSION_KEYS = ("factor", "offset")
_MAPPING_KEYS = ("from", "to")


class FeatureSpecError(ValueError):
    """A feature specification is invalid; the message names the key, e.g.
    'features[2].aggregation: must be one of ...'."""


class _FrozenMap(Mapping):
    """An immutable mapping that is hashable and picklable (MappingProxyType is neither), so
    specs can key the compile cache and travel to training worker processes."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Any = ()):
        self._data = dict(data)
        self._hash: int | None = None

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def get(self, key: Any, default: Any = None) -> Any:
        # Mapping.get goes through __getitem__ and a KeyError per miss: most codings miss.
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _MAPPING):
            return NotImplemented
        return self._data == dict(other.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self._data,)


@dataclass(frozen=True)
class MissingPolicy:
    strategy: str            # "required" | "impute"
    value: float | None      # the imputation value; None only while unresolved ("median")
    fit: str | None = None   # "median" when training computes the value, else None


_REQUIRED = MissingPolicy("required", None)
_ZERO = MissingPolicy("impute", 0.0)


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    resource: str
    attribute: str | None
    codes: tuple[str, ...]
    aggregation: str
    lookback_days: int | None
    unit: str | None
    conversions: Mapping[str, tuple[float, float]]
    plausible: tuple[float, float] | None
    missing: MissingPolicy
    description: str = ""
    molar_mass: float | None = None  # g/mol of the analyte counted in moles (molar <-> mass)

    def __post_init__(self) -> None:
        object.__setattr__(self, "codes", tuple(self.codes))
        if self.molar_mass is not None:
            object.__setattr__(self, "molar_mass", float(self.molar_mass))
        object.__setattr__(self, "conversions", _FrozenMap(
            (unit, _factor_offset(conv)) for unit, conv in dict(self.conversions or {}).items()))
        if self.plausible is not None:
            lo, hi = self.plausible
            object.__setattr__(self, "plausible", (float(lo), float(hi)))

    def to_dict(self) -> dict[str, Any]:
        """The manifest form; `parse_features([spec.to_dict()])` gives back an equal spec."""
        source: dict[str, Any] = {"resource": self.resource}
        if self.attribute is not None:
            source["attribute"] = self.attribute
        if self.codes:
            source["codes"] = list(self.codes)
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["source"] = source
        out["aggregation"] = self.aggregation
        if self.lookback_days is not None:
            out["lookback_days"] = self.lookback_days
        if self.unit is not None:
            out["unit"] = self.unit
        if self.conversions:
            out["conversions"] = {
                unit: factor if offset == 0 else {"factor": factor, "offset": offset}
                for unit, (factor, offset) in self.conversions.items()}
        if self.molar_mass is not None:
            out["molar_mass"] = self.molar_mass
        if self.plausible is not None:
            out["plausible"] = list(self.plausible)
        out["missing"] = _policy_to_raw(self.missing)
        return out


def _factor_offset(conv: Any) -> tuple[float, float]:
    if isinstance(conv, int | float):
        return float(conv), 0.0
    factor, offset = conv
    return float(factor), float(offset)


def _policy_to_raw(policy: MissingPolicy) -> Any:
    if policy.strategy == "required":
        return "required"
    raw: dict[str, Any] = {"impute": "median" if policy.value is None else policy.value}
    if policy.fit is not None and policy.value is not None:
        raw["fit"] = policy.fit
    return raw


def _fail(path: str, message: str) -> FeatureSpecError:
    return FeatureSpecError(f"{path}: {message}")


def _kind(raw: Any) -> str:
    return "null" if raw is None else type(raw).__name__


def _check_keys(raw: Mapping, allowed: tuple[str, ...], path: str) -> None:
    for key in raw:
        if key not in allowed:
            raise _fail(f"{path}.{key}", f"unknown key (allowed: {', '.join(allowed)})")


def _is_number(raw: Any) -> bool:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return False
    try:
        return math.isfinite(raw)
    except OverflowError:  # an int beyond float range
        return False


def _is_list(raw: Any) -> bool:
    return isinstance(raw, Sequence) and not isinstance(raw, str | bytes)


def parse_features(raw: Any, where: str = "features", *,
                   allow_unfitted: bool = False) -> tuple[FeatureSpec, ...]:
    """Validate a manifest's `features:` list. `allow_unfitted` admits `missing: {impute:
    median}` (training specs); a served manifest must carry the fitted value."""
    if not _is_list(raw):
        raise _fail(where, f"must be a list of feature mappings, got {_kind(raw)}")
    specs: list[FeatureSpec] = []
    names: dict[str, str] = {}
    for index, item in enumerate(raw):
        path = f"{where}[{index}]"
        spec = _parse_feature(item, path, allow_unfitted)
        if spec.name in names:
            raise _fail(f"{path}.name", f"duplicate of {names[spec.name]}.name {spec.name!r}")
        names[spec.name] = path
        specs.append(spec)
    return tuple(specs)


def _parse_feature(item: Any, path: str, allow_unfitted: bool) -> FeatureSpec:
    if not isinstance(item, _MAPPING):
        raise _fail(path, f"must be a mapping, got {_kind(item)}")
    _check_keys(item, _FEATURE_KEYS, path)
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _fail(f"{path}.name", f"required, matching [a-z][a-z0-9_]*; got {name!r}")
    description = item.get("description")
    if description is None:
        description = ""
    elif not isinstance(description, str):
        raise _fail(f"{path}.description", f"must be a string, got {_kind(description)}")

    source = item.get("source")
    if not isinstance(source, _MAPPING):
        raise _fail(f"{path}.source", f"required mapping, got {_kind(source)}")
    _check_keys(source, _SOURCE_KEYS, f"{path}.source")
    resource = source.get("resource")
    if resource not in RESOURCES:
        raise _fail(f"{path}.source.resource", f"must be one of {', '.join(RESOURCES)}; "
                                               f"got {resource!r}")
    attribute = None
    codes: tuple[str, ...] = ()
    if resource == "Patient":
        if source.get("codes") is not None:
            raise _fail(f"{path}.source.codes", "not used by Patient features")
        attribute = source.get("attribute")
        if attribute not in PATIENT_ATTRIBUTES:
            raise _fail(f"{path}.source.attribute",
                        f"must be one of {', '.join(PATIENT_ATTRIBUTES)}; got {attribute!r}")
    else:
        if source.get("attribute") is not None:
            raise _fail(f"{path}.source.attribute", "only for Patient features")
        codes = _parse_codes(source.get("codes"), f"{path}.source.codes")

    aggregation = item.get("aggregation")
    if aggregation is None:
        aggregation = DEFAULT_AGGREGATION[resource]
    if aggregation not in AGGREGATIONS[resource]:
        raise _fail(f"{path}.aggregation", f"must be one of {', '.join(AGGREGATIONS[resource])}"
                                           f" for {resource}; got {aggregation!r}")
    numeric = resource == "Observation" and aggregation in NUMERIC_AGGREGATIONS

    lookback = item.get("lookback_days")
    if lookback is not None:
        if resource == "Patient":
            raise _fail(f"{path}.lookback_days", "not used by Patient features")
        if (not isinstance(lookback, int) or isinstance(lookback, bool)
                or not 0 < lookback <= MAX_LOOKBACK_DAYS):
            raise _fail(f"{path}.lookback_days", f"must be an integer from 1 to "
                                                 f"{MAX_LOOKBACK_DAYS}; got {lookback!r}")

    unit = item.get("unit")
    conversions: dict[str, tuple[float, float]] = {}
    plausible = molar_mass = None
    if numeric:
        if not isinstance(unit, str) or not unit.strip():
            raise _fail(f"{path}.unit", f"required for {aggregation} (the canonical UCUM unit)")
        unit = unit.strip()
        conversions = _parse_conversions(item.get("conversions"), unit, f"{path}.conversions")
        plausible = _parse_plausible(item.get("plausible"), f"{path}.plausible")
        molar_mass = item.get("molar_mass")
        if molar_mass is not None and (not _is_number(molar_mass) or molar_mass <= 0):
            raise _fail(f"{path}.molar_mass", f"must be a positive number (g/mol); "
                                              f"got {molar_mass!r}")
    else:
        for key in ("unit", "conversions", "molar_mass", "plausible"):
            if item.get(key) is not None:
                raise _fail(f"{path}.{key}", "only for numeric Observation aggregations "
                                             f"({', '.join(sorted(NUMERIC_AGGREGATIONS))})")

    missing = _parse_missing(item.get("missing"), f"{path}.missing", allow_unfitted)
    if aggregation in COUNTING_AGGREGATIONS:
        missing = _ZERO  # never missing: absence is a count of 0
    return FeatureSpec(name=name, resource=resource, attribute=attribute, codes=codes,
                       aggregation=aggregation, lookback_days=lookback, unit=unit,
                       conversions=conversions, plausible=plausible, missing=missing,
                       description=description, molar_mass=molar_mass)


def _parse_codes(raw: Any, path: str) -> tuple[str, ...]:
    if not _is_list(raw) or not raw:
        raise _fail(path, f'required: a non-empty list of "system|code" strings; got {_kind(raw)}')
    out: list[str] = []
    for index, text in enumerate(raw):
        system, code = _parse_code(text, f"{path}[{index}]", wildcard=True)
        normalised = f"{system}|{code}"
        if normalised in out:
            raise _fail(f"{path}[{index}]", f"duplicate of {path}[{out.index(normalised)}] "
                                            f"({normalised})")
        out.append(normalised)
    return tuple(out)


def _parse_code(raw: Any, path: str, *, wildcard: bool) -> tuple[str, str]:
    if not isinstance(raw, str) or "|" not in raw:
        raise _fail(path, f'must be a "system|code" string; got {raw!r}')
    system, _, code = raw.partition("|")
    system = _system(system)
    code = code.strip()
    prefix = code[:-1] if code.endswith("*") else None
    if prefix == "":
        raise _fail(path, f"a wildcard needs at least one character before '*'; got {raw!r}")
    if not system or not code:
        raise _fail(path, f'must be "system|code" with a non-empty system and code; got {raw!r}')
    if prefix is not None and not wildcard:
        raise _fail(path, f"wildcards are not allowed here; got {raw!r}")
    if "*" in (code if prefix is None else prefix):
        raise _fail(path, f"'*' is only allowed at the end of a code (prefix match); got {raw!r}")
    normalised = _code(system, code if prefix is None else prefix)
    if not normalised:
        raise _fail(path, f"code is empty once normalised; got {raw!r}")
    return system, normalised if prefix is None else normalised + "*"


def _parse_conversions(raw: Any, unit: str, path: str) -> dict[str, tuple[float, float]]:
    if raw is None:
        return {}
    if not isinstance(raw, _MAPPING):
        raise _fail(path, f"must be a mapping of source unit to factor; got {_kind(raw)}")
    out: dict[str, tuple[float, float]] = {}
    seen = {_unit(unit): "the canonical unit"}
    for source_unit, conv in raw.items():
        where = f"{path}[{source_unit!r}]"
        if not isinstance(source_unit, str) or not source_unit.strip():
            raise _fail(where, "a unit must be a non-empty string")
        key = _unit(source_unit)
        if key in seen:
            raise _fail(where, f"same unit as {seen[key]}")
        seen[key] = repr(source_unit)
        if _is_number(conv):
            factor, offset = conv, 0
        elif isinstance(conv, _MAPPING):
            _check_keys(conv, _CONVERSION_KEYS, where)
            factor, offset = conv.get("factor"), conv.get("offset", 0)
            if not _is_number(offset):
                raise _fail(f"{where}.offset", f"must be a finite number; got {offset!r}")
        else:
            raise _fail(where, f"must be a factor or {{factor: x, offset: y}}; got {_kind(conv)}")
        if not _is_number(factor) or factor <= 0:
            raise _fail(where, f"factor must be a positive number; got {factor!r}")
        out[source_unit] = (float(factor), float(offset))
    return out


def _parse_plausible(raw: Any, path: str) -> tuple[float, float] | None:
    if raw is None:
        return None
    if (not _is_list(raw) or len(raw) != 2 or not all(_is_number(x) for x in raw)
            or not raw[0] < raw[1]):
        raise _fail(path, f"must be [low, high] with finite numbers low < high; got {raw!r}")
    return float(raw[0]), float(raw[1])


def _parse_missing(raw: Any, path: str, allow_unfitted: bool) -> MissingPolicy:
    if raw is None or raw == "required":
        return _REQUIRED
    if not isinstance(raw, _MAPPING):
        raise _fail(path, f"must be 'required' or {{impute: <number>}}; got {raw!r}")
    _check_keys(raw, _MISSING_KEYS, path)
    value, fit = raw.get("impute"), raw.get("fit")
    if fit is not None and fit != "median":
        raise _fail(f"{path}.fit", f"must be 'median'; got {fit!r}")
    if value == "median":
        if not allow_unfitted:
            raise _fail(f"{path}.impute", "'median' must be fitted by training first (a served "
                                          "manifest carries the number)")
        return MissingPolicy("impute", None, "median")
    if not _is_number(value):
        raise _fail(f"{path}.impute", f"must be a finite number or 'median'; got {value!r}")
    return MissingPolicy("impute", float(value), fit)


def parse_code_map(raw: Any, where: str = "code_mappings") -> CodeMap:
    """Validate a site's `code_mappings` list into local (system, code) → standard codes."""
    if raw is None:
        return _FrozenMap()
    if not _is_list(raw):
        raise _fail(where, f"must be a list of {{from, to}} mappings; got {_kind(raw)}")
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for index, item in enumerate(raw):
        path = f"{where}[{index}]"
        if not isinstance(item, _MAPPING):
            raise _fail(path, f"must be a mapping with from and to; got {_kind(item)}")
        _check_keys(item, _MAPPING_KEYS, path)
        source = _parse_code(item.get("from"), f"{path}.from", wildcard=False)
        to = item.get("to")
        if isinstance(to, str):
            targets = [_parse_code(to, f"{path}.to", wildcard=False)]
        elif _is_list(to) and to:
            targets = [_parse_code(t, f"{path}.to[{i}]", wildcard=False) for i, t in enumerate(to)]
        else:
            raise _fail(f"{path}.to", f'required: "system|code" or a non-empty list of them; '
                                      f"got {_kind(to)}")
        merged = out.setdefault(source, [])
        merged.extend(t for t in targets if t not in merged)
    return _FrozenMap({source: tuple(targets) for source, targets in out.items()})
