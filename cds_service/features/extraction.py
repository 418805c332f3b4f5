"""The extraction engine: specs compiled once into a (system, code) lookup, each resource
visited once: `extract`, `extract_many`, `readings`, `readings_many`, and `ChartPass` (several
spec lists from one pass, which resources computed from its first vectors can join later).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from cds_service.features.codes import _MAPPING, CodeMap, _coding_key
from cds_service.features.compiled import _Compiled, _compiled, _Lookup
from cds_service.features.resources import (
    _absent_reason,
    _as_utc,
    _concept_codes,
    _has_value,
    _instant,
    _numeric_value,
    _observation_date,
    _resource_id,
    _value_key,
    flatten,
)
from cds_service.features.specs import FUTURE_SKEW, NUMERIC_AGGREGATIONS, FeatureSpec
from cds_service.features.values import (
    FeatureVector,
    Reading,
    _Acc,
    _count_feature,
    _numeric_feature,
    _ordered,
    _patient_feature,
)

# R4 ObservationStatus: entered-in-error never existed, cancelled was never performed.
_OBS_EXCLUDED_STATUS = frozenset({"entered-in-error", "cancelled"})
# R4 condition-ver-status / condition-clinical (CodeableConcept; the code is in coding[].code).
_COND_EXCLUDED_VERIFICATION = frozenset({"entered-in-error", "refuted"})
_COND_NOT_COUNTED_CLINICAL = frozenset({"inactive", "resolved"})


def extract(specs: Sequence[FeatureSpec], resources: Iterable[Any], *, now: datetime,
            code_map: CodeMap | None = None) -> FeatureVector:
    """The feature vector of one patient's resources at `now` (see the module docstring)."""
    compiled = _compiled(tuple(specs))
    now = _as_utc(now)
    collector = _Collector(compiled, now, code_map)
    collector.feed(resources)
    return _vector(compiled, range(len(compiled.features)), collector.accs, collector.patient,
                   now)


class ChartPass:
    """One pass over a chart for several spec lists at once: a hook's own inputs and its active
    model's features, so a 1,000-result chart is read once, not once per list. Resources the
    hook computes from the first vector (an eGFR from creatinine, which the model reads too)
    join the same pass with `extend`.

    `vector(specs)` is exactly `extract(specs, every resource given so far)`, and
    `readings(specs, reading_specs)` exactly `readings_many`, for `specs` one of the groups;
    any other spec list gets a pass of its own over the same resources (a shadow model's, which
    stays out of the shared pass so that nothing in it can touch the active answer)."""

    def __init__(self, groups: Iterable[Sequence[FeatureSpec]], resources: Iterable[Any], *,
                 now: datetime, code_map: CodeMap | None = None):
        self.now = _as_utc(now)
        self.code_map = code_map
        self._groups, self._compiled = _joined(tuple(tuple(group) for group in groups))
        self._resources: list[Any] = []
        self._collector = _Collector(self._compiled, self.now, code_map)
        self.extend(resources)

    @property
    def resources(self) -> list[Any]:
        """Every resource given so far, in order."""
        return self._resources

    def extend(self, resources: Iterable[Any]) -> None:
        """Add resources to the pass, as if they had come after those given before."""
        resources = list(resources)
        self._resources += resources
        self._collector.feed(resources)

    def _start(self, specs: tuple[FeatureSpec, ...]) -> int | None:
        return _start(self._groups, specs)

    def serves(self, now: datetime, code_map: CodeMap | None) -> bool:
        """Whether this pass reads the chart as `extract(now=now, code_map=code_map)` would."""
        return _as_utc(now) == self.now and code_map is self.code_map

    def vector(self, specs: Sequence[FeatureSpec]) -> FeatureVector:
        specs = tuple(specs)
        start = self._start(specs)
        if start is None:
            return extract(specs, self._resources, now=self.now, code_map=self.code_map)
        end = start + len(specs)
        return _vector(self._compiled, range(start, end), self._collector.accs,
                       self._collector.patient, self.now)

    def readings(self, specs: Sequence[FeatureSpec],
                 reading_specs: Sequence[FeatureSpec]) -> tuple[list[Reading], ...]:
        """`readings_many(reading_specs)`; each of `reading_specs` must be one of `specs`."""
        specs = tuple(specs)
        indexes = [specs.index(spec) for spec in reading_specs]  # ValueError: not one of specs
        for spec in reading_specs:
            _check_reading_spec(spec)
        start = self._start(specs)
        if start is None:
            return readings_many(reading_specs, self._resources, now=self.now,
                                 code_map=self.code_map)
        return tuple(_readings(self._compiled, self._collector.accs[start + i], start + i,
                               self.code_map) for i in indexes)


