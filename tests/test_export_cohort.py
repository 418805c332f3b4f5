"""`cds-service models cohort`: a time-to-event cohort from a hand-built Bulk Data export.

Every date is an offset from T0, a fixed reference inside the test data (never today), so the
tests mean the same under a shifted clock. Expected values are worked out by hand from the
definitions (docs/clinical.md, "Cohort from a Bulk Data export") in the comments beside them.
"""

from __future__ import annotations

import csv
import gzip
import json
from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml

from cds_service.cli import main
from cds_service.features import extract
from cds_service.models.errors import ModelError
from cds_service.models.manifest import load_spec
from cds_service.training import timeline
from cds_service.training.export_cohort import build_cohort, load_cohort_spec
from cds_service.training.export_cohort_output import (
    DIED_BEFORE,
    FORMAT,
    KF_BEFORE,
    NO_BIRTH_DATE,
    NO_FOLLOW_UP,
    NO_INDEX,
    NO_PATIENT,
    NO_SEX,
    UNDER_AGE,
)
from cds_service.training.timeline import CHRONIC_DIALYSIS_CODES
from cds_service.training.training import as_of
from hooks._kidney import CONDITION_SETS

ROOT = Path(__file__).resolve().parent.parent
KFRE_SPEC = ROOT / "models" / "specs" / "kfre-4var.yaml"
LR_SPEC = ROOT / "models" / "specs" / "ckd-progression-lr.yaml"

T0 = date(2015, 1, 1)
LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"
ICD10CM, CPT = "http://hl7.org/fhir/sid/icd-10-cm", "http://www.ama-assn.org/go/cpt"


def d(days: int) -> str:
    return (T0 + timedelta(days=days)).isoformat()


class Export:
    """Resources by type, written as one NDJSON file per type (Patient gzipped)."""

    def __init__(self) -> None:
        self.by_type: dict[str, list[dict]] = {}
        self.n = 0

    def add(self, resource: dict) -> dict:
        self.n += 1
        resource.setdefault("id", f"{resource['resourceType'].lower()}-{self.n}")
        self.by_type.setdefault(resource["resourceType"], []).append(resource)
        return resource

    def patient(self, pid: str, born: str | None = "1950-01-01", gender: str | None = "male",
                **extra) -> None:
        resource = {"resourceType": "Patient", "id": pid, **extra}
        if born:
            resource["birthDate"] = born
        if gender:
            resource["gender"] = gender
        self.add(resource)

    def obs(self, pid: str, day: int, code: str, value: float, unit: str,
            comparator: str | None = None, system: str = LOINC) -> None:
        quantity = {"value": value, "unit": unit}
        if comparator:
            quantity["comparator"] = comparator
        self.add({"resourceType": "Observation", "status": "final",
                  "code": {"coding": [{"system": system, "code": code}]},
                  "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": d(day),
                  "valueQuantity": quantity})

    def egfr(self, pid: str, day: int, value: float, comparator: str | None = None) -> None:
        # LOINC 62238-1: eGFR CKD-EPI (hooks/data/loinc_kidney.yaml, egfr_creatinine).
        self.obs(pid, day, "62238-1", value, "mL/min/{1.73_m2}", comparator)

    def condition(self, pid: str, system: str, code: str, onset: int | None,
                  recorded: int | None = None) -> None:
        resource = {"resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"},
                    "code": {"coding": [{"system": system, "code": code}]}}
        if onset is not None:
            resource["onsetDateTime"] = d(onset)
        if recorded is not None:
            resource["recordedDate"] = d(recorded)
        self.add(resource)

    def procedure(self, pid: str, system: str, code: str, day: int,
                  status: str = "completed") -> None:
        self.add({"resourceType": "Procedure", "status": status,
                  "subject": {"reference": f"Patient/{pid}"}, "performedDateTime": d(day),
                  "code": {"coding": [{"system": system, "code": code}]}})

    def encounter(self, pid: str, day: int, status: str = "finished") -> None:
        self.add({"resourceType": "Encounter", "status": status,
                  "subject": {"reference": f"Patient/{pid}"},
                  "period": {"start": d(day), "end": d(day)}})

    def ckd(self, pid: str) -> None:
        """eGFR 40 on day 0 and 35 on day 100: CKD confirmed, index day 100 (100 >= 90)."""
        self.egfr(pid, 0, 40)
        self.egfr(pid, 100, 35)

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


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "cohort.csv", encoding="utf-8", newline="") as fh:
        return {row["patient_id"]: row for row in csv.DictReader(fh)}


