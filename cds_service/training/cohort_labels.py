"""A `models cohort` directory (cohort.csv + cohort.json) read for training and evaluation:
fixed-horizon labels, the model's feature columns, and the split in time.

Labels at a horizon of H years (H × 365.25 days, the Julian year, as cohort.json's follow-up
counts use), from each row's `event` and `followup_days`:

- kidney failure with followup_days ≤ H·365.25 → 1;
- followed past H·365.25 days (whatever came later) without kidney failure before it → 0;
- death at or before H·365.25 days without kidney failure → 0: death is a competing event, not
  censoring. With deaths counted as non-events, the share of 1s estimates the cumulative
  incidence of kidney failure in the presence of death, the quantity KFRE's validations report
  against (Tangri N et al. JAMA 2016;315:164, competing-risk sensitivity analyses; Ramspek CL et
  al. J Am Soc Nephrol 2021;32:1174, where ignoring death overestimated KFRE's risk; the
  estimand: Austin PC, Lee DS, Fine JP. Circulation 2016;133:601);
- censored at or before H·365.25 days → no label: excluded and counted ("censored before the
  horizon"). Dropping them biases the event rate upwards when censoring is heavy; the count is
  reported so the reader can judge (docs/models.md, "Training and evaluating on a cohort").

A patient missing a feature the model requires is excluded and counted under "missing <names>",
as `models train --ndjson` counts them.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.features import FeatureSpec
from cds_service.models.errors import ModelError
from cds_service.training.export_cohort import extraction
from cds_service.training.export_cohort_output import COLUMNS, CSV_FILE, EVENTS, FORMAT, JSON_FILE

DAYS_PER_YEAR = 365.25
CENSORED_BEFORE = "censored before the horizon"


@dataclass(frozen=True)
class CohortRow:
    patient_id: str
    index_date: date
    event: str
    followup_days: int
    age: int
    sex: str
    values: Mapping[str, float | None]  # feature columns by name; None: not observed


@dataclass
class Cohort:
    directory: Path
    document: dict[str, Any]
    rows: list[CohortRow]
    features: dict[str, dict[str, Any]]  # the definitions the columns were extracted with

    def check_features(self, features: Sequence[FeatureSpec], who: str) -> None:
        """Every feature of `who` is a column, extracted as `who` defines it."""
        specs = ", ".join(self.document.get("spec_files") or [self.document["spec"]["file"]])
        for f in features:
            if f.name not in self.features:
                raise ModelError(f"{self.directory / CSV_FILE}: no column {f.name!r}, a feature "
                                 f"of {who}; the cohort has the features of {specs}. Rebuild it "
                                 "with `models cohort` naming this spec too (--spec, repeated)")
            if extraction(f) != self.features[f.name]:
                raise ModelError(f"{self.directory / CSV_FILE}: column {f.name!r} was extracted "
                                 f"with another definition than {who}'s (cohort: {specs}); "
                                 "rebuild the cohort with this spec")


def read_cohort(directory: Path) -> Cohort:
    """cohort.json's feature definitions and cohort.csv's rows; ModelError names the file and
    line of anything malformed."""
    meta, table = directory / JSON_FILE, directory / CSV_FILE
    try:
        document = json.loads(meta.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{meta}: cannot read ({exc.strerror}); COHORT_DIR is the --out of "
                         "`cds-service models cohort`") from exc
    except ValueError as exc:
        raise ModelError(f"{meta}: not JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelError(f"{meta}: format is not {FORMAT}")
    features = {f["name"]: {k: v for k, v in f.items() if k not in ("description", "missing")}
                for f in document["spec"]["features"]}
    rows = []
    try:
        with open(table, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ModelError(f"{table}: header lacks {', '.join(missing)}")
            names = [c for c in reader.fieldnames or () if c in features]
            for row in reader:
                try:
                    if row["event"] not in EVENTS:
                        raise ValueError(f"event {row['event']!r}")
                    followup = int(row["followup_days"])
                    if followup <= 0:
                        raise ValueError(f"followup_days {followup}")
                    values = {n: float(row[n]) if row[n] not in ("", None) else None
                              for n in names}
                    rows.append(CohortRow(row["patient_id"], date.fromisoformat(row["index_date"]),
                                          row["event"], followup, int(row["age_at_index"]),
                                          row["sex"], values))
                except (ValueError, TypeError) as exc:
                    raise ModelError(f"{table}:{reader.line_num}: bad row: {exc}") from exc
    except OSError as exc:
        raise ModelError(f"{table}: cannot read ({exc.strerror})") from exc
    present = set(names)
    return Cohort(directory, document, rows, {k: v for k, v in features.items() if k in present})


def label(row: CohortRow, horizon_years: float) -> int | None:
    """1, 0, or None (censored before the horizon): the rules of this module's docstring."""
    horizon_days = DAYS_PER_YEAR * horizon_years
    if row.followup_days > horizon_days:
        return 0
    if row.event == "kidney_failure":
        return 1
    if row.event == "death":
        return 0
    return None


