"""Units: result units to a feature's canonical UCUM unit through ucumvert (a UCUM grammar on
pint), each distinct unit text parsed once and cached.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

_UNIT_TABLE = str.maketrans({"µ": "u", "μ": "u", "²": "2", "{": None, "}": None, "_": None})


@lru_cache(maxsize=1024)
def _unit(unit: str) -> str:
    """Comparison key of a unit: "mL/min/{1.73_m2}", "ml/min/1.73 m2" and "mL/min/1.73m²" are
    one unit, and µmol/L (micro sign) equals μmol/L (Greek mu) and umol/L."""
    return "".join(unit.lower().translate(_UNIT_TABLE).split())

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