def the_export() -> Export:
    x = Export()
    # censored: index day 100; last contact is the latest dated resource of any kind, the
    # MedicationRequest of day 520 (after the day-500 encounter); the planned encounter of day
    # 900 is no contact. Censored on day 520, follow-up 520 - 100 = 420 days.
    x.patient("censored")
    x.ckd("censored")
    x.encounter("censored", 500)
    x.encounter("censored", 900, status="planned")
    x.add({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
           "subject": {"reference": "Patient/censored"}, "authoredOn": d(520),
           "medicationReference": {"reference": "Medication/med-1"}})
    x.add({"resourceType": "Medication", "id": "med-1",
           "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                "code": "197361"}]}})
    # eGFR >= 60 between: 50 (day 0), 65 (day 50) ends that run, 50 (day 120) starts another,
    # 48 (day 200) is only 80 days into it: no index (ignoring the 65, day 120 would have been).
    x.patient("normal-between")
    for day, value in ((0, 50), (50, 65), (120, 50), (200, 48)):
        x.egfr("normal-between", day, value)
    x.encounter("normal-between", 400)
    # gap < 90: 50 on day 0 and 52 on day 89, 89 days apart: no index.
    x.patient("short-gap")
    x.egfr("short-gap", 0, 50)
    x.egfr("short-gap", 89, 52)
    x.encounter("short-gap", 400)
    # creatinine only, female born 1960-06-15: age 54 on day 0 (2015-01-01) and day 100
    # (2015-04-11). CKD-EPI 2021 female, Scr 1.5 mg/dL: kappa 0.7, Scr/kappa = 2.142857;
    # 142 x 2.142857^-1.200 (= 0.40068) x 0.9938^54 (= 0.71475) x 1.012 = 41.2 -> 41 < 60 on
    # both days (day 100 reported as 132.6 umol/L = 1.5 mg/dL x 88.40): index day 100.
    x.patient("creatinine", born="1960-06-15", gender="female")
    x.obs("creatinine", 0, "2160-0", 1.5, "mg/dL")
    x.obs("creatinine", 100, "14682-9", 132.6, "umol/L")
    x.encounter("creatinine", 300)
    # chronic dialysis: haemodialysis (SNOMED CT 302497006) every 20 days from day 300 to 400:
    # gaps 20 <= 45, span 100 >= 90 -> chronic; event on the run's first day, 300; follow-up 200.
    x.patient("dialysis-chronic")
    x.ckd("dialysis-chronic")
    for day in range(300, 401, 20):
        x.procedure("dialysis-chronic", SNOMED, "302497006", day)
    x.encounter("dialysis-chronic", 600)
    # acute dialysis: CPT 90935 on days 300, 305, 310 (span 10 < 90), nothing after: not kidney
    # failure. Censored at the last contact, day 700: follow-up 600.
    x.patient("dialysis-acute")
    x.ckd("dialysis-acute")
    for day in (300, 305, 310):
        x.procedure("dialysis-acute", CPT, "90935", day)
    x.encounter("dialysis-acute", 700)
    # acute sessions on days 150 and 155; then Z99.2 (dependence on dialysis, a chronic-status
    # code) with onset day 250: 95 days after 155 > 45, a new run, chronic by its code: event day
    # 250, follow-up 150. A not-done session on day 120 is ignored.
    x.patient("dialysis-status")
    x.ckd("dialysis-status")
    x.procedure("dialysis-status", SNOMED, "302497006", 120, status="not-done")
    x.procedure("dialysis-status", SNOMED, "302497006", 150)
    x.procedure("dialysis-status", SNOMED, "302497006", 155)
    x.condition("dialysis-status", ICD10CM, "Z99.2", 250)
    x.encounter("dialysis-status", 800)
    # transplant: Procedure 70536003 (transplant of kidney) on day 400: event 400, follow-up 300.
    x.patient("transplant")
    x.ckd("transplant")
    x.procedure("transplant", SNOMED, "70536003", 400)
    x.encounter("transplant", 900)
    # sustained eGFR < 15: 14 on day 300 and 13 on day 400 (100 >= 90 days, nothing >= 15
    # between): kidney failure dated at the first, day 300, follow-up 200; death on day 500 comes
    # after it, so kidney failure is the event.
    x.patient("egfr-sustained", deceasedDateTime=d(500))
    x.ckd("egfr-sustained")
    x.egfr("egfr-sustained", 300, 14)
    x.egfr("egfr-sustained", 400, 13)
    # single eGFR < 15: 14 on day 300, 20 on day 350 (>= 15: the run ends), "<15" on day 420
    # starts a new one that nothing confirms: no kidney failure; censored at day 420, follow-up
    # 320.
    x.patient("egfr-single")
    x.ckd("egfr-single")
    x.egfr("egfr-single", 300, 14)
    x.egfr("egfr-single", 350, 20)
    x.egfr("egfr-single", 420, 15, comparator="<")
    # death competing: died on day 250 (deceasedDateTime), sustained eGFR < 15 from day 300
    # would have been kidney failure later: the event is death on day 250, follow-up 150.
    x.patient("death", deceasedDateTime=d(250) + "T10:00:00Z")
    x.ckd("death")
    x.encounter("death", 200)
    x.egfr("death", 300, 12)
    x.egfr("death", 400, 11)
    # deceasedBoolean true without a date: dated at the last contact, day 300; follow-up 200.
    x.patient("death-undated", deceasedBoolean=True)
    x.ckd("death-undated")
    x.encounter("death-undated", 300)
    # Exclusions, one reason each.
    x.ckd("no-patient")                          # Observations of a patient the export lacks
    x.patient("no-birth", born=None)
    x.ckd("no-birth")
    x.patient("no-sex", gender="unknown")
    x.ckd("no-sex")
    x.patient("child", born="2000-01-01")        # 15 at the index date, 2015-04-11
    x.ckd("child")
    x.encounter("child", 400)
    x.patient("kf-before")                       # Z94.0 kidney transplant status from day 50
    x.ckd("kf-before")
    x.condition("kf-before", ICD10CM, "Z94.0", 50)
    x.encounter("kf-before", 400)
    x.patient("died-before", deceasedDateTime=d(100))   # died on the index date
    x.ckd("died-before")
    x.patient("no-follow-up")                    # nothing after the index date
    x.ckd("no-follow-up")
    return x


EXPECTED = {
    # patient: (event, event_date, followup_days, kidney_failure_by)
    "censored": ("censored", d(520), 420, ""),
    "creatinine": ("censored", d(300), 200, ""),
    "dialysis-chronic": ("kidney_failure", d(300), 200, "dialysis"),
    "dialysis-acute": ("censored", d(700), 600, ""),
    "dialysis-status": ("kidney_failure", d(250), 150, "dialysis"),
    "transplant": ("kidney_failure", d(400), 300, "transplant"),
    "egfr-sustained": ("kidney_failure", d(300), 200, "egfr"),
    "egfr-single": ("censored", d(420), 320, ""),
    "death": ("death", d(250), 150, ""),
    "death-undated": ("death", d(300), 200, ""),
}
EXCLUDED = {NO_PATIENT: 1, NO_BIRTH_DATE: 1, NO_SEX: 1, NO_INDEX: 2, UNDER_AGE: 1, KF_BEFORE: 1,
            DIED_BEFORE: 1, NO_FOLLOW_UP: 1}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    work = tmp_path_factory.mktemp("cohort")
    export = the_export().write(work / "export")
    assert main(["models", "cohort", str(export), "--spec", str(KFRE_SPEC),
                 "--out", str(work / "out")]) == 0
    return work / "out"


def test_each_patient_event_date_and_follow_up(cohort):
    rows = read_rows(cohort)
    assert set(rows) == set(EXPECTED)
    for pid, (event, day, followup, by) in EXPECTED.items():
        row = rows[pid]
        assert (row["event"], row["event_date"], int(row["followup_days"]),
                row["kidney_failure_by"]) == (event, day, followup, by), pid
    # index: day 100 for every included patient (second eGFR < 60, 100 days after the first)
    assert {row["index_date"] for row in rows.values()} == {d(100)}


def test_creatinine_gives_the_index_and_age_sex_columns(cohort):
    row = read_rows(cohort)["creatinine"]
    assert (row["index_date"], row["age_at_index"], row["sex"]) == (d(100), "54", "female")
    # kfre-4var's egfr feature reads reported eGFRs only: none here, so the cell is empty.
    assert row["egfr"] == ""
    censored = read_rows(cohort)["censored"]
    # born 1950-01-01, index 2015-04-11: 65; the latest eGFR by the end of the index date, 35.
    assert (censored["age"], censored["male"], censored["egfr"]) == ("65.0", "1.0", "35.0")


def test_exclusions_counted_with_reasons(cohort):
    document = json.loads((cohort / "cohort.json").read_text(encoding="utf-8"))
    counts = document["counts"]
    assert counts["excluded"] == EXCLUDED
    # 19 patient ids: 18 Patient resources (10 included + 8 excluded that have one) plus
    # "no-patient", known only from its Observations.
    assert counts["patients"] == len(EXPECTED) + sum(EXCLUDED.values())
    assert counts["included"] == len(EXPECTED)
    assert counts["events"] == {"kidney_failure": 4, "death": 2, "censored": 4}
    assert counts["kidney_failure_by"] == {"dialysis": 2, "egfr": 1, "transplant": 1}
    assert counts["death_dated_by_last_contact"] == 1
    assert document["export"]["files"]["Patient.001.ndjson.gz"] == 18
    assert document["export"]["medications"] == 1
    assert document["spec"]["id"] == "kfre-4var"
    report = (cohort / "report.md").read_text(encoding="utf-8")
    for reason, n in EXCLUDED.items():
        assert f"| excluded: {reason} | {n} |" in report
    # follow-up days of the 10 rows, sorted: 150 150 200 200 200 200 300 320 420 600; nearest
    # rank (the ceil(q x 10)-th): p25 the 3rd, median the 5th, p75 the 8th.
    assert document["followup"]["days"] == {"min": 150, "p25": 200, "median": 200, "p75": 320,
                                            "max": 600}


def _leaky_patient(x: Export, pid: str, conditions: bool) -> None:
    """Pre-index data for every feature of ckd-progression-lr. eGFR 65 (day 0), 50 (day 200),
    40 (day 400): the 65 is not below 60, so CKD is confirmed on day 400 (200 days after 50)."""
    x.patient(pid)
    for day, value in ((0, 65), (200, 50), (400, 40)):
        x.egfr(pid, day, value)
    x.obs(pid, 300, "9318-7", 120, "mg/g")            # uacr
    x.obs(pid, 300, "8480-6", 150, "mm[Hg]")          # sbp
    x.obs(pid, 300, "4548-4", 7.1, "%")               # hba1c
    if conditions:
        x.condition(pid, ICD10CM, "E11.9", 50, recorded=60)   # diabetes
        x.condition(pid, ICD10CM, "I10", 50, recorded=60)     # hypertension
    x.encounter(pid, 1000)


def _after_index(x: Export, pid: str) -> None:
    """Data after the index date (day 400) that changes every non-Patient feature if read:
    date-only results the next day (midnight: within the engine's clock-skew allowance of the
    as-of time, 23:59:59 on the index date), and Conditions with onset before the index date but
    recorded after it."""
    x.egfr(pid, 401, 20)
    x.obs(pid, 401, "9318-7", 900, "mg/g")
    x.obs(pid, 401, "8480-6", 190, "mm[Hg]")
    x.obs(pid, 401, "4548-4", 9.9, "%")
    x.condition(pid, ICD10CM, "E11.9", 10, recorded=450)
    x.condition(pid, ICD10CM, "I10", 10, recorded=450)


def test_no_leakage_after_the_index_date(tmp_path):
    spec = load_spec(LR_SPEC)
    exports = []
    for name, late in (("before", False), ("after", True)):
        x = Export()
        _leaky_patient(x, "p", conditions=True)
        _leaky_patient(x, "q", conditions=False)
        if late:
            _after_index(x, "p")
            _after_index(x, "q")
        build_cohort(x.write(tmp_path / name), LR_SPEC, tmp_path / f"out-{name}")
        exports.append(x)
    rows_a, rows_b = read_rows(tmp_path / "out-before"), read_rows(tmp_path / "out-after")
    names = spec.feature_names
    for pid in ("p", "q"):
        assert rows_a[pid]["index_date"] == rows_b[pid]["index_date"] == d(400)
        assert {n: rows_b[pid][n] for n in names} == {n: rows_a[pid][n] for n in names}
        assert all(rows_a[pid][n] != "" for n in names), rows_a[pid]
    # q: eGFR 40 on the index day, hand-checked; no diabetes on the chart by then.
    assert (rows_a["q"]["egfr"], rows_a["q"]["diabetes"]) == ("40.0", "0.0")
    # The added data would change every feature but age and sex had it been read: the engine
    # itself, on all of q's resources, as of day 460 (after the late Conditions' recordedDate).
    resources = [r for rs in exports[1].by_type.values() for r in rs
                 if r.get("subject", {}).get("reference") == "Patient/q" or r.get("id") == "q"]
    leaky = extract(spec.features, resources, now=as_of(T0 + timedelta(days=460)))
    for value in leaky.values:
        if value.name not in ("age", "male"):
            assert repr(value.observed) != rows_a["q"][value.name], value.name


def test_spec_cohort_section_overrides_the_defaults(tmp_path):
    x = Export()
    # 50 on day 0 and 52 on day 89: no index by default (89 < 90); with ckd_min_gap_days 60, the
    # index is day 89; censored at day 400: follow-up 311.
    x.patient("p")
    x.egfr("p", 0, 50)
    x.egfr("p", 89, 52)
    x.encounter("p", 400)
    data = yaml.safe_load(KFRE_SPEC.read_text(encoding="utf-8"))
    data["cohort"] = {"ckd_min_gap_days": 60, "horizon_years": 2}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data), encoding="utf-8")
    document = build_cohort(x.write(tmp_path / "export"), spec, tmp_path / "out")
    row = read_rows(tmp_path / "out")["p"]
    assert (row["index_date"], row["followup_days"]) == (d(89), "311")
    assert document["parameters"]["ckd_min_gap_days"] == 60
    assert document["parameters"]["horizon_years"] == 2
    # `models train` reads the same spec: the section is allowed there and ignored.
    assert load_spec(spec).id == "kfre-4var"


