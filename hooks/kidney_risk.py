"""kidney-risk (patient-view): kidney failure risk and KDIGO stage when a chart opens.

Quiet unless there is something to act on (docs/clinical.md, "kidney-risk"):
- no eGFR (the newest of reported eGFRs and CKD-EPI 2021 from creatinine) and no urine ACR, or
  the patient is on dialysis: no card;
- the kidney failure risk equation is applied only where it is valid (adults, eGFR < 60, no
  dialysis, transplant, pregnancy or acute change: `KidneyStatus.risk_exclusions`); elsewhere the
  card gives no percentage and says why;
- the site's model (kfre-4var unless the site names another) scored: a card when the risk reaches
  the lowest threshold (manifest, or the site's `thresholds`; KDIGO 2024 practice points 2.2.1 and
  2.2.3) or a KDIGO 2024 referral criterion holds (eGFR < 30, urine ACR ≥ 300 mg/g, 5-year risk
  at the site's 3-5%); otherwise none;
- no score: the KDIGO G category decides (G3a and worse), albuminuria A3 through referral;
- an acute fall in kidney function (KDIGO AKI/AKD criteria) is said as such, not staged as CKD.
Suggestions (one action each, Epic): a draft nephrology referral when a referral criterion
holds, a draft urine ACR when none was resulted in 12 months; both only when the site names the
orderable (`orderables`), since Epic pends orders from its own preference-list codes.
"""

from __future__ import annotations

import json

from marshmallow import fields, validate

from cds_service.models.loaded import Prediction
from cds_service.protocol.cards import (
    Action,
    Card,
    Coding,
    Link,
    Source,
    Suggestion,
    draft_order,
    severity,
)
from cds_service.service import CdsService, HookRequest
from cds_service.site_section import SiteSection
from hooks._kidney import (
    INPUTS,
    PREFETCH,
    KidneyStatus,
    assess_request,
    factor_label,
    factor_text,
    risk_text,
)
from hooks._medications import active_medications
from hooks._prescribing import TOPIC_SYSTEM, Patient, evaluate

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
    # KDIGO 2024 recommendation 5.1 / practice point 2.2.1: refer at eGFR < 30, urine ACR
    # ≥ 300 mg/g, or a 5-year kidney failure risk of 3-5% (the site chooses within that range).
    # docs/clinical.md.
    risk = fields.Float(load_default=0.05, validate=validate.Range(min=0.03, max=0.05))
    egfr_below = fields.Float(load_default=30, validate=validate.Range(min=1, max=200))
    uacr_at_least = fields.Float(load_default=300, validate=validate.Range(min=1))


class _SmartLink(SiteSection):
    label = fields.String(required=True, validate=validate.Length(min=1, max=80))
    # Epic shows only SMART links the health system registered, so this is that launch URL.
    url = fields.Url(required=True, schemes={"https"})


class Settings(SiteSection):
    referral = fields.Nested(_Referral, load_default=lambda: _Referral().load({}))
    smart_link = fields.Nested(_SmartLink)


def _five_year(prediction: Prediction | None) -> float | None:
    if prediction is None or prediction.score is None:
        return None
    return {prediction.output: prediction.score, **prediction.secondary}.get("risk_5y")


def _referral_reasons(status: KidneyStatus, prediction: Prediction | None,
                      settings: dict) -> list[str]:
    if status.acute or {"dialysis", "kidney_transplant"} & status.conditions:
        return []  # the criteria are for CKD; these patients are under kidney care already
    reasons = []
    five_year = _five_year(prediction)
    if five_year is not None and five_year >= settings["risk"]:
        reasons.append(f"5-year kidney failure risk {five_year:.0%} "
                       f"(≥ {settings['risk']:.0%})")
    if status.egfr_below(settings["egfr_below"]):
        reasons.append(f"{status.egfr_text()} (< {settings['egfr_below']:g})")
    if status.uacr_at_least(settings["uacr_at_least"]):
        reasons.append(f"{status.uacr_text()} (≥ {settings['uacr_at_least']:g})")
    return reasons


def _indicator(status: KidneyStatus, prediction: Prediction | None,
               referral: list[str]) -> str | None:
    candidates = ["warning" if referral else None]
    if prediction is not None and prediction.score is not None:
        candidates.append(prediction.indicator)
    else:
        candidates.append(G_INDICATOR.get(status.g[0]) if status.g else None)
    if status.acute and status.egfr_below(60):
        candidates.append("warning")
    if status.egfr_below(15):
        candidates.append("critical")
    return max(candidates, key=severity)


def _values_table(status: KidneyStatus) -> str:
    rows = []
    if status.latest is not None:
        latest = status.latest
        g, g_text = status.g
        what = f"{latest.text().removeprefix('calculated ').removeprefix('eGFR ')} mL/min/1.73 m²"
        if latest.creatinine is not None:
            what += f", calculated (CKD-EPI 2021) from {status.creatinine_text()}"
            if latest.sex_basis:
                what += f"; {latest.sex_basis}"
        category = "acute change: not staged" if status.acute else f"KDIGO {g} ({g_text})"
        rows.append(f"| eGFR | {what} | {category} | {latest.date} |")
    if status.uacr is not None:
        a, a_text = status.a
        rows.append(f"| Urine ACR | {status.uacr_text().removeprefix('urine ACR ')} | "
                    f"KDIGO {a} ({a_text}) | {status.uacr.date} |")
    return "| Result | Value | Category | Date |\n|---|---|---|---|\n" + "\n".join(rows)


