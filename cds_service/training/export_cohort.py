"""A time-to-event cohort from a FHIR Bulk Data export: `cds-service models cohort`.

Per patient (definitions and sources: docs/clinical.md, "Cohort from a Bulk Data export"):

- **index date**: CKD confirmed, the first eGFR < 60 that follows an eGFR < 60 at least 90 days
  earlier with no eGFR >= 60 in between (KDIGO 2024: GFR < 60 for more than 3 months);
- **outcome**: kidney failure, the first of chronic dialysis, kidney transplant, or eGFR < 15
  sustained for 90 days; death is a competing event; everyone else is censored at last contact;
- **features**: the spec's, extracted by the service's engine from what was dated on or before
  the index date, as of the end of that day (`training.as_of`, the same as `models train`).

eGFR is a reported eGFR (hooks/data/loinc_kidney.yaml families) or CKD-EPI 2021 from serum
creatinine, both read by the feature engine with the kidney services' own specs
(hooks/data/kidney_inputs.yaml) and calculated by the services' own `hooks._kidney` code.

Output (COHORT_DIR): `cohort.csv` (one row per included patient), `cohort.json` (definitions,
parameters, spec, counts, export summary) and `report.md`. The export is read in bounded memory
(`export_store`): spilled to SQLite, then one patient at a time.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from cds_service.features import Reading, concept_codes, extract, readings_many
from cds_service.features.resources import _instant, _observation_date
from cds_service.models.errors import ModelError
from cds_service.models.manifest import Manifest, parse_manifest, read_yaml
from cds_service.training.export_store import ExportStore, export_files, read_log
from cds_service.training.training import as_of

FORMAT = "cds-service-cohort/1"
CSV_FILE, JSON_FILE, REPORT_FILE = "cohort.csv", "cohort.json", "report.md"
EVENTS = ("kidney_failure", "death", "censored")
# Fixed columns of cohort.csv; the spec's features follow, one column each, by feature name.
COLUMNS = ("patient_id", "index_date", "event", "event_date", "followup_days",
           "kidney_failure_by", "age_at_index", "sex")

# Exclusion reasons, in the order they are tested (a patient is counted under the first).
NO_PATIENT = "no Patient resource"
NO_BIRTH_DATE = "no birth date"
NO_SEX = "sex not recorded as male or female"
NO_INDEX = "no index date (CKD not confirmed by eGFR)"
UNDER_AGE = "younger than min_age at index"
KF_BEFORE = "kidney failure at or before index"
DIED_BEFORE = "death at or before index"
NO_FOLLOW_UP = "no follow-up after index"
EXCLUSIONS = (NO_PATIENT, NO_BIRTH_DATE, NO_SEX, NO_INDEX, UNDER_AGE, KF_BEFORE, DIED_BEFORE,
              NO_FOLLOW_UP)

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


def load_cohort_spec(path: Path) -> tuple[Manifest, Definition]:
    """The training spec and its `cohort:` section (removed before the spec is validated)."""
    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise ModelError(f"{path}: expected a YAML mapping at the top level")
    data = dict(data)
    raw = data.pop("cohort", None)
    spec = parse_manifest(data, str(path), spec=True)
    clash = sorted(set(spec.feature_names) & set(COLUMNS))
    if clash:
        raise ModelError(f"{path}: features {clash} have the names of cohort.csv's own columns")
    return spec, Definition.from_spec(raw, str(path), spec)


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


def _day(raw: Any) -> date | None:
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
        return [d for d in (_day(raw.get("start")), _day(raw.get("end"))) if d]
    events = raw.get("event")  # Timing
    return [d for d in (_day(e) for e in events or () if isinstance(events, list)) if d]


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
            if (day := _day(raw)) is not None:
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
        recorded = _day(resource.get("recordedDate"))
        return recorded or _event_day(resource)
    return contact_day(resource)


def _event_day(resource: Mapping[str, Any]) -> date | None:
    """When a Condition or Procedure says the thing happened: onset / performed, else recorded."""
    for key in ("onsetDateTime", "performedDateTime"):
        if (d := _day(resource.get(key))) is not None:
            return d
    for key in ("onsetPeriod", "performedPeriod"):
        period = resource.get(key)
        if isinstance(period, Mapping):
            if (d := _day(period.get("start")) or _day(period.get("end"))) is not None:
                return d
    return _day(resource.get("recordedDate"))


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


# ---------------------------------------------------------------------------------------------
# One patient


@dataclass
class Row:
    patient_id: str
    index_date: date
    event: str
    event_date: date
    kidney_failure_by: str | None
    age: float
    female: bool
    features: list[float | None]

    @property
    def followup_days(self) -> int:
        return (self.event_date - self.index_date).days

    def csv(self) -> list[Any]:
        return [self.patient_id, self.index_date.isoformat(), self.event,
                self.event_date.isoformat(), self.followup_days, self.kidney_failure_by or "",
                int(self.age), "female" if self.female else "male",
                *("" if v is None else repr(round(v, 6)) for v in self.features)]


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
    day = _day(patient.get("deceasedDateTime"))
    if day is not None:
        return day, False
    if patient.get("deceasedBoolean") is True and last_contact is not None:
        return last_contact, True
    return None, False


@dataclass
class Tally:
    exclusions: Counter[str] = dataclasses.field(default_factory=Counter)
    events: Counter[str] = dataclasses.field(default_factory=Counter)
    kidney_failure_by: Counter[str] = dataclasses.field(default_factory=Counter)
    death_dated_by_last_contact: int = 0
    undated_kidney_failure_records: int = 0
    after_export: int = 0
    included: int = 0
    missing: Counter[str] = dataclasses.field(default_factory=Counter)
    missing_required: int = 0
    index_first: date | None = None
    index_last: date | None = None


def cohort_row(patient_id: str, resources: list[dict[str, Any]], spec: Manifest,
               definition: Definition, kidney: Kidney, tally: Tally,
               export_day: date | None = None) -> Row | str:
    """One patient's row, or the reason (EXCLUSIONS) they are left out."""
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    if patient is None:
        return NO_PATIENT
    days, kept = [], []
    for resource in resources:
        day = contact_day(resource)
        if day is not None and export_day is not None and day > export_day:
            tally.after_export += 1  # dated after the export was taken: an error, not used
            continue
        kept.append(resource)
        if day is not None:
            days.append(day)
    resources = kept
    last_contact = max(days) if days else None
    until = as_of((last_contact or date(1900, 1, 1)) + timedelta(days=1))
    age_now, female = kidney.patient(patient, until)
    if age_now is None:
        return NO_BIRTH_DATE
    if female is None:
        return NO_SEX
    results = kidney.egfrs(resources, patient, female, until)
    ckd = sustained(results, definition.ckd_egfr_below, definition.ckd_min_gap_days,
                    kidney.k.below, kidney.k.at_least)
    if ckd is None:
        return NO_INDEX
    index = ckd[1]
    cut = as_of(index)
    age, _ = kidney.patient(patient, cut)
    if age is None or age < definition.min_age:
        return UNDER_AGE
    failure, undated = kidney_failure(resources, results, kidney, definition)
    tally.undated_kidney_failure_records += undated
    if failure is not None and failure.day <= index:
        return KF_BEFORE
    died, by_contact = death_day(patient, last_contact)
    if died is not None and died <= index:
        return DIED_BEFORE
    if failure is not None and (died is None or failure.day <= died):
        event, end, by = "kidney_failure", failure.day, failure.by
    elif died is not None:
        event, end, by = "death", died, None
        tally.death_dated_by_last_contact += by_contact
    else:
        event, end, by = "censored", last_contact, None
    if end is None or end <= index:
        return NO_FOLLOW_UP
    # Features: only what was on the chart by the end of the index date.
    before = [r for r in resources if r is patient or (
        (day := known_day(r)) is not None and day <= index)]
    vector = extract(spec.features, before, now=cut)
    values = [v.observed if v.status == "observed" else None for v in vector.values]
    for value, feature in zip(values, spec.features, strict=True):
        if value is None:
            tally.missing[feature.name] += 1
    if any(v is None and f.missing.strategy == "required"
           for v, f in zip(values, spec.features, strict=True)):
        tally.missing_required += 1
    return Row(patient_id, index, event, end, by, age, female, values)


