"""`cds-service invoke`: play the EHR for one call, from a FHIR Bundle file.

Builds the CDS Hooks request Epic would send for a patient in the Bundle, signs it with the site's
development key (RS384, Epic's header and claim shape), POSTs it and prints the cards.

Prefetch is filled from the Bundle: a read template gets the resource with that type and id; a
search template gets every resource of its type that points at the patient. Other search
parameters are not applied: the services filter by code themselves.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import requests

from cds_service.config import Site
from cds_service.data import jsonlimit
from cds_service.data.prefetch import is_search, render_template
from cds_service.records.suppression import WITHHELD_EXTENSION
from cds_service.trust.devkeys import ALGORITHM, load_signing_key, private_key_path

ORDER_TYPES = ("MedicationRequest", "ServiceRequest")
# HL7 v3 ActReason HTEST, "test health data": the tag on our synthetic example Bundles.
SYNTHETIC_TAG = ("http://terminology.hl7.org/CodeSystem/v3-ActReason", "HTEST")
# A full FHIR date, dateTime or instant (partial dates such as "2024-05" are left as they are).
_FHIR_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2}))?")
# The clinician `invoke` and the sandbox play: overrides they send suppress cards for this user
# only, and the sandbox resets only this user's.
INVOKE_USER = "PractitionerRole/cds-invoke"


class InvokeError(Exception):
    """The call could not be built or sent; the message says why."""


def _resources(bundle: Any) -> list[dict]:
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise InvokeError("the file is not a FHIR Bundle")
    return [e["resource"] for e in bundle.get("entry") or ()
            if isinstance(e, Mapping) and isinstance(e.get("resource"), Mapping)]


def _points_at(resource: Mapping, patient_ref: str) -> bool:
    for field in ("subject", "patient"):
        ref = resource.get(field)
        if isinstance(ref, Mapping) and ref.get("reference") == patient_ref:
            return True
    return False


def build_request(site: Site, service_id: str, bundle: Any, *, hook: str | None = None,
                  selections: Sequence[str] = ()) -> dict:
    enabled = site.services.get(service_id)
    if enabled is None:
        raise InvokeError(f"service {service_id!r} is not enabled for site {site.id!r}")
    hook = hook or enabled.service.hooks[0]
    if hook not in enabled.service.hooks:
        raise InvokeError(f"{service_id} answers {', '.join(enabled.service.hooks)}, not {hook}")
    resources = _resources(bundle)
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    if patient is None or not patient.get("id"):
        raise InvokeError("the Bundle has no Patient with an id")
    patient_ref = f"Patient/{patient['id']}"
    context: dict[str, Any] = {"userId": INVOKE_USER, "patientId": patient["id"]}
    encounter = next((r for r in resources if r.get("resourceType") == "Encounter"), None)
    if encounter and encounter.get("id"):
        context["encounterId"] = encounter["id"]

    if hook in ("order-select", "order-sign"):
        drafts = [r for r in resources if r.get("resourceType") in ORDER_TYPES
                  and r.get("status") == "draft"]
        medications = [r for r in resources if r.get("resourceType") == "Medication"]
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": r} for r in drafts + medications]}
        if hook == "order-select":
            chosen = list(selections) or [f"{r['resourceType']}/{r['id']}" for r in drafts]
            if not chosen:
                raise InvokeError("order-select needs a draft order in the Bundle (status draft)")
            context["selections"] = chosen

    prefetch: dict[str, Any] = {}
    for key, template in enabled.prefetch.items():
        rendered = render_template(template, context)
        if rendered is None:
            continue
        resource_type = rendered.split("?", 1)[0].split("/", 1)[0]
        if is_search(template):
            matches = [r for r in resources
                       if r.get("resourceType") == resource_type and _points_at(r, patient_ref)]
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset",
                             "total": len(matches), "entry": [{"resource": r} for r in matches]}
        else:
            wanted = rendered.split("/", 1)[-1]
            prefetch[key] = next((r for r in resources if r.get("resourceType") == resource_type
                                  and r.get("id") == wanted), None)
    return {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context,
            "prefetch": prefetch,
            "extension": {"com.epic.cdshooks.request.cds-hooks-specification-version": "1.1"}}


def signing_token(site: Site, audience: str) -> str:
    """An Epic-shaped JWT from the site's development key (nbf = iat − 300, exp = iat + 900)."""
    for issuer in site.issuers:
        if issuer.jwks_file and private_key_path(Path(issuer.jwks_file)).exists():
            key, kid = load_signing_key(Path(issuer.jwks_file))
            now = int(time.time())
            claims = {"iss": issuer.iss, "sub": "cds-service-invoke", "aud": audience,
                      "iat": now, "nbf": now - 300, "exp": now + 900, "jti": str(uuid.uuid4())}
            return jwt.encode(claims, key, algorithm=ALGORITHM,
                              headers={"kid": kid, "typ": "JWT"})
    raise InvokeError(
        f"site {site.id!r} has no development key to sign with (an issuer with dev_keypair)"
    )