def test_chronic_status_codes_are_members_of_the_repository_dialysis_set():
    assert set(CHRONIC_DIALYSIS_CODES) <= set(CONDITION_SETS["dialysis"])


@pytest.mark.parametrize("gz", [False, True])
def test_malformed_line_is_an_error_naming_file_and_line(tmp_path, capsys, gz):
    x = Export()
    x.patient("p")
    x.ckd("p")
    export = x.write(tmp_path / "export")
    if gz:
        path, opener = export / "Patient.001.ndjson.gz", gzip.open
    else:
        path, opener = export / "Observation.001.ndjson", open
    with opener(path, "at", encoding="utf-8") as fh:
        fh.write('{"resourceType": "Observation", \n')
    lines = 2 if gz else 3  # 1 Patient, or 2 Observations, then the broken line
    code = main(["models", "cohort", str(export), "--spec", str(KFRE_SPEC), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path.name}:{lines}: not JSON" in err
    assert "Traceback" not in err


def test_cli_exit_codes(tmp_path, capsys):
    spec, out = str(KFRE_SPEC), str(tmp_path / "out")
    # not an export
    assert main(["models", "cohort", str(tmp_path / "missing"), "--spec", spec, "--out",
                 out]) == 2
    assert "not a directory" in capsys.readouterr().err
    # an export where nobody qualifies
    x = Export()
    x.patient("p")
    x.egfr("p", 0, 75)
    export = x.write(tmp_path / "export")
    assert main(["models", "cohort", str(export), "--spec", spec, "--out", out]) == 2
    assert f"1 {NO_INDEX}" in capsys.readouterr().err
    # a bad `cohort:` key in the spec
    data = yaml.safe_load(KFRE_SPEC.read_text(encoding="utf-8"))
    data["cohort"] = {"ckd_min_gap": 60}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["models", "cohort", str(export), "--spec", str(bad), "--out", out]) == 2
    assert "cohort.ckd_min_gap: unknown key" in capsys.readouterr().err
    # argparse: --spec is required
    with pytest.raises(SystemExit) as exc:
        main(["models", "cohort", str(export), "--out", out])
    assert exc.value.code == 2
    # and a good one
    x.egfr("p", 100, 50)
    x.egfr("p", 200, 45)
    x.encounter("p", 300)
    x.write(export)
    assert main(["models", "cohort", str(export), "--spec", spec, "--out", out]) == 0
    assert "cohort: 1 of 1 patients" in capsys.readouterr().out
    assert not list(Path(out).glob(".cohort-spill-*"))   # the spill is removed


