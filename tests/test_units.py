"""Units through UCUM, comparators kept as bounds, `readings`, and the clock-skew allowance.

Expected values are worked by hand from the molar mass of creatinine, C4H7N3O:
4 x 12.011 + 7 x 1.008 + 3 x 14.007 + 15.999 = 113.120 g/mol (IUPAC standard atomic weights;
PubChem CID 588 gives 113.12 g/mol). So 1 umol/L = 113.12 ug/L = 0.011312 mg/dL, and 1 mg/mmol
(albumin per creatinine) = 1 mg / 113.12 mg = 1 / 0.11312 mg/g = 8.840 mg/g.
`NOW` is passed to the engine, which reads no clock: the tests hold at any date.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from cds_service import features as engine
from cds_service.features import (
    FUTURE_SKEW,
    FeatureSpecError,
    Reading,
    extract,
    parse_code_map,
    parse_features,
    readings,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
LOCAL = "urn:oid:1.2.840.114350.1.13.0.1.7.2.768282"  # an Epic lab component id system
CREATININE_G_PER_MOL = 113.12

SPECS = parse_features(yaml.safe_load("""
- name: egfr
  source: {resource: Observation, codes: ["http://loinc.org|33914-3", "http://loinc.org|62238-1"]}
  lookback_days: 730
  unit: "mL/min/{1.73_m2}"
  plausible: [1, 200]
- name: creatinine
  source: {resource: Observation, codes: ["http://loinc.org|2160-0", "http://loinc.org|14682-9"]}
  lookback_days: 730
  unit: mg/dL
  molar_mass: 113.12
  plausible: [0.1, 30]
- name: creatinine_min
  source: {resource: Observation, codes: ["http://loinc.org|2160-0"]}
  aggregation: min
  unit: mg/dL
  molar_mass: 113.12
- name: creatinine_no_mass
  source: {resource: Observation, codes: ["http://loinc.org|2160-0"]}
  unit: mg/dL
- name: uacr
  source: {resource: Observation, codes: ["http://loinc.org|9318-7"]}
  unit: mg/g
  molar_mass: 113.12
  plausible: [0.1, 100000]
- name: hba1c
  source: {resource: Observation, codes: ["http://loinc.org|4548-4"]}
  unit: "%"
- name: diabetes
  source: {resource: Condition, codes: ["http://hl7.org/fhir/sid/icd-10-cm|E11*"]}
