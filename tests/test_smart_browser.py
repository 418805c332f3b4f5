"""The SMART app launched in Debian's Chromium (Playwright) from a local EHR (authorization and
FHIR server on loopback, tests/helpers/smart_server.py) into a real `cds-service serve` with two
workers: launch → authorize → callback → app, with no console or CSP error, nothing of the
token in the browser, and screenshots (screen and print) under tests/artifacts/smart_app/.

Needs Chromium and Playwright (tests/helpers/browser.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cds_service.tools.invoke import load_bundle
from tests.conftest import ROOT
from tests.helpers.browser import ARTIFACTS as ALL_ARTIFACTS
from tests.helpers.servers import free_port
from tests.helpers.smart_server import SmartServer
from tests.helpers.smart_site import write_smart_site

ARTIFACTS = ALL_ARTIFACTS / "smart_app"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def demo_chart() -> dict:
    """The sandbox's CKD patient on metformin (examples/bundles, dated today), with four more
    years of eGFR behind the two it has."""
    bundle = load_bundle(str(ROOT / "examples" / "bundles" / "ckd-patient-nsaid.json"))
    resources = [e["resource"] for e in bundle["entry"]]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    now = datetime.now(UTC)
    for n, value in enumerate([52, 49, 47, 44, 40, 36, 33]):
        observations.append({
            "resourceType": "Observation", "id": f"egfr-history-{n}", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "62238-1"}]},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "effectiveDateTime": (now - timedelta(days=1800 - 240 * n)).date().isoformat(),
            "valueQuantity": {"value": value, "unit": "mL/min/{1.73_m2}"}})
    active = [r for r in resources
              if r["resourceType"] == "MedicationRequest" and r.get("status") == "active"]
    return {"patient": patient, "observations": observations, "medication_requests": active}


def test_launch_to_app_in_chromium(serve, browser, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with SmartServer(redirect_uris=[f"{base}/smart/callback"]) as ehr:
        chart = demo_chart()
        patient_id = chart["patient"]["id"]
        ehr.add_patient_chart(patient_id, **chart)
        site = write_smart_site(tmp_path, ehr.iss, f"{base}/smart/callback")
        server = serve("--workers", "2", "--site-config", str(site), "--access-log", port=port,
                       env={"CDS_SMART_SESSION_URL": f"sqlite:///{tmp_path / 'smart.sqlite3'}",
                            "CDS_ALLOW_DEV_KEYS": "false"})
        page = browser.new_page()
        problems: list[str] = []  # script errors and CSP violations show up here
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        requests_seen: list[str] = []
        page.on("request", lambda r: requests_seen.append(r.url))

        # Epic opens the registered launch URL with iss and launch.
        launch = ehr.new_launch(patient=patient_id)
        page.goto(f"{base}/smart/launch?iss={ehr.iss}&launch={launch}")
        page.wait_for_url(f"{base}/smart/app?ctx=*")
        shot(page, "01-app")

        assert page.get_by_role("heading", level=1).inner_text().strip()
        for name in ("Kidney function", "Albuminuria", "Kidney failure risk",
                     "Medicines the prescribing rules flag"):
            assert page.get_by_role("heading", name=name).is_visible()
        # The charts have accessible names, and a table of their values follows each.
        assert page.get_by_role("img").count() >= 2
        assert page.get_by_role("table").count() >= 2
        text = page.inner_text("main")
        assert "metformin" in text.lower()
        # Keyboard: the first Tab reaches the skip link, which leads to the main content.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"

        page.emulate_media(media="print")
        shot(page, "02-print")
        page.emulate_media(media="screen")

        # Nothing of the token in the browser: cookies, storage, the page, or any URL visited.
        tokens = ehr.issued_access_tokens + ehr.issued_refresh_tokens
        assert tokens
        cookies = browser.cookies()
        assert [c["name"] for c in cookies if c["domain"] == "127.0.0.1"] == ["cds_smart"]
        (cookie,) = [c for c in cookies if c["name"] == "cds_smart"]
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Lax"
        storage = page.evaluate("JSON.stringify([Object.entries(localStorage), "
                                "Object.entries(sessionStorage)])")
        assert storage == "[[],[]]"
        seen = page.content() + storage + " ".join(c["value"] for c in cookies) + " ".join(
            requests_seen)
        assert not any(token in seen for token in tokens)
        # The server's log (access log on) has neither a token nor the authorization code.
        log = server.output()
        codes = [r["code"] for r in ehr.authorize_requests if r.get("code")]
        assert codes and '"GET /smart/callback HTTP/1.1\\" 303' in log
        assert not any(secret in log for secret in [*tokens, *codes])

        # Reloading keeps the patient (a second worker reads the same session store).
        for _ in range(4):
            page.reload()
            assert page.get_by_role("heading", name="Kidney function").is_visible()
        assert problems == []