def test_export_log_is_summarised(tmp_path):
    x = Export()
    x.patient("p")
    x.ckd("p")
    x.encounter("p", 200)
    x.encounter("p", 300)
    export = x.write(tmp_path / "export")
    log = [{"eventId": "kickoff", "timestamp": "t", "eventDetail": {
               "exportUrl": "https://ehr.test/Group/g/$export",
               "requestParameters": {"_type": "Patient,Observation"}}},
           {"eventId": "status_complete", "eventDetail": {"transactionTime": d(250)}},
           {"eventId": "export_complete", "eventDetail": {
               "_server": "https://ehr.test", "_group": "g", "_resourcesByType": {"Patient": 1}}}]
    (export / "log.ndjson").write_text("".join(json.dumps(e) + "\n" for e in log),
                                       encoding="utf-8")
    document = build_cohort(export, KFRE_SPEC, tmp_path / "out")
    assert document["export"]["log"]["group"] == "g"
    assert document["export"]["log"]["transaction_time"] == d(250)
    # the day-300 encounter is after the export was taken (day 250): not a contact; censored
    # at the day-200 encounter, follow-up 100.
    assert document["counts"]["resources_dated_after_export"] == 1
    assert read_rows(tmp_path / "out")["p"]["followup_days"] == "100"
    assert "log.ndjson" not in document["export"]["files"]
    assert document["format"] == FORMAT


