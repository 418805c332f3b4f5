"""`cds-service data export`: Group-level Bulk Data export with SMART Backend Services, against
a real Bulk Data server on loopback (tests/helpers/bulk_server.py) whose token endpoint verifies
every client assertion. Keys are generated here; waits are zero (`Waits(minimum=0)`) except where
a test needs real time to pass (a token expiring mid-export)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from cds_service.cli import main
from cds_service.config import load_sites
from cds_service.protocol.errors import ConfigError
from cds_service.service import index_services
from cds_service.training.bulk_export import export
from cds_service.training.errors import AuthFailed, ExportError, OutDirInUse, UnsafeUrl
from cds_service.training.export_files import read_ndjson
from cds_service.training.export_http import Waits
from cds_service.training.export_medications import medication_id
from cds_service.training.export_request import ExportRequest, parse_since, parse_types
from cds_service.training.smart_auth import BackendServicesToken, default_scope
from tests.helpers.bulk_server import BulkDataServer
from tests.helpers.services import TEST_SERVICES

CLIENT_ID = "cds-bulk-client"
KID = "d3bmo5HzW61TUgikHZH+A8Tx4UOXz2iOs4KvVU4eLY0="  # Epic-style: standard base64
FAST = Waits(default=0, minimum=0, retries=3)
TYPES = ("Patient", "Observation", "MedicationRequest")

PATIENTS = [{"resourceType": "Patient", "id": "p1"}, {"resourceType": "Patient", "id": "p2"}]
OBSERVATIONS = [{"resourceType": "Observation", "id": f"o{n}", "subject": {
    "reference": "Patient/p1"}} for n in range(3)]
MED_REQUESTS = [
    {"resourceType": "MedicationRequest", "id": "mr1",
     "medicationReference": {"reference": "Medication/med1"}},
    {"resourceType": "MedicationRequest", "id": "mr2",
     "medicationReference": {"reference": "Medication/med2"}},
    {"resourceType": "MedicationRequest", "id": "mr3",  # med1 again: read once
     "medicationReference": {"reference": "Medication/med1"}},
    {"resourceType": "MedicationRequest", "id": "mr4",  # coded inline: nothing to read
     "medicationCodeableConcept": {"text": "lisinopril 10 mg"}},
]
MEDICATIONS = {m: {"resourceType": "Medication", "id": m} for m in ("med1", "med2")}


@pytest.fixture(scope="module")
def private_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def pem_file(tmp_path, private_key) -> Path:
    path = tmp_path / "keys" / "bulk.private.pem"
    path.parent.mkdir()
    path.write_bytes(private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


@pytest.fixture
def server(private_key):
    srv = BulkDataServer(client_id=CLIENT_ID, public_key=private_key.public_key(), kid=KID)
    srv.files["Patient.ndjson"] = ("Patient", PATIENTS)
    srv.files["Observation.ndjson"] = ("Observation", OBSERVATIONS)
    srv.files["MedicationRequest.ndjson"] = ("MedicationRequest", MED_REQUESTS)
    srv.medications.update(MEDICATIONS)
    yield srv
    srv.close()


def run(server: BulkDataServer, out: Path, key_file: Path, **options):
    request = ExportRequest(fhir_url=server.url, group="registry-ckd", types=TYPES)
    options.setdefault("waits", FAST)
    options.setdefault("report", lambda line: None)
    return export(request, out, client_id=CLIENT_ID, private_key_file=key_file, kid=KID,
                  allow_http_loopback=True, **options)


def ndjson_ids(path: Path) -> list[str]:
    return [r["id"] for r in read_ndjson(path)]


def test_group_export_writes_ndjson_hydrates_medications_and_logs(server, pem_file, tmp_path):
    server.status_script = [(429, {"Retry-After": "0"}),
                            (202, {"Retry-After": "0", "X-Progress": "40% done"}),
                            (202, {"Retry-After": "0"})]
    lines: list[str] = []
    out = tmp_path / "export"

    summary = run(server, out, pem_file, report=lines.append)

    [kickoff] = server.kickoffs
    assert kickoff["path"] == "/fhir/Group/registry-ckd/$export"
    assert kickoff["query"] == {"_type": ["Patient,Observation,MedicationRequest"]}
    assert kickoff["prefer"] == "respond-async"
    assert kickoff["accept"] == "application/fhir+json"
    assert server.status_polls == 4  # 429, 202, 202, manifest
    assert ndjson_ids(out / "Patient.000.ndjson.gz") == ["p1", "p2"]
    assert ndjson_ids(out / "Observation.000.ndjson.gz") == ["o0", "o1", "o2"]
    assert ndjson_ids(out / "MedicationRequest.000.ndjson.gz") == ["mr1", "mr2", "mr3", "mr4"]
    # Referenced only, so read one by one afterwards; each once.
    assert ndjson_ids(out / "Medication.referenced.ndjson.gz") == ["med1", "med2"]
    assert server.medication_reads == ["med1", "med2"]
    assert summary.counts() == {"Patient": 2, "Observation": 3, "MedicationRequest": 4,
                                "Medication": 2}
    # Downloads required the token, and got it; the job was released afterwards.
    assert all(sent for _, sent in server.file_requests)
    assert server.deletes == ["/status/job1"]
    # One verified client assertion; the default scope is SMART v1 (what the server offers),
    # with Medication added for the reads.
    [assertion] = server.assertions
    assert assertion["header"]["kid"] == KID and assertion["header"]["alg"] == "RS384"
    assert assertion["scope"] == ("system/Patient.read system/Observation.read "
                                  "system/MedicationRequest.read system/Medication.read")
    assert not server.rejected and server.unauthorized == 0

    events = [json.loads(line) for line in (out / "log.ndjson").read_text().splitlines()]
    assert [e["eventId"] for e in events] == [
        "kickoff", "status_complete", "download_complete", "download_complete",
        "download_complete", "_medications_referenced", "export_complete"]
    assert {e["exportId"] for e in events[1:]} == {f"{server.root}/status/job1"}
    done = events[-1]["eventDetail"]
    assert done["_group"] == "registry-ckd" and done["_server"] == server.url
    assert done["_resourcesByType"] == summary.counts()
    state = json.loads((out / "export-state.json").read_text())
    assert state["completed_at"] and state["transaction_time"] == "2025-01-02T03:04:05Z"
    assert any("40% done" in line for line in lines)
    assert lines[-1].startswith("Done: 11 resources")


def test_busy_token_endpoint_and_file_server_are_waited_for(server, pem_file, tmp_path):
    server.token_script = [(429, {"Retry-After": "0"})]
    server.file_script["Patient.ndjson"] = [(503, {"Retry-After": "0"}),
                                            (429, {"Retry-After": "0"})]
    waits: list[float] = []

    summary = run(server, tmp_path / "out", pem_file, sleep=waits.append)

    assert summary.counts()["Patient"] == 2
    assert [name for name, _ in server.file_requests].count("Patient.ndjson") == 3
    assert len(server.assertions) == 1 and waits == [0, 0, 0]


def test_a_download_that_breaks_off_is_fetched_again_whole(server, pem_file, tmp_path):
    server.truncate_once.add("Patient.ndjson")

    run(server, tmp_path / "out", pem_file)

    assert [name for name, _ in server.file_requests].count("Patient.ndjson") == 2
    assert ndjson_ids(tmp_path / "out" / "Patient.000.ndjson.gz") == ["p1", "p2"]
    assert not list((tmp_path / "out").glob("*.part"))


def test_a_server_busy_for_too_long_stops_the_export_for_a_rerun(server, pem_file, tmp_path):
    server.status_script = [(503, {"Retry-After": "0"})] * 5  # 4 in this run, 1 in the next

    with pytest.raises(ExportError, match=r"status: 503, 4 times in a row; rerun later"):
        run(server, tmp_path / "out", pem_file)

    run(server, tmp_path / "out", pem_file)
    assert len(server.kickoffs) == 1


def test_a_failed_kickoff_leaves_the_directory_to_a_rerun(server, pem_file, tmp_path):
    server.kid = "not-yet-registered"
    with pytest.raises(AuthFailed):
        run(server, tmp_path / "out", pem_file)

    server.kid = KID
    assert run(server, tmp_path / "out", pem_file).completed_at


def test_token_is_refreshed_before_it_expires_during_a_long_poll(server, pem_file, tmp_path):
    # Tokens last 2 s here; the export takes 3 s of polling. A client that waits for the 401
    # would get one: refreshing ahead of expiry, it never does.
    server.expires_in = 2
    server.status_script = [(202, {"Retry-After": "1"})] * 3

    run(server, tmp_path / "out", pem_file)

    assert len(server.assertions) >= 2
    assert server.unauthorized == 0
    assert len({a["claims"]["jti"] for a in server.assertions}) == len(server.assertions)


def test_a_revoked_token_is_replaced_once_and_the_export_goes_on(server, pem_file, tmp_path):
    server.status_script = [(202, {"Retry-After": "0"})]
    real_sleep_calls: list[float] = []

    def revoke_then_sleep(seconds: float) -> None:
        real_sleep_calls.append(seconds)
        server.revoke_tokens()

    run(server, tmp_path / "out", pem_file, sleep=revoke_then_sleep)

    assert server.unauthorized == 1
    assert len(server.assertions) == 2
    assert real_sleep_calls == [0]


def test_interrupted_poll_resumes_without_a_second_kickoff(server, pem_file, tmp_path):
    server.status_script = [(202, {"Retry-After": "0"})] * 2
    out = tmp_path / "out"

    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(server, out, pem_file, sleep=ctrl_c)
    saved = json.loads((out / "export-state.json").read_text())
    assert saved["status_url"] == f"{server.root}/status/job1" and not saved["files"]

    summary = run(server, out, pem_file)

    assert len(server.kickoffs) == 1
    assert summary.completed_at and summary.counts()["Patient"] == 2


def test_interrupted_download_resumes_with_only_the_missing_files(server, pem_file, tmp_path):
    server.broken_files = {"Observation.ndjson"}
    out = tmp_path / "out"

    with pytest.raises(ExportError, match="Observation.ndjson answered 403"):
        run(server, out, pem_file)
    assert (out / "Patient.000.ndjson.gz").exists()
    assert not (out / "Observation.000.ndjson.gz").exists()

    server.broken_files.clear()
    run(server, out, pem_file)

    fetched = [name for name, _ in server.file_requests]
    assert len(server.kickoffs) == 1
    assert fetched.count("Patient.ndjson") == 1
    assert fetched.count("Observation.ndjson") == 2
    assert ndjson_ids(out / "Observation.000.ndjson.gz") == ["o0", "o1", "o2"]


def test_a_completed_export_is_not_run_again(server, pem_file, tmp_path):
    out = tmp_path / "out"
    run(server, out, pem_file)
    lines: list[str] = []

    run(server, out, pem_file, report=lines.append)

    assert len(server.kickoffs) == 1 and "already complete" in lines[0]


def test_presigned_files_get_no_token(server, pem_file, tmp_path):
    server.requires_access_token = False

    run(server, tmp_path / "out", pem_file)

    assert server.file_requests and not any(sent for _, sent in server.file_requests)


def test_server_errors_are_downloaded_beside_the_output(server, pem_file, tmp_path):
    server.errors = [{"resourceType": "OperationOutcome", "id": "e1", "issue": [
        {"severity": "warning", "code": "processing", "diagnostics": "Patient p9 skipped"}]}]
    lines: list[str] = []

    run(server, tmp_path / "out", pem_file, report=lines.append)

    assert ndjson_ids(tmp_path / "out" / "error" / "OperationOutcome.000.ndjson.gz") == ["e1"]
    assert "1 issues in error/" in lines[-1]


def test_a_jwk_set_signs_with_the_key_of_the_configured_kid(server, private_key, tmp_path):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = []
    for key, kid in ((other, "old-key"), (private_key, KID)):
        jwk = json.loads(RSAAlgorithm.to_jwk(key))
        jwk.update(kid=kid, alg="RS384")
        keys.append(jwk)
    jwks_file = tmp_path / "bulk.private.jwks"
    jwks_file.write_text(json.dumps({"keys": keys}))

    run(server, tmp_path / "out", jwks_file)

    assert server.assertions[0]["header"]["kid"] == KID


def test_a_kid_the_ehr_does_not_know_is_refused_at_the_token_endpoint(server, pem_file,
                                                                      tmp_path):
    server.kid = "another-kid"

    with pytest.raises(AuthFailed, match=r"answered 400 \(invalid_client: unknown kid"):
        run(server, tmp_path / "out", pem_file)
    assert not server.kickoffs


def test_client_assertion_claims(private_key):
    token = BackendServicesToken(requests.Session(), token_url="https://ehr.test/oauth2/token",
                                 client_id=CLIENT_ID, key=private_key, kid=KID,
                                 algorithm="RS384", scope="system/Patient.read",
                                 clock=lambda: 1_000_000.0)
    first, second = token.client_assertion(), token.client_assertion()

    header = jwt.get_unverified_header(first)
    claims = jwt.decode(first, private_key.public_key(), algorithms=["RS384"],
                        audience="https://ehr.test/oauth2/token",
                        options={"verify_exp": False})
    assert header == {"alg": "RS384", "kid": KID, "typ": "JWT"}
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert 0 < claims["exp"] - 1_000_000 <= 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


def test_a_key_of_the_wrong_kind_for_the_algorithm_is_named(server, tmp_path):
    ec_pem = tmp_path / "keys" / "ec.pem"
    ec_pem.parent.mkdir()
    ec_pem.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))

    with pytest.raises(AuthFailed, match="cannot sign RS384"):
        run(server, tmp_path / "out", ec_pem)
    assert not server.assertions


def test_plain_http_to_a_non_loopback_host_is_refused_before_any_request(pem_file, tmp_path):
    request = ExportRequest(fhir_url="http://ehr.example.org/fhir", group="g")
    with pytest.raises(UnsafeUrl, match="not https"):
        export(request, tmp_path / "out", client_id=CLIENT_ID, private_key_file=pem_file,
               kid=KID, allow_http_loopback=True, report=lambda line: None)


def test_loopback_http_needs_the_site_setting(server, pem_file, tmp_path):
    request = ExportRequest(fhir_url=server.url, group="g")
    with pytest.raises(UnsafeUrl):
        export(request, tmp_path / "out", client_id=CLIENT_ID, private_key_file=pem_file,
               kid=KID, report=lambda line: None)


def test_the_out_dir_is_ours_alone(server, pem_file, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OutDirInUse, match="not empty"):
        run(server, tmp_path, pem_file)

    out = tmp_path / "out"
    run(server, out, pem_file)
    other = ExportRequest(fhir_url=server.url, group="another-group", types=TYPES)
    with pytest.raises(OutDirInUse, match="holds an export of"):
        export(other, out, client_id=CLIENT_ID, private_key_file=pem_file, kid=KID,
               allow_http_loopback=True, report=lambda line: None)


@pytest.mark.parametrize(("reference", "expected"), [
    ("Medication/med1", "med1"),
    ("Medication/med1/_history/3", "med1"),
    ("https://ehr.test/fhir/Medication/e.Abc-1", "e.Abc-1"),
    ("https://other.test/fhir/Medication/med1", None),
    ("#contained-med", None),
    ("Substance/s1", None),
    ("Medication/", None),
    (None, None),
    ({"reference": "Medication/med1"}, None),
])
def test_medication_id(reference, expected):
    assert medication_id(reference, "https://ehr.test/fhir") == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-01-31", "2024-01-31T00:00:00Z"),
    ("2024-01-31T10:00:00Z", "2024-01-31T10:00:00+00:00"),
    ("2024-01-31T10:00:00+01:00", "2024-01-31T10:00:00+01:00"),
])
def test_parse_since(text, expected):
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["2024-31-01", "2024-01-31T10:00:00", "yesterday"])
def test_parse_since_refuses(text):
    with pytest.raises(ExportError, match="--since"):
        parse_since(text)


def test_parse_types():
    assert parse_types("Patient, Observation,Patient") == ("Patient", "Observation")
    assert "Patient" in parse_types(None)
    with pytest.raises(ExportError, match="observation"):
        parse_types("Patient,observation")


@pytest.mark.parametrize(("capabilities", "expected"), [
    (["permission-v1"], "system/Patient.read system/Observation.read"),
    (["permission-v2"], "system/Patient.rs system/Observation.rs"),
    (["permission-v1", "permission-v2"], "system/Patient.read system/Observation.read"),
    ([], "system/Patient.read system/Observation.read"),
])
def test_default_scope(capabilities, expected):
    assert default_scope(("Patient", "Observation"), {"capabilities": capabilities}) == expected


@pytest.mark.parametrize(("header", "expected"), [
    (None, 7.0),  # no Retry-After: the default
    ("0", 1.0),  # never faster than the minimum
    ("30", 30.0),
    ("86400", 3600.0),  # capped
    ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),  # a date in the past: now, so the minimum
])
def test_waits_follow_retry_after(header, expected):
    response = requests.Response()
    if header is not None:
        response.headers["Retry-After"] = header
    assert Waits(default=7.0).after(response) == expected


SITE = """\
site: bulk-site
prefetch:
  allow_http_loopback: true