def send(base_url: str, site: Site, service_id: str, body: dict,
         timeout: float = 10.0, *, public_url: str | None = None) -> requests.Response:
    """POST `body` to `base_url`'s service, signed for `aud` `<public_url>/cds-services/<id>`
    (the server accepts the endpoint at its configured public URL only), or for the URL posted
    to when no public URL is given."""
    path = f"/cds-services/{service_id}"
    url = base_url.rstrip("/") + path
    audience = public_url.rstrip("/") + path if public_url else url
    headers = {"Authorization": f"Bearer {signing_token(site, audience)}"}
    try:
        return requests.post(url, json=body, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise InvokeError(f"cannot reach {url}: {exc.__class__.__name__}") from exc


def format_cards(body: Mapping, context: Mapping | None = None) -> str:
    """The cards as a clinician would read them, then any withheld by suppression and why;
    `context` (the request's) names the user and patient in the hint to reset them."""
    cards = body.get("cards") or []
    extension = body.get("extension")
    withheld = (extension.get(WITHHELD_EXTENSION) if isinstance(extension, Mapping) else None) or []
    if not cards and not withheld:
        return "No cards (nothing to say for this patient)."
    lines: list[str] = [] if cards else ["No cards shown."]
    for card in cards:
        lines.append(f"[{card['indicator']}] {card['summary']}")
        if card.get("detail"):
            lines += [f"    {line}" for line in card["detail"].splitlines() if line.strip()]
        for suggestion in card.get("suggestions", []):
            for action in suggestion.get("actions", []):
                target = action.get("resourceId") or action.get("resource", {}).get(
                    "resourceType", "")
                lines.append(f"    suggestion: {suggestion['label']} ({action['type']} {target})")
        for link in card.get("links", []):
            lines.append(f"    link: {link['label']} <{link['url']}>")
        lines.append(f"    source: {card['source']['label']}")
    if withheld:
        lines.append("Withheld: the same user overrode a card of the same topic for this patient "
                     "(alert-fatigue suppression)")
    for card in withheld:
        lines.append(f"[{card['indicator']}] {card['summary']}")
        lines.append(f"    overridden at {card['overriddenAt']} (card {card['overriddenCard']}); "
                     f"shown again after {card['shownAgainAfter']}, or sooner if more severe")
    if withheld and context:
        lines.append(f"    to show it again now: cds-service suppressions clear "
                     f"--patient {context.get('patientId')} --user {context.get('userId')}")
    return "\n".join(lines)


def shift_dates(value: Any, days: int) -> Any:
    """A copy of `value` with every full FHIR date, dateTime and instant moved by `days`; the
    time of day and offset stay as written."""
    if isinstance(value, Mapping):
        return {key: shift_dates(item, days) for key, item in value.items()}
    if isinstance(value, list):
        return [shift_dates(item, days) for item in value]
    if isinstance(value, str) and _FHIR_DATE.fullmatch(value):
        try:
            moved = date.fromisoformat(value[:10]) + timedelta(days=days)
        except (ValueError, OverflowError):
            return value
        return moved.isoformat() + value[10:]
    return value


def dated_today(bundle: Any, today: date) -> Any:
    """A synthetic example Bundle (tagged HTEST, with a `timestamp`) moved by whole days so that
    its timestamp falls on `today`: its results stay as recent, and its patient as old, as when
    it was written, so it never ages out of a look-back window. Any other Bundle is as given."""
    if not isinstance(bundle, Mapping):
        return bundle
    tags = (bundle.get("meta") or {}).get("tag") or ()
    synthetic = any(isinstance(tag, Mapping) and (tag.get("system"), tag.get("code"))
                    == SYNTHETIC_TAG for tag in tags)
    stamp = bundle.get("timestamp")
    if not synthetic or not isinstance(stamp, str) or not _FHIR_DATE.fullmatch(stamp):
        return bundle
    try:
        days = (today - date.fromisoformat(stamp[:10])).days
    except ValueError:
        return bundle
    return shift_dates(bundle, days)


def load_bundle(path: str, today: date | None = None) -> Any:
    """The Bundle in the file; a synthetic example is dated today (`dated_today`)."""
    try:
        bundle = jsonlimit.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvokeError(f"cannot read {path}: {exc.strerror}") from exc
    except (ValueError, jsonlimit.JsonTooDeep) as exc:
        raise InvokeError(f"{path} is not usable JSON: {exc}") from exc
    return dated_today(bundle, today or datetime.now(UTC).date())
