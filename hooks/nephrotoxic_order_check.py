"""nephrotoxic-order-check (order-select, order-sign): kidney-unsafe medication orders.

Which orders: order-select evaluates only the new `selections`; order-sign evaluates every draft
order (hook library STU1); the other draft orders are context. Which medications: the value sets
in hooks/data/medications.yaml (NSAIDs, metformin), by RxNorm ingredient, site code mapping or
name. When the patient's eGFR (reported, or CKD-EPI 2021 from creatinine) or the site model's
kidney failure risk meets a rule, one card per order names the drug, the eGFR with its date and
the risk, and suggests removing the draft order and, where the value set names one, drafting a
safer alternative. The clinician picks inside Epic; nothing is written by us.
Sources: docs/clinical.md, "nephrotoxic-order-check".
"""

from __future__ import annotations

from collections.abc import Mapping

from cds_service.cards import (
    RESOURCE_ID,
    Action,
    Card,
    Coding,
    Source,
    Suggestion,
    draft_order,
)
from cds_service.registry import CdsService, HookRequest
from hooks._kidney import KidneyStatus, assess_request, risk_text
from hooks._medications import (
    TOPIC_SYSTEM,
    VALUE_SETS,
    Match,
    active_matches,
    applicable_rule,
    medication_match,
    medication_requests,
)
from hooks.kidney_risk import CREATININE_CODES, EGFR_CODES, UACR_CODES

# Epic's RxNorm system for creates (Epic CDS Hooks tutorial, "Creating unsigned orders").
EPIC_RXNORM = "urn:oid:2.16.840.1.113883.6.88"
# A draft order in one of these states is no longer being ordered (R4 medicationrequest-status).
_NOT_ORDERED = frozenset({"cancelled", "entered-in-error", "stopped", "completed", "revoked"})
# The site orderables this service reads (the value sets' alternatives), and what the card does
# without each (`cds-service site check` warns about missing ones).
ORDERABLES = {
    c.alternative[0]: f"'Order {c.alternative[0]} instead' drafts RxNorm ingredient "
                      f"{c.alternative[1]}, not this site's preference-list item"
    for c in VALUE_SETS.classes if c.alternative
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


def _alternative(request: HookRequest, match: Match) -> Suggestion | None:
    if match.medication_class.alternative is None:
        return None
    name, rxcui = match.medication_class.alternative
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


def _card(request: HookRequest, order: Mapping, match: Match, rule, status: KidneyStatus,
          prediction) -> Card:
    drug = match.ingredient
    med_class = match.medication_class
    facts = []
    if status.egfr is not None:
        facts.append(f"{status.egfr_text()} on {status.egfr_date}")
    scored = prediction is not None and prediction.score is not None
    if scored:
        facts.append(risk_text(prediction))
    summary = f"{drug.capitalize()} ordered with {', '.join(facts)}: {rule.summary}"

    lines = [f"**{drug.capitalize()}** ({med_class.label}, matched by {match.matched_by})."]
    if status.egfr is not None:
        how = ""
        if status.calculated_from is not None:
            how = f", calculated with CKD-EPI 2021 from {status.creatinine_text()}"
        lines.append(f"Latest eGFR **{status.egfr:g} mL/min/1.73 m²** ({status.egfr_date}), "
                     f"KDIGO {status.g[0]}{how}.")
    if scored:
        lines.append(f"{risk_text(prediction).capitalize()} (model {prediction.model_id} "
                     f"{prediction.model_version}).")
    lines.append(rule.advice)
    suggestions = [s for s in (_remove(order, drug), _alternative(request, match)) if s]
    return Card(
        summary=summary,
        indicator=rule.indicator,
        detail=" ".join(lines),
        source=Source(label=med_class.source_label, url=med_class.source_url,
                      topic=med_class.topic),
        suggestions=tuple(suggestions),
        override_reasons=OVERRIDE_REASONS,
    )


def handle(request: HookRequest) -> list[Card]:
    draft_orders = request.context.get("draftOrders")
    bundles = [draft_orders, *(v for v in request.prefetch.values() if v is not None)]
    matches = [(order, match) for order in orders_to_check(request)
               if (match := medication_match(order, bundles, request.site.code_map))]
    if not matches:
        return []  # the common case: nothing kidney-relevant was ordered; no chart reading
    status, prediction = assess_request(request)
    risk_indicator = prediction.indicator if prediction is not None else None
    # Classes the patient already takes (an active, not draft, order): "do not start" rules
    # do not apply to them.
    taking = {m.medication_class.id for m in active_matches(request.prefetch.get("medications"),
                                                             request.site.code_map)}
    cards = []
    for order, match in matches:
        rule = applicable_rule(match.medication_class, egfr=status.egfr,
                               risk_indicator=risk_indicator,
                               already_taking=match.medication_class.id in taking)
        if rule is not None:
            cards.append(_card(request, order, match, rule, status, prediction))
    return cards


SERVICE = CdsService(
    id="nephrotoxic-order-check",
    hooks=("order-select", "order-sign"),
    title="Kidney-unsafe medication order",
    description="Warns when an NSAID or metformin is ordered for a patient whose eGFR or "
                "kidney failure risk makes it unsafe; suggests removing the draft order or a "
                "safer alternative.",
    handler=handle,
    model="kfre-4var",
    orderables=ORDERABLES,
    # No `_sort`/`_count`, as in kidney_risk.py: the newest result is picked by its date.
    prefetch={
        "egfr": "Observation?patient={{context.patientId}}&code=" + EGFR_CODES,
        "creatinine": "Observation?patient={{context.patientId}}&code=" + CREATININE_CODES,
        "uacr": "Observation?patient={{context.patientId}}&code=" + UACR_CODES,
        "patient": "Patient/{{context.patientId}}",
        "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
    },
    optional_prefetch=frozenset({"creatinine", "uacr", "patient", "medications"}),
)
