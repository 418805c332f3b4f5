"""The SMART app's routes: `/smart/launch` → the EHR's authorize endpoint → `/smart/callback` →
`/smart/app`. SMART App Launch 2.x, EHR launch (https://hl7.org/fhir/smart-app-launch/).

- The browser holds only an opaque session id (cookie `cds_smart`, HttpOnly, Secure, SameSite);
  `state`, the PKCE verifier and the tokens stay server-side (`cds_service.smart.sessions`).
- Each completed launch is a context of its own (`/smart/app?ctx=…`, good only with the cookie
  that made it): two charts open in two tabs never show each other's patient.
- The page reads the chart through the same prefetch templates, FHIR client, feature engine,
  model and rules as the kidney-risk card (`cds_service.smart.picture`).
- Pages carry no script; the Content-Security-Policy allows only our stylesheet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, current_app, redirect, render_template, request, url_for
from markupsafe import escape
from werkzeug.wrappers import Response

from cds_service.config import Site
from cds_service.protocol.errors import CdsError, FhirAccessError
from cds_service.runtime import runtime
from cds_service.smart import oauth
from cds_service.smart.oauth import LaunchFailed
from cds_service.smart.page import read_picture
from cds_service.smart.sessions import SESSION_ID, Sessions, kv_from_url, new_id
from cds_service.smart.settings import SmartAppSettings
from cds_service.training.errors import AuthFailed

log = logging.getLogger("cds_service.smart")

bp = Blueprint("smart", __name__, url_prefix="/smart", template_folder="templates",
               static_folder="static")

COOKIE = "cds_smart"
LAUNCH_TTL_S = 600  # from the authorize redirect to the callback: a sign-in, not a session


class SmartPageError(Exception):
    def __init__(self, status: int, public: str, log_message: str | None = None):
        super().__init__(log_message or public)
        self.status = status
        self.public = public


def init_app(app: Flask, sites: Mapping[str, Site]) -> None:
    config = app.config
    kv = kv_from_url(config.get("SMART_SESSION_URL"), config.get("REPLAY_CACHE_URL"),
                     "var/smart-sessions.sqlite3")
    app.extensions["smart"] = {"sessions": Sessions(kv), "discovery": oauth.Discovery()}
    app.register_blueprint(bp)


def _state() -> dict[str, Any]:
    return current_app.extensions["smart"]


def _site_for(iss: str) -> tuple[Site, SmartAppSettings]:
    for site in runtime().sites.values():
        if site.smart_app is not None and any(spec.iss == iss for spec in site.issuers):
            return site, site.smart_app
    # Nothing is fetched from an issuer we do not trust: no discovery, no redirect to it.
    raise SmartPageError(400, "This app was opened by an EHR it is not registered with.",
                         f"launch from an untrusted iss ({len(iss)} characters)")


def _session_id() -> str | None:
    value = request.cookies.get(COOKIE, "")
    return value if SESSION_ID.fullmatch(value) else None


@bp.after_request
def _headers(response: Response) -> Response:
    site_frames: set[str] = set()
    for site in runtime().sites.values():
        if site.smart_app is not None:
            site_frames.update(site.smart_app.frame_ancestors)
    ancestors = " ".join(sorted(site_frames)) or "'none'"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
        f"form-action 'none'; frame-ancestors {ancestors}")
    # Patient data and sign-in state: never cached, never sent on as a Referer.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.errorhandler(SmartPageError)
def _page_error(exc: SmartPageError):
    log.info("smart app: %s", exc)
    return _message_page(exc.status, exc.public)


@bp.errorhandler(LaunchFailed)
def _launch_failed(exc: LaunchFailed):
    log.warning("smart app: %s", exc)
    return _message_page(exc.status, exc.public)


@bp.errorhandler(CdsError)
def _cds_error(exc: CdsError):
    log.warning("smart app: %s", exc.message)
    return _message_page(exc.status, "The app cannot open this chart right now. Try again.")


def _message_page(status: int, text: str) -> tuple[str, int]:
    return render_template("smart_message.html", message=str(escape(text))), status


def _set_cookie(response: Response, session_id: str, app: SmartAppSettings) -> None:
    # Secure even on a loopback test server (browsers treat http://127.0.0.1 as secure); the
    # session id is the only thing the browser ever holds.
    response.set_cookie(COOKIE, session_id, max_age=int(app.session_lifetime.total_seconds()),
                        path="/smart/", secure=True, httponly=True, samesite=app.cookie_samesite)


@bp.get("/launch")
def launch():
    iss, launch_id = request.args.get("iss"), request.args.get("launch")
    if not iss or not launch_id:
        raise SmartPageError(400, "Open this app from a patient's chart in the EHR (the launch "
                                  "carries no iss and launch).")
    site, app = _site_for(iss)
    config = _state()["discovery"].get(iss, allow_http_loopback=app.allow_http_loopback)
    session_id = _session_id() or new_id()
    state = new_id()
    verifier, challenge = oauth.pkce_pair()
    _state()["sessions"].put(session_id, f"launch:{state}", {
        "site": site.id, "iss": iss, "verifier": verifier}, LAUNCH_TTL_S)
    response = redirect(oauth.authorize_url(config, app, iss=iss, launch=launch_id, state=state,
                                            challenge=challenge), code=302)
    _set_cookie(response, session_id, app)
    return response


@bp.get("/callback")
def callback():
    session_id = _session_id()
    state, code = request.args.get("state"), request.args.get("code")
    if not session_id or not state:
        raise SmartPageError(400, "This sign-in did not start in this browser. Open the app "
                                  "again from the chart.", "callback without session or state")
    # One use only: a replayed callback (the same code and state again) finds nothing.
    pending = _state()["sessions"].take(session_id, f"launch:{state}")
    if pending is None:
        raise SmartPageError(400, "This sign-in did not start in this browser, or was already "
                                  "used. Open the app again from the chart.",
                             "callback state unknown to this session")
    if request.args.get("error") or not code:
        # RFC 6749 §4.1.2.1: the server reports the refusal to the redirect URI.
        raise SmartPageError(400, "The EHR did not authorize the app. Open it again from the "
                                  "chart.", f"authorize error {request.args.get('error')!r:.40}")
    site = runtime().sites.get(pending["site"])
    if site is None or site.smart_app is None:
        raise SmartPageError(400, "This app is no longer enabled here.")
    app = site.smart_app
    config = _state()["discovery"].get(pending["iss"], allow_http_loopback=app.allow_http_loopback)
    try:
        tokens = oauth.exchange_code(config, app, code=code, verifier=pending["verifier"])
    except AuthFailed as exc:
        raise LaunchFailed(str(exc), status=500, public="This site's app registration is not "
                           "usable; tell the service's operators.") from exc
    if not tokens.patient:
        raise SmartPageError(400, "The EHR launched the app without a patient. Open it from a "
                                  "patient's chart.", "token response without patient")
    user = oauth.fhir_user(config, app, tokens.id_token,
                           allow_http_loopback=app.allow_http_loopback)
    context_id = new_id()
    now = time.time()
    ends = now + app.session_lifetime.total_seconds()
    _state()["sessions"].put(session_id, f"context:{context_id}", {
        "site": site.id, "iss": pending["iss"], "patient": tokens.patient,
        "encounter": tokens.encounter, "fhir_user": user, "access_token": tokens.access_token,
        "expires_at": tokens.expires_at, "refresh_token": tokens.refresh_token,
        "ends_at": ends, "launched_at": now}, _ttl(tokens, ends))
    return redirect(url_for("smart.app", ctx=context_id), code=303)


def _ttl(tokens: oauth.Tokens, ends: float) -> float:
    """A context lives as long as its token, or until `ends` when it can be refreshed."""
    until = ends if tokens.refresh_token else min(tokens.expires_at, ends)
    return until - time.time()


def _current(session_id: str, context_id: str) -> dict[str, Any]:
    sessions: Sessions = _state()["sessions"]
    name = f"context:{context_id}"
    context = sessions.get(session_id, name)
    if context is None:
        raise SmartPageError(401, "This session has ended. Open the app again from the chart.")
    site = runtime().sites.get(context["site"])
    if site is None or site.smart_app is None:
        raise SmartPageError(401, "This app is no longer enabled here.")
    if context["expires_at"] - 30 > time.time():
        return context
    if not context.get("refresh_token") or context["ends_at"] <= time.time():
        sessions.delete(session_id, name)
        raise SmartPageError(401, "This session has ended. Open the app again from the chart.")
    app = site.smart_app
    config = _state()["discovery"].get(context["iss"], allow_http_loopback=app.allow_http_loopback)
    try:
        tokens = oauth.refresh(config, app, context["refresh_token"])
    except (LaunchFailed, AuthFailed) as exc:
        # Another worker may have refreshed this context a moment ago, and a server that
        # rotates refresh tokens then refuses the old one: take the token that worker stored.
        again = sessions.get(session_id, name)
        if again is not None and again["expires_at"] - 30 > time.time():
            return again
        sessions.delete(session_id, name)
        raise SmartPageError(401, "This session has ended. Open the app again from the chart.",
                             f"refresh failed: {exc}") from exc
    context.update(access_token=tokens.access_token, expires_at=tokens.expires_at,
                   refresh_token=tokens.refresh_token or context["refresh_token"])
    sessions.put(session_id, name, context, _ttl(tokens, context["ends_at"]))
    return context


@bp.get("/app")
def app():
    session_id, context_id = _session_id(), request.args.get("ctx", "")
    if not session_id or not SESSION_ID.fullmatch(context_id):
        raise SmartPageError(401, "This session has ended. Open the app again from the chart.")
    context = _current(session_id, context_id)
    site = runtime().sites[context["site"]]
    try:
        picture = read_picture(site, context)
    except FhirAccessError as exc:
        if any(issue.code == "forbidden" for issue in exc.issues):
            _state()["sessions"].delete(session_id, f"context:{context_id}")
            raise SmartPageError(401, "The EHR no longer accepts this session. Open the app "
                                      "again from the chart.", exc.message) from exc
        raise
    return render_template("smart_app.html", picture=picture, fhir_user=context["fhir_user"],
                           launched_at=datetime.fromtimestamp(context["launched_at"], UTC))
