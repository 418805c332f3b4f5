"""Alert-fatigue suppression end to end, on SQLite and the local PostgreSQL: a card the same user
overrode for the same patient is not shown again within the site's window, and the decision is
in the audit log. Requests are the golden scenarios' (tests/data)."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timedelta

import pytest

from cds_service.records.suppression import WITHHELD_EXTENSION
from hooks import SERVICES
from tests.helpers.golden import DATA, FROZEN_NOW, GOLDEN_SITE, assert_matches_golden, load
from tests.helpers.http import assert_outcome, post
from tests.helpers.store_queries import list_feedback
from tests.helpers.validator import validate_response

KIDNEY = DATA / "kidney-risk" / "egfr-28-g4-warning"
NSAID = DATA / "nephrotoxic-order-check" / "nsaid-low-egfr"
G5 = DATA / "kidney-risk" / "egfr-12-g5-critical"


class Clock:
    def __init__(self):
        self.now = FROZEN_NOW

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_client(store_url, make_app, clock):  # apps close before the store goes
    def _make(site_yaml: str = ""):
        app = make_app(SERVICES=SERVICES, CLOCK=clock, DATABASE_URL=store_url,
                       SITE_YAML=GOLDEN_SITE + site_yaml)
        return app, app.test_client()
    return _make


def request_of(scenario, **context) -> dict:
    body = copy.deepcopy(load(scenario / "request.json"))
    body["hookInstance"] = str(uuid.uuid4())
    body["context"].update(context)
    return body


def invoke(client, scenario, **context) -> dict:
    response = post(client, f"/cds-services/{scenario.parent.name}",
                    request_of(scenario, **context))
    assert response.status_code == 200, response.get_json()
    assert validate_response(response.get_json(), epic=True) == []
    return response.get_json()


def override(client, scenario, card: dict, at) -> None:
    reason = card["overrideReasons"][0]
    response = post(client, f"/cds-services/{scenario.parent.name}/feedback", {"feedback": [{
        "card": card["uuid"], "outcome": "overridden",
        "overrideReason": {"reason": {"code": reason["code"], "system": reason["system"]},
                           "userComment": "discussed with patient"},
        "outcomeTimestamp": at.strftime("%Y-%m-%dT%H:%M:%SZ")}]})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["stored"] == 1


@pytest.mark.parametrize("scenario", [KIDNEY, NSAID], ids=lambda p: p.name)
def test_overridden_card_is_not_shown_again_to_that_user_for_that_patient(make_client, scenario):
    app, client = make_client()
    first = post(client, f"/cds-services/{scenario.parent.name}", load(scenario / "request.json"))
    body = assert_matches_golden(first, load(scenario / "expected.json"))
    override(client, scenario, body["cards"][0], FROZEN_NOW - timedelta(minutes=5))

    again = invoke(client, scenario)
    assert again["cards"] == []
    # Why, in the response (validated above): which card, overridden when, shown again after.
    card = body["cards"][0]
    [withheld] = again["extension"][WITHHELD_EXTENSION]
    overridden_at = withheld.pop("overriddenAt")
    shown_again_after = withheld.pop("shownAgainAfter")
    assert withheld == {"summary": card["summary"], "indicator": card["indicator"],
                        "topic": card["source"]["topic"], "overriddenCard": card["uuid"]}
    assert (datetime.fromisoformat(shown_again_after) - datetime.fromisoformat(overridden_at)
            == timedelta(hours=24))

    store = app.extensions["cds"].store
    last = list(store.iter_audit(kind="invoke"))[-1]
    topic = card["source"]["topic"]["code"]
    assert last["outcome"] == "cards=0 suppressed=1"
    assert last["detail"] == (f"suppressed {topic}: same user overrode card {card['uuid']} at "
                              f"{overridden_at} (window 24h)")

    # Another clinician, or the same clinician with another patient, still sees it.
    for other in ({"userId": "PractitionerRole/eOtherUser0000003"},
                  {"patientId": "eAnotherPatient00000003"}):
        answer = invoke(client, scenario, **other)
        assert len(answer["cards"]) == 1 and "extension" not in answer


def test_accepted_cards_do_not_silence_anything(make_client):
    _, client = make_client()
    card = invoke(client, KIDNEY)["cards"][0]
    response = post(client, "/cds-services/kidney-risk/feedback", {"feedback": [{
        "card": card["uuid"], "outcome": "accepted",
        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        "outcomeTimestamp": f"{(FROZEN_NOW - timedelta(minutes=5)):%Y-%m-%dT%H:%M:%SZ}"}]})
    assert response.status_code == 200
    assert len(invoke(client, KIDNEY)["cards"]) == 1


def test_the_card_returns_after_the_window(make_client, clock):
    _, client = make_client("alert_fatigue:\n  override_window_hours: 2\n")
    card = invoke(client, KIDNEY)["cards"][0]
    override(client, KIDNEY, card, FROZEN_NOW - timedelta(minutes=1))
    clock.now = FROZEN_NOW + timedelta(minutes=118)
    assert invoke(client, KIDNEY)["cards"] == []
    clock.now = FROZEN_NOW + timedelta(minutes=121)
    assert len(invoke(client, KIDNEY)["cards"]) == 1


def test_window_zero_turns_suppression_off(make_client):
    _, client = make_client("alert_fatigue:\n  override_window_hours: 0\n")
    card = invoke(client, KIDNEY)["cards"][0]
    override(client, KIDNEY, card, FROZEN_NOW - timedelta(minutes=1))
    assert len(invoke(client, KIDNEY)["cards"]) == 1


def test_a_more_severe_card_is_shown_again_and_the_audit_says_why(make_client):
    app, client = make_client()
    warning = invoke(client, KIDNEY)["cards"][0]
    assert warning["indicator"] == "warning"
    override(client, KIDNEY, warning, FROZEN_NOW - timedelta(minutes=1))
    # The same patient and user, later with an eGFR of 12 (G5): a critical card.
    patient = load(KIDNEY / "request.json")["context"]["patientId"]
    critical = invoke(client, G5, patientId=patient,
                      userId=load(KIDNEY / "request.json")["context"]["userId"])
    assert [c["indicator"] for c in critical["cards"]] == ["critical"]
    assert "extension" not in critical  # shown, so not listed as withheld
    detail = list(app.extensions["cds"].store.iter_audit(kind="invoke"))[-1]["detail"]
    assert detail.startswith("shown again kidneyfunction: critical after warning overridden at")


def test_suppression_fails_open_when_the_store_cannot_answer(make_client, monkeypatch):
    app, client = make_client()
    card = invoke(client, KIDNEY)["cards"][0]
    override(client, KIDNEY, card, FROZEN_NOW - timedelta(minutes=1))

    def broken(**kwargs):
        raise RuntimeError("database is gone")

    monkeypatch.setattr(app.extensions["cds"].store, "recent_overrides", broken)
    assert len(invoke(client, KIDNEY)["cards"]) == 1
    detail = list(app.extensions["cds"].store.iter_audit(kind="invoke"))[-1]["detail"]
    assert detail == "suppression skipped: feedback store unavailable"


def test_an_outcome_timestamp_ahead_of_our_clock_does_not_stretch_the_window(make_client, clock):
    _, client = make_client("alert_fatigue:\n  override_window_hours: 2\n")
    card = invoke(client, KIDNEY)["cards"][0]
    override(client, KIDNEY, card, clock.now + timedelta(minutes=4))  # within the clock skew
    clock.now += timedelta(minutes=119)
    assert invoke(client, KIDNEY)["cards"] == []
    clock.now += timedelta(minutes=2)  # 2 h after we received it, though 2 h after its stamp
    assert len(invoke(client, KIDNEY)["cards"]) == 1  # is 3 minutes away


def test_feedback_delivered_late_does_not_restart_the_window(make_client, clock):
    # Epic retrying feedback after an outage: the clinician overrode the card 90 minutes ago.
    _, client = make_client("alert_fatigue:\n  override_window_hours: 2\n")
    card = invoke(client, KIDNEY)["cards"][0]
    override(client, KIDNEY, card, clock.now - timedelta(minutes=90))
    clock.now += timedelta(minutes=29)
    assert invoke(client, KIDNEY)["cards"] == []
    clock.now += timedelta(minutes=2)
    assert len(invoke(client, KIDNEY)["cards"]) == 1


def test_an_outcome_timestamp_decades_ahead_is_400_and_silences_nothing(make_client, clock):
    app, client = make_client()
    card = invoke(client, KIDNEY)["cards"][0]
    response = post(client, "/cds-services/kidney-risk/feedback", {"feedback": [{
        "card": card["uuid"], "outcome": "overridden",
        "outcomeTimestamp": (clock.now + timedelta(days=365 * 73)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")}]})
    assert_outcome(response, 400, "feedback[0].outcomeTimestamp", "after this server's time")
    assert list_feedback(app.extensions["cds"].store) == []
    assert len(invoke(client, KIDNEY)["cards"]) == 1
