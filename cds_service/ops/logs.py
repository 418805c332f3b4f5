"""Logging: one JSON object per line, correlated by request id and hookInstance.

Every record logged while a request is handled carries `request_id` (the caller's `X-Request-ID`
when it is a plain token, else a fresh one, echoed on the response), and once known `site`,
`service` and `hook_instance`. What is never logged: tokens, request or response bodies, FHIR
resource contents. Patient ids appear only in the audit log, whose policy allows them.
urllib3 is held at WARNING: its DEBUG lines print full FHIR URLs, and those carry patient ids.
"""

from __future__ import annotations

import logging
import logging.config
import re

from flask import Flask, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

from cds_service.ids import uuid4_hex

REQUEST_ID_HEADER = "X-Request-ID"
_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# LogRecord attribute ← key of the call's audit fields (`g.call.audit`: plain strings, filled as
# the request is understood)
_CONTEXT = (("site", "site"), ("service", "service_id"), ("hook_instance", "hook_instance"))
FORMATS = ("json", "text")


class RequestContext(logging.Filter):
    """Adds the request's correlation fields to every record logged inside it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            request_id = getattr(g, "request_id", None)
            if request_id and not hasattr(record, "request_id"):
                record.request_id = request_id
            call = getattr(g, "call", None)
            audit = call.audit if call is not None else {}
            for attribute, key in _CONTEXT:
                value = audit.get(key)
                if isinstance(value, str) and not hasattr(record, attribute):
                    setattr(record, attribute, value)
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter("%(levelname)s %(name)s %(message)s", timestamp=True,
                         rename_fields={"levelname": "level", "name": "logger"})


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Process logging (the CLI, gunicorn's master before it starts): the same configuration
    gunicorn then applies, so every line of a run has one format."""
    logging.config.dictConfig(logconfig(fmt, level))


def init_app(app: Flask) -> None:
    """Request ids: accepted from the caller when they are a plain token, echoed back."""

    @app.before_request
    def _request_id() -> None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = given if _TOKEN.fullmatch(given) else uuid4_hex()

    @app.after_request
    def _echo(response):
        request_id = getattr(g, "request_id", None)
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    logging.getLogger("urllib3").setLevel(logging.WARNING)  # also when hosted by another server


def logconfig(fmt: str = "json", level: str = "INFO", *, access_log: bool = False) -> dict:
    """`logging.config.dictConfig` form, also gunicorn's `logconfig_dict`: our lines and
    gunicorn's own (boot, reload, access log) in one format on one stderr handler, with the
    request context filter. gunicorn emits an access line per request whenever a logging
    dictionary is set, whatever `accesslog` says: its logger is held at WARNING unless asked
    for (one line per call cost a third of the throughput of a bare Flask app)."""
    if fmt not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = ["console"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": level, "handlers": handler},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": handler, "propagate": False,
                               "qualname": "gunicorn.error"},
            "gunicorn.access": {"level": "INFO" if access_log else "WARNING",
                                "handlers": handler, "propagate": False,
                                "qualname": "gunicorn.access"},
            "urllib3": {"level": "WARNING"},
        },
        "filters": {"request": {"()": "cds_service.ops.logs.RequestContext"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": fmt,
                                 "filters": ["request"], "stream": "ext://sys.stderr"}},
        "formatters": {
            "json": {"()": "cds_service.ops.logs.json_formatter"},
            "text": {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s %(message)s"},
        },
    }
