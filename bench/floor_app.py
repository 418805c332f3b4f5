"""The floor for the HTTP benchmark: a bare Flask app that parses a hook request and answers a
fixed card, served by gunicorn with the service's own settings.

What the service does beyond this floor (JWT verification, prefetch, features, model, cards,
audit) is what a service/floor ratio measures; HTTP parsing, gunicorn's gthread workers and
Flask routing are common to both. The gunicorn application is `cds-service serve`'s own
(`cds_service.ops.serving.Server`): `SETTINGS` plus the same bind, workers, threads,
`max_requests`, logging dictionary and server hooks, so a change there moves both. (gunicorn
writes an access line per request whenever a logging dictionary is set, `--access-log` or not;
the floor does too.)

Like the service, it answers `Server-Timing: total;dur=<ms>`, the time from its first
`before_request` to its last `after_request`.

    python -m bench.floor_app --port 8001 --workers 1 [--threads 4] [--max-requests 0]
"""

from __future__ import annotations

import argparse
import json
import time

from flask import Flask, Response, g, request

from cds_service.ops.logs import logconfig
from cds_service.ops.serving import SETTINGS, Server

# One warning card shaped like kidney-risk's (2.3 KB as JSON, about what the service answers
# for the bench's patient-view payloads).
CARD = {
    "uuid": "5f1b2f7e-3a4c-4f8e-9b1d-2c7a9e0d4b61",
    "summary": "5-year kidney failure risk 24% (eGFR 28, UACR 420 mg/g)",
    "indicator": "warning",
    "detail": "| Result | Value | Category | Date |\n|---|---|---|---|\n| eGFR | 28 mL/min/1.73 m² "
              "| KDIGO G4 (severely decreased) | 2026-11-11 |\n| Urine ACR | 420 mg/g | KDIGO A3 "
              "(severely increased) | 2026-11-11 |\n\n**5-year kidney failure risk 24%**, 2-year "
              "8% (model kfre-4var 1.0.0). Main factors: eGFR 28 raises risk; urine ACR 420 mg/g "
              "raises risk; female sex lowers risk.\n\nKDIGO 2024 recommends referral to "
              "nephrology: 5-year kidney failure risk 24% (≥ 5%); eGFR 28 (< 30); urine ACR "
              "420 mg/g (≥ 300).",
    "source": {"label": "KDIGO 2024 CKD guideline",
               "url": "https://kdigo.org/guidelines/ckd-evaluation-and-management/",
               "topic": {"code": "kidneyfunction", "system": "https://cds.example.org/topics",
                         "display": "Reduced kidney function"}},
    "suggestions": [{
        "label": "Refer to nephrology", "uuid": "0b6f8d1c-7e2a-4c3b-8f9d-1a2b3c4d5e6f",
        "isRecommended": True,
        "actions": [{"type": "create",
                     "description": "Draft a nephrology referral for you to review and sign.",
                     "resource": {
                         "resourceType": "ServiceRequest", "status": "draft", "intent": "order",
                         "subject": {"reference": "Patient/eBnchPt0Kx4Rm7Qz2Wv9Ld3"},
                         "code": {"coding": [{
                             "system": "urn:com.epic.cdshooks.action.code.system."
                                       "preference-list-item",
                             "code": "118732", "display": "AMB REFERRAL TO NEPHROLOGY"}]},
                         "reasonCode": [{"text": "CKD G4A3: 5-year kidney failure risk 24% "
                                                 "(≥ 5%); eGFR 28 (< 30); urine ACR 420 mg/g "
                                                 "(≥ 300)"}]}}]}],
    "selectionBehavior": "any",
    "overrideReasons": [
        {"code": code, "system": "https://cds.example.org/topics", "display": display}
        for code, display in (("nephrologyfollowing", "Already followed by nephrology"),
                              ("goalsofcare", "Not consistent with goals of care"),
                              ("patientdeclined", "Patient declined"),
                              ("datanotcurrent", "Result not current or acute"))],
    "links": [{"label": "KDIGO 2024 CKD guideline", "type": "absolute",
               "url": "https://kdigo.org/guidelines/ckd-evaluation-and-management/"}],
}
BODY = json.dumps({"cards": [CARD]}, ensure_ascii=False).encode()


def create_app() -> Flask:
    app = Flask("bench-floor")

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.post("/cds-services/<service_id>")
    def invoke(service_id: str) -> Response:
        body = request.get_json()  # parsed like the service's body, then unused
        if not isinstance(body, dict) or "hookInstance" not in body:
            return Response(b'{"error": "not a hook request"}', status=400,
                            mimetype="application/json")
        return Response(BODY, status=200, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status": "ok"}', mimetype="application/json")

    @app.after_request
    def _timing(response: Response) -> Response:
        started = g.get("started")
        if started is not None:
            elapsed_ms = (time.perf_counter() - started) * 1000
            response.headers["Server-Timing"] = f"total;dur={elapsed_ms:.3f}"
        return response

    return app


class FloorServer(Server):
    """`cds-service serve`'s own gunicorn application (`cds_service.ops.serving.Server`: SETTINGS,
    bind, workers, threads, max_requests, logging, server hooks), loading this app instead."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, deployment=None,
                         logconfig=logconfig(args.log_format, access_log=args.access_log))

    def load(self) -> Flask:
        return create_app()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_app",
                                     description="Bare Flask floor app for bench.service_bench.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=SETTINGS["threads"])
    parser.add_argument("--max-requests", type=int, default=0)
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    args = parser.parse_args(argv)
    args.access_log, args.pidfile = False, None  # no access log; nothing reloads it
    FloorServer(args).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
