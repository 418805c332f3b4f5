"""Kidney-aware prescribing rules (hooks/data/prescribing_rules.yaml) and their evaluation.

A rule is data: the drugs (groups or ingredients), the routes, the conditions on the patient,
the advice, the suggestions and the citation. The file is validated when this module is
imported: a bad edit stops start-up naming the key, it never silently disables a check.

Evaluation (docs/clinical.md, "Prescribing rules"): for each ordered medication, rules are
checked in file order; per card topic, the first rule whose drugs, route and every `when`
condition hold gives one card.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from cds_service.protocol.cards import Coding, severity
from cds_service.schema_errors import describe_errors
from hooks._kidney import KidneyStatus, at_least, creatinine_clearance
from hooks._medications import TERMINOLOGY, Medication

DATA_FILE = Path(__file__).parent / "data" / "prescribing_rules.yaml"
TOPIC_SYSTEM = "https://cds.example.org/topics"
INDICATORS = ("info", "warning", "critical")


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class _When(_Strict):
    egfr_below = fields.Float(validate=validate.Range(min=1, max=200))
    egfr_at_least = fields.Float(validate=validate.Range(min=0, max=200))
    crcl_below = fields.Float(validate=validate.Range(min=1, max=200))
    crcl_at_least = fields.Float(validate=validate.Range(min=0, max=200))
    risk_at_least = fields.String(validate=validate.OneOf(INDICATORS))
    new_start_only = fields.Boolean()
    also_taking = fields.List(fields.List(fields.String(), validate=validate.Length(min=1)),
                              validate=validate.Length(min=1))
    ckd_on_problem_list = fields.Boolean()
    no_kidney_function_within_days = fields.Integer(validate=validate.Range(min=1, max=3650))
    age_at_least = fields.Integer(validate=validate.Range(min=0, max=130))
    acute_kidney_injury = fields.Boolean()


class _Rule(_Strict):
    id = fields.String(required=True, validate=validate.Regexp(r"^[a-z0-9][a-z0-9-]*$"))
    drugs = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    routes = fields.String(load_default="systemic", validate=validate.OneOf(("systemic", "any")))
    when = fields.Nested(_When, required=True)
    indicator = fields.String(required=True, validate=validate.OneOf(INDICATORS))
    topic = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    summary = fields.String(required=True, validate=validate.Length(min=1, max=60))
    advice = fields.String(required=True, validate=validate.Length(min=1, max=400))
    suggest = fields.List(fields.String(validate=validate.OneOf(("remove", "alternative"))),
                          load_default=list)
    alternative = fields.String()
    source = fields.String(required=True)
    reference = fields.String(required=True, validate=validate.Length(min=1))


class _Source(_Strict):
    label = fields.String(required=True)
    url = fields.Url(required=True)
    citation = fields.String(required=True)


class _Group(_Strict):
    label = fields.String(required=True)
    ingredients = fields.List(fields.String(), required=True, validate=validate.Length(min=1))


class _File(_Strict):
    sources = fields.Dict(keys=fields.String(), values=fields.Nested(_Source), required=True)
    groups = fields.Dict(keys=fields.String(), values=fields.Nested(_Group), required=True)
    rules = fields.List(fields.Nested(_Rule), required=True, validate=validate.Length(min=1))


@dataclass(frozen=True)
class Source:
    label: str
    url: str
    citation: str


@dataclass(frozen=True)
class Rule:
    id: str
    ingredients: frozenset[str]
    label: str                    # how the card names the drug class ("NSAID")
    systemic_only: bool
    when: Mapping[str, Any]
    also_taking: tuple[tuple[str, frozenset[str]], ...]   # (label, ingredients) per inner list
    indicator: str
    topic: Coding
    summary: str
    advice: str
    suggest: tuple[str, ...]
    alternative: tuple[str, str] | None        # (name, RxNorm ingredient RxCUI)
    source: Source
    reference: str


def _ingredients(names: Iterable[str], groups: Mapping[str, Any], path: str) -> frozenset[str]:
    out: set[str] = set()
    for name in names:
        if name in groups:
            out |= _ingredients(groups[name]["ingredients"], {}, f"{path}.{name}")
        elif name in TERMINOLOGY.rxcui:
            out.add(name)
        else:
            raise ValueError(f"{path}: {name!r} is neither a group nor an RxNorm ingredient of "
                             "hooks/data/rxnorm.json")
    return frozenset(out)


def load_rules(path: Path = DATA_FILE) -> tuple[Rule, ...]:
    """The rules of `path`; raises ValueError naming the file and key at fault."""
    try:
        data = _File().load(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        raise ValueError(f"{path}: {describe_errors(exc)}") from exc
    groups = data["groups"]
    for name, group in groups.items():
        _ingredients(group["ingredients"], {}, f"{path}: groups.{name}")
    rules, seen = [], set()
    for index, raw in enumerate(data["rules"]):
        where = f"{path}: rules[{index}]"
        if raw["id"] in seen:
            raise ValueError(f"{where}.id: {raw['id']!r} is used twice")
        seen.add(raw["id"])
        if raw["source"] not in data["sources"]:
            raise ValueError(f"{where}.source: {raw['source']!r} is not in sources")
        alternative = raw.get("alternative")
        if ("alternative" in raw["suggest"]) != (alternative is not None):
            raise ValueError(f"{where}: suggest 'alternative' and the alternative key go together")
        if alternative is not None and alternative not in TERMINOLOGY.rxcui:
            raise ValueError(f"{where}.alternative: {alternative!r} is not an RxNorm ingredient "
                             "of hooks/data/rxnorm.json")
        topic = raw["topic"]
        if set(topic) != {"code", "display"} or not topic["code"].isalnum():
            raise ValueError(f"{where}.topic: needs an alphanumeric code and a display")
        when = dict(raw["when"])
        also = tuple(
            (" or ".join(groups[g]["label"] if g in groups else g for g in names),
             _ingredients(names, groups, f"{where}.when.also_taking"))
            for names in when.pop("also_taking", ()))
        first = raw["drugs"][0]
        rules.append(Rule(
            id=raw["id"], ingredients=_ingredients(raw["drugs"], groups, f"{where}.drugs"),
            label=groups[first]["label"] if first in groups else first,
            systemic_only=raw["routes"] == "systemic", when=when, also_taking=also,
            indicator=raw["indicator"],
            topic=Coding(code=topic["code"], system=TOPIC_SYSTEM, display=topic["display"]),
            summary=raw["summary"], advice=raw["advice"], suggest=tuple(raw["suggest"]),
            alternative=(alternative, TERMINOLOGY.rxcui[alternative]) if alternative else None,
            source=Source(**data["sources"][raw["source"]]), reference=raw["reference"]))
    return tuple(rules)


RULES = load_rules()


@dataclass(frozen=True)
class Patient:
    """What the rules read about the patient, computed once per request."""

    status: KidneyStatus
    now: datetime
    risk_indicator: str | None = None
    active: tuple[Medication, ...] = ()      # active MedicationRequests
    drafts: tuple[Medication, ...] = ()      # every draft order of this request

    def crcl(self) -> tuple[float | None, str]:
        return creatinine_clearance(self.status)


@dataclass(frozen=True)
class Finding:
    """A rule that holds for an ordered medication, with what made it hold."""

    rule: Rule
    drug: str                     # the ingredient the rule is about
    facts: tuple[str, ...]        # "creatinine clearance 24 mL/min (Cockcroft-Gault …)"


def _crcl_holds(patient: Patient, limit: float, below: bool, facts: list[str]) -> bool:
    value, how = patient.crcl()
    if value is not None:
        facts.append(f"creatinine clearance {value:g} mL/min ({how})")
        return value < limit if below else value >= limit
    latest = patient.status.latest
    if latest is None:
        return False
    facts.append(f"creatinine clearance not calculated ({how}): eGFR used instead")
    return (patient.status.egfr_below(limit) if below
            else at_least(latest.value, latest.comparator, limit))


def _holds(rule: Rule, medication: Medication, patient: Patient, facts: list[str]) -> bool:
    status, when = patient.status, rule.when
    if "egfr_below" in when and not status.egfr_below(when["egfr_below"]):
        return False
    if "egfr_at_least" in when and not (
            status.latest and at_least(status.latest.value, status.latest.comparator,
                                       when["egfr_at_least"])):
        return False
    if "age_at_least" in when and not (status.age is not None
                                       and status.age >= when["age_at_least"]):
        return False
    if "risk_at_least" in when and not (
            patient.risk_indicator is not None
            and severity(patient.risk_indicator) >= severity(when["risk_at_least"])):
        return False
    if when.get("new_start_only") and any(m.ingredients & rule.ingredients
                                          for m in patient.active):
        return False
    if when.get("ckd_on_problem_list") and "ckd" not in status.conditions:
        return False
    if when.get("acute_kidney_injury") and not status.acute:
        return False
    if "no_kidney_function_within_days" in when and status.last_kidney_function is not None:
        limit = (patient.now - timedelta(days=when["no_kidney_function_within_days"]))
        if status.last_kidney_function >= limit.date().isoformat():
            return False
    for label, ingredients in rule.also_taking:
        others = [m for m in (*patient.active, *patient.drafts)
                  if m is not medication and m.ingredients & ingredients]
        if not others:
            return False
        facts.append(f"with {label}: {', '.join(sorted(others[0].ingredients & ingredients))}")
    if "crcl_below" in when and not _crcl_holds(patient, when["crcl_below"], True, facts):
        return False
    return not ("crcl_at_least" in when
                and not _crcl_holds(patient, when["crcl_at_least"], False, facts))


def evaluate(medication: Medication, patient: Patient,
             rules: Iterable[Rule] = RULES) -> list[Finding]:
    """The first rule per topic that holds for this medication, in file order."""
    findings: dict[str, Finding] = {}
    for rule in rules:
        if rule.topic.code in findings:
            continue
        drugs = medication.ingredients & rule.ingredients
        if not drugs or (rule.systemic_only and not medication.systemic):
            continue
        facts: list[str] = []
        if _holds(rule, medication, patient, facts):
            findings[rule.topic.code] = Finding(rule, sorted(drugs)[0], tuple(facts))
    return list(findings.values())


def alternatives() -> dict[str, str]:
    """Alternative name → RxNorm ingredient RxCUI, over every rule."""
    return {r.alternative[0]: r.alternative[1] for r in RULES if r.alternative}