"""))
SPEC = {s.name: s for s in SPECS}
_n = iter(range(10**6))


def obs(code, value=None, unit=None, *, date="2025-05-01T09:00:00Z", status="final", id=None,
        system=LOINC, **extra):
    resource = {"resourceType": "Observation", "id": id or f"o{next(_n)}", "status": status,
                "code": {"coding": [{"system": system, "code": code}]},
                "effectiveDateTime": date}
    if value is not None:
        quantity = {"value": value}
        if unit is not None:
            quantity.update(unit=unit, system=UCUM, code=unit)
        resource["valueQuantity"] = quantity
    resource.update(extra)
    return resource


def run(name, resources, now=NOW):
    return extract(SPECS, resources, now=now)[name]


# ---------------------------------------------------------------------------------------------
# Units


CONVERTS = [
    # (feature, LOINC, value, unit as sent, expected in the canonical unit)
    ("uacr", "9318-7", 30, "mg/g{creat}", 30.0),
    ("uacr", "9318-7", 30, "mg/g", 30.0),
    ("uacr", "9318-7", 3, "mg/mmol{creat}", 3 / 0.11312),
    ("uacr", "9318-7", 3, "mg/mmol", 3 / 0.11312),
    ("uacr", "9318-7", 1, "mg/mmol", 8.840),   # the 8.84 of KDIGO's tables, 3 digits
    ("uacr", "9318-7", 30, "ug/mg", 30.0),     # ug/mg = mg/g
    ("uacr", "9318-7", 0.03, "mg/mg", 30.0),
    ("creatinine", "14682-9", 100, "umol/L", 1.1312),
    ("creatinine", "14682-9", 100, "µmol/L", 1.1312),   # micro sign U+00B5
    ("creatinine", "14682-9", 100, "μmol/L", 1.1312),   # Greek mu U+03BC
    ("creatinine", "14682-9", 100, "mcmol/L", 1.1312),
    ("creatinine", "14682-9", 100, "10*-6.mol/L", 1.1312),
    ("creatinine", "14682-9", 0.1, "mmol/L", 1.1312),
    ("creatinine", "2160-0", 1.2, "mg/dl", 1.2),
    ("creatinine", "2160-0", 12, "mg/L", 1.2),
    ("egfr", "33914-3", 45, "mL/min/{1.73_m2}", 45.0),
    ("egfr", "33914-3", 45, "mL/min/1.73m2", 45.0),
    ("egfr", "33914-3", 45, "mL/min/1.73.m2", 45.0),
    ("egfr", "33914-3", 45, "mL/min/(1.73.m2)", 45.0),
    ("egfr", "33914-3", 45, "ml/min/1.73m2", 45.0),
    ("egfr", "33914-3", 45, "mL/min/1.73 m²", 45.0),
    ("egfr", "33914-3", 45, "ML/MIN/1.73M2", 45.0),
]


@pytest.mark.parametrize(("name", "code", "value", "unit", "expected"), CONVERTS,
                         ids=[f"{r[0]}-{r[3]}" for r in CONVERTS])
def test_unit_converts(name, code, value, unit, expected):
    fv = run(name, [obs(code, value, unit)])
    assert fv.status == "observed", fv
    assert fv.value == pytest.approx(expected, rel=1e-4), fv


REFUSED = [
    # (feature, LOINC, unit, why it cannot convert)
    ("egfr", "33914-3", "mg/dL", "unit 'mg/dL' not convertible to mL/min/{1.73_m2}"),
    ("egfr", "33914-3", "mL/min",   # not indexed to body surface: a different quantity
     "unit 'mL/min' not convertible to mL/min/{1.73_m2} (not per {1.73_m2})"),
    ("creatinine", "2160-0", "xq!!/%%", "unit 'xq!!/%%' not convertible to mg/dL"),
    ("creatinine", "2160-0", "{ratio}", "unit '{ratio}' not convertible to mg/dL"),
    ("creatinine", "2160-0", "Cel", "unit 'Cel' not convertible to mg/dL"),
    # No molar mass declared: molar results cannot become mass.
    ("creatinine_no_mass", "2160-0", "umol/L", "unit 'umol/L' not convertible to mg/dL"),
    # HbA1c IFCC mmol/mol is a different scale from NGSP %, not a multiple (both dimensionless).
    ("hba1c", "4548-4", "mmol/mol", "unit 'mmol/mol' not convertible to %"),
]


@pytest.mark.parametrize(("name", "code", "unit", "note"), REFUSED,
                         ids=[f"{r[0]}-{r[2]}" for r in REFUSED])
def test_unit_refused(name, code, unit, note):
    fv = run(name, [obs(code, 50, unit)])
    assert fv.value is None and fv.status == "missing", fv
    assert note in fv.notes, fv.notes


def test_conversion_note_and_exactness():
    fv = run("creatinine", [obs("14682-9", 100, "umol/L")])
    assert fv.notes == ("converted from umol/L",)
    assert fv.value == 1.1312  # exact to the float: factor rounded to 12 significant digits
    same = run("uacr", [obs("9318-7", 30, "mg/g{creat}")])
    assert same.notes == ()  # a factor of 1 is no reinterpretation


def test_spec_conversions_table_still_wins():
    spec = parse_features([{**SPEC["creatinine"].to_dict(), "name": "c2",
                            "conversions": {"umol/L": 0.0113}}])
    fv = extract(spec, [obs("14682-9", 100, "umol/L")], now=NOW)["c2"]
    assert fv.value == pytest.approx(1.13)


def test_unit_parse_is_cached():
    engine._ucum_factor.cache_clear()
    for _ in range(3):
        run("creatinine", [obs("14682-9", 100, "umol/L")])
    info = engine._ucum_factor.cache_info()
    assert info.misses == 1 and info.hits == 2


@pytest.mark.parametrize(("raw", "message"), [
    (0, "must be a positive number"), (-113.12, "must be a positive number"),
    ("113.12", "must be a positive number"), (True, "must be a positive number"),
])
def test_molar_mass_validated(raw, message):
    item = {**SPEC["creatinine"].to_dict(), "molar_mass": raw}
    with pytest.raises(FeatureSpecError, match=r"features\[0\]\.molar_mass: " + message):
        parse_features([item])


def test_molar_mass_only_for_numeric_and_round_trips():
    assert SPEC["creatinine"].molar_mass == CREATININE_G_PER_MOL
    assert SPEC["creatinine"].to_dict()["molar_mass"] == CREATININE_G_PER_MOL
    assert parse_features([SPEC["creatinine"].to_dict()]) == (SPEC["creatinine"],)
    with pytest.raises(FeatureSpecError, match=r"features\[0\]\.molar_mass: only for numeric"):
        parse_features([{"name": "n", "source": {"resource": "Observation",
                                                  "codes": ["http://loinc.org|2160-0"]},
                         "aggregation": "count", "molar_mass": 113.12}])


# ---------------------------------------------------------------------------------------------
# Comparators


COMPARATORS = [
    (obs("33914-3", 15, "mL/min/{1.73_m2}", valueQuantity={
        "value": 15, "comparator": "<", "unit": "mL/min/{1.73_m2}"}), 15.0, "<"),
    (obs("33914-3", valueString="<15"), 15.0, "<"),
    (obs("33914-3", valueString=">60"), 60.0, ">"),
    (obs("33914-3", valueString="> 90 mL/min/1.73m2"), 90.0, ">"),
    (obs("33914-3", valueString="≥90"), 90.0, ">="),
    (obs("33914-3", valueString="60"), 60.0, None),
    (obs("33914-3", 60, "mL/min/{1.73_m2}"), 60.0, None),
]


@pytest.mark.parametrize(("resource", "value", "comparator"), COMPARATORS,
                         ids=[f"cmp-{i}" for i in range(len(COMPARATORS))])
def test_comparator_kept_as_bound(resource, value, comparator):
    fv = run("egfr", [resource])
    assert fv.value == value and fv.comparator == comparator, fv
    assert fv.to_dict()["comparator"] == comparator
    if comparator:
        assert f"reported as {comparator}{value:g}; used {value:g}" in fv.notes


def test_comparator_follows_the_chosen_result():
    newer_plain = [obs("33914-3", valueString=">60", date="2025-01-01"),
                   obs("33914-3", 55, "mL/min/{1.73_m2}", date="2025-03-01")]
    assert run("egfr", newer_plain).comparator is None
    low = [obs("2160-0", valueString="<0.2", date="2025-01-01"),
           obs("2160-0", 1.1, "mg/dL", date="2025-03-01")]
    fv = run("creatinine_min", low)
    assert (fv.value, fv.comparator) == (0.2, "<")


# ---------------------------------------------------------------------------------------------
# readings


def test_readings_history_oldest_first_with_the_same_exclusions():
    code_map = parse_code_map([{"from": f"{LOCAL}|1526", "to": f"{LOINC}|2160-0"}])
    resources = [
        obs("2160-0", 1.4, "mg/dL", date="2025-03-01T08:00:00Z", id="c3"),
        obs("14682-9", 100, "umol/L", date="2024-01-10", id="c1"),
        obs("1526", valueString="<0.5", system=LOCAL, date="2024-06-01", id="c2"),
        obs("2160-0", 1.4, "mg/dL", date="2025-03-01T08:00:00Z", id="c3b"),  # resend: deduped
        obs("2160-0", 9.9, "mg/dL", status="entered-in-error", id="x1"),
        obs("2160-0", 1.0, "mg/dL", date="2025-07-01", id="x2"),               # future
        obs("2160-0", 1.0, "mg/dL", date="2023-05-01", id="x3"),               # before 730 days
        obs("2160-0", 90, "mg/dL", id="x4"),                                    # implausible
        obs("2160-0", 1.0, "mmol/mol", id="x5"),                                # unconvertible
    ]
    out = readings(SPEC["creatinine"], resources, now=NOW, code_map=code_map)
    assert out == [
        Reading(datetime(2024, 1, 10, tzinfo=UTC), "2024-01-10", 1.1312, None,
                "Observation/c1", f"{LOINC}|14682-9", ("converted from umol/L",)),
        Reading(datetime(2024, 6, 1, tzinfo=UTC), "2024-06-01", 0.5, "<",
                "Observation/c2", f"{LOINC}|2160-0",
                ("reported as <0.5; used 0.5", "unit missing; assumed mg/dL")),
        Reading(datetime(2025, 3, 1, 8, tzinfo=UTC), "2025-03-01", 1.4, None,
                "Observation/c3b", f"{LOINC}|2160-0", ()),
    ]
    # The same results `extract` aggregates.
    fv = extract([SPEC["creatinine"]], resources, now=NOW, code_map=code_map)["creatinine"]
    assert (fv.n, fv.value, fv.source) == (3, 1.4, "Observation/c3b")


def test_chart_pass_is_extract_and_readings_in_one_pass():
    code_map = parse_code_map([{"from": f"{LOCAL}|1526", "to": f"{LOINC}|2160-0"}])
    resources = [
        obs("2160-0", 1.4, "mg/dL", date="2025-03-01T08:00:00Z", id="c3"),
        obs("1526", valueString="<0.5", system=LOCAL, date="2024-06-01", id="c2"),
        obs("33914-3", 48, "mL/min/1.73m2", date="2025-02-01", id="e1"),
        obs("2160-0", 9.9, "mg/dL", status="entered-in-error", id="x1"),
    ]
    specs = [SPEC["egfr"], SPEC["creatinine"], SPEC["hba1c"]]
    chart = engine.ChartPass([specs], resources, now=NOW, code_map=code_map)
    creatinines, egfrs = chart.readings(specs, [SPEC["creatinine"], SPEC["egfr"]])
    assert chart.vector(specs) == extract(specs, resources, now=NOW, code_map=code_map)
    assert [(r.source, r.value, r.comparator) for r in creatinines] == [
        ("Observation/c2", 0.5, "<"), ("Observation/c3", 1.4, None)]
    assert creatinines == readings(SPEC["creatinine"], resources, now=NOW, code_map=code_map)
    assert [(r.source, r.value) for r in egfrs] == [("Observation/e1", 48.0)]
    with pytest.raises(ValueError):  # a reading spec must be one of the extracted specs
        engine.ChartPass([[SPEC["egfr"]]], [], now=NOW).readings([SPEC["egfr"]],
                                                                [SPEC["creatinine"]])
    with pytest.raises(ValueError, match="numeric Observation"):
        engine.ChartPass([[SPEC["diabetes"]]], [], now=NOW).readings([SPEC["diabetes"]],
                                                                    [SPEC["diabetes"]])


def test_chart_pass_groups_and_extend_are_extract_on_everything_so_far():
    # Two groups sharing a spec, one pass; then a resource computed later joins the pass.
    first = [SPEC["egfr"], SPEC["creatinine"]]
    second = [SPEC["creatinine"], SPEC["hba1c"], SPEC["diabetes"]]
    resources = [
        obs("2160-0", 1.4, "mg/dL", date="2025-03-01", id="c3"),
        obs("4548-4", 7.1, "%", date="2025-01-01", id="h1"),
        obs("2160-0", 1.2, "mg/dL", date="2025-02-01", id="c3"),  # same id: the first wins
    ]
    later = [obs("33914-3", 40, "mL/min/1.73m2", date="2025-03-02", id="computed"),
             obs("4548-4", 9.9, "%", date="2025-03-02", id="h1")]  # seen before: skipped
    chart = engine.ChartPass([first, second], resources, now=NOW)
    assert chart.vector(first) == extract(first, resources, now=NOW)
    assert chart.vector(second) == extract(second, resources, now=NOW)
    assert chart.vector(first)["egfr"].status != "observed"
    chart.extend(later)
    assert chart.resources == [*resources, *later]
    for group in (first, second, [SPEC["hba1c"]]):  # the last is no group: a pass of its own
        assert chart.vector(group) == extract(group, [*resources, *later], now=NOW)
    assert chart.vector(first)["egfr"].value == 40
    assert chart.vector(second)["hba1c"].value == 7.1
    assert chart.serves(NOW, None) and not chart.serves(NOW, {}) \
        and not chart.serves(NOW + timedelta(seconds=1), None)


def test_readings_refuses_non_numeric_specs():
    with pytest.raises(ValueError, match="numeric Observation"):
        readings(SPEC["diabetes"], [], now=NOW)


def test_readings_empty_and_tolerant():
    assert readings(SPEC["egfr"], [], now=NOW) == []
    assert readings(SPEC["egfr"], [None, "x", {"resourceType": "Observation"}], now=NOW) == []


# ---------------------------------------------------------------------------------------------
# Clock skew


def at(delta):
    return (NOW + delta).isoformat()


@pytest.mark.parametrize(("delta", "kept"), [
    (timedelta(seconds=30), True),
    (FUTURE_SKEW, True),
    (FUTURE_SKEW + timedelta(seconds=1), False),
    (timedelta(hours=1), False),
])
def test_results_just_ahead_of_our_clock_are_kept(delta, kept):
    fv = run("egfr", [obs("33914-3", 40, "mL/min/{1.73_m2}", date=at(delta))])
    assert (fv.value == 40.0) is kept, fv
    assert ("1 future-dated result ignored" in fv.notes) is not kept
    assert len(readings(SPEC["egfr"], [obs("33914-3", 40, "mL/min/{1.73_m2}", date=at(delta))],
                        now=NOW)) == int(kept)


@pytest.mark.parametrize(("delta", "counted"), [
    (timedelta(minutes=2), True), (timedelta(minutes=10), False)])
def test_conditions_recorded_just_ahead_are_counted(delta, counted):
    condition = {"resourceType": "Condition", "id": "d1", "recordedDate": at(delta),
                 "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                      "code": "E11.9"}]}}
    fv = run("diabetes", [condition])
    assert fv.value == (1.0 if counted else 0.0), fv


def test_pass_matcher_answers_as_the_lookup_for_every_concept_shape():
    from cds_service.features.compiled import _compiled
    from cds_service.features.extraction import _matcher

    code_map = parse_code_map([{"from": f"{LOCAL}|1526", "to": f"{LOINC}|2160-0"}])
    lookup = _compiled((SPEC["egfr"], SPEC["creatinine"], SPEC["hba1c"])).observation
    concepts = [
        {"coding": [{"system": LOINC, "code": "2160-0"}]},
        {"coding": [{"system": LOCAL, "code": "1526"}]},                      # via the code map
        {"coding": [{"system": LOINC, "code": "4548-4"}, {"system": LOCAL, "code": "1526"}]},
        {"coding": [{"system": LOINC, "code": "0000-0"}]},
        {"coding": [{"system": LOINC + "/", "code": " 2160-0 "}]},            # normalised
        {"coding": []}, {"coding": None}, {"coding": "2160-0"}, {"coding": ["x"]},
        {"coding": [{"system": [LOINC], "code": "2160-0"}]},                  # unhashable part
        {"coding": [None, {"system": LOINC, "code": "2160-0"}]}, {}, None, "x",
    ]
    matcher = _matcher(lookup, code_map)
    for _ in range(2):  # the second time from the memo
        for concept in concepts:
            assert set(matcher(concept)) == lookup.match(concept, code_map), concept
    assert matcher({"coding": [{"system": LOINC, "code": "2160-0"}]}) == {1}


def test_features_reading_one_result_each_apply_their_own_unit_and_range():
    # One pass shares a result's value between features that read it alike (a service input
    # and its model's feature): never between features whose unit or range differ.
    egfr = SPEC["egfr"]
    twin = dataclasses.replace(egfr, name="egfr_twin")
    narrow = dataclasses.replace(egfr, name="egfr_narrow", plausible=(1.0, 30.0))
    other_unit = dataclasses.replace(egfr, name="egfr_ml_s", unit="mL/s", plausible=(0.01, 4.0),
                                     conversions={"mL/min/{1.73_m2}": (1 / 60, 0.0)})
    resources = [obs("33914-3", 48, "mL/min/1.73m2", date="2025-02-01", id="e1")]
    chart = engine.ChartPass([[egfr, twin], [narrow, other_unit]], resources, now=NOW)
    first, second = chart.vector([egfr, twin]), chart.vector([narrow, other_unit])
    assert (first["egfr"].value, first["egfr_twin"].value) == (48.0, 48.0)
    assert second["egfr_narrow"].status != "observed"
    assert second["egfr_ml_s"].value == pytest.approx(0.8)
    assert second == extract([narrow, other_unit], resources, now=NOW)


def test_a_pass_over_spec_lists_made_afresh_each_time_reads_each_list_it_is_given():
    # Joined spec lists are remembered by the identity of the tuples read: lists given as lists
    # become new tuples each call, whose ids Python reuses once they are dropped. Each pass must
    # still read the specs it was given.
    resources = [obs("2160-0", 1.4, "mg/dL", date="2025-03-01", id="c3"),
                 obs("4548-4", 7.1, "%", date="2025-01-01", id="h1"),
                 obs("33914-3", 48, "mL/min/1.73m2", date="2025-02-01", id="e1")]
    lists = [[SPEC["egfr"], SPEC["creatinine"]], [SPEC["hba1c"], SPEC["egfr"]],
             [SPEC["creatinine"], SPEC["hba1c"]]]
    for i in range(300):
        specs = lists[i % 3]
        vector = engine.ChartPass([list(specs)], resources, now=NOW).vector(specs)
        assert vector == extract(specs, resources, now=NOW)
        assert vector.names == tuple(spec.name for spec in specs)
