"""kidney-risk (patient-view): flag reduced kidney function when a chart opens.

Rule-based for now: the latest eGFR and its KDIGO G category. Quiet (no card) when there is no
eGFR or it is ≥ 60, i.e. no CKD by eGFR alone.
KDIGO 2024 CKD guideline: https://kdigo.org/guidelines/ckd-evaluation-and-management/
"""

from __future__ import annotations

from cds_service.cards import Card, Coding, Link, Source
from cds_service.registry import CdsService, HookRequest
from hooks._fhir import EGFR_LOINC, latest_lab

KDIGO_URL = "https://kdigo.org/guidelines/ckd-evaluation-and-management/"
TOPIC_SYSTEM = "https://cds.example.org/topics"

# KDIGO GFR categories (mL/min/1.73 m²): lower bound → (category, description, indicator).
G_CATEGORIES = (
    (90, "G1", "normal or high", None),
    (60, "G2", "mildly decreased", None),
    (45, "G3a", "mildly to moderately decreased", "info"),
    (30, "G3b", "moderately to severely decreased", "warning"),
    (15, "G4", "severely decreased", "warning"),
    (0, "G5", "kidney failure", "critical"),
)


def g_category(egfr: float) -> tuple[str, str, str | None]:
    for lower, category, text, indicator in G_CATEGORIES:
        if egfr >= lower:
            return category, text, indicator
    return G_CATEGORIES[-1][1:]


def handle(request: HookRequest) -> list[Card]:
    egfr = latest_lab(request.prefetch["egfr"] or (), EGFR_LOINC)
    if egfr is None:
        return []
    category, text, indicator = g_category(egfr.value)
    if indicator is None:
        return []
    when = egfr.when.isoformat() if egfr.when else "an unknown date"
    detail = (
        f"Latest eGFR **{egfr.value:g} mL/min/1.73 m²** ({when}): KDIGO category **{category}** "
        f"({text}).\n\nKDIGO 2024 recommends referral to nephrology when eGFR is below 30."
    )
    return [
        Card(
            summary=f"eGFR {egfr.value:g} on {when}: CKD category {category} ({text})",
            indicator=indicator,
            detail=detail,
            source=Source(
                label="KDIGO 2024 CKD guideline",
                url=KDIGO_URL,
                topic=Coding(code="kidneyfunction", system=TOPIC_SYSTEM,
                             display="Reduced kidney function"),
            ),
            links=(Link(label="KDIGO 2024 CKD guideline", url=KDIGO_URL),),
        )
    ]


SERVICE = CdsService(
    id="kidney-risk",
    hooks=("patient-view",),
    title="Kidney function",
    description="Flags reduced kidney function (eGFR below 60) with its KDIGO GFR category.",
    handler=handle,
    prefetch={
        "egfr": "Observation?patient={{context.patientId}}"
                "&code=http://loinc.org|33914-3,http://loinc.org|62238-1,"
                "http://loinc.org|98979-8,http://loinc.org|48642-3&_sort=-date&_count=10",
    },
)
