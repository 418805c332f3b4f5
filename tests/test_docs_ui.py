"""`/docs`: Swagger UI from this server's own files, pinned, never from a CDN."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from cds_service.protocol import swagger_ui
from tests.conftest import ROOT
from tests.helpers.browser import ARTIFACTS

CONTENT_TYPES = {".css": {"text/css"}, ".js": {"text/javascript", "application/javascript"}}


class AssetLinks(HTMLParser):
    """The URLs a page loads: `<script src>` and `<link href>`."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.urls.append(attrs["src"])
        elif tag == "link" and attrs.get("href"):
            self.urls.append(attrs["href"])


def asset_urls(html: str) -> list[str]:
    parser = AssetLinks()
    parser.feed(html)
    return parser.urls


# "" is the server at the root; "/cds" a reverse proxy that mounts it under a path (SCRIPT_NAME).
@pytest.mark.parametrize("root", ["", "/cds"])
def test_docs_page_loads_only_same_origin_assets_that_are_served(client, root):
    base = f"http://localhost{root}"
    page = client.get("/docs", base_url=base)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert re.search(r"https?:|//", html) is None  # no CDN, no protocol-relative URL either

    urls = asset_urls(html)
    assert len(urls) == 3  # the stylesheet, the preset and the bundle
    page_url = f"{base}/docs"
    for url in urls:
        resolved = urlsplit(urljoin(page_url, url))
        assert resolved.netloc == "localhost" and resolved.path.startswith(f"{root}/docs/")
        with client.get(resolved.path.removeprefix(root), base_url=base) as response:
            assert response.status_code == 200, url
            assert response.mimetype in CONTENT_TYPES[Path(resolved.path).suffix], url
            assert len(response.get_data()) > 10_000, url  # the real files, not an error page
    # The spec the page asks for is this server's too.
    assert f'url: "{root}/openapi.json"' in html


@pytest.mark.parametrize("name", ["index.html", "oauth2-redirect.html", "VERSION", "..%2fdist"
                                  "%2fswagger-ui.css", "..%2f__init__.py", "swagger-ui.js"])
def test_only_the_files_the_page_loads_are_served(client, name):
    response = client.get(f"/docs/swagger-ui/{name}")
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_the_served_swagger_ui_is_the_pinned_release():
    # flask-swagger-ui's release number is the swagger-ui release its dist/ holds (pyproject.toml).
    shipped = (Path(swagger_ui.DIST) / "VERSION").read_text().strip()
    assert shipped == f"v{version('flask-swagger-ui')}"


def test_docs_renders_in_chromium_with_the_network_off(serve, browser):
    server = serve("--workers", "1", "--site-config", str(ROOT / "site_config"))
    blocked: list[str] = []

    def only_loopback(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("internetdisconnected")

    browser.route("**/*", only_loopback)
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

    page.goto(server.base + "/docs")
    title = page.locator(".swagger-ui .info .title")
    title.wait_for()
    assert title.inner_text().startswith("CDS Hooks service")
    paths = page.locator(".swagger-ui .opblock .opblock-summary-path").all_inner_texts()
    assert "/cds-services/{service_id}" in {path.replace("\u200b", "") for path in paths}
    (ARTIFACTS / "docs").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs" / "docs.png"), full_page=True)
    assert blocked == []
    assert problems == []