# ---------------------------------------------------------------------------------------------
# The command


def build_cohort(export_dir: Path, spec_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write cohort.csv, cohort.json and report.md into `out_dir`; return cohort.json."""
    spec, definition = load_cohort_spec(spec_path)
    files = export_files(export_dir)
    log = read_log(export_dir)
    export_day = _day(log.get("transaction_time"))
    kidney = Kidney()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".cohort-spill-", dir=out_dir))
    tally = Tally()
    try:
        store = ExportStore(work / "export.sqlite3", fhir_url=log.get("server") or "")
        try:
            spill = store.load(files)
            store.db.execute("CREATE TABLE followup (days INTEGER, event TEXT)")
            with open(out_dir / CSV_FILE, "w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow([*COLUMNS, *spec.feature_names])
                for patient_id, resources in store.patients():
                    row = cohort_row(patient_id, resources, spec, definition, kidney, tally,
                                     export_day)
                    if isinstance(row, str):
                        tally.exclusions[row] += 1
                        continue
                    writer.writerow(row.csv())
                    _count(row, tally)
                    store.db.execute("INSERT INTO followup VALUES (?, ?)",
                                     (row.followup_days, row.event))
            followup = _followup(store, definition)
        finally:
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not tally.included:
        (out_dir / CSV_FILE).unlink(missing_ok=True)
        reasons = "; ".join(f"{n} {why}" for why, n in tally.exclusions.most_common()) or (
            "no patients in the export")
        raise ModelError(f"{export_dir}: no patient meets the cohort definition ({reasons})")
    document = _document(spec, spec_path, definition, export_dir, spill, log, tally, followup)
    (out_dir / JSON_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (out_dir / REPORT_FILE).write_text(report(document), encoding="utf-8")
    return document


def _count(row: Row, tally: Tally) -> None:
    tally.included += 1
    tally.events[row.event] += 1
    if row.kidney_failure_by:
        tally.kidney_failure_by[row.kidney_failure_by] += 1
    tally.index_first = min(filter(None, (tally.index_first, row.index_date)))
    tally.index_last = max(filter(None, (tally.index_last, row.index_date)))


def _followup(store: ExportStore, definition: Definition) -> dict[str, Any]:
    """Follow-up distribution and events within the horizon, from the spill (not memory)."""
    db = store.db
    n = db.execute("SELECT count(*) FROM followup").fetchone()[0]
    if not n:
        return {}

    def quantile(q: float) -> int:
        """Nearest rank: the ceil(q * n)-th smallest (the smallest for q = 0)."""
        return db.execute("SELECT days FROM followup ORDER BY days LIMIT 1 OFFSET ?",
                          (max(0, math.ceil(q * n) - 1),)).fetchone()[0]

    out: dict[str, Any] = {
        "days": {"min": quantile(0), "p25": quantile(0.25), "median": quantile(0.5),
                 "p75": quantile(0.75), "max": quantile(1)},
        "person_years": round(db.execute("SELECT sum(days) FROM followup").fetchone()[0]
                              / 365.25, 2),
    }
    if definition.horizon_years:
        horizon = definition.horizon_years * 365.25
        rows = db.execute(
            "SELECT event, sum(days <= ?), sum(days > ?) FROM followup GROUP BY event",
            (horizon, horizon)).fetchall()
        out["within_horizon"] = {event: within for event, within, _ in rows}
        out["followed_beyond_horizon"] = sum(beyond for _, _, beyond in rows)
    return out


def _document(spec: Manifest, spec_path: Path, definition: Definition, export_dir: Path,
              spill: Any, log: Mapping[str, Any], tally: Tally,
              followup: Mapping[str, Any]) -> dict[str, Any]:
    years = followup.get("person_years") or 0
    rates = {event: round(1000 * tally.events[event] / years, 2) if years else None
             for event in ("kidney_failure", "death")}
    return {
        "format": FORMAT,
        "spec": {"id": spec.id, "version": spec.version, "file": str(spec_path),
                 "features": [f.to_dict() for f in spec.features]},
        "parameters": dataclasses.asdict(definition),
        "definitions": DEFINITIONS,
        "columns": {**COLUMN_MEANINGS, **{f.name: f"feature {f.name} as of the end of the index "
                                           f"date ({f.unit or f.aggregation}); empty: not "
                                           "observed (imputation is the training step's)"
                                          for f in spec.features}},
        "counts": {
            "patients": spill.patients,
            "included": tally.included,
            "excluded": {why: tally.exclusions[why] for why in EXCLUSIONS
                         if tally.exclusions[why]},
            "events": {event: tally.events[event] for event in EVENTS},
            "kidney_failure_by": dict(sorted(tally.kidney_failure_by.items())),
            "events_per_1000_person_years": rates,
            "death_dated_by_last_contact": tally.death_dated_by_last_contact,
            "undated_kidney_failure_records": tally.undated_kidney_failure_records,
            "resources_dated_after_export": tally.after_export,
            "missing_features": {f.name: tally.missing[f.name] for f in spec.features},
            "missing_required_feature": tally.missing_required,
        },
        "index_dates": {"first": tally.index_first.isoformat() if tally.index_first else None,
                        "last": tally.index_last.isoformat() if tally.index_last else None},
        "followup": dict(followup),
        "export": {
            "directory": str(export_dir),
            "files": spill.files,
            "resources_by_type": dict(sorted(spill.by_type.items())),
            "resources_without_patient": dict(sorted(spill.without_patient.items())),
            "medications": spill.medications,
            "log": dict(log),
        },
    }


DEFINITIONS = {
    "index_date": "date of the first eGFR < ckd_egfr_below that comes at least ckd_min_gap_days "
                  "after an earlier eGFR < ckd_egfr_below, with no eGFR >= ckd_egfr_below in "
                  "between (CKD confirmed; KDIGO 2024). eGFR: reported, or CKD-EPI 2021 from "
                  "serum creatinine",
    "kidney_failure": "first of: chronic dialysis (a run of dialysis records no more than "
                      "dialysis_max_gap_days apart lasting chronic_dialysis_days, or holding a "
                      "chronic-status code; dated at the run's first record), kidney transplant "
                      "(Condition or Procedure; onset/performed date, else recorded), eGFR < "
                      "kidney_failure_egfr_below sustained sustained_days (dated at its first "
                      "result)",
    "death": "Patient.deceasedDateTime; deceasedBoolean true is dated at the last contact; a "
             "competing event: the earlier of kidney failure and death is the event",
    "censored": "at the last contact: the latest clinical date of any resource of the patient "
                "(a resource dated after the export's transactionTime is an error and not used)",
    "features": "the spec's features, extracted by the service's engine from resources dated "
                "on or before the index date (Condition: recordedDate), as of 23:59:59 UTC "
                "that day",
    "exclusions": "each patient is counted under the first that applies: "
                  + "; ".join(EXCLUSIONS),
}

COLUMN_MEANINGS = {
    "patient_id": "Patient.id in the export",
    "index_date": "YYYY-MM-DD; time zero, and the date to split on by time",
    "event": "kidney_failure | death (competing) | censored",
    "event_date": "YYYY-MM-DD of the event, or of censoring (last contact)",
    "followup_days": "event_date - index_date, > 0",
    "kidney_failure_by": "dialysis | transplant | egfr (sustained eGFR < 15); empty otherwise",
    "age_at_index": "whole years at the index date",
    "sex": "female | male",
}


def report(document: Mapping[str, Any]) -> str:
    counts, params = document["counts"], document["parameters"]
    followup = document["followup"]
    lines = [f"# Cohort for {document['spec']['id']} {document['spec']['version']}", "",
             f"From `{document['export']['directory']}`: {counts['patients']} patients, "
             f"{sum(document['export']['resources_by_type'].values())} resources. "
             f"Format `{document['format']}` (cohort.json lists every column).", "",
             "## Counts", "", "| | patients |", "|---|---|",
             f"| in the export | {counts['patients']} |"]
    lines += [f"| excluded: {why} | {n} |" for why, n in counts["excluded"].items()]
    lines += [f"| **included** | **{counts['included']}** |", "", "## Events", "",
              "| event | patients | per 1000 person-years |", "|---|---|---|"]
    rates = counts["events_per_1000_person_years"]
    for event in EVENTS:
        rate = rates.get(event)
        lines.append(f"| {event} | {counts['events'][event]} | "
                     f"{'' if rate is None else rate} |")
    by = ", ".join(f"{k} {v}" for k, v in counts["kidney_failure_by"].items()) or "none"
    lines += ["", f"Kidney failure by: {by}. Deaths dated by the last contact (deceasedBoolean "
              f"only): {counts['death_dated_by_last_contact']}. Undated kidney-failure records "
              f"not used: {counts['undated_kidney_failure_records']}."]
    if followup:
        d = followup["days"]
        lines += ["", "## Follow-up", "",
                  f"Days from index to event or censoring: min {d['min']}, 25th percentile "
                  f"{d['p25']}, median {d['median']}, 75th percentile {d['p75']}, max "
                  f"{d['max']}; {followup['person_years']} person-years. Index dates "
                  f"{document['index_dates']['first']} to {document['index_dates']['last']}."]
        if "within_horizon" in followup:
            within = followup["within_horizon"]
            lines.append(
                f"Within the {params['horizon_years']:g}-year horizon: kidney failure "
                f"{within.get('kidney_failure', 0)}, death {within.get('death', 0)}, censored "
                f"{within.get('censored', 0)}; followed beyond it: "
                f"{followup['followed_beyond_horizon']}.")
    lines += ["", "## Features as of the index date", "", "| feature | missing |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in counts["missing_features"].items()]
    lines += ["", f"Patients missing a required feature: {counts['missing_required_feature']} "
              "(kept here; training leaves them out).", "", "## Definitions", ""]
    lines += [f"- **{name}**: {text}" for name, text in document["definitions"].items()]
    lines += ["", "Parameters: " + ", ".join(f"{k} {v}" for k, v in params.items()), ""]
    return "\n".join(lines)


def run(args: Any) -> int:
    """`cds-service models cohort EXPORT_DIR --spec YAML --out DIR`."""
    document = build_cohort(Path(args.export_dir), Path(args.spec), Path(args.out))
    counts = document["counts"]
    print(f"cohort: {counts['included']} of {counts['patients']} patients; events "  # noqa: T201
          + ", ".join(f"{k} {v}" for k, v in counts["events"].items()))
    for name in (CSV_FILE, JSON_FILE, REPORT_FILE):
        print(f"  wrote {Path(args.out) / name}")  # noqa: T201
    return 0