@dataclass
class Labelled:
    """The labelled patients usable by a model, in cohort.csv order."""

    rows: list[CohortRow]
    y: np.ndarray
    observed: np.ndarray  # feature columns in the model's order, NaN: not observed
    excluded: Counter[str] = field(default_factory=Counter)
    deaths_before_horizon: int = 0

    @property
    def index_dates(self) -> list[date]:
        return [r.index_date for r in self.rows]


def label_cohort(cohort: Cohort, features: Sequence[FeatureSpec], horizon_years: float,
                 who: str) -> Labelled:
    """Label every row at the horizon; leave out (and count) the censored and those missing a
    feature `features` require."""
    cohort.check_features(features, who)
    kept, ys, matrix = [], [], []
    excluded: Counter[str] = Counter()
    deaths = 0
    for row in cohort.rows:
        y = label(row, horizon_years)
        if y is None:
            excluded[CENSORED_BEFORE] += 1
            continue
        values = [row.values.get(f.name) for f in features]
        lacking = [f.name for f, v in zip(features, values, strict=True)
                   if v is None and f.missing.strategy == "required"]
        if lacking:
            excluded["missing " + ", ".join(lacking)] += 1
            continue
        if row.event == "death" and row.followup_days <= DAYS_PER_YEAR * horizon_years:
            deaths += 1  # labelled 0: the competing event came first
        kept.append(row)
        ys.append(y)
        matrix.append([math.nan if v is None else v for v in values])
    if not kept:
        raise ModelError(f"{cohort.directory}: no patient has a label at {horizon_years:g} years "
                         f"and {who}'s required features ({dict(excluded)})")
    return Labelled(kept, np.array(ys, dtype=int),
                    np.array(matrix, dtype=float).reshape(len(kept), len(features)),
                    excluded, deaths)


def time_split(index_dates: Sequence[date], train_fraction: float
               ) -> tuple[np.ndarray, np.ndarray, date]:
    """(train rows, test rows, boundary): the first ⌈f·n⌉ patients by index date train, with
    everyone whose index date equals the last of them (a date is never split across the two);
    the rest, all with later index dates, test. Validation in time, as TRIPOD recommends over a
    random split for showing transportability to later patients (Collins GS et al. BMJ
    2015;350:g7594; Steyerberg EW, Clinical Prediction Models, 2nd ed. 2019, ch. 17)."""
    if not 0 < train_fraction < 1:
        raise ModelError(f"--train-fraction must be between 0 and 1, not {train_fraction}")
    dates = np.array([d.toordinal() for d in index_dates])
    ordered = np.sort(dates, kind="mergesort")
    boundary = int(ordered[max(1, math.ceil(train_fraction * len(dates))) - 1])
    train = np.nonzero(dates <= boundary)[0]
    test = np.nonzero(dates > boundary)[0]
    last = date.fromordinal(boundary)
    if not test.size:
        raise ModelError(f"the time split leaves no patient to test: every index date is on or "
                         f"before {last.isoformat()}; lower --train-fraction")
    return train, test, last
