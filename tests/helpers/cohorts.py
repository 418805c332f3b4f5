"""Small cohorts for `models train --cohort` / `models evaluate --cohort` tests: a cohort
directory written by hand (cohort.csv + cohort.json with the specs' feature definitions), and a
seeded Bulk Data export for `models cohort`.

Every date is an offset from T0, a fixed reference inside the test data (never today), so the
tests mean the same under a shifted clock.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from cds_service.training.export_cohort import load_cohort_specs
from cds_service.training.export_cohort_output import COLUMNS, CSV_FILE, FORMAT, JSON_FILE

ROOT = Path(__file__).resolve().parents[2]
KFRE_SPEC = ROOT / "models" / "specs" / "kfre-4var.yaml"
LR_SPEC = ROOT / "models" / "specs" / "ckd-progression-lr.yaml"
T0 = date(2015, 1, 1)
LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"


def day(n: int) -> date:
    return T0 + timedelta(days=n)


def cohort_row(pid: str, index_day: int, event: str, followup: int, *, age: int = 70,
               sex: str = "male", features: Mapping[str, float | None] | None = None) -> dict:
    """One cohort.csv row; index date T0 + index_day, event date followup days later; the
    feature columns by name."""
    return {"patient_id": pid, "index_date": day(index_day).isoformat(), "event": event,
            "event_date": day(index_day + followup).isoformat(), "followup_days": followup,
            "kidney_failure_by": "transplant" if event == "kidney_failure" else "",
            "age_at_index": age, "sex": sex, **(features or {})}


def write_cohort(directory: Path, rows: Iterable[Mapping], specs: Sequence[Path] = (KFRE_SPEC,),
                 drop: Sequence[str] = ()) -> Path:
    """cohort.csv and cohort.json as `models cohort` writes them for `specs` (features united
    by name), less the feature columns in `drop`."""
    spec, _ = load_cohort_specs([Path(s) for s in specs])
    names = [f.name for f in spec.features if f.name not in drop]
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / CSV_FILE, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow([*COLUMNS, *names])
        for row in rows:
            writer.writerow([row.get(c, "") for c in COLUMNS]
                            + ["" if row.get(n) is None else row[n] for n in names])
    document = {"format": FORMAT,
                "spec": {"id": spec.id, "version": spec.version, "file": str(specs[0]),
                         "features": [f.to_dict() for f in spec.features
                                      if f.name not in drop]},
                "spec_files": [str(s) for s in specs]}
    (directory / JSON_FILE).write_text(json.dumps(document), encoding="utf-8")
    return directory


def kfre_rows(n: int, seed: int, *, start: int = 0, diabetes: bool = False) -> list[dict]:
    """`n` patients with KFRE's inputs (and `diabetes` when asked), outcomes drawn so that low
    eGFR and high UACR fail more often, index dates spread over ~4 years from T0 + start."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        egfr = float(rng.uniform(12, 59))
        uacr = float(math.exp(rng.uniform(1, 8)))
        risk = 1 / (1 + math.exp(-(-1.0 - 0.08 * (egfr - 35) + 0.5 * (math.log(uacr) - 4))))
        draw = rng.uniform()
        if draw < risk:
            event, followup = "kidney_failure", int(rng.integers(30, 1800))
        elif draw < risk + 0.15:
            event, followup = "death", int(rng.integers(30, 1800))
        elif draw < risk + 0.25:
            event, followup = "censored", int(rng.integers(30, 1800))
        else:
            event, followup = "censored", int(rng.integers(1900, 3000))
        age, sex = int(rng.integers(40, 90)), "male" if rng.uniform() < 0.5 else "female"
        extra = {"diabetes": float(rng.uniform() < 0.4)} if diabetes else {}
        rows.append(cohort_row(f"p{seed}-{i:04d}", start + int(rng.integers(0, 1460)), event,
                               followup, age=age, sex=sex)
                    | {"age": float(age), "male": float(sex == "male"), "egfr": round(egfr, 1),
                       "uacr": round(uacr, 1), **extra})
    return rows


