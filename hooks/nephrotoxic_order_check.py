"""nephrotoxic-order-check (order-select, order-sign): kidney-unsafe medication orders.

Which orders: order-select evaluates only the new `selections`; order-sign evaluates every draft
order (hook library STU1); the other draft orders are context (an NSAID drafted with a diuretic
already on the list). Which medications: any RxNorm level, a site code mapping or a name
(hooks/_medications.py), by route (eye drops and gels are not systemic). Which rules: the data
in hooks/data/prescribing_rules.yaml (hooks/_prescribing.py), on the newest kidney function
(reported, or CKD-EPI 2021 from creatinine), creatinine clearance, the site model's kidney failure
risk, the active medications and the problem list. One card per order and rule topic names the
drug, the values behind the rule with their dates and the source, and suggests removing the draft
order and, where the rule names one, drafting a safer alternative. The clinician picks inside
Epic; nothing is written by us. Sources: docs/clinical.md, "Prescribing rules".
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

from cds_service.protocol.cards import (
    RESOURCE_ID,
    Action,
    Card,
    Coding,
    Source,
    Suggestion,
    draft_order,
)
from cds_service.service import CdsService, HookRequest
from hooks._kidney import (
    COMPARATOR_TEXT,
    INPUTS,
    PREFETCH,
    KidneyStatus,
    assess_request,
    creatinine_clearance,
    risk_text,
)
from hooks._medications import (
    Medication,
    active_medications,
    medication_of,
    medication_requests,
)
from hooks._prescribing import TOPIC_SYSTEM, Finding, Patient, alternatives, evaluate

# Epic's RxNorm system for creates (Epic CDS Hooks tutorial, "Creating unsigned orders").
EPIC_RXNORM = "urn:oid:2.16.840.1.113883.6.88"
# A draft order in one of these states is no longer being ordered (R4 medicationrequest-status).
_NOT_ORDERED = frozenset({"cancelled", "entered-in-error", "stopped", "completed", "revoked"})
# The site orderables this service reads (the rules' alternatives), and what the card does
# without each (`cds-service site check` warns about missing ones).
ORDERABLES = {
    name: f"'Order {name} instead' drafts RxNorm ingredient {rxcui}, not this site's "
          "preference-list item"
    for name, rxcui in alternatives().items()
}

OVERRIDE_REASONS = (
    Coding(code="benefitoutweighsrisk", system=TOPIC_SYSTEM, display="Benefit outweighs risk"),
    Coding(code="shortcourse", system=TOPIC_SYSTEM, display="Short course, will monitor"),
    Coding(code="dialysis", system=TOPIC_SYSTEM, display="Patient on dialysis"),
    Coding(code="datanotcurrent", system=TOPIC_SYSTEM, display="eGFR not current"),
)


def orders_to_check(request: HookRequest) -> list[Mapping]:
    orders = [o for o in medication_requests(request.context.get("draftOrders"))
              if o.get("status") not in _NOT_ORDERED]
    if request.hook == "order-select":
        # A selection naming no draft order (Epic sends both; a mismatch is its bug, not ours)
        # matches nothing and raises nothing.
        selected = {s for s in request.context.get("selections") or () if isinstance(s, str)}
        orders = [o for o in orders if f"MedicationRequest/{o.get('id')}" in selected]
    return orders


def _alternative(request: HookRequest, finding: Finding) -> Suggestion | None:
    if "alternative" not in finding.rule.suggest or finding.rule.alternative is None:
        return None
    name, rxcui = finding.rule.alternative
    orderable = request.site.orderables.get(name)
    concept = orderable.concept() if orderable is not None else {
        "coding": [{"system": EPIC_RXNORM, "code": rxcui, "display": name}], "text": name}
    resource = draft_order("MedicationRequest", request.context.get("patientId"),
                           medicationCodeableConcept=concept)
    return Suggestion(label=f"Order {name} instead",
                      actions=(Action.create(f"Draft an order for {name} for you to review "
                                             "and sign.", resource),))


def _remove(order: Mapping, drug: str) -> Suggestion | None:
    # Epic's draft-order ids run far past FHIR's 64 characters (~190 in the Epic tutorial's
    # draftOrders example); an id a delete action cannot name keeps the card, not the action.
    reference = f"MedicationRequest/{order.get('id')}"
    if not isinstance(order.get("id"), str) or not RESOURCE_ID.match(reference):
        return None
    return Suggestion(label=f"Remove the {drug} order", is_recommended=True,
                      actions=(Action.delete(f"Remove the {drug} order.", reference),))


def _kidney_lines(status: KidneyStatus, now: datetime) -> list[str]:
    if status.latest is None:
        return ["No eGFR or creatinine on record in the last 2 years."]
    latest = status.latest
    how = ""
    if latest.creatinine is not None:
        how = f", calculated with CKD-EPI 2021 from {status.creatinine_text()}"
        if latest.sex_basis:
            how += f" ({latest.sex_basis})"
    category = "" if status.acute else f", KDIGO {status.g[0]}"
    lines = [f"Latest eGFR **{COMPARATOR_TEXT[latest.comparator]}{latest.value:g} "
             f"mL/min/1.73 m²** ({latest.date}){category}{how}."]
    if status.last_kidney_function < (now - timedelta(days=365)).date().isoformat():
        lines.append("That result is over a year old: check kidney function (KDIGO 2024 "
                     "advises testing at least yearly in CKD).")
    if status.acute:
        lines.append(f"Kidney function is changing acutely: {status.acute}.")
    return lines


def _card(request: HookRequest, order: Mapping, medication: Medication, finding: Finding,
          status: KidneyStatus, prediction) -> Card:
    rule, drug = finding.rule, finding.drug
    facts = []
    crcl = (creatinine_clearance(status)[0]
            if {"crcl_below", "crcl_at_least"} & set(rule.when) else None)
    if crcl is not None:  # Beers states these thresholds in creatinine clearance
        facts.append(f"creatinine clearance {crcl:g} mL/min")
    elif status.latest is not None:
        facts.append(f"{status.egfr_text()} on {status.egfr_date}")
    elif rule.when.get("no_kidney_function_within_days"):
        facts.append("no kidney function on record")
    scored = prediction is not None and prediction.score is not None
    if scored and "risk_at_least" in rule.when:
        facts.append(risk_text(prediction))
    summary = f"{drug.capitalize()} ordered" + (f" with {', '.join(facts)}" if facts else "")
    summary += f": {rule.summary}"

    ordered_as = f"ordered as {medication.text}, " if medication.text else ""
    label = "" if rule.label == drug else f"{rule.label}; "
    lines = [f"**{drug.capitalize()}** ({label}{ordered_as}matched by {medication.matched_by})."]
    lines += _kidney_lines(status, request.now)
    lines += [f"{fact[0].upper()}{fact[1:]}." for fact in finding.facts]
    if scored:
        lines.append(f"{risk_text(prediction).capitalize()} (model {prediction.model_id} "
                     f"{prediction.model_version}).")
    lines.append(f"{rule.advice} ({rule.source.label}, {rule.reference}.)")
    suggestions = [s for s in (_remove(order, drug) if "remove" in rule.suggest else None,
                               _alternative(request, finding)) if s]
    return Card(
        summary=summary,
        indicator=rule.indicator,
        detail=" ".join(lines),
        source=Source(label=rule.source.label, url=rule.source.url, topic=rule.topic),
        suggestions=tuple(suggestions),
        override_reasons=OVERRIDE_REASONS,
    )


def handle(request: HookRequest) -> list[Card]:
    draft_orders = request.context.get("draftOrders")
    bundles = [draft_orders, *(v for v in request.prefetch.values() if v is not None)]
    code_map = request.site.code_map
    drafts = [(order, medication) for order in medication_requests(draft_orders)
              if order.get("status") not in _NOT_ORDERED
              and (medication := medication_of(order, bundles, code_map))]
    checked = {id(order) for order in orders_to_check(request)}
    to_check = [(order, medication) for order, medication in drafts if id(order) in checked]
    if not to_check:
        return []  # the common case: nothing kidney-relevant was ordered; no chart reading
    status, prediction = assess_request(request)
    patient = Patient(
        status=status, now=request.now,
        risk_indicator=prediction.indicator if prediction is not None else None,
        active=tuple(active_medications(request.prefetch.get("medications"), code_map)),
        drafts=tuple(medication for _, medication in drafts))
    return [_card(request, order, medication, finding, status, prediction)
            for order, medication in to_check
            for finding in evaluate(medication, patient)]


SERVICE = CdsService(
    id="nephrotoxic-order-check",
    hooks=("order-select", "order-sign"),
    title="Kidney-unsafe medication order",
    description="Warns when a medication is ordered that the patient's kidney function makes "
                "unsafe (NSAIDs, metformin, NSAID with ACE inhibitor or ARB and diuretic, "
                "Beers Criteria kidney dosing); suggests removing the draft order or a safer "
                "alternative.",
    handler=handle,
    model="kfre-4var",
    orderables=ORDERABLES,
    prefetch={
        "egfr": PREFETCH["egfr"],
        "creatinine": PREFETCH["creatinine"],
        "uacr": PREFETCH["uacr"],
        "patient": PREFETCH["patient"],
        "medications": PREFETCH["medications"],
        "conditions": PREFETCH["conditions"],
        # Weight for Cockcroft-Gault (LOINC 29463-7 Body weight, 3141-9 Body weight Measured).
        "weight": "Observation?patient={{context.patientId}}"
                  "&code=http://loinc.org|29463-7,http://loinc.org|3141-9",
    },
    optional_prefetch=frozenset({"creatinine", "uacr", "patient", "medications", "conditions",
                                 "weight"}),
    feature_groups=(INPUTS,),
)
