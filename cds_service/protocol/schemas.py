"""marshmallow schemas at the HTTP boundary: CDS Hooks requests, hook contexts, discovery.

Rule numbers refer to `cds-hooks-conformance.md`. Requests are parsed leniently where Epic is
known to deviate (1.0-shaped requests, `draftOrders` with or without `type`, string-valued
`extension` keys) and strictly where a missing field would make the answer wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

from marshmallow import (
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    missing,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from cds_service.service import HOOKS

# FHIR R4 id charset (https://hl7.org/fhir/R4/datatypes.html#id). Its 64-character limit is not
# enforced: Epic's draft-order ids run to ~194 characters (Epic tutorial, draftOrders example).
FHIR_ID = r"[A-Za-z0-9\-.]{1,256}"
# Hook library: userId is "[ResourceType]/[id]" of Practitioner, PractitionerRole, Patient or
# RelatedPerson (rule 26). Epic sends PractitionerRole/<id>, or Practitioner/<id> for users
# without a provider record.
USER_ID = rf"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/{FHIR_ID}$"
# hookInstance is a UUID (rule 19); it is logged for correlation, so accept only a safe charset.
HOOK_INSTANCE = r"^[A-Za-z0-9._:\-]{1,128}$"


# The hook kinds `_FastLoad` runs itself (single-object ones without the original data).
_FAST_HOOKS = ("pre_load", "validates_schema", "post_load")


class _FastLoad(Schema):
    """A schema whose `load` of a valid request takes a short path: the same fields'
    `deserialize` (every type check and validator as declared here), unknown keys kept
    (`INCLUDE`), then the schema's own pre_load, validates_schema and post_load methods, without
    marshmallow's error bookkeeping around each step (a third of a 3 KB call's parsing, issue
    20). Anything a field or hook refuses is loaded again by marshmallow, whose error the client
    gets. `tests/test_schemas.py` holds the two to the same answers."""

    def load(self, data, *, many=None, partial=None, unknown=None):
        if many is None and partial is None and unknown is None and self._fast_loadable():
            try:
                return self._fast_load(data)
            except ValidationError:
                pass
        return super().load(data, many=many, partial=partial, unknown=unknown)

    def _fast_loadable(self) -> bool:
        fast = self.__dict__.get("_fast")  # what a schema instance is does not change
        if fast is None:
            fast = self.__dict__["_fast"] = self._check_fast_loadable()
        return fast

    def _check_fast_loadable(self) -> bool:
        if self.many or self.partial or self.unknown != INCLUDE:
            return False
        for tag, hooks in self._hooks.items():
            if tag == "validates" and hooks:  # @validates field methods: not run here
                return False
            if tag in _FAST_HOOKS and any(hook_many or kwargs.get("pass_original")
                                          for _, hook_many, kwargs in hooks):
                return False
        return True

    @cached_property
    def _plan(self) -> tuple[tuple[tuple[str, str, Any, Any], ...], frozenset[str]]:
        """Per field: (data key, output key, field, shortcut or None); and every data key."""
        plan = []
        for attr_name, field in self.load_fields.items():
            name = field.data_key if field.data_key is not None else attr_name
            plan.append((name, field.attribute or attr_name, field, _shortcut(field)))
        return tuple(plan), frozenset(name for name, *_ in plan)

    def _run_hooks(self, tag: str, data: Any) -> Any:
        for name, _, _ in self._hooks.get(tag, ()):
            data = getattr(self, name)(data, many=False, partial=None, unknown=INCLUDE)
        return data

    def _fast_load(self, data: Any) -> dict:
        data = self._run_hooks("pre_load", data)
        if not isinstance(data, dict):
            raise ValidationError("not an object")
        out: dict[str, Any] = {}
        plan, declared = self._plan
        for name, key, field, shortcut in plan:
            value = data.get(name, missing)
            value = shortcut(value) if shortcut else field.deserialize(value, name, data)
            if value is not missing:
                out[key] = value
        for key in data.keys() - declared:
            out[key] = data[key]
        for name, _, _ in self._hooks.get("validates_schema", ()):
            getattr(self, name)(out, many=False, partial=None, unknown=INCLUDE)
        return self._run_hooks("post_load", out)


def _shortcut(field: fields.Field) -> Callable[[Any], Any] | None:
    """`field.deserialize(value)` for the plain fields a request holds (a string, a URL, an
    object, a list of such, any JSON value), without marshmallow's bookkeeping around it: the
    same checks, the same validators, the same value out. It raises ValidationError wherever
    `deserialize` might (marshmallow then loads the request and words the error); None for any
    other field."""
    kind = type(field)
    if field.pre_load or field.post_load or field.load_default is not missing:
        return None
    if kind is fields.Dict and (field.key_field or field.value_field):
        return None
    item = None
    if kind is fields.List:  # a list of plain items: each through the item field's shortcut
        item = _shortcut(field.inner) if not isinstance(field.inner, fields.Nested) else None
        if item is None:
            return None
    accepted = {fields.String: str, fields.Url: str, fields.Dict: dict, fields.List: list,
                fields.Raw: object}.get(kind)
    if accepted is None:
        return None
    required, allow_none, validators = field.required, field.allow_none, tuple(field.validators)

    def shortcut(value: Any) -> Any:
        if value is missing:
            if required:
                raise ValidationError("required")
            return missing
        if value is None:
            if allow_none:
                return None
            raise ValidationError("null")
        if accepted is not object and type(value) is not accepted:
            raise ValidationError("type")  # bytes, subclasses: marshmallow's to decide
        if accepted is dict:
            value = dict(value)  # Dict returns a copy
        elif item is not None:
            value = [item(each) for each in value]
        for validator in validators:
            if validator(value) is False:
                raise ValidationError("validator")
        return value

    return shortcut


class FhirAuthorizationSchema(_FastLoad):
    """CDS Hooks 2.0 §Passing the Access Token. Only the token is used; scopes are not parsed
    because Epic sends proprietary scope names (`Patient.Read (R4)`, `urn:Epic-com:…`)."""

    class Meta:
        unknown = INCLUDE

    access_token = fields.String(required=True, validate=validate.Length(min=1))
    token_type = fields.String(required=True)
    expires_in = fields.Integer()
    scope = fields.String()
    subject = fields.String()
    patient = fields.String()

    @validates_schema
    def _bearer(self, data, **kwargs):
        if data.get("token_type", "").lower() != "bearer":
            raise ValidationError("token_type must be 'Bearer'.", "token_type")


def _bundle(value: Any) -> None:
    # The hook library's published examples omit Bundle.type; Epic and library main send
    # "collection" (rule 38): accept both, but it must be a Bundle.
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        raise ValidationError("must be a FHIR Bundle of draft order resources.")
    if not isinstance(value.get("entry", []), list):
        raise ValidationError("Bundle.entry must be a list.")


class _BaseContextSchema(_FastLoad):
    class Meta:
        # Hooks may gain context fields in later versions; unknown fields are kept, not refused.
        unknown = INCLUDE

    userId = fields.String(
        required=True,
        validate=validate.Regexp(USER_ID, error="must be ResourceType/id of the user, e.g. "
                                 "PractitionerRole/123."),
    )
    patientId = fields.String(
        required=True, validate=validate.Regexp(rf"^{FHIR_ID}$", error="must be a FHIR id.")
    )
    encounterId = fields.String(validate=validate.Regexp(rf"^{FHIR_ID}$",
                                                          error="must be a FHIR id."))


# Epic only sends context.draftOrders when the client holds the CDS-Hooks order scope, e.g.
# "MedicationRequest (Unsigned Order)" (Epic tutorial, Gotchas); say so when it is missing.
_DRAFT_ORDERS_MISSING = (
    "Missing data for required field. Epic omits draftOrders unless the client is authorized "
    "for the unsigned-order scopes (e.g. 'MedicationRequest (Unsigned Order)')."
)


class PatientViewContextSchema(_BaseContextSchema):
    pass


class OrderSignContextSchema(_BaseContextSchema):
    draftOrders = fields.Raw(
        required=True, validate=_bundle, error_messages={"required": _DRAFT_ORDERS_MISSING}
    )


class OrderSelectContextSchema(OrderSignContextSchema):
    # Rule 31: an array of "Type/id" references into draftOrders.
    selections = fields.List(
        fields.String(validate=validate.Regexp(rf"^[A-Za-z]+/{FHIR_ID}$",
                                               error="must be ResourceType/id.")),
        required=True,
        validate=validate.Length(min=1),
    )


CONTEXT_SCHEMAS: dict[str, Schema] = {
    "patient-view": PatientViewContextSchema(),
    "order-select": OrderSelectContextSchema(),
    "order-sign": OrderSignContextSchema(),
}
assert set(CONTEXT_SCHEMAS) == set(HOOKS)  # noqa: S101 - import-time invariant


class CdsRequestSchema(_FastLoad):
    """CDS Hooks 2.0 §Calling a CDS Service, accepting the 1.0/1.1 shapes Epic sends."""

    class Meta:
        unknown = INCLUDE

    hook = fields.String(required=True, validate=validate.OneOf(HOOKS))
    hookInstance = fields.String(
        required=True,
        validate=validate.Regexp(HOOK_INSTANCE, error="must be a UUID (letters, digits, '-')."),
    )
    fhirServer = fields.Url(schemes={"http", "https"}, require_tld=False)
    fhirAuthorization = fields.Nested(FhirAuthorizationSchema)
    context = fields.Dict(required=True)
    prefetch = fields.Dict(allow_none=True)
    extension = fields.Raw()

    @pre_load
    def _ignore_non_object_extension(self, data, **kwargs):
        # Rule 137: `extension` MUST be an object; a malformed one is ignored, not fatal.
        if isinstance(data, dict) and "extension" in data and not isinstance(
            data["extension"], dict
        ):
            data = {k: v for k, v in data.items() if k != "extension"}
        return data

    @validates_schema
    def _authorization_needs_server(self, data, **kwargs):
        # Rule 20 / invariant cds-r-1: fhirServer is REQUIRED when fhirAuthorization is given.
        if "fhirAuthorization" in data and "fhirServer" not in data:
            raise ValidationError(
                "fhirServer is required when fhirAuthorization is provided.", "fhirServer"
            )

    @post_load
    def _hook_context(self, data, **kwargs):
        schema = CONTEXT_SCHEMAS[data["hook"]]
        try:
            data["context"] = schema.load(data["context"])
        except ValidationError as exc:
            raise ValidationError({"context": exc.messages}) from exc
        data.setdefault("extension", {})
        data["prefetch"] = data.get("prefetch") or {}
        return data


# --- discovery (rules 7-16) --------------------------------------------------------------


class DiscoveryServiceSchema(Schema):
    hook = fields.String(required=True)
    id = fields.String(required=True)
    title = fields.String()
    description = fields.String(required=True)
    prefetch = fields.Dict(keys=fields.String(), values=fields.String())
    usageRequirements = fields.String()


class DiscoverySchema(Schema):
    services = fields.List(fields.Nested(DiscoveryServiceSchema), required=True)


# --- response documentation (bodies are rendered by cds_service.protocol.cards, not dumped)
# ---------


class CardsResponseSchema(Schema):
    """CDS Hooks 2.0 §CDS Service Response: `cards` (possibly empty) and `systemActions`."""

    cards = fields.List(fields.Dict(), required=True)
    systemActions = fields.List(fields.Dict())
    # Cards withheld by alert-fatigue suppression
    # (cds_service.records.suppression.WITHHELD_EXTENSION).
    extension = fields.Dict()


class FeedbackAckSchema(Schema):
    received = fields.Integer(required=True)
    stored = fields.Integer(required=True)


class OperationOutcomeSchema(Schema):
    resourceType = fields.String(required=True)
    issue = fields.List(fields.Dict(), required=True)
