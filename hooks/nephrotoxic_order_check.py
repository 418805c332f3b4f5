"""nephrotoxic-order-check (order-select and order-sign): NSAID orders with reduced eGFR.

order-select evaluates only the new `selections`; order-sign evaluates every draft order (hook
library STU1). The card suggests removing the draft order; the clinician decides inside Epic.
KDIGO 2024 CKD guideline, practice point 3.11.2 ("avoid prolonged NSAID use in CKD"):
https://kdigo.org/guidelines/ckd-evaluation-and-management/
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cds_service.cards import RESOURCE_ID, Action, Card, Coding, Source, Suggestion
from cds_service.registry import CdsService, HookRequest
from hooks._fhir import EGFR_LOINC, RXNORM, codes, latest_lab, resources_of

KDIGO_URL = "https://kdigo.org/guidelines/ckd-evaluation-and-management/"
TOPIC_SYSTEM = "https://cds.example.org/topics"
EGFR_THRESHOLD = 60

# NSAIDs by RxNorm ingredient RxCUI (https://mor.nlm.nih.gov/RxNav/).
NSAIDS = {
    "5640": "ibuprofen",
    "7258": "naproxen",
    "35827": "ketorolac",
    "3355": "diclofenac",
    "140587": "celecoxib",
    "5781": "indomethacin",
    "41493": "meloxicam",
}


def _medication_concept(order: Mapping, draft_orders: Any) -> Any:
    if order.get("medicationCodeableConcept"):
        return order["medicationCodeableConcept"]
    reference = order.get("medicationReference")
    reference = reference.get("reference") if isinstance(reference, Mapping) else None
    if not isinstance(reference, str):
        return None
    # Epic (Feb 2024+) puts referenced Medications in the draftOrders Bundle; others contain them.
    candidates = resources_of(draft_orders, "Medication") + [
        r for r in order.get("contained") or () if isinstance(r, Mapping)
    ]
    wanted = reference.lstrip("#").rsplit("/", 1)[-1]
    for medication in candidates:
        if medication.get("id") == wanted:
            return medication.get("code")
    return None


def nsaid_name(order: Mapping, draft_orders: Any) -> str | None:
    concept = _medication_concept(order, draft_orders)
    for system, code in codes(concept):
        if system == RXNORM and code in NSAIDS:
            return NSAIDS[code]
    # Product-level RxCUIs and local codes do not match ingredients; fall back to names.
    texts = [concept.get("text", "")] if isinstance(concept, Mapping) else []
    if isinstance(concept, Mapping):
        texts += [c.get("display", "") for c in concept.get("coding") or ()
                  if isinstance(c, Mapping)]
    lowered = " ".join(t for t in texts if isinstance(t, str)).lower()
    return next((name for name in NSAIDS.values() if name in lowered), None)


def orders_to_check(request: HookRequest) -> list[Mapping]:
    orders = resources_of(request.context["draftOrders"], "MedicationRequest")
    if request.hook == "order-select":
        selected = set(request.context["selections"])
        orders = [o for o in orders if f"MedicationRequest/{o.get('id')}" in selected]
    return orders


def handle(request: HookRequest) -> list[Card]:
    egfr = latest_lab(request.prefetch["egfr"] or (), EGFR_LOINC)
    if egfr is None or egfr.value >= EGFR_THRESHOLD:
        return []
    when = egfr.when.isoformat() if egfr.when else "an unknown date"
    cards = []
    for order in orders_to_check(request):
        drug = nsaid_name(order, request.context["draftOrders"])
        if drug is None:
            continue
        suggestions = ()
        # Epic's draft-order ids run far past FHIR's 64 characters (~190 in the Epic tutorial's
        # draftOrders example). An id a delete action cannot name keeps its card without the
        # suggestion instead of failing the whole request (Action.delete raises ValueError).
        if isinstance(order.get("id"), str) and RESOURCE_ID.match(
            f"MedicationRequest/{order['id']}"
        ):
            suggestions = (
                Suggestion(
                    label=f"Remove the {drug} order",
                    actions=(Action.delete(f"Remove the {drug} order.",
                                           f"MedicationRequest/{order['id']}"),),
                    is_recommended=True,
                ),
            )
        cards.append(
            Card(
                summary=f"{drug.capitalize()} ordered with eGFR {egfr.value:g} ({when}): "
                        "avoid NSAIDs in CKD",
                indicator="critical" if egfr.value < 30 else "warning",
                detail=(
                    f"The order for **{drug}** is an NSAID. Latest eGFR is "
                    f"**{egfr.value:g} mL/min/1.73 m²** ({when}). KDIGO 2024 advises avoiding "
                    "NSAIDs in CKD; consider acetaminophen for pain."
                ),
                source=Source(
                    label="KDIGO 2024 CKD guideline",
                    url=KDIGO_URL,
                    topic=Coding(code="nsaidckd", system=TOPIC_SYSTEM,
                                 display="NSAID with reduced kidney function"),
                ),
                suggestions=suggestions,
                override_reasons=(
                    Coding(code="benefit-outweighs-risk", system=TOPIC_SYSTEM,
                           display="Benefit outweighs risk"),
                    Coding(code="short-course", system=TOPIC_SYSTEM,
                           display="Short course, will monitor"),
                ),
            )
        )
    return cards


SERVICE = CdsService(
    id="nephrotoxic-order-check",
    hooks=("order-select", "order-sign"),
    title="NSAID order with reduced kidney function",
    description="Warns when an NSAID is ordered for a patient whose latest eGFR is below 60, "
                "and suggests removing the draft order.",
    handler=handle,
    prefetch={
        "egfr": "Observation?patient={{context.patientId}}"
                "&code=http://loinc.org|33914-3,http://loinc.org|62238-1,"
                "http://loinc.org|98979-8,http://loinc.org|48642-3&_sort=-date&_count=10",
    },
)
