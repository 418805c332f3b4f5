"""Medication value sets (hooks/data/medications.yaml) and what an order's medication is.

The data file is validated when this module is imported: a bad edit stops start-up naming the
key, it never silently disables a check. Matching tolerates every shape an Epic order arrives
in (docs/clinical.md, "Medication value sets"):

- `medicationCodeableConcept`, or `medicationReference` resolved from the draftOrders Bundle
  (Epic sends the Medication there since Feb 2024), from the order's `contained`, or from any
  Medication in the prefetch;
- RxNorm ingredient codes, or local/product codes (and Epic ERX identifiers) the site maps to
  them with `code_mappings`;
- otherwise a whole-word ingredient or brand name in the text, display or reference display;
- no medication at all (an order still being filled in): no match, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from cds_service.cards import Coding, severity
from cds_service.features import RXNORM, CodeMap, concept_codes, flatten
from cds_service.schemas import describe_errors

DATA_FILE = Path(__file__).parent / "data" / "medications.yaml"
TOPIC_SYSTEM = "https://cds.example.org/topics"
# MedicationRequest statuses of a medication the patient is on (R4 medicationrequest-status).
ACTIVE = frozenset({"active", "on-hold"})


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class _RuleSchema(_Strict):
    egfr_below = fields.Float(validate=validate.Range(min=1, max=200))
    risk_at_least = fields.String(validate=validate.OneOf(("info", "warning", "critical")))
    new_start_only = fields.Boolean(load_default=False)
    indicator = fields.String(required=True, validate=validate.OneOf(("warning", "critical")))
    summary = fields.String(required=True, validate=validate.Length(min=1, max=60))
    advice = fields.String(required=True, validate=validate.Length(min=1, max=300))

    @validates_schema
    def _one_condition(self, data: dict, **kwargs: Any) -> None:
        if ("egfr_below" in data) == ("risk_at_least" in data):
            raise ValidationError("give exactly one of egfr_below and risk_at_least")


class _ClassSchema(_Strict):
    label = fields.String(required=True)
    topic = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    source = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    rules = fields.List(fields.Nested(_RuleSchema), required=True,
                        validate=validate.Length(min=1))
    alternative = fields.Dict(keys=fields.String(), values=fields.String())
    ingredients = fields.Dict(
        keys=fields.String(validate=validate.Regexp(r"^[0-9]{1,10}$", error="an RxCUI")),
        values=fields.Dict(), required=True, validate=validate.Length(min=1))


class _FileSchema(_Strict):
    classes = fields.Dict(keys=fields.String(validate=validate.Regexp(r"^[a-z][a-z0-9-]*$")),
                          values=fields.Nested(_ClassSchema), required=True)


@dataclass(frozen=True)
class Rule:
    indicator: str
    summary: str
    advice: str
    egfr_below: float | None = None
    risk_at_least: str | None = None
    new_start_only: bool = False


@dataclass(frozen=True)
class MedicationClass:
    id: str
    label: str
    topic: Coding
    source_label: str
    source_url: str
    rules: tuple[Rule, ...]
    ingredients: Mapping[str, str]            # RxCUI → ingredient name
    alternative: tuple[str, str] | None      # (name, RxNorm ingredient RxCUI)


@dataclass(frozen=True)
class Match:
    medication_class: MedicationClass
    ingredient: str
    matched_by: str  # "RxNorm 5640", "site code mapping", "name"


@dataclass(frozen=True)
class ValueSets:
    classes: tuple[MedicationClass, ...]
    by_rxcui: Mapping[str, tuple[MedicationClass, str]]   # RxCUI → (class, ingredient)
    by_name: Mapping[str, tuple[MedicationClass, str]]    # lower-case name → (class, ingredient)
    names: re.Pattern[str]


def load_value_sets(path: Path = DATA_FILE) -> ValueSets:
    """The value sets of `path`; raises ValueError naming the file and key at fault."""
    try:
        data = _FileSchema().load(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        raise ValueError(f"{path}: {describe_errors(exc)}") from exc
    classes = []
    by_code: dict[str, tuple[MedicationClass, str]] = {}
    names: dict[str, tuple[MedicationClass, str]] = {}
    for class_id, raw in data["classes"].items():
        ingredients = {rxcui: str(entry["name"]) for rxcui, entry in raw["ingredients"].items()}
        alternative = raw.get("alternative")
        med_class = MedicationClass(
            id=class_id, label=raw["label"],
            topic=Coding(code=raw["topic"]["code"], system=TOPIC_SYSTEM,
                         display=raw["topic"]["display"]),
            source_label=raw["source"]["label"], source_url=raw["source"]["url"],
            rules=tuple(Rule(**rule) for rule in raw["rules"]),
            ingredients=ingredients,
            alternative=(alternative["name"], alternative["rxnorm"]) if alternative else None)
        classes.append(med_class)
        for rxcui, entry in raw["ingredients"].items():
            if rxcui in by_code:
                raise ValueError(f"{path}: classes.{class_id}.ingredients.{rxcui}: also listed "
                                 f"under {by_code[rxcui][0].id}")
            by_code[rxcui] = (med_class, entry["name"])
            for name in (entry["name"], *entry.get("other_names", ())):
                names[str(name).lower()] = (med_class, entry["name"])
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
                         + r")\b", re.IGNORECASE)
    return ValueSets(tuple(classes), by_code, names, pattern)


VALUE_SETS = load_value_sets()


def _texts(*concepts: Any) -> str:
    parts = []
    for concept in concepts:
        if not isinstance(concept, Mapping):
            continue
        parts += [concept.get("text"), concept.get("display")]
        parts += [c.get("display") for c in concept.get("coding") or () if isinstance(c, Mapping)]
    return " ".join(p for p in parts if isinstance(p, str))[:2000]


def identify(concept: Any, code_map: CodeMap | None = None, *, identifiers: Any = None,
             display: Any = None) -> Match | None:
    """The value-set entry a medication belongs to, by code first and name second."""
    direct = concept_codes(concept)
    for system, code in sorted(concept_codes(concept, code_map, identifiers)):
        if system == RXNORM and code in VALUE_SETS.by_rxcui:
            med_class, name = VALUE_SETS.by_rxcui[code]
            how = f"RxNorm {code}" if (system, code) in direct else "site code mapping"
            return Match(med_class, name, how)
    found = VALUE_SETS.names.search(_texts(concept, {"display": display}))
    if found:
        med_class, name = VALUE_SETS.by_name[found.group(1).lower()]
        return Match(med_class, name, "name")
    return None


def resolve_medication(order: Mapping, bundles: Iterable[Any]) -> tuple[Any, Any, Any]:
    """(CodeableConcept, identifiers, reference display) of a MedicationRequest's medication."""
    concept = order.get("medicationCodeableConcept")
    reference = order.get("medicationReference")
    if not isinstance(reference, Mapping):
        return concept, None, None
    display = reference.get("display")
    target = reference.get("reference")
    if not isinstance(target, str) or not target:
        return concept, None, display
    if target.startswith("#"):
        contained = order.get("contained")
        candidates: Iterable[Any] = contained if isinstance(contained, list) else ()
    else:
        candidates = flatten(bundles)
    wanted = target.lstrip("#").rsplit("/", 1)[-1]
    for resource in candidates:
        if (isinstance(resource, Mapping) and resource.get("resourceType") == "Medication"
                and resource.get("id") == wanted):
            return resource.get("code"), resource.get("identifier"), display
    return concept, None, display


