"""A patient's timeline in a Bulk Data export, as the cohort reads it: when each record happened
(contact days, clinical dates), the eGFR history (reported, or CKD-EPI 2021 from creatinine), the
index date (CKD confirmed), kidney failure (chronic dialysis, transplant, sustained eGFR < 15)
and death. Definitions and sources: docs/clinical.md, "Cohort from a Bulk Data export"; the
numbers are a `Definition`, overridable by a spec's `cohort:` section.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from typing import Any

from cds_service.features import Reading, concept_codes, extract, readings_many
from cds_service.features.resources import _instant, _observation_date
from cds_service.models.errors import ModelError
from cds_service.models.manifest import Manifest

# Chronic-status codes among the repository's `dialysis` set (hooks/data/kidney_conditions.yaml):
# each says the patient is on maintenance dialysis / has ESRD, not that one session took place.
# ICD-10-CM Z99.2 Dependence on renal dialysis; N18.6 End stage renal disease; SNOMED CT 105502003
# Dependence on renal dialysis, 46177005 End-stage renal disease; CPT 90960/90961 ESRD-related
# services, monthly (billed only for patients with ESRD on dialysis; VSAC ESRD Monthly
# Outpatient Services 2.16.840.1.113883.3.464.1003.109.12.1014). The rest of the set (dialysis
# procedures, CPT 90935/90937, ICD-10-CM Z49) are sessions, which may be acute.
CHRONIC_DIALYSIS_CODES = (
    "http://hl7.org/fhir/sid/icd-10-cm|Z99.2", "http://hl7.org/fhir/sid/icd-10-cm|N18.6",
    "http://snomed.info/sct|105502003", "http://snomed.info/sct|46177005",
    "http://www.ama-assn.org/go/cpt|90960", "http://www.ama-assn.org/go/cpt|90961",
)

# R4 status codes of a record that did not happen (Procedure: event-status; Condition:
# condition-ver-status); a resolved Condition still dates the event it records.
_NOT_DONE = frozenset({"entered-in-error", "not-done", "refuted"})
# R4 Encounter status: planned, cancelled or erroneous encounters are no contact.
_NO_CONTACT_ENCOUNTER = frozenset({"planned", "cancelled", "entered-in-error"})
# Clinical date elements of the resource types a Bulk export holds (FHIR R4), whatever the type:
# the latest one is the resource's contact date (`last contact`).
_DATE_KEYS = frozenset({
    "effectiveDateTime", "effectiveInstant", "issued", "onsetDateTime", "recordedDate",
    "abatementDateTime", "performedDateTime", "authoredOn", "occurrenceDateTime",
    "whenHandedOver", "whenPrepared", "dateAsserted", "date"})
_PERIOD_KEYS = frozenset({"effectivePeriod", "onsetPeriod", "performedPeriod", "period",
                          "abatementPeriod", "occurrencePeriod", "effectiveTiming"})


# ---------------------------------------------------------------------------------------------
# Definitions


@dataclass(frozen=True)
class Definition:
    """The cohort's parameters; defaults as in docs/clinical.md, overridable by the spec's
    `cohort:` section (models/README.md, "Cohort from a Bulk Data export")."""

    ckd_egfr_below: float = 60.0        # KDIGO 2024 GFR categories G3a-G5
    ckd_min_gap_days: int = 90          # KDIGO 2024: > 3 months
    kidney_failure_egfr_below: float = 15.0   # KDIGO 2024 G5 (kidney failure)
    sustained_days: int = 90            # eGFR < 15 for this long counts as kidney failure
    chronic_dialysis_days: int = 90     # USRDS 90-day rule
    dialysis_max_gap_days: int = 45     # a longer gap between dialysis records ends a run
    min_age: int = 18
    horizon_years: float | None = None  # default: the spec's output.horizon_years

    @classmethod
    def from_spec(cls, raw: Any, source: str, spec: Manifest) -> Definition:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ModelError(f"{source}: cohort: expected a mapping of the keys in "
                             "models/README.md")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in fields:
                raise ModelError(f"{source}: cohort.{key}: unknown key (known: "
                                 f"{', '.join(fields)})")
            integer = fields[key].type.startswith("int")
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value) and value > 0 and (not integer or value == int(value)))
            if not ok:
                kind = "a positive whole number" if integer else "a positive number"
                raise ModelError(f"{source}: cohort.{key}: must be {kind}, not {value!r}")
            values[key] = int(value) if integer else float(value)
        if "horizon_years" not in values:
            values["horizon_years"] = spec.output.horizon_years
        definition = cls(**values)
        if definition.kidney_failure_egfr_below >= definition.ckd_egfr_below:
            raise ModelError(f"{source}: cohort.kidney_failure_egfr_below must be below "
                             "cohort.ckd_egfr_below")
        return definition


# ---------------------------------------------------------------------------------------------
# Codes and dates


def _code_matcher(entries: Iterable[str]) -> tuple[frozenset, tuple]:
    """("system|code" and "system|prefix*" entries) → (exact keys, (system, prefix) pairs), both
    normalised as the engine normalises codings (ICD-10 dotless, OIDs to URLs)."""
    exact, prefixes = set(), []
    for entry in entries:
        system, _, code = entry.partition("|")
        wildcard = code.endswith("*")
        keys = concept_codes({"coding": [{"system": system, "code": code.rstrip("*")}]})
        for key in keys:
            (prefixes.append(key) if wildcard else exact.add(key))
    return frozenset(exact), tuple(prefixes)


def _matches(concept: Any, matcher: tuple[frozenset, tuple]) -> bool:
    exact, prefixes = matcher
    for system, code in concept_codes(concept):
        if (system, code) in exact:
            return True
        if any(system == s and code.startswith(p) for s, p in prefixes):
            return True
    return False


def parse_day(raw: Any) -> date | None:
    """The local calendar date a FHIR date/dateTime states (the engine's parser)."""
    return _day_of(raw) if isinstance(raw, str) else None


@lru_cache(maxsize=65_536)  # bounded: the same dates recur across a patient's resources
def _day_of(raw: str) -> date | None:
    when = _instant(raw)
    return date.fromisoformat(when[1]) if when else None


def _period_days(raw: Any) -> list[date]:
    if not isinstance(raw, Mapping):
        return []
    if "start" in raw or "end" in raw:
        return [d for d in (parse_day(raw.get("start")), parse_day(raw.get("end"))) if d]
    events = raw.get("event")  # Timing
    return [d for d in (parse_day(e) for e in events or () if isinstance(events, list)) if d]


def contact_day(resource: Mapping[str, Any]) -> date | None:
    """The latest clinical date a resource states; None for an undated one or one that records
    no contact (erroneous, cancelled, planned)."""
    status = resource.get("status")
    if isinstance(status, str) and (status in _NOT_DONE or status == "cancelled" or (
            resource.get("resourceType") == "Encounter" and status in _NO_CONTACT_ENCOUNTER)):
        return None
    days = []
    for key, raw in resource.items():
        if key in _DATE_KEYS:
            if (day := parse_day(raw)) is not None:
                days.append(day)
        elif key in _PERIOD_KEYS:
            days.extend(_period_days(raw))
    return max(days) if days else None


def known_day(resource: Mapping[str, Any]) -> date | None:
    """When a resource became part of the chart, for the features' as-of cut: an Observation's
    effective date (else issued, as the engine reads it), a Condition's recordedDate (else its
    onset), anything else its latest date."""
    rtype = resource.get("resourceType")
    if rtype == "Observation":
        when = _observation_date(resource)
        return date.fromisoformat(when[1]) if when else None
    if rtype == "Condition":
        recorded = parse_day(resource.get("recordedDate"))
        return recorded or _event_day(resource)
    return contact_day(resource)


def _event_day(resource: Mapping[str, Any]) -> date | None:
    """When a Condition or Procedure says the thing happened: onset / performed, else recorded."""
    for key in ("onsetDateTime", "performedDateTime"):
        if (d := parse_day(resource.get(key))) is not None:
            return d
    for key in ("onsetPeriod", "performedPeriod"):
        period = resource.get(key)
        if isinstance(period, Mapping):
            if (d := parse_day(period.get("start")) or parse_day(period.get("end"))) is not None:
                return d
    return parse_day(resource.get("recordedDate"))


def _done(resource: Mapping[str, Any]) -> bool:
    status = resource.get("status")
    if isinstance(status, str) and status in _NOT_DONE:
        return False
    verification = concept_codes(resource.get("verificationStatus"))
    return not any(code in _NOT_DONE for _, code in verification)


# ---------------------------------------------------------------------------------------------
# Kidney function


@dataclass(frozen=True)
class Result:
    """One eGFR, reported or calculated (`hooks._kidney.Egfr`), on its local date."""

    day: date
    value: float
    comparator: str | None
    calculated: bool


class Kidney:
    """The kidney services' specs and code sets, loaded once (hooks/_kidney.py)."""

    def __init__(self) -> None:
        from hooks import _kidney

        self.k = _kidney
        specs = {spec.name: spec for spec in _kidney.INPUTS}
        # The services read two years back; a cohort needs the whole history (no lower bound).
        self.egfr = dataclasses.replace(specs["egfr"], lookback_days=None)
        self.creatinine = dataclasses.replace(specs["creatinine"], lookback_days=None)
        self.age, self.male = specs["age"], specs["male"]
        self.transplant = _code_matcher(_kidney.CONDITION_SETS["kidney_transplant"])
        self.dialysis = _code_matcher(_kidney.CONDITION_SETS["dialysis"])
        self.chronic = _code_matcher(CHRONIC_DIALYSIS_CODES)

    def patient(self, patient: Mapping[str, Any], when: datetime) -> tuple[float | None,
                                                                            bool | None]:
        """(age in whole years at `when`, female) by the engine's Patient features."""
        vector = extract((self.age, self.male), (patient,), now=when)
        age = vector["age"].value if vector["age"].status == "observed" else None
        male = vector["male"].value if vector["male"].status == "observed" else None
        return age, None if male is None else not male

    def egfrs(self, resources: Sequence[Mapping[str, Any]], patient: Mapping[str, Any],
              female: bool, until: datetime) -> list[Result]:
        """Every eGFR up to `until`, oldest first: reported ones, and CKD-EPI 2021 from each
        creatinine with the age at that result; on the same instant the laboratory's own eGFR
        wins over ours (docs/clinical.md, "Equations")."""
        reported, creatinines = readings_many((self.egfr, self.creatinine), resources,
                                              now=until)
        taken = {r.instant for r in reported}
        results = [Result(date.fromisoformat(r.date), float(round(r.value)), r.comparator,
                          False) for r in reported]
        for creatinine in creatinines:
            if creatinine.instant in taken:
                continue
            egfr = self._calculated(creatinine, patient, female)
            if egfr is not None:
                results.append(Result(date.fromisoformat(egfr.date), egfr.value, None, True))
        return sorted(results, key=lambda r: (r.day, r.calculated))

    def _calculated(self, creatinine: Reading, patient: Mapping[str, Any], female: bool):
        age, _ = self.patient(patient, creatinine.instant)
        if age is None:
            return None
        # Age and `now` both at the result: `_calculated` then uses the age as given.
        return self.k._calculated(creatinine, age, creatinine.instant, female)


def sustained(results: Sequence[Result], below: float, min_days: int,
              below_fn: Any, at_least_fn: Any) -> tuple[date, date] | None:
    """(first day, confirming day) of the first run of eGFR < `below` spanning >= `min_days`
    with no eGFR >= `below` in between; None if there is none. A bound that proves neither
    (">45" against 60) neither extends nor ends a run."""
    start: date | None = None
    for result in results:
        if below_fn(result.value, result.comparator, below):
            if start is None:
                start = result.day
            elif (result.day - start).days >= min_days:
                return start, result.day
        elif at_least_fn(result.value, result.comparator, below):
            start = None
    return None


@dataclass
class Outcome:
    day: date
    by: str


def kidney_failure(resources: Sequence[Mapping[str, Any]], results: Sequence[Result],
                   kidney: Kidney, definition: Definition) -> tuple[Outcome | None, int]:
    """The first kidney failure (chronic dialysis, transplant, sustained eGFR < 15), and how
    many kidney-failure records were undated (not placeable, not used)."""
    found: list[Outcome] = []
    dialysis: list[tuple[date, bool]] = []
    undated = 0
    for resource in resources:
        if resource.get("resourceType") not in ("Condition", "Procedure") or not _done(resource):
            continue
        code = resource.get("code")
        transplant = _matches(code, kidney.transplant)
        on_dialysis = not transplant and _matches(code, kidney.dialysis)
        if not (transplant or on_dialysis):
            continue
        day = _event_day(resource)
        if day is None:
            undated += 1
        elif transplant:
            found.append(Outcome(day, "transplant"))
        else:
            dialysis.append((day, _matches(code, kidney.chronic)))
    if (start := _chronic_dialysis(dialysis, definition)) is not None:
        found.append(Outcome(start, "dialysis"))
    run = sustained(results, definition.kidney_failure_egfr_below, definition.sustained_days,
                    kidney.k.below, kidney.k.at_least)
    if run is not None:
        found.append(Outcome(run[0], "egfr"))
    first = min(found, key=lambda o: (o.day, o.by)) if found else None
    return first, undated


def _chronic_dialysis(records: list[tuple[date, bool]], definition: Definition) -> date | None:
    """First day of the first chronic run of dialysis records. Records at most
    `dialysis_max_gap_days` apart form a run; a run is chronic when it spans at least
    `chronic_dialysis_days` (USRDS 90-day rule) or holds a chronic-status code."""
    run_start: date | None = None
    last: date | None = None
    chronic = False
    for day, status in sorted(records):
        if last is None or (day - last).days > definition.dialysis_max_gap_days:
            run_start, chronic = day, False
        last = day
        chronic = chronic or status or (day - run_start).days >= definition.chronic_dialysis_days
        if chronic:
            return run_start
    return None


def death_day(patient: Mapping[str, Any], last_contact: date | None) -> tuple[date | None, bool]:
    """(date of death, whether it was dated by the last contact): deceasedDateTime, else
    deceasedBoolean true dated at the last contact (died then or later; the earliest date the
    data allow)."""
    died = parse_day(patient.get("deceasedDateTime"))
    if died is not None:
        return died, False
    if patient.get("deceasedBoolean") is True and last_contact is not None:
        return last_contact, True
    return None, False
