"""What each published feedback example (tests/fixtures/cds-hooks-examples) loads as: the fields
of its one `FeedbackItem`, `raw` aside."""

from __future__ import annotations

from datetime import UTC, datetime

from cds_service.records.feedback import (
    EPIC_REASON_CATEGORY,
    EPIC_REASON_DISPLAY,
    EPIC_REASON_TITLE,
)

NONE = {
    "accepted_suggestions": (),
    "override_code": None,
    "override_system": None,
    "override_display": None,
    "user_comment": None,
    "override_extension": None,
    "warnings": (),
}

EXAMPLE_CASES = {
    "cdshooks-2.0-feedback-accepted.json": {
        **NONE,
        "card": "4e0a3a1e-3283-4575-ab82-028d55fe2719",
        "outcome": "accepted",
        "outcome_timestamp": datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC),
        "accepted_suggestions": ("e56e1945-20b3-4393-8503-a1a20fd73152",),
    },
    "cdshooks-2.0-feedback-overridden-no-reason.json": {
        **NONE,
        "card": "f6b95768-b1c8-40dc-8385-bf3504b82ffb",
        "outcome": "overridden",
        "outcome_timestamp": datetime(2020, 12, 11, tzinfo=UTC),
    },
    "cdshooks-2.0-feedback-overridden-with-reason.json": {
        **NONE,
        "card": "9368d37b-283f-44a0-93ea-547cebab93ed",
        "outcome": "overridden",
        "outcome_timestamp": datetime(2020, 12, 11, tzinfo=UTC),
        "override_code": "d7ecf885",
        "override_system": "https://example.com/cds-hooks/override-reason-system",
        "user_comment": "A comment entered by the clinician.",
    },
    "epic-feedback-accepted.json": {
        **NONE,
        "card": "123456",
        "outcome": "accepted",
        "outcome_timestamp": datetime(2022, 5, 19, 19, 48, 34, tzinfo=UTC),
        "accepted_suggestions": ("replaceWithGUID",),
    },
    "epic-feedback-overridden-with-reason.json": {
        **NONE,
        "card": "123456",
        "outcome": "overridden",
        "outcome_timestamp": datetime(2022, 5, 19, 19, 44, 4, tzinfo=UTC),
        "override_code": "contraindicated",
        # Sic: Epic's example has a space in the system URI; kept as sent.
        "override_system": "http: //example.org/cds-services/fhir/CodeSystem/override-reasons",
        "override_display": "bad",
        "user_comment": "User Entered Free Text",
    },
    "epic-feedback-overridden-with-extension.json": {
        **NONE,
        "card": "123456",
        "outcome": "overridden",
        "outcome_timestamp": datetime(2022, 5, 19, 19, 44, 4, tzinfo=UTC),
        "override_code": "45",
        "override_display": "Does not meet criteria",
        "user_comment": "User Entered Free Text",
        "override_extension": {
            EPIC_REASON_CATEGORY: "45",
            EPIC_REASON_DISPLAY: "Does not meet criteria",
            EPIC_REASON_TITLE: "Does not meet criteria",
        },
    },
}