def test_creatinine_egfr_is_ckd_epi_2021_at_the_age_of_the_result():
    # Female born 1960-06-15, 54 on 2015-01-01: 142 x (1.5/0.7)^-1.200 x 0.9938^54 x 1.012
    # = 142 x 0.40068 x 0.71475 x 1.012 = 41.2 -> 41; 132.6 umol/L is 1.5 mg/dL (/ 88.40).
    # Male, same age and creatinine: 142 x (1.5/0.9)^-1.200 x 0.9938^54 = 142 x 0.54173 x
    # 0.71475 = 55.0 -> 55.
    kidney = timeline.Kidney()
    for gender, expected in (("female", 41.0), ("male", 55.0)):
        x = Export()
        x.patient("p", born="1960-06-15", gender=gender)
        x.obs("p", 0, "2160-0", 1.5, "mg/dL")
        x.obs("p", 100, "14682-9", 132.6, "umol/L")
        resources = [r for rs in x.by_type.values() for r in rs]
        results = kidney.egfrs(resources, resources[0], gender == "female",
                               as_of(T0 + timedelta(days=200)))
        assert [(r.day, r.value, r.calculated) for r in results] == [
            (T0, expected, True), (T0 + timedelta(days=100), expected, True)]


def test_sustained_runs_and_bounds():
    from hooks._kidney import at_least, below

    def run(*results):
        rs = [timeline.Result(T0 + timedelta(days=day), value, cmp, False)
              for day, value, cmp in results]
        return timeline.sustained(rs, 60, 90, below, at_least)

    # two below 60, 90 days apart: (first, confirming) day
    assert run((0, 50, None), (90, 55, None)) == (T0, T0 + timedelta(days=90))
    # 60 exactly is not below 60 and ends the run; the new run from day 100 is confirmed on 190
    assert run((0, 50, None), (50, 60, None), (100, 50, None), (190, 50, None)) == (
        T0 + timedelta(days=100), T0 + timedelta(days=190))
    # ">45" proves nothing against 60: the run from day 0 goes on
    assert run((0, 50, None), (50, 45, ">"), (90, 50, None)) == (T0, T0 + timedelta(days=90))
    # ">60" is at least 60: ends the run
    assert run((0, 50, None), (50, 60, ">"), (90, 50, None)) is None
    # "<60" is below 60
    assert run((0, 60, "<"), (95, 59, None)) == (T0, T0 + timedelta(days=95))


