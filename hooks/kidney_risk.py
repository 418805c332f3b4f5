"""kidney-risk (patient-view): kidney failure risk and KDIGO stage when a chart opens.

Quiet unless there is something to act on (docs/clinical.md, "kidney-risk"):
- no eGFR (reported, or CKD-EPI 2021 from creatinine) and no urine ACR: no card;
- the site's model (kfre-4var unless the site names another) scored: a card when the risk reaches
  the lowest threshold (manifest, or the site's `thresholds`) or a KDIGO 2024 referral criterion
  holds (eGFR < 30, urine ACR ≥ 300 mg/g); otherwise none;
- the model could not score (e.g. no urine ACR): the KDIGO G category decides (G3a and worse).
Suggestions (one action each, Epic): a draft nephrology referral when a referral criterion
holds, a draft urine ACR when none was resulted in 12 months; both only when the site names the
orderable (`orderables`), since Epic pends orders from its own preference-list codes.
"""

from __future__ import annotations

import json

from marshmallow import fields, validate

from cds_service.cards import (
    Action,
    Card,
    Coding,
    Link,
    Source,
    Suggestion,
    draft_order,
    severity,
)
from cds_service.config import SiteSection
from cds_service.models.registry import Prediction
from cds_service.registry import CdsService, HookRequest
from hooks._kidney import (
    HORIZONS,
    KidneyStatus,
    assess_request,
    factor_label,
    factor_text,
    number,
    risk_text,
)
from hooks._medications import TOPIC_SYSTEM, active_matches, applicable_rule

KDIGO_URL = "https://kdigo.org/guidelines/ckd-evaluation-and-management/"
TOPIC = Coding(code="kidneyfunction", system=TOPIC_SYSTEM, display="Reduced kidney function")
REFERRAL_ORDERABLE = "nephrology-referral"
UACR_ORDERABLE = "urine-acr"
# The site orderables this service reads, and what the card loses without each
# (`cds-service site check` warns about missing ones).
ORDERABLES = {
    REFERRAL_ORDERABLE: "the 'Refer to nephrology' suggestion is left out",
    UACR_ORDERABLE: "the 'Order urine albumin/creatinine ratio' suggestion is left out",
}

# Without a model score: card indicator per KDIGO G category (G1/G2: no CKD by eGFR alone).
G_INDICATOR = {"G1": None, "G2": None, "G3a": "info", "G3b": "warning", "G4": "warning",
               "G5": "critical"}

OVERRIDE_REASONS = (
    Coding(code="nephrologyfollowing", system=TOPIC_SYSTEM,
           display="Already followed by nephrology"),
    Coding(code="goalsofcare", system=TOPIC_SYSTEM,
           display="Not consistent with goals of care"),
    Coding(code="patientdeclined", system=TOPIC_SYSTEM, display="Patient declined"),
    Coding(code="datanotcurrent", system=TOPIC_SYSTEM, display="Result not current or acute"),
)


class _Referral(SiteSection):
    # KDIGO 2024 rec. 5.1: refer at eGFR < 30, urine ACR ≥ 300 mg/g, or a 5-year kidney failure
    # risk above 5% (3-5% consider). docs/clinical.md.
    risk = fields.Float(load_default=0.05, validate=validate.Range(min=0, max=1))
    egfr_below = fields.Float(load_default=30, validate=validate.Range(min=1, max=200))
    uacr_at_least = fields.Float(load_default=300, validate=validate.Range(min=1))


class _SmartLink(SiteSection):
    label = fields.String(required=True, validate=validate.Length(min=1, max=80))
    # Epic shows only SMART links the health system registered, so this is that launch URL.
    url = fields.Url(required=True, schemes={"https"})


class Settings(SiteSection):
    referral = fields.Nested(_Referral, load_default=lambda: _Referral().load({}))
    smart_link = fields.Nested(_SmartLink)


def _referral_reasons(status: KidneyStatus, prediction: Prediction | None,
                      settings: dict) -> list[str]:
    reasons = []
    if prediction is not None and prediction.score is not None \
            and prediction.score >= settings["risk"]:
        reasons.append(f"{risk_text(prediction)} (≥ {settings['risk']:.0%})")
    if status.egfr is not None and status.egfr < settings["egfr_below"]:
        reasons.append(f"eGFR {status.egfr:g} (< {settings['egfr_below']:g})")
    if status.uacr is not None and status.uacr.value >= settings["uacr_at_least"]:
        reasons.append(f"urine ACR {number(status.uacr.value)} mg/g "
                       f"(≥ {settings['uacr_at_least']:g})")
    return reasons


