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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from cds_service.features import FeatureSpec, extract
from cds_service.models.errors import ModelError
from cds_service.models.manifest import Manifest, parse_manifest, read_yaml
from cds_service.training.export_cohort_output import (
    COLUMNS,
    CSV_FILE,
    DIED_BEFORE,
    JSON_FILE,
    KF_BEFORE,
    NO_BIRTH_DATE,
    NO_FOLLOW_UP,
    NO_INDEX,
    NO_PATIENT,
    NO_SEX,
    REPORT_FILE,
    UNDER_AGE,
    Tally,
    cohort_document,
    report,
)
from cds_service.training.export_store import ExportStore, export_files, read_log
from cds_service.training.timeline import (
    Definition,
    Kidney,
    contact_day,
    death_day,
    kidney_failure,
    known_day,
    parse_day,
    sustained,
)
from cds_service.training.training import as_of

# ---------------------------------------------------------------------------------------------
# The spec


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


def extraction(feature: FeatureSpec) -> dict[str, Any]:
    """What decides a feature's observed value: its definition without the description and the
    missing policy (imputation is each model's own, applied after the cohort)."""
    return {k: v for k, v in feature.to_dict().items() if k not in ("description", "missing")}


def load_cohort_specs(paths: Sequence[Path]) -> tuple[Manifest, Definition]:
    """Several specs, one cohort: the first spec's `cohort:` section and horizon, the features of
    all by name (a comparator's inputs beside the new model's). The same name must mean the same
    extraction in every spec, else one column would hold two things; a feature is `required`
    in the cohort when any spec requires it (for the count of patients missing one)."""
    spec, definition = load_cohort_spec(paths[0])
    features: dict[str, tuple[FeatureSpec, Path]] = {f.name: (f, paths[0]) for f in spec.features}
    for path in paths[1:]:
        other, _ = load_cohort_spec(path)
        for feature in other.features:
            seen = features.get(feature.name)
            if seen is None:
                features[feature.name] = (feature, path)
            elif extraction(seen[0]) != extraction(feature):
                raise ModelError(f"feature {feature.name!r} is defined differently in {seen[1]} "
                                 f"and {path}; rename one of them, or make them the same")
            elif (feature.missing.strategy == "required"
                  and seen[0].missing.strategy != "required"):
                features[feature.name] = (dataclasses.replace(seen[0], missing=feature.missing),
                                          seen[1])
    merged = dataclasses.replace(spec, features=tuple(f for f, _ in features.values()))
    return merged, definition


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


def build_cohort(export_dir: Path, spec_path: Path | Sequence[Path], out_dir: Path
                 ) -> dict[str, Any]:
    """Write cohort.csv, cohort.json and report.md into `out_dir`; return cohort.json. With
    several specs, the features of all (`load_cohort_specs`)."""
    spec_paths = [spec_path] if isinstance(spec_path, Path | str) else list(spec_path)
    spec_paths = [Path(p) for p in spec_paths]
    spec, definition = load_cohort_specs(spec_paths)
    files = export_files(export_dir)
    log = read_log(export_dir)
    export_day = parse_day(log.get("transaction_time"))
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
    document = cohort_document(spec, spec_paths, definition, export_dir, spill, log, tally,
                               followup)
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


def run(args: Any) -> int:
    """`cds-service models cohort EXPORT_DIR --spec YAML [--spec YAML ...] --out DIR`."""
    document = build_cohort(Path(args.export_dir), [Path(p) for p in args.spec], Path(args.out))
    counts = document["counts"]
    print(f"cohort: {counts['included']} of {counts['patients']} patients; events "  # noqa: T201
          + ", ".join(f"{k} {v}" for k, v in counts["events"].items()))
    for name in (CSV_FILE, JSON_FILE, REPORT_FILE):
        print(f"  wrote {Path(args.out) / name}")  # noqa: T201
    return 0
