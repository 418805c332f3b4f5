"""The developer sandbox at `/sandbox`: what a clinician would see, for a patient you choose.

Like the CDS Hooks sandbox (https://sandbox.cds-hooks.org), but with this deployment's services,
models and site settings. Pick a bundled synthetic patient or upload a FHIR Bundle, pick a service
and hook (and for order hooks the medications to draft); the page shows the exact request, signed
with the site's development key the way Epic signs (`cds_service.tools.invoke`), the response, the
cards rendered as Epic shows them, and the model's score with its top factors. Accept and override
send real feedback, so an overridden card is then withheld (alert-fatigue suppression), and shown as
such; "Reset" ends the suppressions the sandbox's own clinician caused for the patient chosen.

Every call goes over HTTP to this server's own `/cds-services/...`, so authentication, replay
protection, suppression, metrics and the audit log all run as for Epic. Served only when a site
sets `sandbox: true`, which config refuses unless that site has an issuer with `dev_keypair`.

UNAUTHENTICATED: a developer tool for a development deployment. It never takes a token from the
browser; it mints its own with the development key. Cross-site pages cannot drive it: every POST
must be `application/json`, which a browser sends cross-origin only after a CORS preflight, and
nothing here answers one.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC
from pathlib import Path
from typing import Any

import jwt
import requests
from flask import Blueprint, Flask, current_app, render_template, request
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from cds_service.config import Site, SiteService
from cds_service.models.binding import ModelBinding
from cds_service.protocol.errors import CdsError, RequestInvalid
from cds_service.protocol.http import require_json_body
from cds_service.records import suppression
from cds_service.runtime import runtime
from cds_service.schema_errors import messages_to_issues
from cds_service.tools.invoke import (
    INVOKE_USER,
    ORDER_TYPES,
    InvokeError,
    build_request,
    dated_today,
    signing_token,
)

log = logging.getLogger("cds_service.tools.sandbox")

bp = Blueprint("sandbox", __name__, url_prefix="/sandbox", template_folder="templates",
               static_folder="static")

# Bundled synthetic patients; `SANDBOX_BUNDLES_DIR` (CDS_SANDBOX_BUNDLES_DIR) points elsewhere.
BUNDLES_DIR = Path(__file__).resolve().parents[2] / "examples" / "bundles"
# A call back into this same server needs a free gunicorn thread (gthread: 4 per worker).
TIMEOUT_S = 20.0
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
# Orders to draft that a Bundle need not hold, coded by RxNorm ingredient RxCUI (hooks/data/
# rxnorm.json; acetaminophen is the NSAIDs' alternative in hooks/data/prescribing_rules.yaml).
CATALOGUE = {
    "ibuprofen-400": ("5640", "ibuprofen 400 MG Oral Tablet"),
    "naproxen-500": ("7258", "naproxen 500 MG Oral Tablet"),
    "acetaminophen-500": ("161", "acetaminophen 500 MG Oral Tablet"),
    "metformin-500": ("6809", "metformin hydrochloride 500 MG Oral Tablet"),
}
ORDER_HOOKS = ("order-select", "order-sign")
# Shown in the page, so a token cannot be copied from it and replayed within its 15 minutes.
TOKEN_SHOWN = 24

# (url, headers, JSON body) → (HTTP status, parsed JSON body, or the text when not JSON).
Transport = Callable[[str, Mapping[str, str], Any], tuple[int, Any]]


class SandboxUpstreamError(CdsError):
    """This server's own CDS endpoint could not be reached from the sandbox."""

    status = 502
    code = "transient"


def http_transport(url: str, headers: Mapping[str, str], body: Any) -> tuple[int, Any]:
    try:
        response = requests.post(url, json=body, headers=dict(headers), timeout=TIMEOUT_S)
    except requests.Timeout as exc:
        raise SandboxUpstreamError(
            f"no answer from {url} in {TIMEOUT_S:g} s (a server with one thread per worker cannot "
            "answer its own sandbox: serve with --threads 2 or more)") from exc
    except requests.RequestException as exc:
        raise SandboxUpstreamError(f"cannot reach {url}: {exc.__class__.__name__}") from exc
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text[:2000]


def init_app(app: Flask, sites: Mapping[str, Site]) -> None:
    """Mount the sandbox when a site enables it; tests replace `app.extensions["sandbox"]`'s
    transport (the Flask test client has no server to call back)."""
    enabled = tuple(site for site in sites.values() if site.sandbox)
    if not enabled:
        return
    app.extensions["sandbox"] = {"sites": {site.id: site for site in enabled},
                                 "transport": http_transport}
    app.register_blueprint(bp)
    log.warning("the developer sandbox is served at /sandbox for site(s) %s: unauthenticated, "
                "for a development deployment only", ", ".join(s.id for s in enabled))


