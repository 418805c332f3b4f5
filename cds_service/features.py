"""FHIR R4 → model features: one pure engine for the online hooks and for training.

`parse_features` validates a manifest's `features:` list into `FeatureSpec`s; `extract` turns one
patient's resources (prefetch, FHIR reads, or one `group_by_patient` group of a Bulk NDJSON
export) into a `FeatureVector` in spec order. Training and serving call the same `extract`, so a
feature means the same thing in both (train/serve parity); `now` is the prediction time, and
nothing dated after it is used, but for a few minutes of clock skew (`FUTURE_SKEW`). `readings`
gives one Observation feature's usable results one by one, oldest first, from the same pass.

Units: a result's unit is converted to the spec's canonical UCUM unit by a UCUM library
(ucumvert, on pint), parsed once per distinct unit text and cached. Annotations (`{creat}`) carry
no dimension, except that one the canonical unit names must be in the result's unit too
(`mL/min` is not `mL/min/{1.73_m2}`). Molar <-> mass needs the analyte's molar mass (spec key
`molar_mass`); a spec's own `conversions:` table is tried first. A comparator ("<15") keeps the
number and is reported as a bound (`FeatureValue.comparator`, `Reading.comparator`).

Tolerance policy: data never raises. A resource, coding, value, unit or date that is missing,
malformed or unparseable at any depth is treated as missing and skipped; the feature is computed
from what remains. When nothing usable remains the feature is missing and its policy applies:
`required` leaves it without a value (no prediction possible), `impute` substitutes the manifest's
value. Every result set aside for a reason a reader of the explanation would want to know
(status, date, unit, plausibility) and every reinterpretation (comparator bound, unit conversion,
assumed unit) is recorded in the feature's `notes`. Invalid *specifications* are not data: they
raise `FeatureSpecError` when the manifest is loaded, naming the key path.

Speed: the specs are compiled once (cached per spec tuple) into a dict from normalised
(system, code) to feature indexes, and each resource is visited once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from types import MappingProxyType
from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"

# HL7 OIDs of code systems (HL7 OID registry; the "OID" identifier on each FHIR R4 terminology
# page). CDA-derived feeds and Epic's interconnect still send them as `urn:oid:` systems.
_OID_SYSTEMS = MappingProxyType({
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "urn:oid:2.16.840.1.113883.6.3": ICD10,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "urn:oid:2.16.840.1.113883.6.8": UCUM,
})
# ICD-10 codes are written with and without the dot (E11.9, E119: CMS files are dotless); the
# dot carries no meaning, so both sides are compared dotless and upper-case.
_DOTLESS_SYSTEMS = frozenset({ICD10CM, ICD10})

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

# R4 ObservationStatus: entered-in-error never existed, cancelled was never performed.
_OBS_EXCLUDED_STATUS = frozenset({"entered-in-error", "cancelled"})
# R4 condition-ver-status / condition-clinical (CodeableConcept; the code is in coding[].code).
_COND_EXCLUDED_VERIFICATION = frozenset({"entered-in-error", "refuted"})
_COND_NOT_COUNTED_CLINICAL = frozenset({"inactive", "resolved"})
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
_BIRTH_DATE = re.compile(r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
# FHIR id: [A-Za-z0-9\-\.]{1,64}; Epic ids can run longer, so no length limit here.
_PATIENT_REFERENCE = re.compile(
    r"(?:^|/)Patient/([A-Za-z0-9.\-]+)(?:/_history/[A-Za-z0-9.\-]+)?/?$")
_MAX_BUNDLE_DEPTH = 16
# A result stamped up to this far after `now` is kept: the EHR's clock and ours differ by seconds
# to minutes, and a result just filed must not read as "future". Later ones are ignored, noted.
FUTURE_SKEW = timedelta(minutes=5)
_SECONDS_PER_YEAR = 365.25 * 86_400
# JSON gives dicts: test dict first, the Mapping ABC check is several times slower.
_MAPPING = (dict, Mapping)

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


CodeMap = Mapping[tuple[str, str], tuple[tuple[str, str], ...]]


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
        for v in self.values:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
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


# ---------------------------------------------------------------------------------------------
# Normalisation shared by specs, code maps and data


@lru_cache(maxsize=1024)
def _system(system: str) -> str:
    while (trimmed := system.strip().rstrip("/")) != system:
        system = trimmed
    return _OID_SYSTEMS.get(system, system)


def _code(system: str, code: str) -> str:
    code = code.strip()
    if system in _DOTLESS_SYSTEMS:
        return code.replace(".", "").upper()
    return code


@lru_cache(maxsize=8192)
def _coding(system: str, code: str) -> tuple[str, str] | None:
    system = _system(system)
    code = _code(system, code)
    return (system, code) if system and code else None


def _coding_key(system: Any, code: Any) -> tuple[str, str] | None:
    """Normalised (system, code) of one Coding's parts; None when either is unusable."""
    if not isinstance(system, str) or len(system) > 512:
        return None
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)  # a numeric code sent as a JSON number (seen in local Epic codes)
    elif not isinstance(code, str) or len(code) > 256:
        return None
    return _coding(system, code)


