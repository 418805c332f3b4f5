"""Structured logs: JSON lines correlated by request id, site, service and hookInstance, with no
token and no patient id; and `cds-service serve` emitting them for gunicorn's own lines too."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from cds_service.ops import logs
from tests.helpers.golden import (
    FETCH_SCENARIOS,
    TOKEN,
    assert_matches_golden,
    load,
    loopback_client,
    without_prefetch,
)
from tests.helpers.http import post


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.json_formatter())
    handler.addFilter(logs.RequestContext())
    logger = logging.getLogger("cds_service")
    logger.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)


def test_request_logs_are_json_correlated_and_free_of_tokens_and_patient_ids(
        make_app, tmp_path, fhir_server, captured):
    scenario = FETCH_SCENARIOS[0]
    client = loopback_client(make_app, tmp_path, fhir_server)
    body, bundle = without_prefetch(scenario, fhir_server)
    fhir_server.add("Observation", json=bundle)
    before = len(captured())  # start-up lines (model loaded) are outside any request

    response = post(client, f"/cds-services/{scenario.parent.name}", body,
                    headers={"X-Request-ID": "epic-req-42"})

    assert_matches_golden(response, load(scenario / "expected.json"))
    assert response.headers["X-Request-ID"] == "epic-req-42"
    records = captured()[before:]
    assert {r["logger"] for r in records} >= {"cds_service.data.fhir", "cds_service.protocol.views"}
    for record in records:
        assert {"timestamp", "level", "logger", "message"} <= set(record)
        assert record["request_id"] == "epic-req-42"
        assert record["site"] == "test-site"
    [done] = [r for r in records if r["logger"] == "cds_service.protocol.views"]
    assert done["service"] == "kidney-risk"
    assert done["hook_instance"] == body["hookInstance"]
    text = json.dumps(records)
    assert TOKEN not in text
    assert body["context"]["patientId"] not in text


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "a;b", "é"])
def test_a_request_id_that_is_not_a_plain_token_is_replaced(client, given):
    response = client.get("/healthz", headers={"X-Request-ID": given} if given else {})
    made = response.headers["X-Request-ID"]
    assert made != given and len(made) == 32 and int(made, 16) >= 0


def test_gunicorn_logconfig_is_accepted_by_dictconfig_and_formats_json(capsys):
    config = logs.logconfig("json")
    logging.config.dictConfig(config)
    try:
        logging.getLogger("gunicorn.error").info("Booting worker with pid: %s", 7)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        record = json.loads(line)
        assert record["logger"] == "gunicorn.error"
        assert record["message"] == "Booting worker with pid: 7"
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "root": {"handlers": []}})


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logs.logconfig("yaml")
