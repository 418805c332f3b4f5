"""`POST /cds-services/{id}/feedback` end to end, on SQLite and the real local PostgreSQL.

Rules 98-105 and Epic §3.5 of the conformance checklist. Every test runs once per backend
(`store_url` from tests/helpers/storage.py: a SQLite file, or a fresh PostgreSQL schema that is
dropped afterwards; an unreachable PostgreSQL fails the test, never skips it).
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest

from cds_service.data.jsonlimit import MAX_DEPTH
from cds_service.records.feedback import (
    EPIC_REASON_CATEGORY,
    EPIC_REASON_DISPLAY,
)
from tests.conftest import example, make_jwt
from tests.helpers.feedback_examples import EXAMPLE_CASES
from tests.helpers.http import assert_outcome, nested, post
from tests.helpers.store_queries import list_feedback

SERVICE = "echo"
URL = f"/cds-services/{SERVICE}/feedback"
SITE = "test-site"

# Every column of the feedback table: nothing else is stored per item.
COLUMNS = {
    "id", "dedupe_key", "site", "service_id", "card", "outcome", "outcome_timestamp",
    "accepted_suggestions", "override_code", "override_system", "override_display",
    "user_comment", "override_extension", "raw", "warnings", "received_at",
}

# Example file → normalized columns of its one stored row: the values the schema test expects
# of the parsed item (JSON columns come back as lists, not tuples).
EXAMPLES = {
    name: {k: list(v) if isinstance(v, tuple) else v for k, v in case.items()}
    for name, case in EXAMPLE_CASES.items()
}


def stamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def item(n: int = 0, **overrides) -> dict:
    """A valid overridden Feedback item for card `card-<n>`; a value of ... removes a key."""
    base = {
        "card": f"card-{n}",
        "outcome": "overridden",
        "outcomeTimestamp": (datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=n))
        .isoformat()
        .replace("+00:00", "Z"),
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


@pytest.fixture
def database_url(store_url) -> str:
    """The backend under test (requested before `make_app`, so apps close before the drop)."""
    return store_url


@pytest.fixture
def app(database_url, make_app):
    return make_app(DATABASE_URL=database_url)


@pytest.fixture
def client(app):
    return app.test_client()


def rows(app, **filters) -> list[dict]:
    return list_feedback(app.extensions["cds"].store, **filters)


def assert_ack(response, received: int, stored: int) -> None:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert response.get_json() == {"received": received, "stored": stored}


# --- examples, normalization ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_is_acknowledged_and_stored_normalized(app, client, name):
    body = example(name)

    assert_ack(post(client, URL, body), 1, 1)

    [row] = rows(app)
    assert set(row) == COLUMNS
    assert row["site"] == SITE
    assert row["service_id"] == SERVICE
    assert row["raw"] == body["feedback"][0]
    assert row["outcome_timestamp"].tzinfo is UTC
    assert abs(datetime.now(UTC) - row["received_at"]) < timedelta(minutes=1)
    assert len(row["dedupe_key"]) == 64
    normalized = {k: v for k, v in row.items() if k in EXAMPLES[name]}
    assert normalized == EXAMPLES[name]
    assert rows(app, site=SITE, service_id=SERVICE, card=row["card"]) == [row]


def test_all_examples_in_one_batch(app, client):
    items = [example(name)["feedback"][0] for name in sorted(EXAMPLES)]

    assert_ack(post(client, URL, {"feedback": items}), 6, 6)

    assert [r["raw"] for r in rows(app)] == items


def test_feedback_is_recorded_per_service(app, client):
    body = example("epic-feedback-accepted.json")

    assert_ack(post(client, URL, body), 1, 1)
    assert_ack(post(client, "/cds-services/greeter/feedback", body), 1, 1)

    assert [r["service_id"] for r in rows(app)] == [SERVICE, "greeter"]
    assert len(rows(app, service_id="greeter")) == 1


# --- replays (rule 105) ---------------------------------------------------------------------


def test_replay_is_acknowledged_and_stored_once(app, client):
    body = example("epic-feedback-overridden-with-extension.json")
    assert_ack(post(client, URL, body), 1, 1)
    [first] = rows(app)

    assert_ack(post(client, URL, body), 1, 0)
    # The same item with other key order and whitespace is the same feedback.
    reordered = json.dumps(body, sort_keys=True, indent=4)
    response = client.post(URL, data=reordered, content_type="application/json")
    assert_ack(response, 1, 0)

    assert rows(app) == [first]


def test_duplicates_within_one_batch_are_stored_once(app, client):
    assert_ack(post(client, URL, {"feedback": [item(0), item(1), item(0)]}), 3, 2)
    assert_ack(post(client, URL, {"feedback": [item(1), item(2)]}), 2, 1)

    assert [r["card"] for r in rows(app)] == ["card-0", "card-1", "card-2"]


# --- batches -------------------------------------------------------------------------------


def test_batch_of_200_items(app, client):
    items = [item(n, overrideReason={"userComment": f"comment {n} ß✓"}) for n in range(200)]

    assert_ack(post(client, URL, {"feedback": items}), 200, 200)

    stored = rows(app)
    assert [r["card"] for r in stored] == [f"card-{n}" for n in range(200)]
    assert stored[199]["user_comment"] == "comment 199 ß✓"
    assert stored[199]["outcome_timestamp"] == datetime(2024, 1, 1, 0, 3, 19, tzinfo=UTC)
    assert len({r["dedupe_key"] for r in stored}) == 200
    assert_ack(post(client, URL, {"feedback": items}), 200, 0)
    assert len(rows(app)) == 200


# --- bad input: 4xx, and nothing from the request stored ----------------------------------


@pytest.mark.parametrize(
    ("bad_index", "bad_item", "path"),
    [
        (1, item(1, outcome="dismissed"), "feedback[1].outcome"),
        (1, item(1, outcomeTimestamp=...), "feedback[1].outcomeTimestamp"),
        (1, item(1, outcomeTimestamp="2024-01-01T00:00:00"), "feedback[1].outcomeTimestamp"),
        (1, item(1, outcomeTimestamp=stamp(datetime.now(UTC) + timedelta(days=365 * 73))),
         "feedback[1].outcomeTimestamp"),
        (1, item(1, card=...), "feedback[1].card"),
        (1, item(1, card=123456), "feedback[1].card"),
        (1, item(1, acceptedSuggestions=[{"id": ""}]), "feedback[1].acceptedSuggestions[0].id"),
        (1, item(1, overrideReason={"reason": {"code": "x"}}),
         "feedback[1].overrideReason.reason.system"),
        (1, "not an object", "feedback[1]"),
        (199, item(199, outcome="ACCEPTED"), "feedback[199].outcome"),
    ],
)
def test_malformed_item_rejects_the_whole_batch(app, client, bad_index, bad_item, path):
    assert_ack(post(client, URL, {"feedback": [item(100)]}), 1, 1)
    before = rows(app)
    items = [item(n) for n in range(max(bad_index + 1, 3))]
    items[bad_index] = bad_item

    body = assert_outcome(post(client, URL, {"feedback": items}), 400, path)

    assert [issue["expression"] for issue in body["issue"]] == [[path]]
    # No partial write, and the feedback stored earlier is untouched.
    assert rows(app) == before


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "feedback"),
        ({"feedback": []}, "feedback"),
        ({"feedback": None}, "feedback"),
        ({"feedback": {}}, "feedback"),
        ([], "JSON object"),
        ({"Feedback": [item()]}, "feedback"),
    ],
)
def test_body_without_feedback_items_is_400(app, client, body, fragment):
    assert_outcome(post(client, URL, body), 400, fragment)
    assert rows(app) == []


def test_invalid_json_is_400(app, client):
    response = client.post(URL, data='{"feedback": [', content_type="application/json")
    assert_outcome(response, 400, "JSON")
    assert rows(app) == []


def test_outcome_timestamp_is_bounded_by_the_apps_clock_which_stamps_receipt(database_url,
                                                                              make_app):
    # The app's clock (CLOCK, which tests move), not the wall clock, is "now" for both.
    then = datetime.now(UTC) - timedelta(days=1)
    app = make_app(DATABASE_URL=database_url, CLOCK=lambda: then)
    client = app.test_client()
    ahead = item(0, outcomeTimestamp=stamp(then + timedelta(minutes=6)))
    assert_outcome(post(client, URL, {"feedback": [ahead]}), 400,
                   "feedback[0].outcomeTimestamp", "after this server's time")

    assert_ack(post(client, URL, {"feedback": [item(1, outcomeTimestamp=stamp(then))]}), 1, 1)
    [row] = rows(app)
    assert row["received_at"] == then


# body > feedback > [0] > overrideReasons > extension: five levels before the Epic extension's own.
@pytest.mark.parametrize("body", [
    "[" * 100_000 + "]" * 100_000,
    json.dumps({"feedback": [item(overrideReasons={"extension": {"x": nested(MAX_DEPTH - 4)}})]}),
], ids=["100k-levels", "limit+1"])
def test_json_nested_too_deep_is_400_and_stores_nothing(app, client, body):
    response = client.post(URL, data=body, content_type="application/json")
    assert_outcome(response, 400, f"nested deeper than {MAX_DEPTH} levels")
    assert rows(app) == []


def test_extension_nested_up_to_the_limit_is_stored(app, client):
    extension = {"x": nested(MAX_DEPTH - 5)}
    assert_ack(post(client, URL, {"feedback": [item(overrideReasons={"extension": extension})]}),
               1, 1)
    [row] = rows(app)
    assert row["override_extension"] == extension


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None]
)
def test_wrong_content_type_is_415(app, client, content_type):
    body = json.dumps(example("epic-feedback-accepted.json"))

    response = client.post(URL, data=body, content_type=content_type)

    assert_outcome(response, 415, "application/json")
    assert rows(app) == []


def test_fhir_json_content_type_is_accepted(app, client):
    body = json.dumps(example("epic-feedback-accepted.json"))
    response = client.post(URL, data=body, content_type="application/fhir+json")
    assert_ack(response, 1, 1)


@pytest.mark.parametrize("service_id", ["nope", "Echo", "echo%2Ffeedback"])
def test_unknown_service_is_404(app, client, service_id):
    body = example("epic-feedback-accepted.json")

    response = post(client, f"/cds-services/{service_id}/feedback", body)

    assert_outcome(response, 404)
    assert rows(app) == []


def test_get_on_feedback_is_405(app, client):
    response = client.get(URL)
    assert_outcome(response, 405, "GET")
    assert "POST" in response.headers["Allow"]


# --- durability ------------------------------------------------------------------------------


def test_feedback_survives_a_restart(database_url, make_app):
    first = make_app(DATABASE_URL=database_url)
    body = example("epic-feedback-overridden-with-reason.json")
    assert_ack(post(first.test_client(), URL, body), 1, 1)
    assert_ack(post(first.test_client(), URL, {"feedback": [item(0), item(1)]}), 2, 2)
    before = rows(first)
    first.extensions["cds"].close()

    second = make_app(DATABASE_URL=database_url)

    after = rows(second)
    assert after == before
    assert [r["card"] for r in after] == ["123456", "card-0", "card-1"]
    assert after[0]["raw"] == body["feedback"][0]
    assert after[0]["override_display"] == "bad"
    # Replays are still recognised after the restart; new feedback is still stored.
    client = second.test_client()
    assert_ack(post(client, URL, body), 1, 0)
    assert_ack(post(client, URL, {"feedback": [item(2)]}), 1, 1)
    assert len(rows(second)) == 4


# --- what is stored -------------------------------------------------------------------------


def test_only_the_feedback_item_is_stored(app, client):
    feedback_item = example("epic-feedback-overridden-with-extension.json")["feedback"][0]
    token = make_jwt("http://localhost" + URL)
    secrets = {
        "Authorization": f"Bearer {token}",
        "Cookie": "session=cookie-value-77aa",
        "X-Request-Id": "request-id-9c0e",
        "Epic-Client-ID": "epic-client-id-31b2",
    }
    body = {
        "feedback": [feedback_item],
        "fhirAuthorization": {"access_token": "body-token-c3d4", "token_type": "Bearer"},
        "extension": {"note": "top-level-extension-e8f9"},
    }

    assert_ack(post(client, URL, body, headers=secrets), 1, 1)

    [row] = rows(app)
    assert row["raw"] == feedback_item
    dumped = json.dumps(row, default=str)
    for value in [*secrets.values(), token, "body-token-c3d4", "top-level-extension"]:
        assert value not in dumped


def test_unknown_keys_are_kept_in_raw(app, client):
    extra = item(0, extension={"com.example.x": [1, {"y": None}]},
                 overrideReasons={"userComment": "c", "extra": True})

    assert_ack(post(client, URL, {"feedback": [extra]}), 1, 1)

    [row] = rows(app)
    assert row["raw"] == extra
    assert row["user_comment"] == "c"


# --- strings PostgreSQL text cannot hold --------------------------------------------------------

NUL = "\u0000"


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"card": f"card{NUL}0"}, "feedback[1].card"),
        ({"overrideReason": {"userComment": f"bad{NUL}comment"}},
         "feedback[1].overrideReason.userComment"),
        ({"overrideReasons": {"userComment": NUL}}, "feedback[1].overrideReasons.userComment"),
        ({"overrideReason": {"reason": {"code": f"c{NUL}", "system": "http://s"}}},
         "feedback[1].overrideReason.reason.code"),
        ({"overrideReasons": {"reason": {"code": "c", "system": f"http://s{NUL}"}}},
         "feedback[1].overrideReasons.reason.system"),
        ({"overrideReason": {"reason": {"code": "c", "system": "s", "display": f"{NUL}d"}}},
         "feedback[1].overrideReason.reason.display"),
        ({"outcome": "accepted", "acceptedSuggestions": [{"id": "a"}, {"id": f"b{NUL}"}]},
         "feedback[1].acceptedSuggestions[1].id"),
        ({"overrideReasons": {"extension": {EPIC_REASON_DISPLAY: f"Does not{NUL} meet"}}},
         "feedback[1].overrideReasons.extension"),
        ({"overrideReasons": {"extension": {EPIC_REASON_CATEGORY: "45", f"k{NUL}": "v"}}},
         "feedback[1].overrideReasons.extension"),
        ({"outcome": f"overridden{NUL}"}, "feedback[1].outcome"),
        ({"outcomeTimestamp": f"2024-01-01T00:00:00Z{NUL}"}, "feedback[1].outcomeTimestamp"),
    ],
)
def test_nul_character_in_a_field_is_a_clean_400(app, client, overrides, path):
    items = [item(0), item(1, **overrides), item(2)]

    body = assert_outcome(post(client, URL, {"feedback": items}), 400, path)

    assert [issue["expression"] for issue in body["issue"]] == [[path]]
    if "outcome" not in path:
        assert "NUL" in json.dumps(body)
    assert rows(app) == []


def test_nul_character_in_an_unknown_key_is_stored_escaped(app, client):
    odd = item(0, note=f"a{NUL}b", extension={f"k{NUL}": [NUL]})

    assert_ack(post(client, URL, {"feedback": [odd]}), 1, 1)
    assert_ack(post(client, URL, {"feedback": [copy.deepcopy(odd)]}), 1, 0)

    [row] = rows(app)
    assert row["raw"] == odd
    assert row["card"] == "card-0"


def test_lone_surrogate_is_a_clean_400(app, client):
    data = json.dumps({"feedback": [item(0, overrideReason={"userComment": "x\ud800"})]})

    response = client.post(URL, data=data, content_type="application/json")

    assert_outcome(response, 400, "feedback[0].overrideReason.userComment", "surrogate")
    assert rows(app) == []


def test_lone_surrogate_in_an_unread_key_is_stored_escaped(app, client):
    data = json.dumps({"feedback": [item(0, **{"com.example.note": "x\ud800"})]})

    response = client.post(URL, data=data, content_type="application/json")

    assert response.status_code == 200, response.get_json()
    assert rows(app)[0]["raw"]["com.example.note"] == "x\ud800"


def test_store_outage_is_503_with_retry_after(make_app):
    app = make_app(DATABASE_URL="postgresql+psycopg://cds:pw@127.0.0.1:1/none?connect_timeout=1")
    response = app.test_client().post(URL, json={"feedback": [item(0)]})
    body = assert_outcome(response, 503, "Retry later")
    assert response.headers["Retry-After"] == "30"
    assert "pw@" not in json.dumps(body)