def _indicator(status: KidneyStatus, prediction: Prediction | None,
               referral: list[str]) -> str | None:
    if prediction is not None and prediction.score is not None:
        candidates = [prediction.indicator, "warning" if referral else None]
    else:
        candidates = [G_INDICATOR[status.g[0]] if status.g else None,
                      "warning" if referral else None]
    if status.g and status.g[0] == "G5":
        candidates.append("critical")
    return max(candidates, key=severity)


def _values_table(status: KidneyStatus) -> str:
    rows = []
    if status.egfr is not None:
        g, g_text = status.g
        if status.calculated_from is not None:
            what = (f"{status.egfr:g} mL/min/1.73 m², calculated (CKD-EPI 2021) from "
                    f"{status.creatinine_text()}")
        else:
            what = f"{status.egfr:g} mL/min/1.73 m²"
        rows.append(f"| eGFR | {what} | KDIGO {g} ({g_text}) | {status.egfr_date} |")
    if status.uacr is not None:
        a, a_text = status.a
        rows.append(f"| Urine ACR | {number(status.uacr.value)} mg/g | KDIGO {a} ({a_text}) | "
                    f"{status.uacr.date} |")
    return "| Result | Value | Category | Date |\n|---|---|---|---|\n" + "\n".join(rows)


def _model_text(prediction: Prediction) -> str:
    model = f"model {prediction.model_id} {prediction.model_version}"
    if prediction.score is None:
        missing = ", ".join(factor_label(n) for n in prediction.features.missing_required)
        return f"Kidney failure risk not computed ({model}): no {missing} on record."
    others = "".join(f", {HORIZONS.get(name, name)} {value:.0%}"
                     for name, value in prediction.secondary.items())
    factors = "; ".join(f"{factor_text(c.name, c.value)} {c.direction} risk"
                        for c in prediction.top(3))
    text = f"**{risk_text(prediction)}**{others} ({model}). Main factors: {factors}."
    if prediction.imputed:
        text += f" Not measured, typical value used: {', '.join(prediction.imputed)}."
    return text


def _medications_to_review(request: HookRequest, status: KidneyStatus,
                           prediction: Prediction | None) -> list[str]:
    """Active medications a value-set rule flags at this eGFR and risk (docs/clinical.md)."""
    risk = prediction.indicator if prediction is not None else None
    found: list[str] = []
    for match in active_matches(request.prefetch.get("medications"), request.site.code_map):
        rule = applicable_rule(match.medication_class, egfr=status.egfr, risk_indicator=risk,
                               already_taking=True)
        if rule and (text := f"{match.ingredient} ({rule.summary})") not in found:
            found.append(text)
    return found


def _service_request(request: HookRequest, orderable_name: str, reason: str) -> dict | None:
    orderable = request.site.orderables.get(orderable_name)
    if orderable is None:
        return None
    return draft_order("ServiceRequest", request.context.get("patientId"),
                       code=orderable.concept(), reasonCode=[{"text": reason}])