def concept_codes(concept: Any, code_map: Mapping | None = None,
                  identifiers: Any = None) -> set[tuple[str, str]]:
    """Normalised (system, code) pairs of a CodeableConcept, plus what the site's code map
    translates them to. `identifiers` (FHIR Identifier list, e.g. a Medication's Epic ERX id)
    are looked up in the code map as (system, value) too; unmapped identifiers are not codes
    and are left out. Malformed parts are skipped, never raised on."""
    out: set[tuple[str, str]] = set()
    pairs: list[tuple[Any, Any, bool]] = []
    if isinstance(concept, _MAPPING) and isinstance(concept.get("coding"), list):
        pairs += [(c.get("system"), c.get("code"), True) for c in concept["coding"]
                  if isinstance(c, _MAPPING)]
    if isinstance(identifiers, list):
        pairs += [(i.get("system"), i.get("value"), False) for i in identifiers
                  if isinstance(i, _MAPPING)]
    for system, code, is_code in pairs:
        key = _coding_key(system, code)
        if key is None:
            continue
        if is_code:
            out.add(key)
        for target in (code_map or {}).get(key) or ():
            if isinstance(target, tuple) and len(target) == 2:
                out.add(target)
    return out


_UNIT_TABLE = str.maketrans({"µ": "u", "μ": "u", "²": "2", "{": None, "}": None, "_": None})


@lru_cache(maxsize=1024)
def _unit(unit: str) -> str:
    """Comparison key of a unit: "mL/min/{1.73_m2}", "ml/min/1.73 m2" and "mL/min/1.73m²" are
    one unit, and µmol/L (micro sign) equals μmol/L (Greek mu) and umol/L."""
    return "".join(unit.lower().translate(_UNIT_TABLE).split())


# ---------------------------------------------------------------------------------------------
# Units: UCUM through ucumvert (a UCUM grammar on pint), parsed once per distinct text

# Lab spellings that are not UCUM but that Epic and lab interfaces send, keyed by their
# lower-cased, space-free form, mapped to the UCUM unit they mean (then converted by the
# library). Micro as µ/μ/mc and "²" are rewritten before this lookup, and the body-surface
# normaliser "/1.73m2" in any spelling by _BSA.
_LAB_SPELLINGS = MappingProxyType({
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "umol/l": "umol/L",
    "mmol/l": "mmol/L",
    "mg/l": "mg/L",
    "ml/min": "mL/min",
    "ml/min/{1.73_m2}": "mL/min/{1.73_m2}",
    "mg/gcreat": "mg/g{creat}",
    "mg/mmolcreat": "mg/mmol{creat}",
})
# "/1.73m2", "/1.73 m²", "/1.73.m2", "/(1.73.m2)", "/1.73m^2": eGFR's per-1.73 m² body surface,
# which UCUM writes as the annotation {1.73_m2} (a bare "1.73" is no UCUM factor: the library
# reads "1.73.m2" as 1 x 73 x m2).
_BSA = re.compile(r"/\(?1[.,]73[._]?m(?:2|\^2)\)?", re.IGNORECASE)
# µ (micro sign), μ (Greek mu), and "mc" where a unit starts (mcg, mcmol/L; not inside [mclgU]).
_MICRO = re.compile(r"(?:µ|μ|(?<![^/.(])mc)(?=g|mol|L|l|U|eq)")
_ANNOTATION = re.compile(r"\{([^{}]*)\}")
_UCUM_LOCK = threading.Lock()


