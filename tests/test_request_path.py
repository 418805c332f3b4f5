"""A patient-view's path, traced (issue 17): view → auth → request schema → prefetch → service
(features → model → rules) → cards → call record.

Every function of ours that runs during one call is recorded with the module that called it.
The path's stops are the view module and the modules the view calls into directly; all other
code of ours runs beneath one of them (a stop's own helpers: the feature engine under the
service, the JWT verifier under the runtime, the writer under the call record). Ten stops at
most, so that a newcomer reads the path in one sitting.
"""

from __future__ import annotations

import sys
import threading

from hooks import SERVICES
from tests.helpers.golden import patient_request
from tests.helpers.http import post

VIEW = "cds_service.protocol.views"
MAX_STOPS = 10


def traced_call(client) -> tuple[int, dict[str, set[str]]]:
    """(status, {caller module: our modules it called}) for one patient-view."""
    calls: dict[str, set[str]] = {}

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if callee.split(".")[0] in ("cds_service", "hooks") and callee != caller:
            calls.setdefault(caller, set()).add(callee)

    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        response = post(client, "/cds-services/kidney-risk", patient_request())
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return response.status_code, calls


def test_a_patient_view_makes_at_most_ten_stops(make_app):
    client = make_app(SERVICES=SERVICES).test_client()
    assert post(client, "/cds-services/kidney-risk", patient_request()).status_code == 200
    status, calls = traced_call(client)  # the second call: nothing left to load or compile
    assert status == 200
    stops = {VIEW, *calls.get(VIEW, ())}
    assert len(stops) <= MAX_STOPS, sorted(stops)
    # The rooms of the one-line path, each entered from the view.
    assert {"hooks.kidney_risk", "cds_service.runtime", "cds_service.protocol.cards",
            "cds_service.records.call"} <= stops, sorted(stops)
    # Beneath the stops: the service reaches features and the model, the runtime the verifier.
    beneath = {callee for callees in calls.values() for callee in callees} - stops
    assert any(m.startswith("cds_service.features.") for m in beneath), sorted(beneath)
    assert any(m.startswith("cds_service.trust.") for m in beneath), sorted(beneath)