def _start(groups: Sequence[tuple[tuple[FeatureSpec, ...], int]],
           specs: tuple[FeatureSpec, ...]) -> int | None:
    # A list, not a dict: a hand-built spec may hold something unhashable (see _compiled).
    return next((start for group, start in groups if group == specs), None)


# Spec lists joined for a pass, by the identity of the lists given: a hook passes the same
# tuples on every call (its inputs, its model's features), and hashing every spec again to find
# the compiled form cost more than a small chart's results. Each entry holds the tuples it is
# keyed by, so their ids stay theirs.
_JOINED: dict[tuple[int, ...], tuple[tuple, list, _Compiled]] = {}
_JOINED_MAX = 256


def _joined(groups: tuple[tuple[FeatureSpec, ...], ...]
            ) -> tuple[list[tuple[tuple[FeatureSpec, ...], int]], _Compiled]:
    """(each distinct group with its first index in the joined list, the joined list compiled)."""
    key = tuple(map(id, groups))
    found = _JOINED.get(key)
    if found is not None:
        return found[1], found[2]
    starts: list[tuple[tuple[FeatureSpec, ...], int]] = []  # (specs, first index)
    joined: list[FeatureSpec] = []
    for group in groups:
        if _start(starts, group) is None:
            starts.append((group, len(joined)))
            joined += group
    joined_specs = tuple(joined)
    compiled = _compiled(joined_specs)
    try:
        hash(joined_specs)
    except TypeError:  # compiled afresh each time (see _compiled): so is this
        return starts, compiled
    if len(_JOINED) >= _JOINED_MAX:
        _JOINED.clear()
    _JOINED[key] = (groups, starts, compiled)
    return starts, compiled


def _vector(compiled: _Compiled, indexes: range, accs: Sequence[_Acc],
            patient: Mapping | None, now: datetime) -> FeatureVector:
    values = []
    untouched = compiled.untouched
    for index in indexes:
        feature, acc = compiled.features[index], accs[index]
        if feature.kind == "patient":
            values.append(_patient_feature(feature, patient, now))
            continue
        if not (acc.items or acc.counts or acc.texts):
            # Nothing in the chart reached this feature: its value is the spec's alone.
            value = untouched.get(index)
            if value is None:
                value = untouched[index] = (_count_feature if feature.kind == "count"
                                            else _numeric_feature)(feature, acc)
        elif feature.kind == "count":
            value = _count_feature(feature, acc)
        else:
            value = _numeric_feature(feature, acc)
        values.append(value)
    return FeatureVector(tuple(values))


def readings(spec: FeatureSpec, resources: Iterable[Any], *, now: datetime,
             code_map: CodeMap | None = None) -> list[Reading]:
    """Every usable result of one numeric Observation feature, oldest first: the results
    `extract` aggregates, after the same exclusions (status, date and window, unit,
    plausibility) and the same de-duplication. Raises ValueError for other kinds of spec."""
    return readings_many((spec,), resources, now=now, code_map=code_map)[0]


def readings_many(specs: Sequence[FeatureSpec], resources: Iterable[Any], *, now: datetime,
                  code_map: CodeMap | None = None) -> tuple[list[Reading], ...]:
    """`readings` of several features from a single pass over the resources."""
    for spec in specs:
        _check_reading_spec(spec)
    compiled = _compiled(tuple(specs))
    collector = _Collector(compiled, _as_utc(now), code_map)
    collector.feed(resources)
    return tuple(_readings(compiled, acc, index, code_map)
                 for index, acc in enumerate(collector.accs))


def _check_reading_spec(spec: FeatureSpec) -> None:
    if spec.resource != "Observation" or spec.aggregation not in NUMERIC_AGGREGATIONS:
        raise ValueError(f"readings needs a numeric Observation feature; {spec.name!r} is "
                         f"{spec.resource} {spec.aggregation}")


def _readings(compiled: _Compiled, acc: _Acc, index: int,
              code_map: CodeMap | None) -> list[Reading]:
    code = _ByCodings(lambda concept: _matched_code(concept, compiled.observation, code_map,
                                                    index))
    return [Reading(instant, day, value, comparator, f"Observation/{rid}" if rid else None,
                    code(element.get("code")), notes)
            for instant, value, rid, day, notes, comparator, element
            in _ordered(acc.items.values())]


