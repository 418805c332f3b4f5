"""End to end: the sandbox page in Debian's Chromium, driven by Playwright, against a real
`cds-service serve` of the demo site. Screenshots of each step: tests/artifacts/sandbox/*.png.

Needs Chromium and Playwright (tests/helpers/browser.py).
"""

from __future__ import annotations

from cds_service.records.store import Store
from cds_service.tools.invoke import load_bundle
from tests.conftest import ROOT
from tests.helpers.browser import ARTIFACTS as ALL_ARTIFACTS
from tests.helpers.store_queries import list_feedback

ARTIFACTS = ALL_ARTIFACTS / "sandbox"
KIDNEY_SUMMARY = "Kidney failure risk 8% at 2 years, 24% at 5 years (eGFR 27, urine ACR 380 mg/g)"
# The indicator bands in cds_service/static/sandbox.css, as computed colours.
BAND = {"warning": "rgb(217, 122, 0)", "critical": "rgb(196, 38, 29)"}


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_sandbox_patient_view_accept_and_order_select_in_chromium(serve, browser,
                                                                  tmp_path):
    server = serve("--workers", "1", "--site-config",
                   str(ROOT / "site_config" / "demo-hospital.yaml"))
    page = browser.new_page()
    problems: list[str] = []  # script errors and CSP violations show up here
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

    page.goto(server.base + "/sandbox")
    page.wait_for_selector("body[data-ready='true']")
    assert "unauthenticated" in page.inner_text("footer")
    shot(page, "01-page")

    # Card markdown is escaped before it is rendered: no markup or script URL gets through.
    html = page.evaluate("markdown('<img src=x onerror=alert(1)> **b** [x](javascript:alert(1)) "
                         "[KDIGO](https://kdigo.org/a?b=1&c=2)\\n\\n| a | b |\\n|---|---|\\n"
                         "| <i>1</i> | *2* |')")
    assert html == (
        "<p>&lt;img src=x onerror=alert(1)&gt; <strong>b</strong> [x](javascript:alert(1)) "
        '<a href="https://kdigo.org/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">'
        "KDIGO</a></p><table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr>"
        "<td>&lt;i&gt;1&lt;/i&gt;</td><td><em>2</em></td></tr></tbody></table>")

    # patient-view for a bundled patient: an amber warning card with the model's summary.
    page.select_option("#patient", "ckd-patient-nsaid")
    page.select_option("#service", "kidney-risk|patient-view")
    page.click("#run")
    card = page.locator("article.card").first
    card.wait_for()
    assert card.get_attribute("data-indicator") == "warning"
    assert card.locator(".card__summary").inner_text() == KIDNEY_SUMMARY
    band = card.locator(".card__band").evaluate("e => getComputedStyle(e).backgroundColor")
    assert band == BAND["warning"]
    # The markdown detail's table rendered as a table, not as pipes.
    assert card.locator(".card__detail table th").all_inner_texts() == [
        "Result", "Value", "Category", "Date"]
    assert card.locator(".card__detail strong").first.inner_text() == \
        "Kidney failure risk 8% at 2 years, 24% at 5 years"
    assert card.locator(".card__links a").first.inner_text() == "KDIGO 2024 CKD guideline"
    # The model panel: score and the top factors as bars, eGFR first.
    assert page.locator("#model .model__value").inner_text().startswith("24")
    assert page.locator("#model .bars__row").first.get_attribute("data-feature") == "egfr"
    page.click("#request-details summary")
    request_text = page.inner_text("#request-json")
    assert "Authorization: Bearer eyJ" in request_text and "…" in request_text
    assert '"hook": "patient-view"' in request_text
    shot(page, "02-patient-view")

    # Accept a suggestion: real feedback, acknowledged on the card and stored by the server.
    card_uuid = card.get_attribute("data-uuid")
    accept = card.locator("button.button--accept").first
    suggestion_uuid = accept.get_attribute("data-suggestion")
    accept.click()
    ack = card.locator(".card__ack--ok")
    ack.wait_for()
    assert "feedback stored (received 1, stored 1)" in ack.inner_text()
    shot(page, "03-accepted")
    with Store(f"sqlite:///{tmp_path / 'serve.sqlite3'}") as store:
        [row] = list_feedback(store, site="demo-hospital", service_id="kidney-risk")
    assert (row["card"], row["outcome"]) == (card_uuid, "accepted")
    assert row["accepted_suggestions"] == [suggestion_uuid]

    # Override it: the next call withholds it, and the page says which card and until when.
    page.click("#run")
    page.wait_for_selector(f"article.card:not([data-uuid='{card_uuid}'])")
    card = page.locator("article.card").first
    overridden_uuid = card.get_attribute("data-uuid")
    card.locator("select.override__reason").select_option(index=1)
    card.locator("button.button--override").click()
    card.locator(".card__ack--ok").wait_for()
    page.click("#run")
    withheld = page.locator("#withheld")
    withheld.wait_for()
    assert page.locator("article.card").count() == 0
    assert withheld.locator(".withheld__summary").inner_text().strip() == KIDNEY_SUMMARY
    assert withheld.locator(".withheld__card").get_attribute("data-card") == overridden_uuid
    assert "shown again after" in withheld.locator(".withheld__why").inner_text()
    shot(page, "03b-withheld")
    # Reset: the sandbox's own overrides for this patient end, and the card is back.
    page.click("#reset-overrides")
    page.wait_for_selector("#status.status--ok >> text=Cleared 1 suppression(s)")
    page.click("#run")
    page.locator("article.card").first.wait_for()
    assert page.locator("#withheld").is_hidden()
    assert page.locator("article.card .card__summary").first.inner_text() == KIDNEY_SUMMARY

    # order-select drafting ibuprofen 400 mg from the catalogue: the nephrotoxic card (eGFR 27).
    page.select_option("#service", "nephrotoxic-order-check|order-select")
    page.locator("label.medication[data-id='catalogue/ibuprofen-400'] input").check()
    page.click("#run")
    page.wait_for_selector("article.card .card__summary >> text=Ibuprofen ordered")
    card = page.locator("article.card").first
    assert card.get_attribute("data-indicator") == "critical"
    # The example's dates count from today (its `timestamp`): the eGFR is dated as loaded.
    bundle = load_bundle(str(ROOT / "examples" / "bundles" / "ckd-patient-nsaid.json"))
    [egfr_date] = [e["resource"]["effectiveDateTime"][:10] for e in bundle["entry"]
                   if e["resource"]["id"] == "egfr-2026-09"]
    assert card.locator(".card__summary").inner_text() == (
        f"Ibuprofen ordered with eGFR 27 on {egfr_date}: avoid NSAIDs at eGFR below 30")
    band = card.locator(".card__band").evaluate("e => getComputedStyle(e).backgroundColor")
    assert band == BAND["critical"]
    assert card.locator(".suggestion__label").all_inner_texts() == [
        "Remove the ibuprofen order", "Order acetaminophen instead"]
    assert card.locator("select.override__reason option").count() == 5  # prompt + 4 reasons
    assert '"selections": [\n' in page.inner_text("#request-json")
    shot(page, "04-order-select")

    # An uploaded Bundle: its own draft naproxen, at eGFR 48 an amber card.
    page.set_input_files("#upload", str(ROOT / "examples" / "bundles" /
                                        "nsaid-order-candidate.json"))
    naproxen = page.locator("label.medication[data-id='MedicationRequest/draft-naproxen-1']")
    naproxen.locator("input").check()
    assert page.input_value("#patient") == "__upload__"
    page.click("#run")
    page.wait_for_selector("article.card .card__summary >> text=Naproxen ordered")
    card = page.locator("article.card").first
    assert card.get_attribute("data-indicator") == "warning"
    assert card.locator(".card__summary").inner_text().startswith("Naproxen ordered with eGFR 48")
    shot(page, "05-uploaded-bundle")

    assert problems == []
    # The page shows the token truncated; the server never logs it.
    assert "Bearer" not in server.output()