def _state() -> dict:
    return current_app.extensions["sandbox"]


@bp.after_request
def _headers(response):
    # Card text is rendered as markdown in the page: scripts only from /sandbox/static, and the
    # page never framed by another site.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("")
@bp.get("/")
def page():
    return render_template("sandbox.html", sites=list(_state()["sites"]))


# ---------------------------------------------------------------------------------------------
# Patients and what can be ordered for them

def _bundles_dir() -> Path:
    return Path(current_app.config.get("SANDBOX_BUNDLES_DIR") or BUNDLES_DIR)


def _read_bundle(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("sandbox: %s is not a readable JSON file; not listed", path.name)
        return None
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        return None
    return dated_today(data, runtime().clock().date())


def bundled_patients() -> dict[str, dict]:
    """File stem → Bundle, for every `*.json` Bundle with a Patient in the bundles directory."""
    found = {}
    for path in sorted(_bundles_dir().glob("*.json")):
        bundle = _read_bundle(path)
        if bundle is not None and _patient(bundle) is not None:
            found[path.stem] = bundle
    return found


def _entries(bundle: Mapping) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry") or ()
            if isinstance(e, Mapping) and isinstance(e.get("resource"), dict)]


def _patient(bundle: Mapping) -> dict | None:
    return next((r for r in _entries(bundle) if r.get("resourceType") == "Patient"
                 and isinstance(r.get("id"), str)), None)


def _patient_name(patient: Mapping) -> str:
    for name in patient.get("name") or ():
        if isinstance(name, Mapping):
            if name.get("text"):
                return str(name["text"])
            given = " ".join(str(g) for g in name.get("given") or ())
            return f"{given} {name.get('family', '')}".strip()
    return patient.get("id", "")


def _medication_text(order: Mapping) -> str:
    concept = order.get("medicationCodeableConcept")
    if isinstance(concept, Mapping):
        if concept.get("text"):
            return str(concept["text"])
        for coding in concept.get("coding") or ():
            if isinstance(coding, Mapping) and coding.get("display"):
                return str(coding["display"])
    reference = order.get("medicationReference")
    if isinstance(reference, Mapping):
        return str(reference.get("display") or reference.get("reference") or "medication")
    return "medication"


def medications(bundle: Mapping) -> list[dict]:
    """What the order hooks can draft: the Bundle's MedicationRequests (a draft one as it is, any
    other as a new draft of the same medication), then the catalogue."""
    listed = []
    for order in _entries(bundle):
        if order.get("resourceType") == "MedicationRequest" and order.get("id"):
            listed.append({"id": f"MedicationRequest/{order['id']}",
                           "label": _medication_text(order), "source": "bundle",
                           "status": order.get("status")})
    listed += [{"id": f"catalogue/{key}", "label": display, "source": "catalogue",
                "rxnorm": code} for key, (code, display) in CATALOGUE.items()]
    return listed


def _with_drafts(bundle: dict, chosen: list[str]) -> tuple[dict, list[str]]:
    """A copy of the Bundle holding a draft order for each chosen medication, and their ids (the
    hook's `selections`). The Bundle's other draft orders stay, as Epic sends every draft order
    on the order composer in `draftOrders`."""
    bundle = copy.deepcopy(bundle)
    resources = _entries(bundle)
    patient_ref = f"Patient/{_patient(bundle)['id']}"
    by_id = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources
             if r.get("resourceType") in ORDER_TYPES}
    selections, added = [], []
    for n, wanted in enumerate(chosen):
        order = by_id.get(wanted)
        if order is not None and order.get("status") == "draft":
            selections.append(wanted)
            continue
        if order is not None and order.get("resourceType") == "MedicationRequest":
            medication = {k: copy.deepcopy(v) for k, v in order.items()
                          if k in ("medicationCodeableConcept", "medicationReference")}
        elif wanted.startswith("catalogue/") and wanted.removeprefix("catalogue/") in CATALOGUE:
            code, display = CATALOGUE[wanted.removeprefix("catalogue/")]
            medication = {"medicationCodeableConcept": {
                "coding": [{"system": RXNORM, "code": code, "display": display}],
                "text": display}}
        else:
            raise RequestInvalid(f"medications[{n}]: {wanted!r} is neither a MedicationRequest "
                                 "of this Bundle nor a catalogue entry")
        draft = {"resourceType": "MedicationRequest", "id": f"sandbox-draft-{n + 1}",
                 "status": "draft", "intent": "order", "subject": {"reference": patient_ref},
                 **medication}
        added.append({"resource": draft})
        selections.append(f"MedicationRequest/{draft['id']}")
    bundle["entry"] = [*(bundle.get("entry") or ()), *added]
    return bundle, selections


