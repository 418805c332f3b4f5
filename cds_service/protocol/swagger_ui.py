"""Swagger UI's script and stylesheet for `/docs`, served by this server instead of a CDN.

The page must render where the network stops at the hospital (no CDN reachable), and the script
it runs is the one pinned in pyproject.toml: flask-swagger-ui's `dist/`, whose package version
is the swagger-ui version it ships. Only the three files flask-smorest's page loads are served.
"""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, abort, send_from_directory

DIST = str(files("flask_swagger_ui") / "dist")
# flask-smorest's swagger_ui.html appends these names to OPENAPI_SWAGGER_UI_URL.
ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"})
# Relative to the page at <script root>/docs, so that behind a path prefix (SCRIPT_NAME) the
# browser asks for <script root>/docs/swagger-ui/… too; the page has no trailing-slash twin.
ASSETS_URL = "docs/swagger-ui/"

bp = Blueprint("swagger_ui", __name__, url_prefix="/docs/swagger-ui")


@bp.get("/<name>")
def asset(name: str):
    if name not in ASSETS:
        abort(404)
    return send_from_directory(DIST, name)