def test_spilled_export_gives_each_patient_with_referenced_medications(tmp_path):
    from cds_service.training.export_store import ExportStore, export_files

    x = Export()
    for pid in ("b", "a"):
        x.patient(pid)
        x.egfr(pid, 0, 50)
    x.add({"resourceType": "MedicationRequest", "subject": {"reference": "Patient/a"},
           "medicationReference": {"reference": "https://ehr.test/fhir/Medication/m1"}})
    x.add({"resourceType": "Medication", "id": "m1"})
    x.add({"resourceType": "Medication", "id": "m2"})
    x.add({"resourceType": "Group", "id": "g"})        # names no patient: counted, not kept
    export = x.write(tmp_path / "export")
    store = ExportStore(tmp_path / "spill.sqlite3", fhir_url="https://ehr.test/fhir")
    try:
        summary = store.load(export_files(export))
        patients = [(pid, sorted(r["resourceType"] for r in rs)) for pid, rs in store.patients()]
    finally:
        store.close()
    assert patients == [("a", ["Medication", "MedicationRequest", "Observation", "Patient"]),
                        ("b", ["Observation", "Patient"])]
    assert (summary.patients, summary.medications, dict(summary.without_patient)) == (
        2, 2, {"Group": 1})


def test_cohort_parameters_are_checked(tmp_path):
    data = yaml.safe_load(KFRE_SPEC.read_text(encoding="utf-8"))
    for bad, message in (({"sustained_days": 0}, "cohort.sustained_days: must be a positive "
                                                  "whole number"),
                         ({"sustained_days": 1.5}, "whole number"),
                         ({"kidney_failure_egfr_below": 60}, "must be below"),
                         ([1], "expected a mapping")):
        data["cohort"] = bad
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(data), encoding="utf-8")
        with pytest.raises(ModelError, match=message):
            load_cohort_spec(spec)
