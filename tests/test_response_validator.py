"""The response validator, against the published examples and against one-defect mutations."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import example
from tests.helpers.validator import validate_action, validate_response


@pytest.mark.parametrize(
    "name",
    [
        "cdshooks-2.0-response-cards-links-overrideReasons.json",
        "cdshooks-2.0-response-empty-cards.json",
        "cdshooks-1.0-response-empty-cards.json",
        "epic-response-empty-cards.json",
        "cdshooks-1.0-response-cards-links.json",
    ],
)
def test_valid_examples_pass(name):
    assert validate_response(example(name)) == []


# Each expected entry is a substring of exactly one reported problem; nothing else is reported.
@pytest.mark.parametrize(
    ("name", "epic", "expected"),
    [
        (
            "cdshooks-2.0-response-systemActions.json",
            False,
            ["systemActions[0].description: missing"],
        ),
        ("cdshooks-2.0.1-response-autolaunchable.json", False, ["cards[0].indicator: missing"]),
        (
            "epic-response-basic-card.json",
            False,
            ["cards[0].source.label: missing", "cards[0].source.topic.system: missing"],
        ),
        (
            "epic-response-links-overrideReasons-suggestions.json",
            False,
            [
                "cards[0].selectionBehavior: missing",
                "cards[0].overrideReasons[1].display: missing",
                "cards[0].source.icon: 'file://example/CDSHooks/images/example.png' is not",
            ],
        ),
        # Epic's own card examples also lack the card uuid Epic needs to send feedback.
        (
            "epic-response-basic-card.json",
            True,
            [
                "cards[0].uuid: missing",
                "cards[0].source.label: missing",
                "cards[0].source.topic.system: missing",
            ],
        ),
        (
            "cdshooks-2.0-response-cards-links-overrideReasons.json",
            True,
            ["cards[1].uuid: missing"],
        ),
    ],
)
def test_invalid_examples_report_their_specific_problems(name, epic, expected):
    problems = validate_response(example(name), epic=epic)
    for fragment in expected:
        assert sum(fragment in p for p in problems) == 1, (fragment, problems)
    assert len(problems) == len(expected), problems


@pytest.mark.parametrize(
    "name",
    [
        "cdshooks-2.0-response-fragment-action-create.json",
        "cdshooks-2.0-response-fragment-action-update.json",
        "cdshooks-2.0-response-fragment-action-delete-resourceId.json",
    ],
)
def test_action_fragments_pass(name):
    assert validate_action(example(name), "action") == []


def test_deprecated_delete_with_resource_string_is_flagged():
    problems = validate_action(
        example("cdshooks-1.0-response-fragment-action-delete-resource-string.json"), "action"
    )
    assert problems == [
        "action.resource: an id string in resource is the deprecated 1.0 delete form; "
        "use resourceId",
        "action.resourceId: missing (delete SHOULD name it, cds-resp-2)",
    ]


VALID = {
    "cards": [
        {
            "uuid": "c1",
            "summary": "Reduce the dose",
            "indicator": "warning",
            "detail": "eGFR < 30: see the **renal** table.",
            "source": {
                "label": "Renal dosing",
                "url": "https://example.org",
                "icon": "https://example.org/icon.png",
                "topic": {"code": "renaldose", "system": "http://example.org/topics"},
            },
            "selectionBehavior": "any",
            "suggestions": [
                {
                    "label": "Order",
                    "uuid": "s1",
                    "isRecommended": True,
                    "actions": [
                        {
                            "type": "create",
                            "description": "Order",
                            "resource": {"resourceType": "MedicationRequest"},
                        }
                    ],
                },
                {
                    "label": "Cancel",
                    "uuid": "s2",
                    "isRecommended": False,
                    "actions": [
                        {
                            "type": "delete",
                            "description": "Cancel",
                            "resourceId": "MedicationRequest/m-1.2",
                        }
                    ],
                },
            ],
            "overrideReasons": [{"code": "c", "system": "http://x.org", "display": "Refused"}],
            "links": [
                {"label": "Guide", "url": "http://example.org/guide", "type": "absolute"},
                {
                    "label": "App",
                    "url": "https://app.example.org",
                    "type": "smart",
                    "appContext": '{"a":1}',
                    "autolaunchable": True,
                },
            ],
            "extension": {"com.example.flag": True},
        }
    ],
    "systemActions": [
        {
            "type": "update",
            "description": "Annotate",
            "resource": {"resourceType": "ServiceRequest", "id": "o1"},
        }
    ],
    "extension": {"org.example.cds.withheld-cards": [{"summary": "Reduce the dose"}]},
}
CARD = "cards[0]"


def test_valid_body_passes_both_modes():
    assert validate_response(VALID) == []
    assert validate_response(VALID, epic=True) == []


def mutated(path: str, value: object) -> dict:
    """VALID with the element at a dotted path (`cards.0.summary`) replaced; `...` deletes it."""
    body = copy.deepcopy(VALID)
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = body
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return body


SPEC_DEFECTS = [
    ("cards.0.detail", None, f"{CARD}.detail: null"),
    ("cards.0.detail", "", f"{CARD}.detail: empty or blank string"),
    ("cards.0.detail", "  ", f"{CARD}.detail: empty or blank string"),
    ("cards.0.links", [], f"{CARD}.links: empty array"),
    ("cards.0.extension", {}, f"{CARD}.extension: empty object"),
    ("cards.0.suggestions.0.actions.0.resource.note", [], ".resource.note: empty array"),
    ("systemActions", [], "systemActions: empty array"),
    ("cards.0.summary", ..., f"{CARD}.summary: missing"),
    ("cards.0.summary", "x" * 140, f"{CARD}.summary: 140 characters; must be <140"),
    ("cards.0.summary", 7, f"{CARD}.summary: must be a string"),
    ("cards.0.indicator", "hard-stop", f"{CARD}.indicator: 'hard-stop' is not one of"),
    ("cards.0.source", ..., f"{CARD}.source: missing"),
    ("cards.0.source", "Renal dosing", f"{CARD}.source: must be a JSON object"),
    ("cards.0.source.label", ..., f"{CARD}.source.label: missing"),
    ("cards.0.source.url", "example.org", f"{CARD}.source.url: 'example.org' is not an absolute"),
    ("cards.0.source.icon", "file:///icon.png", f"{CARD}.source.icon: 'file:///icon.png'"),
    ("cards.0.source.topic.code", ..., f"{CARD}.source.topic.code: missing"),
    ("cards.0.selectionBehavior", ..., f"{CARD}.selectionBehavior: missing"),
    ("cards.0.selectionBehavior", "all", f"{CARD}.selectionBehavior: 'all' is not one of"),
    (
        "cards.0.suggestions.1.isRecommended",
        "true",
        f"{CARD}.suggestions[1].isRecommended: must be a boolean",
    ),
    ("cards.0.overrideReasons.0.display", ..., f"{CARD}.overrideReasons[0].display: missing"),
    ("cards.0.overrideReasons.0.system", ..., f"{CARD}.overrideReasons[0].system: missing"),
    ("cards.0.suggestions.0.label", ..., f"{CARD}.suggestions[0].label: missing"),
    (
        "cards.0.suggestions.0.actions",
        {"type": "create"},
        f"{CARD}.suggestions[0].actions: must be an array",
    ),
    (
        "cards.0.suggestions.0.actions.0.type",
        "insert",
        f"{CARD}.suggestions[0].actions[0].type: 'insert' is not one of",
    ),
    (
        "cards.0.suggestions.0.actions.0.description",
        ...,
        f"{CARD}.suggestions[0].actions[0].description: missing",
    ),
    (
        "cards.0.suggestions.0.actions.0.resource",
        ...,
        f"{CARD}.suggestions[0].actions[0].resource: missing",
    ),
    (
        "cards.0.suggestions.0.actions.0.resource",
        {"id": "1"},
        f"{CARD}.suggestions[0].actions[0].resource: must be a FHIR resource",
    ),
    (
        "cards.0.suggestions.1.actions.0.resource",
        {"resourceType": "MedicationRequest"},
        f"{CARD}.suggestions[1].actions[0].resource: delete must not carry a resource",
    ),
    (
        "cards.0.suggestions.1.actions.0.resourceId",
        "m-1",
        f"{CARD}.suggestions[1].actions[0].resourceId: 'm-1' is not a relative reference",
    ),
    ("cards.0.links.0.type", "iframe", f"{CARD}.links[0].type: 'iframe' is not one of"),
    ("cards.0.links.0.url", "/guide", f"{CARD}.links[0].url: '/guide' is not an absolute"),
    ("cards.0.links.0.label", ..., f"{CARD}.links[0].label: missing"),
    ("cards.0.links.0.appContext", "{}", f"{CARD}.links[0].appContext: only valid on smart"),
    ("cards.0.links.1.appContext", {"a": 1}, f"{CARD}.links[1].appContext: must be a string"),
    ("cards.0.links.1.autolaunchable", "yes", f"{CARD}.links[1].autolaunchable: must be a boolean"),
    ("cards.0.selection_behavior", "any", f"{CARD}.selection_behavior: unknown card attribute"),
    ("cards.0.extension", "x", f"{CARD}.extension: must be an object"),
    (
        "cards.0.suggestions.1.uuid",
        "c1",
        f"{CARD}.suggestions[1].uuid: duplicate uuid 'c1' (also at {CARD}.uuid)",
    ),
    ("systemActions.0.description", ..., "systemActions[0].description: missing"),
    ("systemActions", {"type": "update"}, "systemActions: must be an array"),
    ("cards", ..., "cards: missing"),
    ("cards", {}, "cards: must be an array"),
    ("cards.0", "card", f"{CARD}: must be a JSON object"),
    ("extension", [], "extension: must be a JSON object (rule 137)"),
    ("extension", {"withheld": 1}, "extension.withheld: not a reverse-domain name (rule 138)"),
]


@pytest.mark.parametrize(
    ("path", "value", "problem"), SPEC_DEFECTS, ids=[f"{p}={v!r}"[:60] for p, v, _ in SPEC_DEFECTS]
)
def test_each_spec_defect_is_reported(path, value, problem):
    problems = validate_response(mutated(path, value))
    assert [p for p in problems if problem in p], problems


def test_at_most_one_with_two_recommended_is_reported():
    body = mutated("cards.0.selectionBehavior", "at-most-one")
    body["cards"][0]["suggestions"][1]["isRecommended"] = True
    assert validate_response(body) == [
        f"{CARD}.selectionBehavior: at-most-one with 2 recommended suggestions (cds-resp-1)"
    ]


def test_uuids_must_be_unique_across_cards():
    body = copy.deepcopy(VALID)
    body["cards"].append(
        {"uuid": "c1", "summary": "s", "indicator": "info", "source": {"label": "l"}}
    )
    assert validate_response(body) == ["cards[1].uuid: duplicate uuid 'c1' (also at cards[0].uuid)"]


@pytest.mark.parametrize("body", [None, [], "cards", {"cards": None}])
def test_non_object_bodies_are_reported(body):
    assert validate_response(body)


EPIC_DEFECTS = [
    (
        "cards.0.selectionBehavior",
        "at-most-one",
        f"{CARD}.selectionBehavior: Epic supports only 'any'",
    ),
    (
        "cards.0.suggestions.0.actions",
        [VALID["cards"][0]["suggestions"][0]["actions"][0]] * 2,
        f"{CARD}.suggestions[0].actions: Epic needs exactly one action, found 2",
    ),
    (
        "cards.0.suggestions.0.actions",
        ...,
        f"{CARD}.suggestions[0].actions: Epic needs exactly one action, found 0",
    ),
    ("cards.0.uuid", ..., f"{CARD}.uuid: missing"),
    ("cards.0.suggestions.1.uuid", ..., f"{CARD}.suggestions[1].uuid: missing"),
    ("cards.0.source.topic.code", "renal-dose", f"{CARD}.source.topic.code: 'renal-dose' must"),
    ("cards.0.source.topic.code", "a" * 101, f"{CARD}.source.topic.code: 'aaaa"),
    ("cards.0.detail", "Stop <b>now</b>", f"{CARD}.detail: contains HTML tags"),
    ("cards.0.detail", "Line one<br/>two", f"{CARD}.detail: contains HTML tags"),
    (
        "cards.0.extension",
        {"com.epic.cdshooks.card.detail.content-type": "text/rtf"},
        "content-type: 'text/rtf' is not a content type Epic supports",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "problem"), EPIC_DEFECTS, ids=[f"{p}={v!r}"[:60] for p, v, _ in EPIC_DEFECTS]
)
def test_each_epic_defect_is_reported_in_epic_mode_only(path, value, problem):
    body = mutated(path, value)
    assert [p for p in validate_response(body, epic=True) if problem in p]
    assert not [p for p in validate_response(body) if problem in p]


@pytest.mark.parametrize(
    ("detail", "content_type"),
    [
        ("<p>Stop <b>now</b></p>", "text/html"),
        ("eGFR <30 and >15; see <https://example.org/renal>", None),
    ],
)
def test_detail_that_is_not_undeclared_html_passes_epic_mode(detail, content_type):
    body = mutated("cards.0.detail", detail)
    if content_type:
        body["cards"][0]["extension"] = {"com.epic.cdshooks.card.detail.content-type": content_type}
    assert validate_response(body, epic=True) == []