@dataclass(frozen=True)
class _UcumUnit:
    base: float                                   # magnitude of 1 unit in pint base units
    dims: tuple[tuple[str, float], ...]           # reduced dimensionality
    cancelled: tuple[tuple[str, float], ...]      # dimensions that cancel (mg/g: [mass])
    molar_cancelled: tuple[tuple[str, float], ...]  # the same once [substance] counts as [mass]
    annotations: frozenset[str]


@lru_cache(maxsize=1)
def _ucum_registry() -> Any:
    # Imported and built on first use (about 0.6 s): compiling specs does it at start-up.
    from ucumvert import PintUcumRegistry
    return PintUcumRegistry()


def _as_ucum(text: str) -> str:
    """The UCUM form of a unit as labs write it (see _LAB_SPELLINGS)."""
    compact = "".join(text.split()).replace("²", "2")
    compact = _BSA.sub("/{1.73_m2}", _MICRO.sub("u", compact))
    return _LAB_SPELLINGS.get(compact.lower(), compact)


def _cancelled(sides: tuple[Counter, Counter]) -> tuple[tuple[str, float], ...]:
    num, den = sides
    out = {}
    for dim in num.keys() & den.keys():
        a, b = num[dim], den[dim]
        if a and b and (a > 0) == (b > 0):
            out[dim] = math.copysign(min(abs(a), abs(b)), a)
    return tuple(sorted(out.items()))


def _ucum_terms(ucum: str) -> Iterator[tuple[int, str]]:
    """(0 numerator | 1 denominator, text) of each top-level term: UCUM reads a/b.c as (a/b).c,
    so only the term right after a "/" divides. Annotation-only terms carry nothing."""
    depth, start, side = 0, 0, 0
    for i, char in enumerate(ucum + "."):
        if char in "({":
            depth += 1
        elif char in ")}":
            depth -= 1
        elif depth == 0 and char in "./" and not (char == "." and ucum[i - 1:i] == "*"):
            part = ucum[start:i]
            if part and not (part.startswith("{") and part.endswith("}")):
                yield side, part
            side, start = (1 if char == "/" else 0), i + 1


@lru_cache(maxsize=2048)
def _ucum_unit(text: str) -> _UcumUnit | None:
    """A unit text parsed by the UCUM library; None when it is not UCUM (nor a known lab
    spelling of it) or not a plain multiple (offset units such as Cel)."""
    ucum = _as_ucum(text)
    with _UCUM_LOCK:
        registry = _ucum_registry()  # not data: a library that fails to load must be seen
    try:
        with _UCUM_LOCK:
            quantity = registry.from_ucum(ucum)
            if not hasattr(quantity, "to_base_units") or not quantity._ok_for_muldiv():
                return None
            base = float(quantity.to_base_units().magnitude)
            dims = tuple(sorted((str(d), float(e))
                                for d, e in quantity.dimensionality.items() if e))
            # Numerator and denominator from the text: pint reduces mg/mg to a bare number.
            sides: tuple[Counter, Counter] = (Counter(), Counter())
            molar: tuple[Counter, Counter] = (Counter(), Counter())
            for side, part in _ucum_terms(ucum):
                component = registry.from_ucum(part)
                for dim, e in getattr(component, "dimensionality", {}).items():
                    sides[side][str(dim)] += e
                    molar[side]["[mass]" if dim == "[substance]" else str(dim)] += e
    except Exception:  # the library raises many kinds on bad text; data never raises
        return None
    if not math.isfinite(base) or base <= 0:
        return None
    return _UcumUnit(base, dims, _cancelled(sides), _cancelled(molar),
                     frozenset(_ANNOTATION.findall(ucum)))


