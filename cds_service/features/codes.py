"""Code systems and codings: the system URLs (and the HL7 OIDs Epic sends for some), and
normalised (system, code) keys, ICD-10 compared dotless.
"""

from __future__ import annotations

from collections.abc import Mapping
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


# JSON gives dicts: test dict first, the Mapping ABC check is several times slower.
_MAPPING = (dict, Mapping)


CodeMap = Mapping[tuple[str, str], tuple[tuple[str, str], ...]]


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