def medication_match(order: Mapping, bundles: Iterable[Any],
                     code_map: CodeMap | None = None) -> Match | None:
    concept, identifiers, display = resolve_medication(order, bundles)
    return identify(concept, code_map, identifiers=identifiers, display=display)


def applicable_rule(med_class: MedicationClass, *, egfr: float | None,
                    risk_indicator: str | None, already_taking: bool) -> Rule | None:
    """The first of the class's rules that holds for this patient, or None."""
    for rule in med_class.rules:
        if rule.new_start_only and already_taking:
            continue
        if rule.egfr_below is not None and egfr is not None and egfr < rule.egfr_below:
            return rule
        if (rule.risk_at_least is not None and risk_indicator is not None
                and severity(risk_indicator) >= severity(rule.risk_at_least)):
            return rule
    return None


def medication_requests(value: Any, statuses: frozenset[str] | None = None) -> list[Mapping]:
    """MedicationRequests in a prefetch value (a resolved searchset is a list of resources) or a
    Bundle such as draftOrders; `statuses` keeps only those (a missing status counts as kept)."""
    return [r for r in flatten([value]) if r.get("resourceType") == "MedicationRequest"
            and (statuses is None or r.get("status") in statuses or r.get("status") is None)]


def active_matches(medications: Any, code_map: CodeMap | None = None) -> list[Match]:
    """Value-set matches among a patient's active (not draft) MedicationRequests."""
    matches = (medication_match(order, [medications], code_map)
               for order in medication_requests(medications, ACTIVE))
    return [match for match in matches if match is not None]
