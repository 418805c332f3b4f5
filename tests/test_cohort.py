"""The synthetic CKD cohort: determinism, FHIR Bulk NDJSON shape, literature relationships in the
data, and injected defects at their documented rates.

Everything is read back from the written files (as a consumer of an Epic Bulk export would), not
from the in-memory resources, so the tests also cover `write_cohort`.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import pytest

from cds_service.training import cohort_defects
from cds_service.training.cohort import (
    GENERATOR_VERSION,
    Cohort,
    generate_cohort,
    read_labels,
    write_cohort,
)

N = 2000
SEED = 20261121
INDEX = date(2025, 1, 1)
EGFR_CODES = {"98979-8", "33914-3", "62238-1"}
UACR_CODES = {"9318-7", "14959-1"}
HBA1C_CODES = {"4548-4", "59261-8"}
FILES = ("Patient", "Observation", "Condition", "labels", "metadata")


def ckd_epi_2021(scr_mg_dl: float, age: float, female: bool) -> float:
    """CKD-EPI 2021 creatinine equation (Inker et al., NEJM 2021;385:1737), written out here
    independently of the generator."""
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    ratio = scr_mg_dl / kappa
    egfr = 142 * min(ratio, 1) ** alpha * max(ratio, 1) ** -1.200 * 0.9938 ** age
    return egfr * 1.012 if female else egfr


def coding(resource_or_concept: dict) -> tuple[str, str]:
    concept = resource_or_concept.get("code", resource_or_concept)
    c = concept["coding"][0]
    return c["system"], c["code"]


def number(value: object) -> float:
    """A valueQuantity.value as a consumer must read it: numbers, or numbers sent as strings."""
    assert isinstance(value, int | float | str) and not isinstance(value, bool)
    return float(value)


@dataclass
class Bulk:
    """A written cohort, parsed back from disk."""

    paths: dict[str, Path]
    lines: dict[str, list[str]]
    resources: dict[str, list[dict]]
    metadata: dict
    labels: dict[str, tuple[date, int]]
    patients: dict[str, dict] = field(default_factory=dict)
    obs: dict[str, dict] = field(default_factory=dict)         # unique by id, file order
    by_patient: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    conditions: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))


def load(paths: dict[str, Path]) -> Bulk:
    lines = {t: paths[t].read_text(encoding="utf-8").splitlines()
             for t in ("Patient", "Observation", "Condition")}
    resources = {t: [json.loads(line) for line in ls] for t, ls in lines.items()}
    bulk = Bulk(paths, lines, resources,
                json.loads(paths["metadata"].read_text(encoding="utf-8")),
                read_labels(paths["labels"]))
    bulk.patients = {p["id"]: p for p in resources["Patient"]}
    for o in resources["Observation"]:
        if o["id"] not in bulk.obs:
            bulk.obs[o["id"]] = o
            bulk.by_patient[o["subject"]["reference"].removeprefix("Patient/")].append(o)
    for c in resources["Condition"]:
        bulk.conditions[c["subject"]["reference"].removeprefix("Patient/")].append(c)
    return bulk


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    return generate_cohort(N, seed=SEED, index_date=INDEX)


@pytest.fixture(scope="module")
def bulk(cohort: Cohort, tmp_path_factory: pytest.TempPathFactory) -> Bulk:
    return load(write_cohort(cohort, tmp_path_factory.mktemp("cohort") / "out"))


def final(bulk: Bulk, codes: set[str]) -> list[dict]:
    return [o for o in bulk.obs.values() if o["status"] == "final" and coding(o)[1] in codes]


def latest(observations: list[dict]) -> dict | None:
    return max(observations, key=lambda o: o["effectiveDateTime"], default=None)


def index_egfr(bulk: Bulk) -> dict[str, float]:
    """Latest final eGFR per patient; '>60' read as 60 (the consumer's usual choice)."""
    out: dict[str, float] = {}
    for pid, observations in bulk.by_patient.items():
        o = latest([x for x in observations
                    if x["status"] == "final" and coding(x)[1] in EGFR_CODES])
        assert o is not None, f"{pid} has no eGFR"
        out[pid] = 60.0 if o.get("valueString") == ">60" else number(o["valueQuantity"]["value"])
    return out


def uacr_mg_g(o: dict) -> float:
    q = o["valueQuantity"]
    return number(q["value"]) * (8.84 if q["unit"] == "mg/mmol" else 1.0)


def rate(labels: dict[str, tuple[date, int]], ids: list[str]) -> float:
    assert ids, "empty group"
    return sum(labels[i][1] for i in ids) / len(ids)


# --- determinism ----------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = write_cohort(generate_cohort(60, seed=7), tmp_path / "a")
    second = write_cohort(generate_cohort(60, seed=7), tmp_path / "b")
    other = write_cohort(generate_cohort(60, seed=8), tmp_path / "c")
    assert set(first) == set(FILES)
    for key in FILES:
        assert first[key].read_bytes() == second[key].read_bytes(), key
        assert first[key].parent == tmp_path / "a"
    for key in ("Patient", "Observation", "Condition", "labels"):
        assert first[key].read_bytes() != other[key].read_bytes(), key
    assert json.loads(other["metadata"].read_text())["seed"] == 8


def test_index_date_moves_every_date_and_is_recorded(tmp_path: Path) -> None:
    idx = date(2020, 6, 30)
    b = load(write_cohort(generate_cohort(40, seed=1, index_date=idx), tmp_path))
    assert b.metadata["index_date"] == "2020-06-30"
    assert {d for d, _ in b.labels.values()} == {idx}
    last = max(o["effectiveDateTime"] for o in b.obs.values())
    assert "2020-01-01" < last[:10] < "2020-06-30"


def test_invalid_arguments_are_rejected() -> None:
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError):
            generate_cohort(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        generate_cohort(10, seed=-1)


# --- FHIR Bulk shape -------------------------------------------------------------------------

def test_every_line_is_one_resource_of_its_files_type(bulk: Bulk) -> None:
    for resource_type, lines in bulk.lines.items():
        assert lines, resource_type
        for line in lines:
            assert "\n" not in line and line == line.strip()
            resource = json.loads(line)
            assert resource["resourceType"] == resource_type
            assert {"code": "synthetic"}.items() <= resource["meta"]["tag"][0].items()
    assert len(bulk.patients) == N == len(bulk.resources["Patient"])
    assert list(bulk.patients) == [f"pt-{i:06d}" for i in range(1, N + 1)]
    for p in bulk.patients.values():
        assert set(p) <= {"resourceType", "id", "meta", "gender", "birthDate"}  # nothing PHI-like
        assert p.get("gender", "female") in ("male", "female")
    assert len({c["id"] for c in bulk.resources["Condition"]}) == len(bulk.resources["Condition"])


def test_every_subject_is_an_existing_patient(bulk: Bulk) -> None:
    for resource in bulk.resources["Observation"] + bulk.resources["Condition"]:
        reference = resource["subject"]["reference"]
        assert reference.startswith("Patient/")
        assert reference.removeprefix("Patient/") in bulk.patients
    assert set(bulk.by_patient) == set(bulk.patients)  # everybody has some history


def test_nothing_is_dated_on_or_after_the_index_date(bulk: Bulk) -> None:
    index_start = datetime(INDEX.year, INDEX.month, INDEX.day).isoformat() + "Z"
    for o in bulk.resources["Observation"]:
        when = o["effectiveDateTime"]
        assert len(when) == 20 and when.endswith("Z"), when
        datetime.fromisoformat(when.replace("Z", "+00:00"))
        assert when < index_start
    for c in bulk.resources["Condition"]:
        assert date.fromisoformat(c["onsetDateTime"]) < INDEX
    for p in bulk.patients.values():
        age = (INDEX - date.fromisoformat(p["birthDate"])).days / 365.25
        assert 29.99 < age < 90.01


def test_observation_codes_units_and_categories(bulk: Bulk) -> None:
    lab = "http://terminology.hl7.org/CodeSystem/observation-category"
    units: dict[str, Counter] = defaultdict(Counter)
    for o in bulk.obs.values():
        system, code = coding(o)
        assert system == "http://loinc.org"
        category = o["category"][0]["coding"][0]
        assert category["system"] == lab
        assert category["code"] == ("vital-signs" if code in ("85354-9", "8480-6")
                                    else "laboratory")
        if code == "85354-9":
            assert "valueQuantity" not in o
            assert [coding(c)[1] for c in o["component"]] == ["8480-6", "8462-4"]
            assert all(c["valueQuantity"]["unit"] == "mm[Hg]" for c in o["component"])
            units[code]["mm[Hg]"] += 1
            continue
        if "valueString" in o:
            assert code in EGFR_CODES and o["valueString"] == ">60"
            continue
        q = o["valueQuantity"]
        assert q["system"] == "http://unitsofmeasure.org" and q["code"] == q["unit"]
        units[code][q["unit"]] += 1
    assert set(units) == EGFR_CODES | UACR_CODES | HBA1C_CODES | {"2160-0", "85354-9", "8480-6"}
    assert all(set(units[c]) == {"mL/min/{1.73_m2}"} for c in EGFR_CODES)
    assert set(units["2160-0"]) == {"mg/dL", "umol/L"}
    assert set(units["9318-7"]) == {"mg/g", "mg/mmol"} and set(units["14959-1"]) == {"mg/g"}
    assert set(units["4548-4"]) == {"%"} and set(units["59261-8"]) == {"mmol/mol"}
    egfr_total = sum(sum(units[c].values()) for c in EGFR_CODES)
    assert sum(units["98979-8"].values()) / egfr_total > 0.65
    assert 0.15 < sum(units["33914-3"].values()) / egfr_total < 0.25
    creat = units["2160-0"]
    assert 0.11 < creat["umol/L"] / creat.total() < 0.19
    bp = units["85354-9"].total() + units["8480-6"].total()
    assert 0.15 < units["8480-6"].total() / bp < 0.25


def test_conditions_are_active_confirmed_and_coded_as_documented(bulk: Bulk) -> None:
    seen: Counter = Counter()
    for c in bulk.resources["Condition"]:
        assert c["clinicalStatus"]["coding"][0] == {
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": "active"}
        assert c["verificationStatus"]["coding"][0]["code"] == "confirmed"
        seen[coding(c)] += 1
    icd = "http://hl7.org/fhir/sid/icd-10-cm"
    allowed = {("http://snomed.info/sct", "44054006"), ("http://snomed.info/sct", "38341003"),
               (icd, "E11.9"), (icd, "E11.22"), (icd, "E11.65"), (icd, "I10")}
    assert set(seen) == allowed
    diabetic = {p for p, cs in bulk.conditions.items()
                if any(coding(c)[1] in ("44054006", "E11.9", "E11.22", "E11.65") for c in cs)}
    hypertensive = {p for p, cs in bulk.conditions.items()
                    if any(coding(c)[1] in ("38341003", "I10") for c in cs)}
    assert 0.30 < len(diabetic) / N < 0.45
    assert 0.60 < len(hypertensive) / N < 0.80
    icd_dm = sum(v for (s, code), v in seen.items() if s == icd and code.startswith("E11"))
    assert 0.30 < icd_dm / len(diabetic) < 0.50


def test_history_counts_follow_the_specification(bulk: Bulk) -> None:
    index_start = INDEX.isoformat()
    for pid, observations in bulk.by_patient.items():
        real = [o for o in observations if o["status"] == "final"]
        kinds = Counter(o["id"].split("-")[2] for o in real)
        assert 2 <= kinds["egfr"] <= 6 and kinds["creat"] == kinds["egfr"], pid
        assert 0 <= kinds["uacr"] <= 3 and 1 <= kinds["bp"] <= 4 and kinds["hba1c"] <= 3
        egfrs = [o for o in real if coding(o)[1] in EGFR_CODES]
        newest = latest(egfrs)
        assert newest is not None
        gap = (date.fromisoformat(index_start) - date.fromisoformat(
            newest["effectiveDateTime"][:10])).days
        assert 1 <= gap <= 183
        assert min(o["effectiveDateTime"] for o in egfrs)[:10] >= "2022-01-01"


# --- labels ----------------------------------------------------------------------------------

def test_labels_csv_has_one_row_per_patient_and_round_trips(bulk: Bulk, cohort: Cohort) -> None:
    text = bulk.paths["labels"].read_text(encoding="utf-8")
    assert text.splitlines()[0] == "patient_id,index_date,label"
    assert len(text.splitlines()) == N + 1
    assert list(bulk.labels) == list(bulk.patients)
    assert {d for d, _ in bulk.labels.values()} == {INDEX}
    assert [(pid, lab) for pid, (_, lab) in bulk.labels.items()] == cohort.labels
    assert bulk.metadata["outcome"]["n_positive"] == sum(lab for _, lab in cohort.labels)


def test_read_labels_rejects_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    for text in ("id,label\npt-1,0\n",
                 "patient_id,index_date,label\npt-1,2025-01-01,2\n",
                 "patient_id,index_date,label\npt-1,2025-13-01,1\n",
                 "patient_id,index_date,label\npt-1,2025-01-01,1\npt-1,2025-01-01,0\n"):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError):
            read_labels(bad)


def test_prevalence_is_in_the_documented_band(bulk: Bulk) -> None:
    prevalence = sum(lab for _, lab in bulk.labels.values()) / N
    assert 0.07 < prevalence < 0.16
    assert bulk.metadata["outcome"]["prevalence"] == pytest.approx(prevalence, abs=1e-4)
    assert 0.07 < bulk.metadata["outcome"]["expected_prevalence"] < 0.16


def test_metadata_describes_the_generation(bulk: Bulk, cohort: Cohort) -> None:
    m = bulk.metadata
    assert m == json.loads(json.dumps(cohort.metadata))
    assert m["seed"] == SEED and m["n_patients"] == N and m["index_date"] == "2025-01-01"
    assert m["generator_version"] == GENERATOR_VERSION == "1"
    assert "synthetic" in m["disclaimer"].lower() and "not" in m["disclaimer"]
    assert m["resource_counts"] == {t: len(bulk.resources[t]) for t in bulk.resources}
    assert m["risk_model"]["kfre_4_variable"]["baseline_survival_5y"] == 0.9240
    assert {d["name"] for d in m["defects"]} == {
        "numeric_as_string", "egfr_gt60_string", "duplicate_line", "entered_in_error",
        "missing_uacr", "patient_missing_gender"}


# --- literature relationships ------------------------------------------------------------------

def test_label_rate_rises_with_low_egfr_albuminuria_and_diabetes(bulk: Bulk) -> None:
    egfr = index_egfr(bulk)
    low = [p for p, v in egfr.items() if v < 30]
    high = [p for p, v in egfr.items() if v >= 60]
    assert rate(bulk.labels, low) > 0.25 > 0.03 > rate(bulk.labels, high)

    uacr = {}
    for p in bulk.patients:
        o = latest([x for x in bulk.by_patient[p]
                    if x["status"] == "final" and coding(x)[1] in UACR_CODES])
        if o is not None:
            uacr[p] = uacr_mg_g(o)
    a3 = [p for p, v in uacr.items() if v > 300]
    a1 = [p for p, v in uacr.items() if v < 30]
    assert len(a3) > 50 and len(a1) > 300
    assert rate(bulk.labels, a3) > 2 * rate(bulk.labels, a1)

    diabetic = [p for p in bulk.patients
                if any(coding(c)[1] in ("44054006", "E11.9", "E11.22", "E11.65")
                       for c in bulk.conditions[p])]
    others = sorted(set(bulk.patients) - set(diabetic))
    assert rate(bulk.labels, diabetic) > 1.3 * rate(bulk.labels, others)

    # within stage G3b-G4 (eGFR 15-45) the faster decliners fare worse: the Coresh effect
    declines = {}
    for p in (p for p, v in egfr.items() if 15 <= v < 45):
        series = sorted((o["effectiveDateTime"], number(o["valueQuantity"]["value"]))
                        for o in bulk.by_patient[p]
                        if o["status"] == "final" and coding(o)[1] in EGFR_CODES
                        and "valueQuantity" in o)
        if len(series) >= 3:
            declines[p] = (series[0][1] - series[-1][1]) / series[0][1]
    ordered = sorted(declines, key=declines.__getitem__)
    third = len(ordered) // 3
    assert rate(bulk.labels, ordered[-third:]) > rate(bulk.labels, ordered[:third])


def test_creatinine_converts_back_to_the_reported_egfr_with_ckd_epi_2021(bulk: Bulk) -> None:
    pairs: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for o in bulk.obs.values():
        if o["status"] != "final" or "valueQuantity" not in o:
            continue
        code = coding(o)[1]
        if code in EGFR_CODES or code == "2160-0":
            key = (o["subject"]["reference"].removeprefix("Patient/"), o["effectiveDateTime"])
            pairs[key]["egfr" if code in EGFR_CODES else "scr"] = o
    errors = []
    for (pid, when), pair in pairs.items():
        gender = bulk.patients[pid].get("gender")
        if gender is None or len(pair) != 2:
            continue
        q = pair["scr"]["valueQuantity"]
        scr = number(q["value"]) / (88.42 if q["unit"] == "umol/L" else 1.0)
        age = (date.fromisoformat(when[:10])
               - date.fromisoformat(bulk.patients[pid]["birthDate"])).days / 365.25
        reported = number(pair["egfr"]["valueQuantity"]["value"])
        errors.append((ckd_epi_2021(scr, age, gender == "female") - reported) / reported)
    assert len(errors) > 3 * N
    assert abs(sum(errors) / len(errors)) < 0.001          # no bias
    assert max(abs(e) for e in errors) < 0.015              # only rounding of the reported values
    assert sum(abs(e) for e in errors) / len(errors) < 0.004


def test_units_convert_as_documented(bulk: Bulk) -> None:
    """Values in the alternative units sit where the conversions put them (same population)."""
    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2]

    hba1c = [o["valueQuantity"] for o in final(bulk, HBA1C_CODES)]
    pct = median([number(q["value"]) for q in hba1c if q["unit"] == "%"])
    ifcc = median([number(q["value"]) * 0.09148 + 2.152 for q in hba1c
                   if q["unit"] == "mmol/mol"])
    assert abs(pct - ifcc) < 0.5
    uacr = [o["valueQuantity"] for o in final(bulk, UACR_CODES)]
    mg_g = median([number(q["value"]) for q in uacr if q["unit"] == "mg/g"])
    mg_mmol = median([number(q["value"]) * 8.84 for q in uacr if q["unit"] == "mg/mmol"])
    assert 0.6 < mg_mmol / mg_g < 1.6
    assert 20 < mg_g < 70  # population median around 30-60 mg/g


