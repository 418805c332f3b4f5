"""The one place where exceptions become HTTP responses: always an OperationOutcome body.

Never a stack trace in a body (the sandbox reference services leak theirs, peers.md §1), never a
silent empty success (HealthChain answers `{"cards": []}` when a handler throws).
"""

from __future__ import annotations

import logging
from typing import IO, Any

import flask_smorest
import msgspec
from flask import Flask, Request, Response, json, request
from flask.json.provider import DefaultJSONProvider
from marshmallow import missing
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import HTTPException, UnsupportedMediaType
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream

from cds_service.data import jsonlimit
from cds_service.ops import memory
from cds_service.protocol.errors import CdsError, Issue, operation_outcome
from cds_service.protocol.schemas import OperationOutcomeSchema
from cds_service.schema_errors import messages_to_issues

log = logging.getLogger("cds_service.protocol.http")

# FHIR issue type per HTTP status, for errors raised by Flask/werkzeug themselves.
_ISSUE_CODE = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    413: "too-long",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
}


# Flask's own JSON sorts keys; so does this, at a tenth of the time for a card response (issue
# 20). Non-ASCII text goes out as UTF-8 (RFC 8259 §8.1), not as \u escapes.
_BODY_ENCODER = msgspec.json.Encoder(order="sorted")


def json_body(value: Any) -> bytes:
    """`value` as a JSON response body; what msgspec cannot write (a lone surrogate from a
    chart's text, a type it does not know) is written by Flask's JSON instead."""
    try:
        return _BODY_ENCODER.encode(value)
    except (TypeError, ValueError, msgspec.EncodeError):  # UnicodeEncodeError: a ValueError
        return json.dumps(value).encode("ascii")


def outcome_response(body: dict, status: int, headers: dict | None = None) -> Response:
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


class Api(flask_smorest.Api):
    """flask-smorest Api whose error bodies are OperationOutcomes instead of its own shape."""

    ERROR_SCHEMA = OperationOutcomeSchema

    def handle_http_exception(self, error: HTTPException):
        data = getattr(error, "data", None) or {}
        code = _ISSUE_CODE.get(error.code or 500, "exception")
        issues: list[Issue] = []
        if "messages" in data:  # webargs validation errors, with field paths
            issues = messages_to_issues(data["messages"])
        if not issues:
            text = data.get("message") or error.description or error.name
            if error.code == 405:
                text = f"{request.method} is not allowed on {request.path}."
            elif error.code == 404:
                text = f"No such endpoint: {request.path}."
            issues = [Issue(str(text), code=code)]
        # werkzeug's 400/415 for a bad body come first: make them name the problem.
        status = error.code or 500
        if status == 422:
            status = 400
        headers = dict(data.get("headers") or {})
        if status == 405 and error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
        return outcome_response(operation_outcome(issues), status, headers)


class JsonParser(FlaskParser):
    """webargs' parser, reading JSON bodies with `jsonlimit.loads` (a nesting limit)."""

    def _raw_load_json(self, req) -> Any:
        if not is_json_request(req):
            return missing
        # As webargs does: UTF-8 only (RFC 8259 §8.1); its UnicodeDecodeError and JSONDecodeError
        # handling (400 "Invalid JSON body.", an empty body as missing) stays as it was.
        raw = req.get_data(cache=True)
        decoded = jsonlimit.loads(raw.decode("utf-8"), utf8=raw)
        memory.hold(raw, decoded)
        return decoded


class _WholeBody(LimitedStream):
    """A body of known length whose `readall` (what `request.get_data()` calls) asks for all of
    the rest in one read. werkzeug's reads 64 KiB at a time, and gunicorn (27.0,
    `Unreader.read`) takes up to 1 MiB off the socket at once and, on each of those reads, copies
    all it holds ahead again: a 1.1 MB prefetch took 17 reads (issue 20: about 0.6 ms of a 21 ms
    call side by side; most of what remained was page faults, see `ops.memory`). Everything
    else is werkzeug's own: this stream is limited to the Content-Length over werkzeug's
    (which enforces MAX_CONTENT_LENGTH), and a body shorter than its Content-Length raises
    `ClientDisconnected` as werkzeug's does."""

    def readall(self) -> bytes:
        parts = []
        while not self.is_exhausted:
            data = self.read(self.limit - self.tell())
            if not data:
                break
            parts.append(data)
        return b"".join(parts)


class CdsRequest(Request):
    """Flask's request, its body of known length read in one piece (see `_WholeBody`)."""

    @cached_property
    def stream(self) -> IO[bytes]:
        stream = super().stream
        length = self.content_length
        if isinstance(stream, LimitedStream) and length:
            return _WholeBody(stream, length)
        return stream


class App(Flask):
    """Flask whose `ensure_sync` answers from a cache. Flask asks it of every view and hook on
    every request, and each answer is an `inspect.iscoroutinefunction` (12 per patient-view:
    about 1 % of a 3 KB call, issue 20); a function does not become a coroutine later. Flask's
    docs name this method as the one to override."""

    request_class = CdsRequest

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sync: dict[Any, Any] = {}

    def ensure_sync(self, func: Any) -> Any:
        try:
            return self._sync[func]
        except KeyError:
            sync = self._sync[func] = super().ensure_sync(func)
            return sync
        except TypeError:  # unhashable: not cached
            return super().ensure_sync(func)


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest Blueprint whose `@arguments` parse JSON bodies with `JsonParser`."""

    ARGUMENTS_PARSER = JsonParser()


class JsonProvider(DefaultJSONProvider):
    """Flask's JSON, with `jsonlimit.loads` behind `request.get_json()` (even `silent=True`:
    `JsonTooDeep` is no ValueError, so it reaches its handler instead of becoming None)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return jsonlimit.loads(s, **kwargs)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(CdsError)
    def _cds_error(error: CdsError):
        # Every refusal of ours, from a bad body to a store outage: what the caller sees, the
        # status and the headers (WWW-Authenticate, Retry-After) are the exception's own.
        log.log(error.log_level, "request failed: %s %s -> %s: %s", request.method, request.path,
                error.status, error.message)
        return outcome_response(error.to_operation_outcome(), error.status, dict(error.headers))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        if isinstance(error, HTTPException):  # routed here only when smorest is not in charge
            return app.extensions["cds_api"].handle_http_exception(error)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return outcome_response(
            operation_outcome([Issue("Internal error; see the service log.", code="exception")]),
            500,
        )


JSON_MIMETYPES = ("application/json", "application/fhir+json")


def require_json_body() -> None:
    """415 unless the body is declared as JSON (CDS Hooks 2.0 §Use of JSON)."""
    if request.mimetype not in JSON_MIMETYPES and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.mimetype or 'missing'}."
        )
