"""Debian's Chromium driven by Playwright, for the browser tests (the `browser` fixture).

Needs `make test-tools` (chromium) and the `test` extras (playwright; never `playwright install`,
which downloads a browser of its own). A test using `browser` is skipped without them, except
under CI where it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots, one folder per test module
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser(tmp_path):
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        missing.append(str(CHROMIUM))
    if missing:
        message = f"the browser tests need {' and '.join(missing)}: run `make test-tools`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            context.close()