# ---------------------------------------------------------------------------------------------
# Request bodies

class _PatientSource(Schema):
    class Meta:
        unknown = RAISE

    site = fields.String()
    patient = fields.String(validate=validate.Length(min=1, max=200))
    bundle = fields.Dict()

    @validates_schema
    def _one_source(self, data, **kwargs):
        if ("patient" in data) == ("bundle" in data):
            raise ValidationError("give either `patient` (a bundled patient) or `bundle` (a "
                                  "FHIR Bundle)", "_schema")


class _InvokeBody(_PatientSource):
    service = fields.String(required=True, validate=validate.Length(min=1, max=200))
    hook = fields.String(required=True, validate=validate.Length(min=1, max=40))
    medications = fields.List(fields.String(validate=validate.Length(min=1, max=300)),
                              load_default=list, validate=validate.Length(max=20))


class _Coding(Schema):
    class Meta:
        unknown = RAISE

    code = fields.String(required=True, validate=validate.Length(min=1))
    system = fields.String(required=True, validate=validate.Length(min=1))
    display = fields.String()


class _FeedbackBody(Schema):
    class Meta:
        unknown = RAISE

    site = fields.String()
    service = fields.String(required=True, validate=validate.Length(min=1, max=200))
    card = fields.String(required=True, validate=validate.Length(min=1, max=200))
    outcome = fields.String(required=True, validate=validate.OneOf(("accepted", "overridden")))
    suggestion = fields.String(validate=validate.Length(min=1, max=200))
    reason = fields.Nested(_Coding)
    comment = fields.String(validate=validate.Length(max=2000))

    @validates_schema
    def _outcome_fields(self, data, **kwargs):
        if data["outcome"] == "accepted" and "suggestion" not in data:
            raise ValidationError("an accepted card names the accepted suggestion's uuid",
                                  "suggestion")
        if data["outcome"] == "overridden" and "suggestion" in data:
            raise ValidationError("an overridden card accepts no suggestion", "suggestion")


def _load(schema: Schema) -> dict:
    require_json_body()
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise RequestInvalid("the body must be a JSON object")
    try:
        return schema.load(payload)
    except ValidationError as exc:
        issues = messages_to_issues(exc.messages)
        raise RequestInvalid("; ".join(i.diagnostics for i in issues), issues=issues) from exc


def _site(data: Mapping) -> Site:
    sites = _state()["sites"]
    wanted = data.get("site") or next(iter(sites))
    if wanted not in sites:
        raise RequestInvalid(f"site {wanted!r} has no sandbox (sandbox sites: {', '.join(sites)})")
    return sites[wanted]


def _service(site: Site, service_id: str) -> SiteService:
    enabled = site.services.get(service_id)
    if enabled is None:
        raise RequestInvalid(f"service {service_id!r} is not enabled for site {site.id!r}")
    return enabled


def _bundle(data: Mapping) -> dict:
    if "patient" in data:
        bundle = bundled_patients().get(data["patient"])
        if bundle is None:
            raise RequestInvalid(f"no bundled patient {data['patient']!r}")
        return bundle
    bundle = data["bundle"]
    if bundle.get("resourceType") != "Bundle":
        raise RequestInvalid("bundle: not a FHIR Bundle (resourceType must be Bundle)")
    if _patient(bundle) is None:
        raise RequestInvalid("bundle: the Bundle has no Patient with an id")
    return dated_today(bundle, runtime().clock().date())


# ---------------------------------------------------------------------------------------------
# Calls to this server's own CDS endpoints, signed as the site's EHR

def _own_base_url() -> str:
    """This server's own address: the socket gunicorn accepted the call on (SERVER_NAME and
    SERVER_PORT), never the Host header, which a caller chooses: the sandbox signs a token and
    posts to this URL, and must not be made to send either anywhere else."""
    environ = request.environ
    scheme = environ.get("wsgi.url_scheme", "http")
    host, port = environ.get("SERVER_NAME", "localhost"), str(environ.get("SERVER_PORT", ""))
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 - a bind-all address
    if ":" in host:
        host = f"[{host}]"
    default = {"http": "80", "https": "443"}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")


def _audience(site: Site, path: str) -> str:
    """The `aud` this deployment accepts for `path`, as Epic would send it: the configured public
    URL of the endpoint, else the site's first `audiences` entry (start-up refuses a site with
    neither). Not the URL posted to, which is this server's own socket address."""
    public_url = runtime().public_url
    if public_url:
        return public_url + path
    return site.audiences[0] if site.audiences else _own_base_url() + path