@lru_cache(maxsize=4096)
def _ucum_factor(text: str, canonical: str, molar_mass: float | None) -> float | str:
    """The factor from `text` to `canonical` (value x factor), or why there is none: "" when the
    units do not convert, else a short reason for the note."""
    source, target = _ucum_unit(text), _ucum_unit(canonical)
    if source is None or target is None:
        return ""
    diff = dict(source.dims)
    for dim, e in target.dims:
        diff[dim] = diff.get(dim, 0.0) - e
    diff = {dim: e for dim, e in diff.items() if e}
    # Molar <-> mass: the source has n more [substance] and n less [mass] than the target.
    n = diff.pop("[substance]", 0.0)
    if diff.pop("[mass]", 0.0) != -n or diff or n != int(n):
        return ""
    factor = source.base / target.base
    if n:
        if molar_mass is None:
            return ""
        # pint's base unit of mass is the kilogram: g/mol / 1000 = kg/mol.
        factor *= (molar_mass / 1000.0) ** int(n)
        same_kind = source.molar_cancelled == target.molar_cancelled
    else:
        same_kind = source.cancelled == target.cancelled
    # Both dimensionless is not enough: mmol/mol (HbA1c IFCC) is no multiple of % (NGSP).
    if not same_kind:
        return ""
    # An annotation the canonical unit names is part of its meaning (eGFR per 1.73 m2).
    missing = target.annotations - source.annotations
    if missing:
        return f"not per {{{sorted(missing)[0]}}}"
    # 12 significant digits: drops the float noise of the base-unit round trip (1e-3/1e-2).
    return float(f"{factor:.12g}")


def _fmt(x: float) -> str:
    return f"{x:g}"


def _show(raw: Any) -> str:
    """A short, safe rendering of a data value for a note (never a whole structure)."""
    if isinstance(raw, str):
        text = raw if len(raw) <= 40 else raw[:37] + "..."
        return repr(text)
    if isinstance(raw, bool | int | float) or raw is None:
        return repr(raw) if not isinstance(raw, int) or abs(raw) < 10**40 else "a huge number"
    return f"a {type(raw).__name__}"


# ---------------------------------------------------------------------------------------------
# Specification parsing


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


# ---------------------------------------------------------------------------------------------
# Compiled form


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


@dataclass(frozen=True)
class _Compiled:
    features: tuple[_Feature, ...]
    observation: _Lookup
    condition: _Lookup


def _compile_uncached(specs: tuple[FeatureSpec, ...]) -> _Compiled:
    features = []
    for spec in specs:
        if spec.resource == "Patient":
            kind = "patient"
        elif spec.aggregation in COUNTING_AGGREGATIONS:
            kind = "count"
        else:
            kind = "numeric"
        features.append(_Feature(
            spec, kind, _unit(spec.unit) if isinstance(spec.unit, str) else None,
            {_unit(u): conv for u, conv in spec.conversions.items()}, spec.molar_mass))
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


def _compiled(specs: tuple[FeatureSpec, ...]) -> _Compiled:
    try:
        return _compile(specs)
    except TypeError:  # a hand-built spec holding something unhashable: compile uncached
        return _compile_uncached(specs)


# ---------------------------------------------------------------------------------------------
# Resource traversal


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


# ---------------------------------------------------------------------------------------------
# Dates and values


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


# ---------------------------------------------------------------------------------------------
# Extraction


class _Acc:
    """What one feature collected: usable items by dedup key, and counted reasons."""

    __slots__ = ("items", "counts", "texts")

    def __init__(self) -> None:
        # key → (instant | None, value | None, id | None, day | None, notes, comparator,
        #        element): the last two for numeric results only
        self.items: dict[Any, tuple[Any, ...]] = {}
        self.counts: Counter[str] = Counter()
        self.texts: Counter[str] = Counter()

    def add(self, key: Any, item: tuple[Any, ...]) -> None:
        held = self.items.get(key)
        # Same instant and value: one result (an interface resend, or a panel component and
        # its standalone twin). Keep the larger id so the choice does not depend on order.
        if held is None or (item[2] or "") > (held[2] or ""):
            self.items[key] = item


def extract(specs: Sequence[FeatureSpec], resources: Iterable[Any], *, now: datetime,
            code_map: CodeMap | None = None) -> FeatureVector:
    """The feature vector of one patient's resources at `now` (see the module docstring)."""
    compiled = _compiled(tuple(specs))
    now = _as_utc(now)
    accs, patient = _collect(compiled, resources, now, code_map)
    values = []
    for feature, acc in zip(compiled.features, accs, strict=True):
        if feature.kind == "patient":
            values.append(_patient_feature(feature, patient, now))
        elif feature.kind == "count":
            values.append(_count_feature(feature, acc))
        else:
            values.append(_numeric_feature(feature, acc))
    return FeatureVector(tuple(values))