# --- injected defects ----------------------------------------------------------------------

def close_to(defect: dict, count: int, denominator: int) -> None:
    assert (defect["count"], defect["denominator"]) == (count, denominator), defect["name"]
    p = defect["rate"]
    observed = count / denominator
    assert abs(observed - p) <= 4 * math.sqrt(p * (1 - p) / denominator) + 0.002, defect


def test_defects_occur_at_their_documented_rates(bulk: Bulk) -> None:
    defects = {d["name"]: d for d in bulk.metadata["defects"]}
    for name, d in defects.items():
        assert 0.01 <= d["rate"] <= (0.10 if name == "missing_uacr" else 0.05), name

    egfr = final(bulk, EGFR_CODES)
    gt60 = [o for o in egfr if o.get("valueString") == ">60"]
    numeric_ge60 = [o for o in egfr
                    if "valueQuantity" in o and number(o["valueQuantity"]["value"]) >= 60]
    assert all("valueQuantity" not in o for o in gt60)
    close_to(defects["egfr_gt60_string"], len(gt60), len(gt60) + len(numeric_ge60))

    quantities = [o["valueQuantity"] for o in bulk.obs.values()
                  if o["status"] == "final" and "valueQuantity" in o]
    as_string = [q for q in quantities if isinstance(q["value"], str)]
    assert all(float(q["value"]) >= 0 for q in as_string)
    close_to(defects["numeric_as_string"], len(as_string), len(quantities))

    errors = [o for o in bulk.obs.values() if o["status"] == "entered-in-error"]
    for o in errors:
        q = o["valueQuantity"]
        assert (q["unit"] == "mg/dL" and q["value"] > 20) or q["value"] > 200  # absurd
    assert len({o["subject"]["reference"] for o in errors}) == len(errors)
    close_to(defects["entered_in_error"], len(errors), N)

    ids = [o["id"] for o in bulk.resources["Observation"]]
    repeated = [i for i, k in Counter(ids).items() if k > 1]
    assert all(Counter(ids)[i] == 2 for i in repeated)
    lines_by_id: dict[str, set[str]] = defaultdict(set)
    for line, o in zip(bulk.lines["Observation"], bulk.resources["Observation"], strict=True):
        lines_by_id[o["id"]].add(line)
    assert all(len(lines_by_id[i]) == 1 for i in repeated)  # an exact duplicate line
    close_to(defects["duplicate_line"], len(repeated), len(set(ids)))

    no_uacr = [p for p in bulk.patients
               if not any(coding(o)[1] in UACR_CODES for o in bulk.by_patient[p])]
    close_to(defects["missing_uacr"], len(no_uacr), N)

    no_gender = [p for p in bulk.patients.values() if "gender" not in p]
    close_to(defects["patient_missing_gender"], len(no_gender), N)