def handle(request: HookRequest) -> list[Card]:
    status, prediction = assess_request(request)
    if not status.has_data:
        return []
    referral = _referral_reasons(status, prediction, request.settings["referral"])
    indicator = _indicator(status, prediction, referral)
    if indicator is None:
        return []

    stage = "".join(c[0] for c in (status.g, status.a) if c)
    figures = [status.egfr_text()] if status.egfr is not None else []
    if status.uacr is not None:
        figures.append(f"UACR {number(status.uacr.value)} mg/g")
    if prediction is not None and prediction.score is not None:
        summary = f"{risk_text(prediction)} ({', '.join(figures)})"
    else:
        category = status.g or status.a
        summary = (f"CKD {stage} ({category[1]}): {', '.join(figures)} on "
                   f"{status.egfr_date or status.uacr.date}")

    detail = [_values_table(status)]
    if prediction is not None:
        detail.append(_model_text(prediction))
    detail += [f"No eGFR: {note}." for note in status.notes]
    if referral:
        detail.append("KDIGO 2024 recommends referral to nephrology: " + "; ".join(referral)
                      + ".")
    no_recent_uacr = status.egfr is not None and status.uacr_last_12_months == 0
    if no_recent_uacr:
        detail.append("No urine ACR in the last 12 months: KDIGO 2024 recommends testing "
                      "albuminuria at least yearly in CKD.")
    to_review = _medications_to_review(request, status, prediction)
    if to_review:
        detail.append("Active medications to review: " + "; ".join(to_review) + ".")

    suggestions = []
    if referral and (resource := _service_request(
            request, REFERRAL_ORDERABLE, f"CKD {stage}: " + "; ".join(referral))):
        suggestions.append(Suggestion(
            label="Refer to nephrology", is_recommended=True,
            actions=(Action.create("Draft a nephrology referral for you to review and sign.",
                                   resource),)))
    if no_recent_uacr and (resource := _service_request(
            request, UACR_ORDERABLE, f"CKD {stage}: no urine ACR in 12 months")):
        suggestions.append(Suggestion(
            label="Order urine albumin/creatinine ratio", is_recommended=True,
            actions=(Action.create("Draft a urine albumin/creatinine ratio order for you to "
                                   "review and sign.", resource),)))

    links = [Link(label="KDIGO 2024 CKD guideline", url=KDIGO_URL)]
    smart = request.settings.get("smart_link")
    if smart:
        # appContext reaches the app as an opaque string (JSON pre-serialised, rule 93): the
        # hookInstance lets the app find this prediction in our store; no PHI in it.
        links.append(Link(label=smart["label"], url=smart["url"], type="smart",
                          app_context=json.dumps({"service": request.service_id,
                                                  "hookInstance": request.hook_instance})))
    return [Card(
        summary=summary,
        indicator=indicator,
        detail="\n\n".join(detail),
        source=Source(label="KDIGO 2024 CKD guideline", url=KDIGO_URL, topic=TOPIC),
        suggestions=tuple(suggestions),
        links=tuple(links),
        override_reasons=OVERRIDE_REASONS,
    )]


# Observation searches list every LOINC code that means the concept (docs/clinical.md).
EGFR_CODES = ("http://loinc.org|33914-3,http://loinc.org|62238-1,http://loinc.org|98979-8,"
              "http://loinc.org|48642-3")
CREATININE_CODES = ("http://loinc.org|2160-0,http://loinc.org|38483-4,"
                    "http://loinc.org|14682-9,http://loinc.org|77140-2")
UACR_CODES = "http://loinc.org|9318-7,http://loinc.org|14959-1,http://loinc.org|32294-1"

SERVICE = CdsService(
    id="kidney-risk",
    hooks=("patient-view",),
    title="Kidney failure risk",
    description="Kidney failure risk (KFRE) with KDIGO CKD stage when a chart opens; suggests "
                "nephrology referral and urine ACR testing when due. Quiet otherwise.",
    handler=handle,
    model="kfre-4var",
    settings_schema=Settings,
    orderables=ORDERABLES,
    # No `_sort` or `_count`: Epic documents no `_sort` for Observation search, and an R4 server
    # ignores what it does not support, so `_count` would page the server's order and could cut
    # off the newest result. The newest is taken by its date from whatever comes back
    # (cds_service/features.py); site_config/README.md, "Readiness check before go-live".
    prefetch={
        "egfr": "Observation?patient={{context.patientId}}&code=" + EGFR_CODES,
        "creatinine": "Observation?patient={{context.patientId}}&code=" + CREATININE_CODES,
        "patient": "Patient/{{context.patientId}}",
        "uacr": "Observation?patient={{context.patientId}}&code=" + UACR_CODES,
        # HbA1c as NGSP % and IFCC mmol/mol (the progression model reads it).
        "hba1c": "Observation?patient={{context.patientId}}&code=http://loinc.org|4548-4,"
                 "http://loinc.org|17856-6,http://loinc.org|59261-8",
        "bp": "Observation?patient={{context.patientId}}"
              "&code=http://loinc.org|85354-9,http://loinc.org|8480-6",
        "conditions": "Condition?patient={{context.patientId}}&clinical-status=active",
        "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
    },
    # The eGFR search decides whether there is a card; everything else improves it when Epic
    # sends it, and its absence is said on the card instead of failing the call.
    optional_prefetch=frozenset({"creatinine", "uacr", "patient", "hba1c", "bp", "conditions",
                                 "medications"}),
)