def readings(spec: FeatureSpec, resources: Iterable[Any], *, now: datetime,
             code_map: CodeMap | None = None) -> list[Reading]:
    """Every usable result of one numeric Observation feature, oldest first: the results
    `extract` aggregates, after the same exclusions (status, date and window, unit,
    plausibility) and the same de-duplication. Raises ValueError for other kinds of spec."""
    return readings_many((spec,), resources, now=now, code_map=code_map)[0]


def readings_many(specs: Sequence[FeatureSpec], resources: Iterable[Any], *, now: datetime,
                  code_map: CodeMap | None = None) -> tuple[list[Reading], ...]:
    """`readings` of several features from a single pass over the resources."""
    for spec in specs:
        if spec.resource != "Observation" or spec.aggregation not in NUMERIC_AGGREGATIONS:
            raise ValueError(f"readings needs a numeric Observation feature; {spec.name!r} is "
                             f"{spec.resource} {spec.aggregation}")
    compiled = _compiled(tuple(specs))
    accs, _ = _collect(compiled, resources, _as_utc(now), code_map)
    out = []
    for index, acc in enumerate(accs):
        out.append([Reading(instant, day, value, comparator,
                            f"Observation/{rid}" if rid else None,
                            _matched_code(element.get("code"), compiled.observation, code_map,
                                          index), notes)
                    for instant, value, rid, day, notes, comparator, element
                    in _ordered(acc.items.values())])
    return tuple(out)


def _matched_code(concept: Any, lookup: _Lookup, code_map: Mapping | None,
                  index: int) -> str | None:
    """The first coding of a concept (or its code-map target) that feature `index` matches."""
    codings = concept.get("coding") if isinstance(concept, _MAPPING) else None
    for coding in codings if isinstance(codings, list) else ():
        if not isinstance(coding, _MAPPING):
            continue
        key = _coding_key(coding.get("system"), coding.get("code"))
        if key is None:
            continue
        for candidate in (key, *((code_map or {}).get(key) or ())):
            hits: set[int] = set()
            if isinstance(candidate, tuple) and len(candidate) == 2:
                lookup._add(candidate, hits)
            if index in hits:
                return f"{candidate[0]}|{candidate[1]}"
    return None


def _collect(compiled: _Compiled, resources: Iterable[Any], now: datetime,
             code_map: CodeMap | None) -> tuple[list[_Acc], Mapping | None]:
    """The single pass over the resources: what each feature collected, and the Patient."""
    features = compiled.features
    accs = [_Acc() for _ in features]
    starts: list[datetime | None] = []
    for feature in features:
        days = feature.spec.lookback_days
        try:
            starts.append(now - timedelta(days=days) if days else None)
        except (OverflowError, TypeError):
            starts.append(None)
    wants_observations = bool(compiled.observation.exact or compiled.observation.prefixes)
    wants_conditions = bool(compiled.condition.exact or compiled.condition.prefixes)
    patient: Mapping | None = None
    seen: set[tuple[str, str]] = set()
    for resource in flatten(resources):
        rtype = resource.get("resourceType")
        if rtype == "Observation":
            if not wants_observations:
                continue
        elif rtype == "Condition":
            if not wants_conditions:
                continue
        elif rtype != "Patient" or patient is not None:
            continue
        rid = _resource_id(resource)
        if rid is not None:
            if (rtype, rid) in seen:
                continue  # the same resource twice (paged searches overlap, prefetch + read)
            seen.add((rtype, rid))
        if rtype == "Observation":
            _observation(resource, rid, compiled, accs, starts, now, code_map)
        elif rtype == "Condition":
            _condition(resource, rid, compiled, accs, starts, now, code_map)
        else:
            patient = resource
    return accs, patient


def extract_many(groups: Sequence[Sequence[FeatureSpec]], resources: Iterable[Any], *,
                 now: datetime, code_map: CodeMap | None = None) -> tuple[FeatureVector, ...]:
    """One vector per spec list, from a single pass over the resources (a service's own inputs
    and its model's features: a 1,000-result prefetch is read once, not once per list)."""
    joined = extract([spec for group in groups for spec in group], resources, now=now,
                     code_map=code_map)
    vectors, start = [], 0
    for group in groups:
        vectors.append(FeatureVector(joined.values[start:start + len(group)]))
        start += len(group)
    return tuple(vectors)


