"""CDS services used only by the tests: they report what the framework handed them."""

from __future__ import annotations

from cds_service.protocol.cards import Action, Card, Source, Suggestion
from cds_service.service import CdsService, HookRequest


def _echo(request: HookRequest) -> list[Card]:
    sources = ", ".join(f"{k}={v}" for k, v in sorted(request.prefetch.sources.items()))
    orders = request.context.get("draftOrders", {}).get("entry", [])
    card = Card(
        summary=f"{request.hook} for Patient/{request.context['patientId']}",
        indicator="info",
        detail=f"prefetch: {sources or 'none'}; draft orders: {len(orders)}",
        source=Source(label="test echo"),
    )
    if request.hook == "order-select":
        first = request.context["selections"][0]
        card = Card(
            summary=card.summary,
            indicator="warning",
            detail=card.detail,
            source=card.source,
            suggestions=(Suggestion(label="Remove it",
                                    actions=(Action.delete(f"Remove {first}", first),)),),
        )
    return [card]


ECHO = CdsService(
    id="echo",
    hooks=("patient-view", "order-select", "order-sign"),
    title="Echo",
    description="Returns one card describing the request it received.",
    handler=_echo,
)


def _patient_name(request: HookRequest) -> list[Card]:
    patient = request.prefetch["patient"]
    if patient is None:
        return []
    names = patient.get("name") or [{}]
    given = " ".join(names[0].get("given") or [])
    return [Card(summary=f"Hello {given}".strip(), indicator="info",
                 source=Source(label="greeter"))]


GREETER = CdsService(
    id="greeter",
    hooks=("patient-view",),
    title="Greeter",
    description="Greets the patient by name, from the `patient` prefetch.",
    handler=_patient_name,
    prefetch={"patient": "Patient/{{context.patientId}}"},
    usage_requirements="Needs Patient read access.",
)


def _boom(request: HookRequest) -> list[Card]:
    raise RuntimeError("secret internals must not leak")


BROKEN = CdsService(
    id="broken",
    hooks=("patient-view",),
    title="Broken",
    description="Raises, to test that failures are answered with an OperationOutcome.",
    handler=_boom,
)

TEST_SERVICES = (ECHO, GREETER, BROKEN)
