"""Feedback request parsing: spec and Epic examples, malformed input, timestamps, batches."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from marshmallow import ValidationError

from cds_service.records.feedback import (
    EPIC_REASON_CATEGORY,
    EPIC_REASON_TITLE,
    MAX_CLOCK_SKEW,
    FeedbackItem,
    FeedbackRequestSchema,
    parse_rfc3339,
)
from tests.conftest import example
from tests.helpers.feedback_examples import EXAMPLE_CASES


def load(body: dict) -> list[FeedbackItem]:
    return FeedbackRequestSchema().load(body)


def item(**overrides) -> dict:
    """A valid overridden Feedback item; `overrides` replace keys, a value of ... removes one."""
    base = {
        "card": "9368d37b-283f-44a0-93ea-547cebab93ed",
        "outcome": "overridden",
        "outcomeTimestamp": "2020-12-11T00:00:00Z",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


@pytest.mark.parametrize("name", sorted(EXAMPLE_CASES))
def test_example_loads_normalized(name):
    body = example(name)

    [loaded] = load(body)

    fields = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(FeedbackItem)}
    assert fields.pop("raw") == body["feedback"][0]
    assert fields == EXAMPLE_CASES[name]
    assert loaded.outcome_timestamp.utcoffset().total_seconds() == 0


def test_raw_is_a_copy_of_the_input():
    body = example("epic-feedback-overridden-with-extension.json")
    [loaded] = load(body)

    body["feedback"][0]["overrideReasons"]["userComment"] = "changed"

    assert loaded.raw["overrideReasons"]["userComment"] == "User Entered Free Text"


def test_items_are_immutable():
    [loaded] = load({"feedback": [item()]})

    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.card = "other"  # type: ignore[misc]


def test_unknown_keys_are_tolerated_and_kept_in_raw():
    extra = item(
        extension={"com.example.x": 1},
        overrideReason={
            "reason": {"code": "c", "system": "urn:s", "display": "d", "version": "1"},
            "userComment": "why",
            "somethingNew": True,
        },
    )

    [loaded] = load({"feedback": [extra], "futureTopLevel": "x"})

    assert (loaded.override_code, loaded.override_system, loaded.override_display) == (
        "c",
        "urn:s",
        "d",
    )
    assert loaded.raw == extra
    assert loaded.warnings == ()


def test_override_reason_with_only_user_comment():
    [loaded] = load({"feedback": [item(overrideReason={"userComment": "not relevant"})]})

    assert loaded.user_comment == "not relevant"
    assert loaded.override_code is None
    assert loaded.warnings == ()


def test_null_optional_fields_count_as_absent():
    [loaded] = load(
        {"feedback": [item(overrideReason=None, overrideReasons=None, acceptedSuggestions=None)]}
    )

    assert (loaded.override_code, loaded.user_comment, loaded.accepted_suggestions) == (
        None,
        None,
        (),
    )


@pytest.mark.parametrize(
    ("feedback", "warning"),
    [
        pytest.param(item(outcome="accepted"), "without acceptedSuggestions", id="accepted-none"),
        pytest.param(
            item(outcome="accepted", acceptedSuggestions=[]),
            "without acceptedSuggestions",
            id="accepted-empty",
        ),
        pytest.param(
            item(acceptedSuggestions=[{"id": "s1"}]),
            "'overridden' with acceptedSuggestions",
            id="overridden-with-suggestions",
        ),
        pytest.param(
            item(
                overrideReason={"userComment": "spec"},
                overrideReasons={"userComment": "epic"},
            ),
            "both overrideReason and overrideReasons",
            id="both-reason-keys",
        ),
        pytest.param(item(overrideReasons={}), "cds-fb-3", id="empty-reason"),
        pytest.param(
            item(
                outcome="accepted",
                acceptedSuggestions=[{"id": "s1"}],
                overrideReason={"userComment": "?"},
            ),
            "override reason sent with outcome 'accepted'",
            id="accepted-with-reason",
        ),
    ],
)
def test_tolerated_but_flagged(feedback, warning):
    [loaded] = load({"feedback": [feedback]})

    assert len(loaded.warnings) == 1
    assert warning in loaded.warnings[0]


def test_spec_override_reason_wins_over_epic_key():
    [loaded] = load(
        {
            "feedback": [
                item(
                    overrideReason={"userComment": "spec"},
                    overrideReasons={"userComment": "epic"},
                )
            ]
        }
    )

    assert loaded.user_comment == "spec"


def test_epic_extension_falls_back_to_title_for_display():
    [loaded] = load(
        {
            "feedback": [
                item(
                    overrideReasons={"extension": {EPIC_REASON_CATEGORY: 7, EPIC_REASON_TITLE: "T"}}
                )
            ]
        }
    )

    assert (loaded.override_code, loaded.override_system, loaded.override_display) == (
        "7",
        None,
        "T",
    )


def messages_at(messages: dict, path: tuple) -> list[str]:
    node = messages
    for key in path:
        assert isinstance(node, dict) and key in node, f"no error at {path}: {messages}"
        node = node[key]
    assert isinstance(node, list), f"{path} is not a leaf: {node}"
    return node


MALFORMED = [
    # (id, body, error path, message fragment)
    ("missing-card", {"feedback": [item(card=...)]}, ("feedback", 0, "card"), "Missing data"),
    ("blank-card", {"feedback": [item(card="  ")]}, ("feedback", 0, "card"), "blank"),
    ("null-card", {"feedback": [item(card=None)]}, ("feedback", 0, "card"), "null"),
    ("numeric-card", {"feedback": [item(card=123456)]}, ("feedback", 0, "card"), "string"),
    ("missing-outcome", {"feedback": [item(outcome=...)]}, ("feedback", 0, "outcome"), "Missing"),
    ("bad-outcome", {"feedback": [item(outcome="ignored")]}, ("feedback", 0, "outcome"), "one of"),
    (
        "outcome-case",
        {"feedback": [item(outcome="Accepted")]},
        ("feedback", 0, "outcome"),
        "one of",
    ),
    (
        "missing-timestamp",
        {"feedback": [item(outcomeTimestamp=...)]},
        ("feedback", 0, "outcomeTimestamp"),
        "Missing",
    ),
    (
        "naive-timestamp",
        {"feedback": [item(outcomeTimestamp="2020-12-11T00:00:00")]},
        ("feedback", 0, "outcomeTimestamp"),
        "time zone",
    ),
    (
        "date-only",
        {"feedback": [item(outcomeTimestamp="2020-12-11")]},
        ("feedback", 0, "outcomeTimestamp"),
        "RFC 3339",
    ),
    (
        "iso-basic-format",
        {"feedback": [item(outcomeTimestamp="20201211T000000Z")]},
        ("feedback", 0, "outcomeTimestamp"),
        "RFC 3339",
    ),
    (
        "month-13",
        {"feedback": [item(outcomeTimestamp="2020-13-11T00:00:00Z")]},
        ("feedback", 0, "outcomeTimestamp"),
        "RFC 3339",
    ),
    (
        "offset-out-of-range",
        {"feedback": [item(outcomeTimestamp="2020-12-11T00:00:00+24:00")]},
        ("feedback", 0, "outcomeTimestamp"),
        "RFC 3339",
    ),
    (
        "epoch-number",
        {"feedback": [item(outcomeTimestamp=1607644800)]},
        ("feedback", 0, "outcomeTimestamp"),
        "RFC 3339",
    ),
    (
        "suggestions-not-list",
        {"feedback": [item(outcome="accepted", acceptedSuggestions={"id": "s"})]},
        ("feedback", 0, "acceptedSuggestions"),
        "list",
    ),
    (
        "suggestion-not-object",
        {"feedback": [item(outcome="accepted", acceptedSuggestions=["s1"])]},
        ("feedback", 0, "acceptedSuggestions", 0, "_schema"),
        "object",
    ),
    (
        "suggestion-without-id",
        {"feedback": [item(outcome="accepted", acceptedSuggestions=[{"uuid": "s1"}])]},
        ("feedback", 0, "acceptedSuggestions", 0, "id"),
        "Missing",
    ),
    (
        "suggestion-id-not-string",
        {"feedback": [item(outcome="accepted", acceptedSuggestions=[{"id": 1}])]},
        ("feedback", 0, "acceptedSuggestions", 0, "id"),
        "string",
    ),
    (
        "reason-without-code",
        {"feedback": [item(overrideReason={"reason": {"system": "urn:s"}})]},
        ("feedback", 0, "overrideReason", "reason", "code"),
        "Missing",
    ),
    (
        "epic-reason-without-system",
        {"feedback": [item(overrideReasons={"reason": {"code": "c", "display": "d"}})]},
        ("feedback", 0, "overrideReasons", "reason", "system"),
        "Missing",
    ),
    (
        "override-reason-not-object",
        {"feedback": [item(overrideReason="because")]},
        ("feedback", 0, "overrideReason", "_schema"),
        "object",
    ),
    (
        "extension-not-object",
        {"feedback": [item(overrideReasons={"extension": ["x"]})]},
        ("feedback", 0, "overrideReasons", "extension"),
        "mapping",
    ),
    (
        "error-in-third-item",
        {"feedback": [item(), item(), item(outcome="maybe")]},
        ("feedback", 2, "outcome"),
        "one of",
    ),
    ("no-feedback-key", {"cards": []}, ("feedback",), "Missing"),
    ("empty-feedback", {"feedback": []}, ("feedback",), "at least one"),
    ("feedback-not-list", {"feedback": item()}, ("feedback",), "list"),
    ("item-not-object", {"feedback": ["x"]}, ("feedback", 0, "_schema"), "object"),
    ("body-not-object", [item()], ("_schema",), "object"),
]


@pytest.mark.parametrize(
    ("body", "path", "fragment"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_rejected_with_field_path(body, path, fragment):
    with pytest.raises(ValidationError) as info:
        load(body)

    messages = messages_at(info.value.messages, path)
    assert any(fragment in message for message in messages), messages


def test_only_the_bad_item_is_named():
    with pytest.raises(ValidationError) as info:
        load({"feedback": [item(), item(card="")]})

    assert list(info.value.messages["feedback"]) == [1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2021-12-11T10:05:31Z", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        # The spec's own example (RFC 3339 §5.8): two fractional digits.
        ("1985-04-12T23:20:50.52Z", datetime(1985, 4, 12, 23, 20, 50, 520000, tzinfo=UTC)),
        ("2021-12-11T10:05:31.123Z", datetime(2021, 12, 11, 10, 5, 31, 123000, tzinfo=UTC)),
        # Nanoseconds (Java clients) are truncated to microseconds.
        ("2021-12-11T10:05:31.123456789Z", datetime(2021, 12, 11, 10, 5, 31, 123456, tzinfo=UTC)),
        ("2021-12-11T10:05:31+00:00", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        ("2021-12-11T12:05:31.5+02:00", datetime(2021, 12, 11, 10, 5, 31, 500000, tzinfo=UTC)),
        ("2021-12-10T23:35:31-10:30", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        ("2021-12-11t10:05:31z", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        ("2021-12-11T10:05:31-00:00", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
    ],
)
def test_timestamps_normalized_to_utc(text, expected):
    [loaded] = load({"feedback": [item(outcomeTimestamp=text)]})

    assert loaded.outcome_timestamp == expected
    assert loaded.outcome_timestamp.tzinfo is UTC
    assert parse_rfc3339(text) == expected


def rfc3339(when: datetime) -> str:
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


@pytest.mark.parametrize("ahead", [MAX_CLOCK_SKEW, -timedelta(days=3650)],
                         ids=["skew-limit", "ten-years-late"])
def test_timestamp_up_to_the_clock_skew_ahead_or_long_past_is_accepted(ahead):
    now = datetime.now(UTC)
    schema = FeedbackRequestSchema(clock=lambda: now)

    [loaded] = schema.load({"feedback": [item(outcomeTimestamp=rfc3339(now + ahead))]})

    assert loaded.outcome_timestamp == now + ahead


@pytest.mark.parametrize("ahead", [MAX_CLOCK_SKEW + timedelta(microseconds=1),
                                   timedelta(days=365 * 70)], ids=["past-skew", "seventy-years"])
def test_timestamp_beyond_the_clock_skew_is_rejected_naming_the_field(ahead):
    now = datetime.now(UTC)
    schema = FeedbackRequestSchema(clock=lambda: now)
    body = {"feedback": [item(), item(outcomeTimestamp=rfc3339(now + ahead))]}

    with pytest.raises(ValidationError) as info:
        schema.load(body)

    assert list(info.value.messages["feedback"]) == [1]
    [message] = messages_at(info.value.messages, ("feedback", 1, "outcomeTimestamp"))
    assert "minutes after this server's time" in message


def test_the_bound_follows_the_clock():
    now = datetime.now(UTC)
    body = {"feedback": [item(outcomeTimestamp=rfc3339(now + timedelta(hours=1)))]}
    with pytest.raises(ValidationError):
        FeedbackRequestSchema(clock=lambda: now).load(body)
    assert FeedbackRequestSchema(clock=lambda: now + timedelta(hours=1)).load(body)


def test_batch_of_500_items():
    body = {
        "feedback": [
            item(card=f"card-{n}", outcomeTimestamp=f"2022-05-19T19:44:{n % 60:02d}.{n:03d}Z")
            for n in range(500)
        ]
    }

    loaded = load(body)

    assert [i.card for i in loaded] == [f"card-{n}" for n in range(500)]
    assert loaded[499].outcome_timestamp == datetime(2022, 5, 19, 19, 44, 19, 499000, tzinfo=UTC)
    assert len({i.dedupe_key("site", "svc") for i in loaded}) == 500


def test_dedupe_key_is_canonical_and_scoped():
    body = example("epic-feedback-overridden-with-extension.json")
    reordered = copy.deepcopy(body)
    reordered["feedback"][0] = dict(reversed(list(body["feedback"][0].items())))
    [a] = load(body)
    [b] = load(reordered)
    [other] = load({"feedback": [item()]})

    key = a.dedupe_key("site-a", "svc")
    # The format is persistent (stored unique keys): pin it.
    canonical = json.dumps(
        {"site": "site-a", "service_id": "svc", "item": body["feedback"][0]},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert key == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert b.dedupe_key("site-a", "svc") == key
    assert a.dedupe_key("site-b", "svc") != key
    assert a.dedupe_key("site-a", "other-svc") != key
    assert other.dedupe_key("site-a", "svc") != key