class Export:
    """A Bulk Data export built from resources: one NDJSON file per type (Patient gzipped)."""

    def __init__(self) -> None:
        self.by_type: dict[str, list[dict]] = {}

    def add(self, resource: dict) -> None:
        resource.setdefault("id", f"{resource['resourceType'].lower()}-"
                                  f"{sum(map(len, self.by_type.values())) + 1}")
        self.by_type.setdefault(resource["resourceType"], []).append(resource)

    def obs(self, pid: str, on: int, code: str, value: float, unit: str) -> None:
        self.add({"resourceType": "Observation", "status": "final",
                  "code": {"coding": [{"system": LOINC, "code": code}]},
                  "subject": {"reference": f"Patient/{pid}"},
                  "effectiveDateTime": day(on).isoformat(),
                  "valueQuantity": {"value": value, "unit": unit}})

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for rtype, resources in self.by_type.items():
            text = "".join(json.dumps(r) + "\n" for r in resources)
            if rtype == "Patient":
                with gzip.open(directory / "Patient.001.ndjson.gz", "wt", encoding="utf-8") as fh:
                    fh.write(text)
            else:
                (directory / f"{rtype}.001.ndjson").write_text(text, encoding="utf-8")
        return directory


def seeded_export(n: int, seed: int) -> Export:
    """`n` CKD patients over ~4 years of index dates. Each: eGFRs < 60 at start, start + 100
    (the index date: confirmed CKD, 100 >= 90 days) and start + 50; UACR and systolic BP at
    start + 90; diabetes for some; then kidney failure (a kidney transplant, SNOMED CT
    70536003), death or a last encounter, earlier and likelier with low eGFR and high UACR."""
    rng = np.random.default_rng(seed)
    x = Export()
    for i in range(n):
        pid = f"pt{i:04d}"
        start = int(rng.integers(0, 1460))
        egfr = float(rng.uniform(12, 55))
        uacr = float(math.exp(rng.uniform(1, 8)))
        patient = {"resourceType": "Patient", "id": pid,
                   "birthDate": f"{1930 + int(rng.integers(0, 45))}-06-15",
                   "gender": "male" if rng.uniform() < 0.5 else "female"}
        risk = 1 / (1 + math.exp(-(-0.8 - 0.1 * (egfr - 35) + 0.6 * (math.log(uacr) - 4))))
        draw = rng.uniform()
        index = start + 100
        if draw < risk:
            x.add({"resourceType": "Procedure", "status": "completed",
                   "subject": {"reference": f"Patient/{pid}"},
                   "performedDateTime": day(index + int(rng.integers(60, 1700))).isoformat(),
                   "code": {"coding": [{"system": SNOMED, "code": "70536003"}]}})
        elif draw < risk + 0.15:
            patient["deceasedDateTime"] = day(index + int(rng.integers(60, 1700))).isoformat()
        last = index + int(rng.integers(1000, 3000))
        x.add({"resourceType": "Encounter", "status": "finished",
               "subject": {"reference": f"Patient/{pid}"},
               "period": {"start": day(last).isoformat(), "end": day(last).isoformat()}})
        x.add(patient)
        for on, value in ((start, egfr + 3), (start + 50, egfr + 1.5), (index, egfr)):
            x.obs(pid, on, "62238-1", round(value, 1), "mL/min/{1.73_m2}")
        x.obs(pid, start + 90, "9318-7", round(uacr, 1), "mg/g")
        x.obs(pid, start + 90, "8480-6", float(rng.integers(110, 170)), "mm[Hg]")
        if rng.uniform() < 0.4:
            x.add({"resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"},
                   "code": {"coding": [{"system": SNOMED, "code": "44054006"}]},
                   "recordedDate": day(start).isoformat()})
    return x
