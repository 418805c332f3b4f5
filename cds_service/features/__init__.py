"""FHIR R4 → model features: one pure engine for the online hooks and for training.

`parse_features` validates a manifest's `features:` list into `FeatureSpec`s; `extract` turns one
patient's resources (prefetch, FHIR reads, or one `group_by_patient` group of a Bulk NDJSON
export) into a `FeatureVector` in spec order. Training and serving call the same `extract`, so a
feature means the same thing in both (train/serve parity); `now` is the prediction time, and
nothing dated after it is used, but for a few minutes of clock skew (`FUTURE_SKEW`). `readings`
gives one Observation feature's usable results one by one, oldest first, from the same pass.

Units: a result's unit is converted to the spec's canonical UCUM unit by a UCUM library
(ucumvert, on pint), parsed once per distinct unit text and cached. Annotations (`{creat}`) carry
no dimension, except that one the canonical unit names must be in the result's unit too
(`mL/min` is not `mL/min/{1.73_m2}`). Molar <-> mass needs the analyte's molar mass (spec key
`molar_mass`); a spec's own `conversions:` table is tried first. A comparator ("<15") keeps the
number and is reported as a bound (`FeatureValue.comparator`, `Reading.comparator`).

Tolerance policy: data never raises. A resource, coding, value, unit or date that is missing,
malformed or unparseable at any depth is treated as missing and skipped; the feature is computed
from what remains. When nothing usable remains the feature is missing and its policy applies:
`required` leaves it without a value (no prediction possible), `impute` substitutes the manifest's
value. Every result set aside for a reason a reader of the explanation would want to know
(status, date, unit, plausibility) and every reinterpretation (comparator bound, unit conversion,
assumed unit) is recorded in the feature's `notes`. Invalid *specifications* are not data: they
raise `FeatureSpecError` when the manifest is loaded, naming the key path.

Where things live: `specs` parses `FeatureSpec`s and code maps; `codes` normalises codings and
`units` converts units; `resources` reads Bundles, dates and values; `compiled` is the per-spec
lookup, `extraction` the engine, and `values` what it returns and how a feature's results
aggregate. The public names are all importable from `cds_service.features`.

Speed: the specs are compiled once (cached per spec tuple) into a dict from normalised
(system, code) to feature indexes, and each resource is visited once. `prepare` compiles them
ahead of any call (`load_deployment` does, in the gunicorn master).
"""

from cds_service.features.codes import (
    ICD10,
    ICD10CM,
    LOINC,
    RXNORM,
    SNOMED,
    UCUM,
    CodeMap,
    concept_codes,
)
from cds_service.features.compiled import _compiled, prepare
from cds_service.features.extraction import (
    ChartPass,
    extract,
    extract_many,
    readings,
    readings_many,
)
from cds_service.features.resources import flatten, group_by_patient
from cds_service.features.specs import (
    AGE_RANGE,
    AGGREGATIONS,
    COUNTING_AGGREGATIONS,
    DEFAULT_AGGREGATION,
    FUTURE_SKEW,
    MAX_LOOKBACK_DAYS,
    NUMERIC_AGGREGATIONS,
    PATIENT_ATTRIBUTES,
    RESOURCES,
    SLOPE_MIN_RESULTS,
    SLOPE_MIN_SPAN_DAYS,
    FeatureSpec,
    FeatureSpecError,
    MissingPolicy,
    parse_code_map,
    parse_features,
)
from cds_service.features.units import _ucum_factor
from cds_service.features.values import FeatureValue, FeatureVector, Reading, vector_from_values

__all__ = [
    "ChartPass",
    "AGE_RANGE",
    "AGGREGATIONS",
    "COUNTING_AGGREGATIONS",
    "CodeMap",
    "DEFAULT_AGGREGATION",
    "FUTURE_SKEW",
    "FeatureSpec",
    "FeatureSpecError",
    "FeatureValue",
    "FeatureVector",
    "ICD10",
    "ICD10CM",
    "LOINC",
    "MAX_LOOKBACK_DAYS",
    "MissingPolicy",
    "NUMERIC_AGGREGATIONS",
    "PATIENT_ATTRIBUTES",
    "RESOURCES",
    "RXNORM",
    "Reading",
    "SLOPE_MIN_RESULTS",
    "SLOPE_MIN_SPAN_DAYS",
    "SNOMED",
    "UCUM",
    "concept_codes",
    "extract",
    "extract_many",
    "flatten",
    "group_by_patient",
    "parse_code_map",
    "parse_features",
    "prepare",
    "readings",
    "readings_many",
    "vector_from_values",
    # Private, re-exported for the tests that inspect the caches through this package.
    "_compiled",
    "_ucum_factor",
]