def _model_text(prediction: Prediction) -> str:
    model = f"model {prediction.model_id} {prediction.model_version}"
    if prediction.score is None:
        missing = ", ".join(factor_label(n) for n in prediction.features.missing_required)
        return f"Kidney failure risk not calculated ({model}): no {missing} on record."
    factors = "; ".join(f"{factor_text(c.name, c.value)} {c.direction} it"
                        for c in prediction.top(3) if c.contribution != 0)
    text = f"**{risk_text(prediction).capitalize()}** ({model})."
    if factors:
        text += f" Main factors: {factors}."
    if prediction.imputed:
        text += (" Not on record, so a typical value was used: "
                 + ", ".join(factor_label(n) for n in prediction.imputed) + ".")
    return text


def _medications_to_review(request: HookRequest, status: KidneyStatus,
                           prediction: Prediction | None) -> list[str]:
    """Active medications a prescribing rule flags at this kidney function and risk."""
    active = tuple(active_medications(request.prefetch.get("medications"),
                                      request.site.code_map))
    patient = Patient(status=status, now=request.now, active=active,
                      risk_indicator=prediction.indicator if prediction is not None else None)
    found: list[str] = []
    for medication in active:
        for finding in evaluate(medication, patient):
            text = f"{finding.drug} ({finding.rule.summary})"
            if text not in found:
                found.append(text)
    return found


def _service_request(request: HookRequest, orderable_name: str, reason: str) -> dict | None:
    orderable = request.site.orderables.get(orderable_name)
    if orderable is None:
        return None
    return draft_order("ServiceRequest", request.context.get("patientId"),
                       code=orderable.concept(), reasonCode=[{"text": reason}])


def _summary(status: KidneyStatus, prediction: Prediction | None) -> str:
    figures = [status.egfr_text()] if status.latest is not None else []
    if status.uacr is not None:
        figures.append(status.uacr_text())
    if status.acute:
        return f"Acute fall in kidney function: {status.acute}"
    if prediction is not None and prediction.score is not None:
        return f"{risk_text(prediction).capitalize()} ({', '.join(figures)})"
    stage = "".join(c[0] for c in (status.g, status.a) if c)
    # The description of whichever category is the more advanced reason for the card.
    g_rank = G_INDICATOR.get(status.g[0]) if status.g else None
    described = status.a if status.a and (status.a[0] == "A3" or g_rank is None) else status.g
    day = status.egfr_date or status.uacr.date
    return f"CKD {stage} ({described[1]}): {', '.join(figures)} on {day}"


def handle(request: HookRequest) -> list[Card]:
    status, prediction = assess_request(request)
    if not status.has_data or "dialysis" in status.conditions:
        # On dialysis: kidney failure has happened; risk, staging and referral do not apply.
        return []
    referral = _referral_reasons(status, prediction, request.settings["referral"])
    indicator = _indicator(status, prediction, referral)
    if indicator is None:
        return []
    stage = "".join(c[0] for c in (status.g, status.a) if c)

    detail = [_values_table(status)]
    if prediction is not None:
        detail.append(_model_text(prediction))
    elif (exclusions := status.risk_exclusions()) and status.latest is not None:
        detail.append("Kidney failure risk not calculated: the equation (Tangri 2011/2016) does "
                      f"not apply because {'; '.join(exclusions)}.")
    detail += [f"No eGFR: {note}." for note in status.notes]
    if "kidney_transplant" in status.conditions:
        detail.append("Kidney transplant recipient: no referral suggested.")
    if referral:
        detail.append("KDIGO 2024 recommends referral to nephrology: " + "; ".join(referral)
                      + ".")
    no_recent_uacr = status.latest is not None and status.uacr_last_12_months == 0
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
    if request.site.smart_app is not None:
        # Our own SMART app (cds_service/smart/): Epic opens its registered launch URL with
        # `iss` and `launch` (CDS Hooks 2.0, Link type "smart").
        links.append(Link(label="Kidney picture (eGFR, albuminuria, risk)",
                          url=request.site.smart_app.launch_url, type="smart"))
    smart = request.settings.get("smart_link")
    if smart:
        # appContext reaches the app as an opaque string (JSON pre-serialised, rule 93): the
        # hookInstance lets the app find this prediction in our store; no PHI in it.
        links.append(Link(label=smart["label"], url=smart["url"], type="smart",
                          app_context=json.dumps({"service": request.service_id,
                                                  "hookInstance": request.hook_instance})))
    return [Card(
        summary=_summary(status, prediction),
        indicator=indicator,
        detail="\n\n".join(detail),
        source=Source(label="KDIGO 2024 CKD guideline", url=KDIGO_URL, topic=TOPIC),
        suggestions=tuple(suggestions),
        links=tuple(links),
        override_reasons=OVERRIDE_REASONS,
    )]


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
    prefetch={
        "egfr": PREFETCH["egfr"],
        "creatinine": PREFETCH["creatinine"],
        "patient": PREFETCH["patient"],
        "uacr": PREFETCH["uacr"],
        # HbA1c as NGSP % and IFCC mmol/mol (the progression model reads it).
        "hba1c": "Observation?patient={{context.patientId}}&code=http://loinc.org|4548-4,"
                 "http://loinc.org|17856-6,http://loinc.org|59261-8",
        "bp": "Observation?patient={{context.patientId}}"
              "&code=http://loinc.org|85354-9,http://loinc.org|8480-6",
        "conditions": PREFETCH["conditions"],
        "medications": PREFETCH["medications"],
    },
    # The eGFR search decides whether there is a card; everything else improves it when Epic
    # sends it, and its absence is said on the card instead of failing the call.
    optional_prefetch=frozenset({"creatinine", "uacr", "patient", "hba1c", "bp", "conditions",
                                 "medications"}),
    feature_groups=(INPUTS,),
)
