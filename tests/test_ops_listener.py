"""/metrics and detailed health on the ops listener only (`serve --ops-port`, CDS_OPS_PORT): the
public port answers 404 for them and a status-only /readyz. The listener is told by the socket
the request arrived on, never by the Host header."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from cds_service.ops.listeners import OPS_PATHS
from cds_service.protocol.errors import ConfigError
from tests.conftest import ROOT
from tests.helpers.servers import Server, free_port

OPS = 9100


@pytest.fixture
def client(make_app):
    return make_app(OPS_PORT=OPS).test_client()


def on_ops(client, path: str):
    return client.get(path, base_url=f"http://localhost:{OPS}")


def test_metrics_and_the_full_readiness_answer_on_the_ops_port(client):
    assert on_ops(client, "/metrics").status_code == 200
    ready = on_ops(client, "/readyz")
    assert ready.status_code == 200 and set(ready.get_json()["checks"]) >= {"config", "spool"}
    assert on_ops(client, "/healthz").status_code == 200
    assert on_ops(client, "/healthz/detail").get_json()["checks"]["store"]["status"] == "ok"


@pytest.mark.parametrize("path", [*OPS_PATHS, "/metrics/", "/metrics/x"])
def test_ops_paths_are_not_found_on_the_public_port(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_public_readiness_says_ready_or_not_and_nothing_else(client):
    response = client.get("/readyz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})
    assert client.get("/healthz").status_code == 200  # probes stay public


def test_the_cds_api_is_not_served_on_the_ops_port(client):
    assert on_ops(client, "/cds-services").status_code == 404
    assert client.get("/cds-services").status_code == 200


def test_without_an_ops_port_everything_is_on_the_one_port(make_app):
    client = make_app().test_client()
    assert client.get("/metrics").status_code == 200
    assert "checks" in client.get("/readyz").get_json()


@pytest.mark.parametrize("port", [0, 70000, "9100", True])
def test_a_bad_ops_port_stops_start_up_naming_the_setting(make_app, port):
    with pytest.raises(ConfigError, match="CDS_OPS_PORT"):
        make_app(OPS_PORT=port)


def fetch(url: str, host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_gunicorn_serves_ops_paths_on_the_ops_socket_only(tmp_path):
    ops_port = free_port()
    server = Server(tmp_path, "--workers", "1", "--ops-port", str(ops_port),
                    "--site-config", str(ROOT / "site_config"))
    ops = f"http://127.0.0.1:{ops_port}"
    try:
        status, body = fetch(ops + "/metrics")
        assert status == 200 and b"cds_" in body
        assert fetch(server.base + "/metrics")[0] == 404
        # Naming the ops port in the Host header does not make the public socket the ops one.
        assert fetch(server.base + "/metrics", host=f"127.0.0.1:{ops_port}")[0] == 404
        status, body = fetch(server.base + "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert "checks" in json.loads(fetch(ops + "/readyz")[1])
        assert fetch(ops + "/cds-services")[0] == 404
    finally:
        server.stop()