def _matched_code(concept: Any, lookup: _Lookup, code_map: Mapping | None,
                  index: int) -> str | None:
    """The first coding of a concept (or its code-map target) that feature `index` matches."""
    codings = concept.get("coding") if isinstance(concept, _MAPPING) else None
    for coding in codings if isinstance(codings, list) else ():
        if not isinstance(coding, _MAPPING):
            continue
        key = _coding_key(coding.get("system"), coding.get("code"))
        if key is None:
            continue
        for candidate in (key, *((code_map or {}).get(key) or ())):
            hits: set[int] = set()
            if isinstance(candidate, tuple) and len(candidate) == 2:
                lookup._add(candidate, hits)
            if index in hits:
                return f"{candidate[0]}|{candidate[1]}"
    return None


_UNSEEN = object()


class _ByCodings:
    """`compute(concept)` remembered for one pass by the concept's (system, code) pairs, all it
    reads of a concept: a chart's results of one test carry the same few codings, a 1,000-result
    chart a few dozen distinct ones."""

    __slots__ = ("compute", "memo")

    def __init__(self, compute: Callable[[Any], Any]):
        self.compute = compute
        self.memo: dict[tuple, Any] = {}

    def __call__(self, concept: Any) -> Any:
        codings = concept.get("coding") if isinstance(concept, _MAPPING) else None
        try:
            # The usual shapes, spelled out (a generator costs more than the lookup it keys): one
            # coding, or two as Epic sends a result (its own component id beside the LOINC).
            count = len(codings) if type(codings) is list else 0
            if count == 1:
                key = ((codings[0].get("system"), codings[0].get("code")),)
            elif count == 2:
                first, second = codings
                key = ((first.get("system"), first.get("code")),
                       (second.get("system"), second.get("code")))
            else:
                key = tuple((c.get("system"), c.get("code")) for c in codings)
            found = self.memo.get(key, _UNSEEN)
        except (TypeError, AttributeError):  # not a list of codings, or unhashable parts
            return self.compute(concept)
        if found is _UNSEEN:
            found = self.memo[key] = self.compute(concept)
        return found


def _matcher(lookup: _Lookup, code_map: CodeMap | None) -> _ByCodings:
    """`lookup.match(concept, code_map)`, remembered for the pass."""
    return _ByCodings(lambda concept: frozenset(lookup.match(concept, code_map)))


class _Collector:
    """The single pass over the resources: what each feature collected, and the Patient. More
    resources can be fed later; a resource seen before (same type and id) is skipped."""

    def __init__(self, compiled: _Compiled, now: datetime, code_map: CodeMap | None):
        self.compiled, self.now, self.code_map = compiled, now, code_map
        self.accs = [_Acc() for _ in compiled.features]
        self.starts: list[datetime | None] = []
        for feature in compiled.features:
            days = feature.spec.lookback_days
            try:
                self.starts.append(now - timedelta(days=days) if days else None)
            except (OverflowError, TypeError):
                self.starts.append(None)
        self.patient: Mapping | None = None
        self.seen: set[tuple[str, str]] = set()
        self.match_observation = _matcher(compiled.observation, code_map)
        self.match_condition = _matcher(compiled.condition, code_map)

    def feed(self, resources: Iterable[Any]) -> None:
        compiled, accs, starts, now = self.compiled, self.accs, self.starts, self.now
        wants_observations = bool(compiled.observation.exact or compiled.observation.prefixes)
        wants_conditions = bool(compiled.condition.exact or compiled.condition.prefixes)
        seen = self.seen
        for resource in flatten(resources):
            rtype = resource.get("resourceType")
            if rtype == "Observation":
                if not wants_observations:
                    continue
            elif rtype == "Condition":
                if not wants_conditions:
                    continue
            elif rtype != "Patient" or self.patient is not None:
                continue
            rid = _resource_id(resource)
            if rid is not None:
                if (rtype, rid) in seen:
                    continue  # the same resource twice (paged searches overlap, prefetch + read)
                seen.add((rtype, rid))
            if rtype == "Observation":
                _observation(resource, rid, compiled, accs, starts, now, self.match_observation)
            elif rtype == "Condition":
                _condition(resource, rid, compiled, accs, starts, now, self.match_condition)
            else:
                self.patient = resource