def _signed_post(site: Site, path: str, body: Any) -> dict:
    url = _own_base_url() + path
    try:
        token = signing_token(site, _audience(site, path))
    except InvokeError as exc:
        raise RequestInvalid(str(exc)) from exc
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    status, answer = _state()["transport"](url, headers, body)
    shown = {**headers, "Authorization": f"Bearer {token[:TOKEN_SHOWN]}…"}
    return {
        "request": {"method": "POST", "url": url, "headers": shown, "body": body,
                    "jwt": {"header": jwt.get_unverified_header(token),
                            "claims": jwt.decode(token, options={"verify_signature": False})}},
        "response": {"status": status, "body": answer},
    }


def explanation(site: Site, enabled: SiteService, body: Mapping) -> dict | None:
    """The site's model on the request's prefetch, as the service scores it; None without one."""
    if enabled.model is None or enabled.model not in runtime().models:
        return None
    from hooks._kidney import assess, risk

    resources = [v for v in body["prefetch"].values() if v is not None]
    now = runtime().clock()
    status = assess(resources, now=now, code_map=site.code_map)
    binding = ModelBinding(runtime().models.get(enabled.model), thresholds=enabled.thresholds,
                           code_map=site.code_map, observed=False)
    prediction = risk(status, resources, binding, now=now)
    if prediction is None:
        return None
    return prediction.to_dict()


@bp.get("/api/patients")
def api_patients():
    patients = []
    for name, bundle in bundled_patients().items():
        patient = _patient(bundle)
        patients.append({"id": name, "patientId": patient["id"], "name": _patient_name(patient),
                         "gender": patient.get("gender"), "birthDate": patient.get("birthDate"),
                         "resources": len(_entries(bundle))})
    return {"patients": patients}


@bp.get("/api/services")
def api_services():
    sites = []
    for site in _state()["sites"].values():
        services = [{"id": s.service.id, "title": s.service.title, "hooks": list(s.service.hooks),
                     "model": s.model} for s in site.services.values()]
        sites.append({"site": site.id, "services": services})
    return {"sites": sites}


@bp.post("/api/medications")
def api_medications():
    return {"medications": medications(_bundle(_load(_PatientSource())))}


@bp.post("/api/invoke")
def api_invoke():
    data = _load(_InvokeBody())
    site = _site(data)
    enabled = _service(site, data["service"])
    bundle = _bundle(data)
    selections: list[str] = []
    if data["hook"] in ORDER_HOOKS and data["medications"]:
        bundle, selections = _with_drafts(bundle, data["medications"])
    try:
        body = build_request(site, data["service"], bundle, hook=data["hook"],
                             selections=selections)
    except InvokeError as exc:
        raise RequestInvalid(str(exc)) from exc
    result = _signed_post(site, f"/cds-services/{data['service']}", body)
    result["explanation"] = explanation(site, enabled, body)
    return result


@bp.post("/api/reset-overrides")
def api_reset_overrides():
    """End the suppressions caused by the sandbox's overrides for the chosen patient: only the
    clinician the sandbox plays (`INVOKE_USER`) at a sandbox site, never another user's."""
    data = _load(_PatientSource())
    site = _site(data)
    patient_id = _patient(_bundle(data))["id"]
    store = runtime().store
    active = suppression.active_overrides(store, {site.id: site.override_window},
                                          now=runtime().clock(), site=site.id,
                                          user_id=INVOKE_USER, patient_id=patient_id)
    cleared = store.delete_overrides([row["id"] for row in active])
    log.info("sandbox: cleared %d suppression(s) of %s at site %s", cleared, INVOKE_USER, site.id)
    return {"cleared": cleared, "site": site.id, "userId": INVOKE_USER, "patientId": patient_id}


@bp.post("/api/feedback")
def api_feedback():
    data = _load(_FeedbackBody())
    site = _site(data)
    _service(site, data["service"])
    # CDS Hooks 2.0 §Feedback: outcomeTimestamp in UTC, RFC 3339.
    item: dict[str, Any] = {"card": data["card"], "outcome": data["outcome"],
                            "outcomeTimestamp": runtime().clock().astimezone(UTC).strftime(
                                "%Y-%m-%dT%H:%M:%SZ")}
    if data["outcome"] == "accepted":
        item["acceptedSuggestions"] = [{"id": data["suggestion"]}]
    elif "reason" in data or "comment" in data:
        item["overrideReason"] = {k: v for k, v in (("reason", data.get("reason")),
                                                    ("userComment", data.get("comment")))
                                  if v is not None}
    return _signed_post(site, f"/cds-services/{data['service']}/feedback", {"feedback": [item]})
