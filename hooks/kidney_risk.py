"""kidney-risk (patient-view): flag reduced kidney function when a chart opens.

The latest eGFR and its KDIGO G category decide whether there is a card: quiet (no card) when
there is no eGFR or it is ≥ 60, i.e. no CKD by eGFR alone. The site's model (kfre-4var unless the
site names another) adds the kidney failure risk, its main factors and the inputs it lacked.
KDIGO 2024 CKD guideline: https://kdigo.org/guidelines/ckd-evaluation-and-management/
"""

from __future__ import annotations

from cds_service.cards import Card, Coding, Link, Source
from cds_service.models.registry import Prediction
from cds_service.registry import CdsService, HookRequest
from hooks._fhir import EGFR_LOINC, latest_lab
from hooks._kidney import g_category

KDIGO_URL = "https://kdigo.org/guidelines/ckd-evaluation-and-management/"
TOPIC_SYSTEM = "https://cds.example.org/topics"

# Card indicator per KDIGO G category; G1/G2 raise no card (no CKD by eGFR alone).
G_INDICATOR = {"G1": None, "G2": None, "G3a": "info", "G3b": "warning", "G4": "warning",
               "G5": "critical"}


_SEVERITY = (None, "info", "warning", "critical")


def _factor(name: str, value: float | None) -> str:
    if name == "male" and value is not None:
        return "male sex" if value else "female sex"
    return name if value is None else f"{name} {value:g}"


def _risk_text(prediction: Prediction) -> tuple[str, str]:
    """(summary suffix, detail paragraph) for a model score; empty when there is none."""
    if prediction.score is None:
        return "", (f"Kidney failure risk not computed ({prediction.model_id} "
                    f"{prediction.model_version}): {prediction.unavailable}.")
    horizon = {"risk_5y": "5-year", "risk_2y": "2-year"}
    main = f"{horizon.get(prediction.output, prediction.output)} kidney failure risk " \
           f"{prediction.score:.0%}"
    others = "".join(f", {horizon.get(name, name)} {value:.0%}"
                     for name, value in prediction.secondary.items())
    factors = "; ".join(f"{_factor(c.name, c.value)} {c.direction} risk"
                        for c in prediction.top(3))
    detail = (f"**{main[0].upper()}{main[1:]}**{others} (model {prediction.model_id} "
              f"{prediction.model_version}). Main factors: {factors}.")
    if prediction.imputed:
        detail += f" Imputed (not measured): {', '.join(prediction.imputed)}."
    return main, detail


def handle(request: HookRequest) -> list[Card]:
    egfr = latest_lab(request.prefetch["egfr"] or (), EGFR_LOINC)
    if egfr is None:
        return []
    category, text = g_category(egfr.value)
    indicator = G_INDICATOR[category]
    if indicator is None:
        return []
    when = egfr.when.isoformat() if egfr.when else "an unknown date"
    detail = (
        f"Latest eGFR **{egfr.value:g} mL/min/1.73 m²** ({when}): KDIGO category **{category}** "
        f"({text}).\n\nKDIGO 2024 recommends referral to nephrology when eGFR is below 30."
    )
    summary = f"eGFR {egfr.value:g} on {when}: CKD category {category} ({text})"
    if request.model is not None:
        prediction = request.model.predict(
            v for v in request.prefetch.values() if v is not None)
        if prediction.score is not None:
            suffix, risk_detail = _risk_text(prediction)
            summary = f"{suffix} (eGFR {egfr.value:g}, {category})"
            detail += "\n\n" + risk_detail
            indicator = max(indicator, prediction.indicator, key=_SEVERITY.index)
    return [
        Card(
            summary=summary,
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
    model="kfre-4var",
    prefetch={
        "egfr": "Observation?patient={{context.patientId}}"
                "&code=http://loinc.org|33914-3,http://loinc.org|62238-1,"
                "http://loinc.org|98979-8,http://loinc.org|48642-3&_sort=-date&_count=10",
        "patient": "Patient/{{context.patientId}}",
        # Urine ACR (3 LOINC codes for one concept) and HbA1c (NGSP % and IFCC mmol/mol).
        "labs": "Observation?patient={{context.patientId}}"
                "&code=http://loinc.org|9318-7,http://loinc.org|14959-1,http://loinc.org|32294-1,"
                "http://loinc.org|4548-4,http://loinc.org|17856-6,http://loinc.org|59261-8"
                "&_sort=-date&_count=20",
        "bp": "Observation?patient={{context.patientId}}"
              "&code=http://loinc.org|85354-9,http://loinc.org|8480-6&_sort=-date&_count=10",
        "conditions": "Condition?patient={{context.patientId}}&clinical-status=active",
    },
    # The eGFR decides whether there is a card; the model's inputs improve it when Epic sends
    # them, and their absence is said on the card instead of failing the call.
    optional_prefetch=frozenset({"patient", "labs", "bp", "conditions"}),
)
