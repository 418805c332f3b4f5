"""What `models cohort` writes: the format of cohort.csv (its columns, events and exclusion
reasons), the counts kept while patients are read (`Tally`), `cohort.json` (definitions in
words, the meaning of each column, parameters, counts, follow-up, the export's summary) and
`report.md`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from cds_service.models.manifest import Manifest
from cds_service.training.timeline import Definition

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



def cohort_document(spec: Manifest, spec_paths: Sequence[Path], definition: Definition,
                    export_dir: Path, spill: Any, log: Mapping[str, Any], tally: Tally,
                    followup: Mapping[str, Any]) -> dict[str, Any]:
    """`spec`: the first spec with the features of all (`load_cohort_specs`); `spec_paths`: every
    spec given, the first one's `cohort:` section and horizon in force."""
    years = followup.get("person_years") or 0
    rates = {event: round(1000 * tally.events[event] / years, 2) if years else None
             for event in ("kidney_failure", "death")}
    return {
        "format": FORMAT,
        "spec": {"id": spec.id, "version": spec.version, "file": str(spec_paths[0]),
                 "features": [f.to_dict() for f in spec.features]},
        "spec_files": [str(p) for p in spec_paths],
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
             "Features of " + ", ".join(f"`{f}`" for f in document["spec_files"]) + "; the "
             "first one's cohort parameters and horizon.", "",
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
