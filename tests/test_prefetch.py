"""Prefetch templates (lint, rendering) and classification of prefetched data, no network.

Examples are copied from the CDS Hooks 2.0 specification and Epic's CDS Hooks tutorial
(shared/reference/cds-hooks-examples/, file names cited per test).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest

from cds_service.data.prefetch import (
    TOKEN_RE,
    Prefetch,
    PrefetchSettings,
    lint_template,
    render_template,
)
from cds_service.data.prefetch_resolve import resolve_prefetch
from cds_service.data.prefetch_values import classify
from cds_service.protocol.errors import FhirAccessError, PrefetchUnavailable

CONTEXT = {"patientId": "123", "encounterId": "E1", "userId": "PractitionerRole/456"}

# epic-request-patient-view.json, key "conditions": Epic's answer to a search with no results.
EPIC_EMPTY_SEARCHSET = {
    "resourceType": "Bundle",
    "type": "searchset",
    "total": 0,
    "link": [
        {
            "relation": "self",
            "url": "https://example.com/interconnect-instance-oauth/api/FHIR/R4/Condition"
            "?patient=eXoGxqgBaJuNkuahMYmiDhg3&_include=Condition:patient"
            "&_include=Condition:patient:organization",
        }
    ],
    "entry": [
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "warning",
                        "code": "processing",
                        "details": {
                            "coding": [
                                {
                                    "system": "urn:oid:1.2.840.114350.1.13.861.1.7.2.657369",
                                    "code": "4101",
                                    "display": "Resource request returns no results.",
                                }
                            ],
                            "text": "Resource request returns no results.",
                        },
                    }
                ],
            },
            "search": {"mode": "outcome"},
        }
    ],
}

PATIENT = {"resourceType": "Patient", "id": "123", "gender": "male", "birthDate": "1974-12-25"}
ROLE = {"resourceType": "PractitionerRole", "id": "456", "active": True}
CONDITION = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/123"}}


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def resolve_offline(templates, prefetch, executor, *, context=CONTEXT, optional=frozenset()):
    """No fhirServer, no token: everything must come from `prefetch`."""
    return resolve_prefetch(
        templates,
        context=context,
        prefetch=prefetch,
        fhir_server=None,
        access_token=None,
        settings=PrefetchSettings(),
        executor=executor,
        optional=optional,
    )


# -- lint ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        # cdshooks-2.0-discovery-fragment-prefetch-templates.json
        "Patient/{{context.patientId}}",
        "Condition?patient={{context.patientId}}&code=44054006&category=problem-list-item"
        "&status=active",
        "PractitionerRole?_id={{userPractitionerRoleId}}",
        # cdshooks-2.0-discovery-fragment-prefetch-user-read.json
        "{{context.userId}}",
        # epic-discovery-fragment-prefetch-configuration.json
        "MedicationRequest?patient={{context.patientId}}&status=active",
        "Condition?patient={{context.patientId}}&encounter={{context.encounterId}}"
        "&category=encounter-diagnosis",
        # rule 43 subset: token :in, date prefixes, _count, _sort
        "Observation?patient={{context.patientId}}&code:in=http://example.org/vs"
        "&date=ge2024-01-01&_sort=-date&_count=5",
        "Practitioner/{{userPractitionerId}}",
        "Patient/{{userPatientId}}",
        "RelatedPerson/{{userRelatedPersonId}}",
        "Patient/123",
    ],
)
def test_lint_accepts_conformant_templates(template):
    assert lint_template(template) == []


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("Patient/{{Patient.id}}", "rule 40"),  # pre-1.0 token syntax (cds-hooks/sandbox#38)
        ("Patient/{{ context.patientId }}", "rule 40"),
        ("Patient/{{patientId}}", "rule 40"),
        ("MedicationRequest/{{context.draftOrders.MedicationRequest.id}}", "root-level"),
        ("Patient/{{context.medication.id}}", "root-level"),
        (
            # cdshooks-2.0-discovery-fragment-prefetch-user-practitionerrole-search.json
            "PractitionerRole?_id={{userPractitionerRoleId}}&_include=PractitionerRole:practitioner",
            "'_include'",
        ),
        ("Patient?_id={{context.patientId}}&_revinclude=Observation:subject", "'_revinclude'"),
        ("Patient?_has:Observation:patient:code=1234-5", "'_has'"),
        ("Observation?subject.name=peter", "chained"),
        ("Observation?subject:Patient.name=peter", "chained"),
        (
            # cdshooks-2.0-discovery-fragment-prefetch-hemoglobin-a1c.json prints `sort:desc=date`
            "Observation?patient={{context.patientId}}&code=4548-4&_count=1&sort:desc=date",
            "':desc'",
        ),
        ("Condition?patient={{context.patientId}}&code:text=diabetes", "':text'"),
        ("https://ehr.example.org/fhir/Patient/1", "relative"),
        ("/Patient/{{context.patientId}}", "relative"),
        ("//evil.example/Patient/1", "relative"),
        ("urn:uuid:1234", "relative"),
        ("Patient/{{context.patientId}}/_history", "neither a read"),
        ("Patient/{{context.patientId}}/$everything", "neither a read"),
        ("Patient/{{context.patientId}}?_elements=id", "search must be"),
        ("{{context.patientId}}", "neither a read"),
        ("patient/123", "neither a read"),
        ("Patient?", "no parameters"),
        ("Patient?name=", "no value"),
        ("Patient?name", "no value"),
        ("Patient?a=1&&b=2", "empty parameter"),
        ("Patient?{{context.patientId}}=1", "contains a token"),
        ("Patient/{{context.patientId", "unbalanced"),
        ("Patient/context.patientId}}", "unbalanced"),
        ("Patient / 1", "whitespace"),
        ("", "non-empty string"),
        (None, "non-empty string"),
        (42, "non-empty string"),
    ],
)
def test_lint_reports_problem(template, problem):
    problems = lint_template(template)
    assert any(problem in p for p in problems), problems


def test_token_re_matches_only_spec_tokens():
    text = "{{context.patientId}} {{userPractitionerRoleId}} {{context.a.b}} {{Patient.id}}"
    assert [m.group(1) for m in TOKEN_RE.finditer(text)] == [
        "context.patientId",
        "userPractitionerRoleId",
    ]


# -- render ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "context", "expected"),
    [
        ("Patient/{{context.patientId}}", CONTEXT, "Patient/123"),
        ("Patient/123", CONTEXT, "Patient/123"),
        ("{{context.userId}}", CONTEXT, "PractitionerRole/456"),
        (
            "Condition?patient={{context.patientId}}&encounter={{context.encounterId}}",
            CONTEXT,
            "Condition?patient=123&encounter=E1",
        ),
        # Rule 42: user tokens derive from context.userId's type.
        ("PractitionerRole?_id={{userPractitionerRoleId}}", CONTEXT, "PractitionerRole?_id=456"),
        ("Practitioner/{{userPractitionerId}}", CONTEXT, None),  # would need a read of the role
        ("Patient/{{userPatientId}}", CONTEXT, None),
        ("Practitioner/{{userPractitionerId}}", {"userId": "Practitioner/abc"}, "Practitioner/abc"),
        ("PractitionerRole/{{userPractitionerRoleId}}", {"userId": "Practitioner/abc"}, None),
        ("Patient/{{userPatientId}}", {"userId": "Patient/p9"}, "Patient/p9"),
        (
            "RelatedPerson/{{userRelatedPersonId}}",
            {"userId": "RelatedPerson/r1"},
            "RelatedPerson/r1",
        ),
        # Epic ids (epic-request-patient-view.json)
        (
            "{{context.userId}}",
            {"userId": "PractitionerRole/e-QokEGUJIzyynNdkCFrs9w3"},
            "PractitionerRole/e-QokEGUJIzyynNdkCFrs9w3",
        ),
        ("{{context.userId}}", {"userId": "456"}, None),  # not Type/id
        ("{{context.userId}}", {"userId": "PractitionerRole/.."}, None),
        ("{{context.userId}}", {"userId": "Practitioner/a b"}, None),
        ("{{context.userId}}", {"userId": "Practitioner/a%2Fb"}, "Practitioner/a%252Fb"),
        ("{{context.userId}}", {}, None),
        # Values are percent-encoded: no injected parameters, no path traversal.
        (
            "Condition?patient={{context.patientId}}&category=problem-list-item",
            {"patientId": "1&_include=*"},
            "Condition?patient=1%26_include%3D%2A&category=problem-list-item",
        ),
        (
            "Patient/{{context.patientId}}",
            {"patientId": "../Practitioner/1"},
            "Patient/..%2FPractitioner%2F1",
        ),
        ("Patient/{{context.patientId}}", {"patientId": "a b?c#d"}, "Patient/a%20b%3Fc%23d"),
        ("Patient/{{context.patientId}}", {"patientId": "é"}, "Patient/%C3%A9"),
        ("Patient/{{context.patientId}}", {"patientId": ".."}, None),
        # Unsatisfiable: absent, empty, non-primitive.
        ("Encounter/{{context.encounterId}}", {"patientId": "123"}, None),
        ("Encounter/{{context.encounterId}}", {"encounterId": ""}, None),
        ("Encounter/{{context.encounterId}}", {"encounterId": "   "}, None),
        ("Encounter/{{context.encounterId}}", {"encounterId": None}, None),
        ("Patient/{{context.patientId}}", {"patientId": 123}, "Patient/123"),
        ("Patient/{{context.patientId}}", {"patientId": True}, None),
        ("Patient/{{context.patientId}}", {"patientId": float("nan")}, None),
        ("Patient/{{context.patientId}}", {"patientId": {"id": "1"}}, None),
        ("Patient/{{context.patientId}}", {"patientId": ["1"]}, None),
        (
            "MedicationRequest?_id={{context.selections}}",
            {"selections": ["MedicationRequest/1"]},
            None,
        ),
        # Tokens the spec does not define are never sent literally.
        ("Patient/{{Patient.id}}", CONTEXT, None),
        ("Patient/{{context.patient.id}}", {"patient": {"id": "1"}}, None),
        ("Patient/{{context.patientId}}", "not a mapping", None),
        (None, CONTEXT, None),
    ],
)
def test_render_template(template, context, expected):
    assert render_template(template, context) == expected


def test_rendered_templates_never_contain_braces():
    for context in ({}, CONTEXT, {"patientId": "{{context.patientId}}"}):
        rendered = render_template("Patient/{{context.patientId}}", context)
        assert rendered is None or ("{" not in rendered and "}" not in rendered)


# -- classification of prefetched values -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "search", "read_type", "expected"),
    [
        (PATIENT, False, "Patient", PATIENT),
        (
            {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": PATIENT}]},
            False,
            "Patient",
            PATIENT,
        ),
        (EPIC_EMPTY_SEARCHSET, True, None, []),
        (EPIC_EMPTY_SEARCHSET, False, "Condition", None),
        ({"resourceType": "Bundle", "type": "searchset", "total": 0}, True, None, []),
        (
            {
                "resourceType": "Bundle",
                "entry": [
                    None,
                    1,
                    "x",
                    {},
                    {"resource": "Condition/1"},
                    {"resource": {"id": "no-type"}},
                    {"resource": CONDITION, "search": {"mode": "match"}},
                    {
                        "resource": {"resourceType": "Patient", "id": "p"},
                        "search": {"mode": "include"},
                    },
                    {"resource": {"resourceType": "Basic"}, "search": {"mode": "outcome"}},
                ],
                "link": "not a list",
            },
            True,
            None,
            [CONDITION, {"resourceType": "Patient", "id": "p"}],
        ),
        (
            {"resourceType": "Bundle", "entry": "junk", "link": [None, {"relation": "next"}]},
            True,
            None,
            [],
        ),
    ],
)
def test_classify_usable(value, search, read_type, expected):
    verdict = classify(value, search=search, read_type=read_type)
    assert verdict.value == expected
    assert verdict.next_url is None


@pytest.mark.parametrize(
    ("value", "search", "read_type", "why"),
    [
        ("123", False, "PractitionerRole", "string"),  # the 2.0 spec's own `"user": "123"`
        (123, False, None, "number"),
        (True, False, None, "boolean"),
        ([PATIENT], False, None, "array"),
        ({}, False, None, "no resourceType"),
        ({"resourceType": ["Patient"]}, False, None, "no resourceType"),
        (
            {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]},
            False,
            None,
            "OperationOutcome",
        ),
        (
            {"resourceType": "OperationOutcome", "issue": [{"severity": "information"}]},
            True,
            None,
            "OperationOutcome",
        ),
        (
            {
                "resourceType": "Bundle",
                "entry": [
                    {"resource": CONDITION},
                    {
                        "resource": {
                            "resourceType": "OperationOutcome",
                            "issue": [{"severity": "fatal", "code": "exception"}],
                        }
                    },
                ],
            },
            True,
            None,
            "error OperationOutcome",
        ),
        (
            {
                "resourceType": "Bundle",
                "entry": [{"resource": {"resourceType": "OperationOutcome"}}],
            },
            True,
            None,
            "error OperationOutcome",
        ),
        (PATIENT, True, None, "not a search Bundle"),
        (PATIENT, False, "Practitioner", "not a Practitioner"),
        (
            {"resourceType": "Bundle", "entry": [{"resource": PATIENT}, {"resource": PATIENT}]},
            False,
            "Patient",
            "exactly one",
        ),
        (
            {"resourceType": "Bundle", "entry": [{"resource": CONDITION}]},
            False,
            "Patient",
            "exactly one",
        ),
    ],
)
def test_classify_unusable(value, search, read_type, why):
    verdict = classify(value, search=search, read_type=read_type)
    assert not hasattr(verdict, "value")
    assert why in verdict.why


def test_classify_reports_next_link():
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [
            {"relation": "self", "url": "https://ehr/fhir/Observation?patient=1"},
            {"relation": "next", "url": "https://ehr/fhir/Observation?patient=1&_page=2"},
        ],
        "entry": [{"resource": {"resourceType": "Observation", "id": "o1"}}],
    }
    verdict = classify(bundle, search=True)
    assert verdict.next_url == "https://ehr/fhir/Observation?patient=1&_page=2"


# -- resolve_prefetch without FHIR access ----------------------------------------------------

EPIC_TEMPLATES = {
    "patient": "Patient/{{context.patientId}}",
    "conditions": "Condition?patient={{context.patientId}}",
    "medications": "MedicationRequest?patient={{context.patientId}}",
    "-user": "{{context.userId}}",
}


def test_epic_style_prefetch_used_as_given(executor):
    prefetch = {
        "-user": ROLE,
        "patient": PATIENT,
        "conditions": copy.deepcopy(EPIC_EMPTY_SEARCHSET),
        "medications": {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 1,
            "entry": [
                {
                    "resource": {"resourceType": "MedicationRequest", "id": "m1"},
                    "search": {"mode": "match"},
                }
            ],
        },
        "unrequested": {"resourceType": "Patient", "id": "other"},  # rule 46: ignored
    }
    result = resolve_offline(EPIC_TEMPLATES, prefetch, executor)
    assert isinstance(result, Prefetch)
    assert list(result) == list(EPIC_TEMPLATES)
    assert result["patient"] == PATIENT
    assert result["-user"] == ROLE
    assert result["conditions"] == []
    assert result["medications"] == [{"resourceType": "MedicationRequest", "id": "m1"}]
    assert set(result.sources.values()) == {"prefetch"}
    assert result.fetched == []
    assert result.truncated == frozenset()
    assert "unrequested" not in result


def test_null_means_no_data(executor):
    result = resolve_offline(EPIC_TEMPLATES, dict.fromkeys(EPIC_TEMPLATES), executor)
    assert dict(result) == dict.fromkeys(EPIC_TEMPLATES)
    assert set(result.sources.values()) == {"null"}


def test_spec_prefetch_fragment_with_bare_string_user_does_not_crash(executor):
    # cdshooks-2.0-request-fragment-prefetch-data.json (with its "..." placeholder keys) against
    # cdshooks-2.0-discovery-fragment-prefetch-templates.json + the user read template.
    prefetch = {
        "patient": {
            "resourceType": "Patient",
            "gender": "male",
            "birthDate": "1974-12-25",
            "...": "<snipped for brevity>",
        },
        "hemoglobin-a1c": {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Observation",
                        "code": {
                            "coding": [
                                {
                                    "system": "http://loinc.org",
                                    "code": "4548-4",
                                    "display": "Hemoglobin A1c",
                                }
                            ]
                        },
                        "...": "<snipped for brevity>",
                    }
                }
            ],
        },
        "user": "123",
    }
    templates = {
        "patient": "Patient/{{context.patientId}}",
        "hemoglobin-a1c": "Observation?patient={{context.patientId}}&code=4548-4&_count=1",
        "user": "{{context.userId}}",
    }
    with pytest.raises(PrefetchUnavailable) as excinfo:
        resolve_offline(templates, prefetch, executor)
    assert not isinstance(excinfo.value, FhirAccessError)
    assert excinfo.value.status == 412
    assert [i.expression for i in excinfo.value.issues] == [("prefetch.user",)]
    assert "string" in excinfo.value.issues[0].diagnostics

    result = resolve_offline(templates, prefetch, executor, optional=frozenset({"user"}))
    assert result["user"] is None
    assert result.sources == {
        "patient": "prefetch",
        "hemoglobin-a1c": "prefetch",
        "user": "optional-missing",
    }
    assert result["hemoglobin-a1c"][0]["code"]["coding"][0]["code"] == "4548-4"


@pytest.mark.parametrize(
    "value",
    [
        "123",
        42,
        [],
        {},
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]},
        {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "OperationOutcome"}}]},
        {"resourceType": "Practitioner", "id": "456"},  # template reads a PractitionerRole
    ],
)
def test_unusable_value_without_fhir_access_is_412_naming_the_key(executor, value):
    templates = {"patient": "Patient/{{context.patientId}}", "user": "{{context.userId}}"}
    with pytest.raises(PrefetchUnavailable) as excinfo:
        resolve_offline(templates, {"patient": PATIENT, "user": value}, executor)
    assert excinfo.value.status == 412
    assert "'user'" in excinfo.value.message
    assert "'patient'" not in excinfo.value.message
    outcome = excinfo.value.to_operation_outcome()
    assert outcome["issue"][0]["expression"] == ["prefetch.user"]


def test_missing_keys_without_fhir_access_are_all_named(executor):
    with pytest.raises(PrefetchUnavailable) as excinfo:
        resolve_offline(EPIC_TEMPLATES, {"patient": PATIENT}, executor)
    named = {i.expression[0] for i in excinfo.value.issues}
    assert named == {"prefetch.conditions", "prefetch.medications", "prefetch.-user"}
    assert excinfo.value.to_operation_outcome()["resourceType"] == "OperationOutcome"


def test_unsatisfiable_template_resolves_to_none(executor):
    templates = {
        "patient": "Patient/{{context.patientId}}",
        "encounter": "Encounter/{{context.encounterId}}",
        "practitioner": "Practitioner/{{userPractitionerId}}",
    }
    context = {"patientId": "123", "userId": "PractitionerRole/456"}
    result = resolve_offline(templates, {"patient": PATIENT}, executor, context=context)
    assert result["encounter"] is None
    assert result["practitioner"] is None
    assert result.sources["encounter"] == result.sources["practitioner"] == "unsatisfiable"


def test_unsatisfiable_template_still_uses_prefetched_value(executor):
    templates = {"practitioner": "Practitioner/{{userPractitionerId}}"}
    practitioner = {"resourceType": "Practitioner", "id": "p1"}
    result = resolve_offline(templates, {"practitioner": practitioner}, executor)
    assert result["practitioner"] == practitioner
    assert result.sources["practitioner"] == "prefetch"


@pytest.mark.parametrize("prefetch", [None, "junk", [1, 2], 5])
def test_odd_prefetch_container(executor, prefetch):
    with pytest.raises(PrefetchUnavailable):
        resolve_offline({"patient": "Patient/{{context.patientId}}"}, prefetch, executor)
    result = resolve_offline(
        {"patient": "Patient/{{context.patientId}}"},
        prefetch,
        executor,
        optional=frozenset({"patient"}),
    )
    assert result.sources == {"patient": "optional-missing"}


def test_prefetched_next_link_without_token_uses_given_page(executor, caplog):
    # cdshooks-3.0ballot-request-order-sign-prefetch-pagination.json (ids simplified)
    orders = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 2,
        "link": [
            {
                "relation": "self",
                "url": "https://ehr.example.org/fhir/MedicationRequest?patient=1288992&_count=1&_page=1",
            },
            {
                "relation": "next",
                "url": "https://ehr.example.org/fhir/MedicationRequest?patient=1288992&_count=1&_page=2",
            },
        ],
        "entry": [
            {
                "resource": {
                    "resourceType": "MedicationRequest",
                    "id": "rx-page-1-01",
                    "status": "active",
                    "intent": "order",
                }
            }
        ],
    }
    templates = {"orders": "MedicationRequest?patient={{context.patientId}}"}
    result = resolve_offline(templates, {"orders": orders}, executor)
    assert [r["id"] for r in result["orders"]] == ["rx-page-1-01"]
    assert result.sources["orders"] == "prefetch"
    assert result.truncated == {"orders"}
    assert "next page" in caplog.text


def test_prefetch_repr_has_no_resource_contents(executor):
    result = resolve_offline(
        EPIC_TEMPLATES, {**dict.fromkeys(EPIC_TEMPLATES), "patient": PATIENT}, executor
    )
    assert "1974" not in repr(result)
    assert "patient" in repr(result)


def test_settings_defaults():
    settings = PrefetchSettings()
    assert (settings.deadline_s, settings.max_pages, settings.allow_http_loopback) == (
        2.5,
        10,
        False,
    )