def test_defects_do_not_touch_the_labels(cohort: Cohort, monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels come from the clean values: with every defect rate set to 0 (the same random draws
    are made, they just never fire) the files are clean and the labels are unchanged."""
    clean_rates = {name: (0.0, *rest) for name, (_, *rest) in cohort_defects.DEFECTS.items()}
    monkeypatch.setattr(cohort_defects, "DEFECTS", clean_rates)
    clean = generate_cohort(N, seed=SEED, index_date=INDEX)
    assert clean.labels == cohort.labels
    assert all(d["count"] == 0 for d in clean.metadata["defects"])
    assert all("gender" in p for p in clean.resources["Patient"])
    assert len(clean.resources["Observation"]) < len(cohort.resources["Observation"])
    assert clean.metadata["population"] == cohort.metadata["population"]


# --- default size ----------------------------------------------------------------------------

def test_default_cohort_of_4000(tmp_path: Path) -> None:
    c = generate_cohort()
    assert c.seed == 20261121 and c.index_date == date(2025, 1, 1)
    assert len(c.labels) == len(c.resources["Patient"]) == 4000
    assert 0.08 <= c.metadata["outcome"]["prevalence"] <= 0.15
    paths = write_cohort(c, tmp_path)
    text = paths["Observation"].read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == len(c.resources["Observation"])
