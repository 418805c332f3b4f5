"""Card builders: every constraint raises, and every rendered response passes the validator."""

from __future__ import annotations

import datetime
import json
import re

import pytest

from cds_service.protocol.cards import (
    Action,
    Card,
    Coding,
    Link,
    Source,
    Suggestion,
    render_response,
)
from cds_service.protocol.errors import ServiceFault
from tests.conftest import EXAMPLES
from tests.helpers.validator import validate_response

SOURCE = Source("Renal dosing service")
MED_REQUEST = {
    "resourceType": "MedicationRequest",
    "status": "draft",
    "intent": "proposal",
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]
    },
}
CREATE = Action.create("Order amlodipine 5 mg tablet", MED_REQUEST)
REASON = Coding("patrefused", "http://example.org/override-reasons", "Patient refused")


def card(**overrides) -> Card:
    return Card(
        **{"summary": "Reduce the dose", "indicator": "warning", "source": SOURCE, **overrides}
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Coding("", "http://x.org"), "Coding.code"),
        (lambda: Coding("a", "  "), "Coding.system"),
        (lambda: Source(""), "Source.label"),
        (lambda: Source("s", url="example.com/about"), "Source.url"),
        (lambda: Source("s", icon="file://example/icon.png"), "Source.icon"),
        (lambda: Source("s", topic="topic1"), "Source.topic"),
        (lambda: Link("", "https://example.com"), "Link.label"),
        (lambda: Link("l", "/relative/path"), "Link.url"),
        (lambda: Link("l", "https://example.com", type="iframe"), "Link.type"),
        (lambda: Link("l", "https://example.com", app_context="{}"), "cds-resp-3"),
        (lambda: Link("l", "https://x.org", type="smart", app_context={"a": 1}), "app_context"),
        (lambda: Link("l", "https://x.org", autolaunchable="true"), "autolaunchable"),
        (lambda: Action("replace", "d", resource=MED_REQUEST), "Action.type"),
        (lambda: Action.create(" ", MED_REQUEST), "Action.description"),
        (lambda: Action.create("d", {"status": "draft"}), "resourceType"),
        (lambda: Action.create("d", "MedicationRequest/1"), "resource dict"),
        (lambda: Action.update("d", {"resourceType": "X", "note": []}), "Action.resource.note"),
        (lambda: Action.update("d", {"resourceType": "X", "id": None}), "Action.resource.id"),
        (
            lambda: Action.create("d", {"resourceType": "X", "authoredOn": datetime.date.today()}),
            "Action.resource.authoredOn is a date",
        ),
        (lambda: Action("create", "d", MED_REQUEST, "MedicationRequest/1"), "not resource_id"),
        (lambda: Action.delete("d", "ServiceRequest"), "resource_id"),
        (lambda: Action.delete("d", "ServiceRequest/has space"), "resource_id"),
        (lambda: Action.delete("d", "ServiceRequest/" + "a" * 257), "resource_id"),
        (
            lambda: Action("delete", "d", resource={"resourceType": "X"}, resource_id="X/1"),
            "never resource",
        ),
        (lambda: Suggestion(""), "Suggestion.label"),
        (lambda: Suggestion("s", actions=[MED_REQUEST]), "Suggestion.actions"),
        (lambda: Suggestion("s", actions=CREATE), "Suggestion.actions"),
        (lambda: Suggestion("s", is_recommended="yes"), "is_recommended"),
        (lambda: Suggestion("s", uuid=""), "Suggestion.uuid"),
        (lambda: card(summary="   "), "Card.summary"),
        (lambda: card(summary=None), "Card.summary"),
        (lambda: card(indicator="hard-stop"), "Card.indicator"),
        (lambda: card(indicator="error"), "Card.indicator"),
        (lambda: card(source="Renal dosing service"), "Card.source"),
        (
            lambda: card(suggestions=[Suggestion("s")], selection_behavior="all"),
            "selection_behavior",
        ),
        (
            lambda: card(
                suggestions=[
                    Suggestion("a", is_recommended=True),
                    Suggestion("b", is_recommended=True),
                ],
                selection_behavior="at-most-one",
            ),
            "cds-resp-1",
        ),
        (lambda: card(override_reasons=[Coding("c", "http://x.org")]), "cds-resp-4"),
        (lambda: card(links=["https://example.com"]), "Card.links"),
        (lambda: card(uuid=" "), "Card.uuid"),
        (lambda: card(extension=["text/html"]), "Card.extension"),
        (lambda: card(extension={"com.example.x": ""}), "Card.extension.com.example.x"),
    ],
)
def test_invalid_arguments_raise(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_minimal_card_omits_every_unset_attribute():
    c = card(uuid="c1", detail="", extension={})
    assert c.to_dict() == {
        "uuid": "c1",
        "summary": "Reduce the dose",
        "indicator": "warning",
        "source": {"label": "Renal dosing service"},
    }


def test_full_card_uses_spec_attribute_names_and_keeps_false():
    c = Card(
        summary="Reduce the dose",
        indicator="critical",
        source=Source(
            "S",
            "https://example.org",
            "https://example.org/i.png",
            Coding("renaldose", "http://example.org/topics"),
        ),
        detail="eGFR < 30",
        suggestions=[Suggestion("Order", [CREATE], is_recommended=False, uuid="s1")],
        selection_behavior="at-most-one",
        override_reasons=[REASON],
        links=[Link("App", "https://app.example.org/launch", "smart", '{"a":1}', True)],
        uuid="c1",
        extension={"com.example.reviewed": True},
    )
    assert c.to_dict() == {
        "uuid": "c1",
        "summary": "Reduce the dose",
        "indicator": "critical",
        "detail": "eGFR < 30",
        "source": {
            "label": "S",
            "url": "https://example.org",
            "icon": "https://example.org/i.png",
            "topic": {"code": "renaldose", "system": "http://example.org/topics"},
        },
        "suggestions": [
            {
                "label": "Order",
                "uuid": "s1",
                "isRecommended": False,
                "actions": [
                    {
                        "type": "create",
                        "description": "Order amlodipine 5 mg tablet",
                        "resource": MED_REQUEST,
                    }
                ],
            }
        ],
        "selectionBehavior": "at-most-one",
        "overrideReasons": [
            {
                "code": "patrefused",
                "system": "http://example.org/override-reasons",
                "display": "Patient refused",
            }
        ],
        "links": [
            {
                "label": "App",
                "url": "https://app.example.org/launch",
                "type": "smart",
                "appContext": '{"a":1}',
                "autolaunchable": True,
            }
        ],
        "extension": {"com.example.reviewed": True},
    }


def test_lists_are_stored_as_tuples():
    c = card(
        suggestions=[Suggestion("s", [CREATE])],
        override_reasons=[REASON],
        links=[Link("l", "https://example.com")],
    )
    assert isinstance(c.suggestions, tuple)
    assert isinstance(c.suggestions[0].actions, tuple)
    assert isinstance(c.override_reasons, tuple)
    assert isinstance(c.links, tuple)


def test_resource_is_copied_so_later_mutation_cannot_invalidate_the_card():
    resource = {"resourceType": "Condition", "code": {"text": "CKD"}}
    action = Action.create("Add CKD to the problem list", resource)
    resource["code"] = {}
    action.to_dict()["resource"]["code"]["text"] = "changed"
    assert action.to_dict()["resource"] == {"resourceType": "Condition", "code": {"text": "CKD"}}


def test_suggestions_default_selection_behavior_to_any():
    assert card(suggestions=[Suggestion("s", [CREATE])]).selection_behavior == "any"
    assert card().selection_behavior is None


def test_uuids_are_generated_and_distinct():
    a, b = card(), card()
    assert a.uuid != b.uuid
    assert Suggestion("s").uuid != Suggestion("s").uuid


def test_delete_carries_resource_id_and_never_resource():
    action = Action.delete("Cancel the duplicate order", "ServiceRequest/procedure-request-1")
    assert action.to_dict() == {
        "type": "delete",
        "description": "Cancel the duplicate order",
        "resourceId": "ServiceRequest/procedure-request-1",
    }


@pytest.mark.parametrize("length", [1, 138, 139])
def test_summary_within_limit_is_kept(length):
    summary = "x" * length
    c = card(summary=summary, detail="More.")
    assert (c.summary, c.detail) == (summary, "More.")


@pytest.mark.parametrize(
    ("summary", "detail", "expected_detail_tail"),
    [
        (
            "Reduce the dose of " + "verylongdrugname " * 12,
            "Original detail.",
            "\n\nOriginal detail.",
        ),
        ("Reduce the dose of " + "x" * 200, None, ""),
        ("y" * 140, "Original detail.", "\n\nOriginal detail."),
    ],
)
def test_long_summary_is_truncated_and_kept_in_detail(summary, detail, expected_detail_tail):
    c = card(summary=summary, detail=detail)
    assert len(c.summary) <= 139
    assert c.summary.endswith("…")
    assert summary.startswith(c.summary[:-1])
    assert c.detail == summary.strip() + expected_detail_tail


def test_truncation_prefers_a_word_boundary():
    c = card(summary="Reduce the dose of " + "verylongdrugname " * 12)
    assert c.summary.endswith("verylongdrugname…")


def test_empty_response():
    assert render_response([], epic=True) == {"cards": []}
    assert render_response([], epic=False) == {"cards": []}


def test_system_actions_rendered_only_when_present():
    update = Action.update("Annotate the order", {"resourceType": "ServiceRequest", "id": "o1"})
    assert "systemActions" not in render_response([card()], epic=True)
    body = render_response([], [update], epic=True)
    assert body["systemActions"] == [update.to_dict()]


def test_at_most_one_is_rendered_as_any_for_epic_only():
    c = card(suggestions=[Suggestion("s", [CREATE])], selection_behavior="at-most-one")
    assert render_response([c], epic=True)["cards"][0]["selectionBehavior"] == "any"
    assert render_response([c], epic=False)["cards"][0]["selectionBehavior"] == "at-most-one"


@pytest.mark.parametrize(
    ("bad_card", "message"),
    [
        (card(suggestions=[Suggestion("Two orders", [CREATE, CREATE])]), "'Two orders' has 2"),
        (card(suggestions=[Suggestion("No orders")]), "'No orders' has 0"),
        (card(source=Source("S", topic=Coding("renal-dose", "http://x.org"))), "renal-dose"),
        (card(source=Source("S", topic=Coding("a" * 101, "http://x.org"))), "1-100"),
        (card(detail="Stop <b>now</b>"), "HTML"),
    ],
)
def test_epic_limits_raise_service_fault(bad_card, message):
    with pytest.raises(ServiceFault, match=message) as excinfo:
        render_response([bad_card], epic=True)
    assert "Reduce the dose" in excinfo.value.message
    render_response([bad_card], epic=False)


def test_duplicate_uuids_raise_service_fault():
    with pytest.raises(ServiceFault, match="used twice"):
        render_response([card(uuid="same"), card(uuid="same")], epic=False)
    with pytest.raises(ServiceFault, match="used twice"):
        render_response(
            [card(uuid="same", suggestions=[Suggestion("s", [CREATE], uuid="same")])], epic=True
        )


def test_render_rejects_non_cards():
    with pytest.raises(ServiceFault, match="dict"):
        render_response([card().to_dict()], epic=True)


RENDERED_CARDS = {
    "minimal": [card()],
    "several": [card(), card(indicator="info"), card(indicator="critical")],
    "truncated summary": [card(summary="Stop " + "x" * 300, detail="Because.")],
    "full": [
        Card(
            summary="Reduce the dose",
            indicator="critical",
            source=Source(
                "S",
                "https://example.org",
                "https://example.org/i.png",
                Coding("renaldose", "http://example.org/topics", "Renal dosing"),
            ),
            detail="Renal function is reduced.\n\n<p>See <b>table</b>.</p>",
            suggestions=[
                Suggestion("Order", [CREATE], is_recommended=True),
                Suggestion(
                    "Cancel",
                    [Action.delete("Cancel order", "MedicationRequest/m-1")],
                    is_recommended=True,
                ),
                Suggestion("Problem", [Action.update("Add", {"resourceType": "Condition"})]),
            ],
            selection_behavior="any",
            override_reasons=[REASON, Coding("other", "local", "Other")],
            links=[
                Link("Guideline", "https://example.org/g"),
                Link("App", "https://app.example.org/launch", "smart", "ctx", True),
            ],
            extension={"com.epic.cdshooks.card.detail.content-type": "text/html"},
        )
    ],
    "at-most-one": [
        card(
            suggestions=[Suggestion("s", [CREATE], is_recommended=True)],
            selection_behavior="at-most-one",
        )
    ],
}


@pytest.mark.parametrize("cards", RENDERED_CARDS.values(), ids=RENDERED_CARDS.keys())
@pytest.mark.parametrize("epic", [True, False])
def test_rendered_responses_pass_the_validator(cards, epic):
    system_actions = [Action.update("Annotate", {"resourceType": "ServiceRequest", "id": "o1"})]
    body = json.loads(json.dumps(render_response(cards, system_actions, epic=epic)))
    assert validate_response(body, epic=epic) == []


def test_delete_accepts_epic_draft_order_ids_longer_than_fhir_ids():
    context = json.loads((EXAMPLES / "epic-request-fragment-context-draftOrders-medication-"
                          "references.json").read_text())["context"]
    draft_id = context["draftOrders"]["entry"][0]["resource"]["id"]
    assert len(draft_id) > 64  # Epic's ids exceed FHIR's 64-character limit
    action = Action.delete("Remove the draft order", f"MedicationRequest/{draft_id}")
    assert action.to_dict()["resourceId"] == f"MedicationRequest/{draft_id}"