fhir_server: {url}
bulk_export:
  client_id: {client_id}
  private_key_file: keys/bulk.private.pem
  kid: "{kid}"
  group: registry-ckd
"""


def test_site_bulk_export_section(tmp_path):
    site_file = tmp_path / "site.yaml"
    site_file.write_text(SITE.format(url="https://ehr.test/fhir", client_id=CLIENT_ID, kid=KID))

    settings = load_sites(site_file, index_services(TEST_SERVICES))["bulk-site"].bulk_export

    assert settings.private_key_file == tmp_path / "keys" / "bulk.private.pem"
    assert (settings.client_id, settings.kid, settings.algorithm, settings.group) == (
        CLIENT_ID, KID, "RS384", "registry-ckd")
    assert settings.fhir_url is None and settings.scope is None


@pytest.mark.parametrize(("extra", "message"), [
    ("  algorithm: HS256\n", "bulk_export.algorithm"),
    ("  kidd: x\n", "bulk_export.kidd: unknown key; did you mean `kid`?"),
    ("  fhir_url: http://ehr.example.org/fhir\n", "bulk_export.fhir_url"),
])
def test_site_bulk_export_errors_name_the_key(tmp_path, extra, message):
    site_file = tmp_path / "site.yaml"
    site_file.write_text(SITE.format(url="https://ehr.test/fhir", client_id=CLIENT_ID, kid=KID)
                         + extra)
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        load_sites(site_file, index_services(TEST_SERVICES))


def test_cli_data_export(server, pem_file, tmp_path, monkeypatch, capsys):
    site_file = tmp_path / "site.yaml"
    site_file.write_text(SITE.format(url=server.url, client_id=CLIENT_ID, kid=KID))
    monkeypatch.setenv("CDS_SITE_CONFIG", str(site_file))
    out = tmp_path / "out"

    code = main(["data", "export", "bulk-site", "--out", str(out), "--type",
                 "Patient,Observation", "--since", "2024-01-01"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["counts"] == {"Patient": 2, "Observation": 3,
                                                  "MedicationRequest": 4}
    assert "Kick-off:" in captured.err and "Done:" in captured.err
    assert server.kickoffs[0]["query"] == {"_type": ["Patient,Observation"],
                                           "_since": ["2024-01-01T00:00:00Z"]}
    # No MedicationRequest asked for: no Medication scope, no reads.
    assert server.assertions[0]["scope"] == "system/Patient.read system/Observation.read"
    assert not server.medication_reads
    with gzip.open(out / "Patient.000.ndjson.gz", "rt") as fh:
        assert fh.read().count("\n") == 2


def test_cli_data_export_reports_a_site_without_bulk_export(tmp_path, monkeypatch, capsys):
    site_file = tmp_path / "site.yaml"
    site_file.write_text("site: plain\n")
    monkeypatch.setenv("CDS_SITE_CONFIG", str(site_file))

    assert main(["data", "export", "plain", "--out", str(tmp_path / "out")]) == 1
    assert "no `bulk_export` section" in capsys.readouterr().err