def extract_many(groups: Sequence[Sequence[FeatureSpec]], resources: Iterable[Any], *,
                 now: datetime, code_map: CodeMap | None = None) -> tuple[FeatureVector, ...]:
    """One vector per spec list, from a single pass over the resources (a service's own inputs
    and its model's features: a 1,000-result prefetch is read once, not once per list)."""
    joined = extract([spec for group in groups for spec in group], resources, now=now,
                     code_map=code_map)
    vectors, start = [], 0
    for group in groups:
        vectors.append(FeatureVector(joined.values[start:start + len(group)]))
        start += len(group)
    return tuple(vectors)


def _observation(obs: Mapping, rid: str | None, compiled: _Compiled, accs: list[_Acc],
                 starts: list[datetime | None], now: datetime, match: _ByCodings) -> None:
    targets: dict[int, Mapping] = {}
    components = obs.get("component")
    if isinstance(components, list):
        # A panel (e.g. blood pressure 85354-9) carries its values in components: a feature
        # matching a component's code reads that component; the first matching one wins.
        for component in reversed(components):
            if isinstance(component, _MAPPING):
                for index in match(component.get("code")):
                    targets[index] = component
    for index in match(obs.get("code")):
        targets[index] = obs
    if not targets:
        return
    status = obs.get("status")
    if isinstance(status, str) and status in _OBS_EXCLUDED_STATUS:
        for index in targets:
            accs[index].counts[f"status:{status}"] += 1
        return
    when = _observation_date(obs)
    numeric: dict[tuple[int, Any], Any] = {}  # (element, feature.value_key) -> _numeric_value
    for index, element in targets.items():
        acc, feature, start = accs[index], compiled.features[index], starts[index]
        if when is None:
            acc.counts["undated"] += 1
            continue
        instant, day = when
        if instant > now + FUTURE_SKEW:
            acc.counts["future"] += 1
            continue
        if start is not None and instant < start:
            acc.counts["old"] += 1
            continue
        if feature.kind == "numeric":
            key = (id(element), feature.value_key)
            result = numeric.get(key) if feature.value_key is not None else None
            if result is None:
                result = numeric[key] = _numeric_value(element, feature)
            if isinstance(result, str):
                acc.texts[result] += 1
                continue
            value, notes, comparator = result
            acc.add((instant, value), (instant, value, rid, day, notes, comparator, element))
        else:
            if (reason := _absent_reason(element)) is not None:
                acc.texts[f"no value (dataAbsentReason {reason})"] += 1
                continue
            if not _has_value(element, element is obs):
                acc.texts["no value"] += 1
                continue
            acc.add((instant, _value_key(element)), (instant, None, rid, day, ()))


def _condition(cond: Mapping, rid: str | None, compiled: _Compiled, accs: list[_Acc],
               starts: list[datetime | None], now: datetime, match: _ByCodings) -> None:
    hits = match(cond.get("code"))
    if not hits:
        return
    excluded = sorted(_concept_codes(cond.get("verificationStatus"))
                      & _COND_EXCLUDED_VERIFICATION)
    not_counted = sorted(_concept_codes(cond.get("clinicalStatus")) & _COND_NOT_COUNTED_CLINICAL)
    period = cond.get("onsetPeriod")
    onset = _instant(cond.get("onsetDateTime"))
    if onset is None and isinstance(period, _MAPPING):
        onset = _instant(period.get("start")) or _instant(period.get("end"))
    recorded = _instant(cond.get("recordedDate"))
    when = onset or recorded
    # Recorded after `now` was not known at `now` (training leakage); onset after it is an error.
    future = any(w is not None and w[0] > now + FUTURE_SKEW for w in (onset, recorded))
    for index in hits:
        acc, start = accs[index], starts[index]
        if excluded:
            acc.counts[f"status:{excluded[0]}"] += 1
        elif not_counted:
            acc.counts[f"clinical:{not_counted[0]}"] += 1
        elif future:
            acc.counts["future"] += 1
        elif start is not None and when is None:
            acc.counts["undated"] += 1
        elif start is not None and when[0] < start:
            acc.counts["old"] += 1
        else:
            # Distinct Conditions each count (duplicates by id were dropped before).
            acc.add(("condition", len(acc.items)),
                    (when[0] if when else None, None, rid, when[1] if when else None, ()))
