"""The request schemas' short path (`schemas._FastLoad`) against marshmallow's own `load`: on
every request, valid or broken, the same loaded value or the same error messages."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
from marshmallow import Schema, ValidationError, validates

from cds_service.protocol import schemas
from cds_service.protocol.schemas import CdsRequestSchema

DATA = Path(__file__).parent / "data"
FIXTURES = Path(__file__).parent / "fixtures" / "cds-hooks-examples"
BASES = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(DATA.glob("*/*/request.json"))]
BASES += [json.loads(p.read_text(encoding="utf-8"))
          for p in sorted(FIXTURES.glob("*request*.json"))]

ODD_VALUES = [None, 0, 1.5, True, "", "x", "ü", [], [1], {}, {"a": 1}, "a" * 300,
              "Patient/", "PractitionerRole/1", "Practitioner/abc.DEF-1", "abc-123", "a b",
              "http://localhost:8080/fhir", "https://fhir.example.org/api/FHIR/R4", "ftp://x.org",
              "http://", "patient-view", "order-select", "order-sign", "Bearer", "bearer", "MAC",
              {"resourceType": "Bundle"}, {"resourceType": "Bundle", "entry": 1},
              {"resourceType": "Bundle", "type": "collection", "entry": []},
              ["MedicationRequest/abc"], ["MedicationRequest/"], ["x"], [None]]
TOP_KEYS = ["hook", "hookInstance", "fhirServer", "fhirAuthorization", "context", "prefetch",
            "extension", "unknownKey"]
CONTEXT_KEYS = ["userId", "patientId", "encounterId", "draftOrders", "selections", "other"]
AUTH_KEYS = ["access_token", "token_type", "expires_in", "scope", "subject", "patient", "x"]


def reference_load(schema: Schema, data):
    """marshmallow's answer: the short path off, for the nested and context schemas too."""
    original = schemas._FastLoad._fast_loadable
    schemas._FastLoad._fast_loadable = lambda self: False
    try:
        return schema.load(data)
    finally:
        schemas._FastLoad._fast_loadable = original


def outcome(load, data):
    try:
        return "ok", load(copy.deepcopy(data))
    except ValidationError as exc:
        return "error", exc.normalized_messages()


def mutate(rng: random.Random, request: dict) -> dict:
    request = copy.deepcopy(request)
    for _ in range(rng.randint(1, 3)):
        where = rng.random()
        if where < 0.4:
            target, keys = request, TOP_KEYS
        elif where < 0.8 and isinstance(request.get("context"), dict):
            target, keys = request["context"], CONTEXT_KEYS
        elif isinstance(request.get("fhirAuthorization"), dict):
            target, keys = request["fhirAuthorization"], AUTH_KEYS
        else:
            target, keys = request, TOP_KEYS
        key = rng.choice(keys)
        if rng.random() < 0.3:
            target.pop(key, None)
        else:
            target[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return request


def test_bases_load_on_the_short_path():
    assert len(BASES) >= 20
    schema = CdsRequestSchema()
    loaded = 0
    for base in BASES:
        kind, value = outcome(schema.load, base)
        assert (kind, value) == outcome(lambda d: reference_load(schema, d), base)
        loaded += kind == "ok"
    assert loaded >= len(BASES) - 3  # the examples are valid requests, nearly all


@pytest.mark.parametrize("seed", range(8))
def test_same_answer_as_marshmallow_on_broken_requests(seed):
    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs, not secrets
    schema = CdsRequestSchema()
    seen = set()
    for _ in range(400):
        request = mutate(rng, rng.choice(BASES))
        fast = outcome(schema.load, request)
        assert fast == outcome(lambda d: reference_load(schema, d), request), request
        seen.add(fast[0])
    assert seen == {"ok", "error"}


def test_not_an_object_and_hook_shapes():
    schema = CdsRequestSchema()
    for data in ([], "x", None, 1, {"hook": "patient-view"}, {"extension": []}):
        assert outcome(schema.load, data) == outcome(lambda d: reference_load(schema, d), data)


def test_valid_requests_never_reach_marshmallow_s_loader(monkeypatch):
    # A valid request never reaches marshmallow's loader; a broken one does (for its errors).
    calls = []
    original = Schema.load
    monkeypatch.setattr(Schema, "load", lambda self, *a, **k: calls.append(type(self).__name__)
                        or original(self, *a, **k))
    schema = CdsRequestSchema()
    valid = next(b for b in BASES if b.get("hook") == "order-select")
    schema.load(copy.deepcopy(valid))
    assert calls == []
    broken = {**copy.deepcopy(valid), "hookInstance": "not a uuid!"}
    with pytest.raises(ValidationError):
        schema.load(broken)
    assert "CdsRequestSchema" in calls


def test_schemas_with_other_hooks_take_marshmallow_s_path():
    class WithFieldValidator(schemas._FastLoad):
        class Meta:
            unknown = "include"

        name = schemas.fields.String()

        @validates("name")
        def _name(self, value, **kwargs):
            if value == "bad":
                raise ValidationError("bad name")

    schema = WithFieldValidator()
    assert not schema._fast_loadable()
    with pytest.raises(ValidationError, match="bad name"):
        schema.load({"name": "bad"})


def test_plain_fields_are_loaded_without_marshmallow_s_field_machinery():
    plan, declared = CdsRequestSchema()._plan
    shortcuts = {name for name, _, _, shortcut in plan if shortcut is not None}
    assert shortcuts == {"hook", "hookInstance", "fhirServer", "context", "prefetch", "extension"}
    assert "fhirAuthorization" in declared - shortcuts  # Nested: its own schema's short path
    plan, _ = schemas.CONTEXT_SCHEMAS["order-select"]._plan
    assert {name for name, _, _, shortcut in plan if shortcut} == {
        "userId", "patientId", "encounterId", "draftOrders", "selections"}