def _observation(obs: Mapping, rid: str | None, compiled: _Compiled, accs: list[_Acc],
                 starts: list[datetime | None], now: datetime, code_map: Mapping | None) -> None:
    lookup = compiled.observation
    targets: dict[int, Mapping] = {}
    components = obs.get("component")
    if isinstance(components, list):
        # A panel (e.g. blood pressure 85354-9) carries its values in components: a feature
        # matching a component's code reads that component; the first matching one wins.
        for component in reversed(components):
            if isinstance(component, _MAPPING):
                for index in lookup.match(component.get("code"), code_map):
                    targets[index] = component
    for index in lookup.match(obs.get("code"), code_map):
        targets[index] = obs
    if not targets:
        return
    status = obs.get("status")
    if isinstance(status, str) and status in _OBS_EXCLUDED_STATUS:
        for index in targets:
            accs[index].counts[f"status:{status}"] += 1
        return
    when = _observation_date(obs)
    for index, element in targets.items():
        acc, feature, start = accs[index], compiled.features[index], starts[index]
        if when is None:
            acc.counts["undated"] += 1
            continue
        instant, day = when
        if instant > now + FUTURE_SKEW:
            acc.counts["future"] += 1
            continue
        if start is not None and instant < start:
            acc.counts["old"] += 1
            continue
        if feature.kind == "numeric":
            result = _numeric_value(element, feature)
            if isinstance(result, str):
                acc.texts[result] += 1
                continue
            value, notes, comparator = result
            acc.add((instant, value), (instant, value, rid, day, notes, comparator, element))
        else:
            if (reason := _absent_reason(element)) is not None:
                acc.texts[f"no value (dataAbsentReason {reason})"] += 1
                continue
            if not _has_value(element, element is obs):
                acc.texts["no value"] += 1
                continue
            acc.add((instant, _value_key(element)), (instant, None, rid, day, ()))


def _condition(cond: Mapping, rid: str | None, compiled: _Compiled, accs: list[_Acc],
               starts: list[datetime | None], now: datetime, code_map: Mapping | None) -> None:
    hits = compiled.condition.match(cond.get("code"), code_map)
    if not hits:
        return
    excluded = sorted(_concept_codes(cond.get("verificationStatus"))
                      & _COND_EXCLUDED_VERIFICATION)
    not_counted = sorted(_concept_codes(cond.get("clinicalStatus")) & _COND_NOT_COUNTED_CLINICAL)
    period = cond.get("onsetPeriod")
    onset = _instant(cond.get("onsetDateTime"))
    if onset is None and isinstance(period, _MAPPING):
        onset = _instant(period.get("start")) or _instant(period.get("end"))
    recorded = _instant(cond.get("recordedDate"))
    when = onset or recorded
    # Recorded after `now` was not known at `now` (training leakage); onset after it is an error.
    future = any(w is not None and w[0] > now + FUTURE_SKEW for w in (onset, recorded))
    for index in hits:
        acc, start = accs[index], starts[index]
        if excluded:
            acc.counts[f"status:{excluded[0]}"] += 1
        elif not_counted:
            acc.counts[f"clinical:{not_counted[0]}"] += 1
        elif future:
            acc.counts["future"] += 1
        elif start is not None and when is None:
            acc.counts["undated"] += 1
        elif start is not None and when[0] < start:
            acc.counts["old"] += 1
        else:
            # Distinct Conditions each count (duplicates by id were dropped before).
            acc.add(("condition", len(acc.items)),
                    (when[0] if when else None, None, rid, when[1] if when else None, ()))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _reason_notes(feature: _Feature, acc: _Acc, used: int) -> list[str]:
    noun = "condition" if feature.spec.resource == "Condition" else "result"
    notes = []
    for key, n in sorted(acc.counts.items()):
        if key.startswith("status:"):
            notes.append(f"{_plural(n, key[7:] + ' ' + noun)} excluded")
        elif key.startswith("clinical:"):
            notes.append(f"{_plural(n, key[9:] + ' ' + noun)} not counted")
    if acc.counts["future"]:
        notes.append(f"{_plural(acc.counts['future'], 'future-dated ' + noun)} ignored")
    if acc.counts["undated"]:
        notes.append(f"{_plural(acc.counts['undated'], 'undated ' + noun)} excluded")
    if acc.counts["old"] and not used:
        notes.append(f"{_plural(acc.counts['old'], noun)} before the "
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
