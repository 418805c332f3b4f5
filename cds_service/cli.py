"""`cds-service`: the command operators run. They script against it: keep options and names
stable (the parser's description below is what they read in `--help`).

    cds-service serve [--host H] [--port P] [--workers N] [--site-config PATH] [--pidfile PATH]
                      [--public-url URL] [--ops-port PORT]
    cds-service reload [--pidfile PATH] [--timeout S]
    cds-service check-config [--site-config PATH] [--json]
    cds-service invoke SERVICE --bundle FILE [--url URL] [--hook HOOK] [--select Type/id]...
    cds-service site check SITE [--fhir-base URL] [--site-config PATH] [--timeout S] [--json]
    cds-service audit show [--patient ID] [--user ID] [--hook-instance ID] [--since T] [--until T]
                           [--outcome TEXT] [--format jsonl|table] ...
    cds-service audit purge [--older-than-days N]
    cds-service suppressions list|clear [--site S] [--service ID] [--patient ID] [--user ID] [--all]
    cds-service models generate-cohort --out DIR [--patients N] [--seed S]
    cds-service models train --ndjson DIR --labels CSV --spec YAML --out models/ID [--replace]
    cds-service models train --cohort DIR --spec YAML --out models/ID [--train-fraction F]
                             [--replace]
    cds-service models evaluate models/ID --ndjson DIR --labels CSV
    cds-service models evaluate models/ID --cohort DIR --report DIR [--compare ID|DIR]
                                [--split all|test] [--bootstrap N] [--seed S] [--site SITE]
    cds-service models validate models/ID [models/ID ...]
    cds-service models explain models/ID --bundle FILE [--now ISO]
    cds-service models cohort EXPORT_DIR --spec YAML [--spec YAML ...] --out DIR
    cds-service models provenance EVAL_DIR [LABEL=]MODEL_DIR... --site SITE [--cohort DIR]
    cds-service models promote MODEL_DIR --site SITE --evaluation DIR [--role shadow|active]
    cds-service models monitor [--site SITE] [--since 24h] [--out FILE] [--prom-file FILE]
    cds-service data export SITE --out DIR [--group ID] [--since DATE] [--type Patient,...]

The parser is built here; each command group's handlers (`run_*`) are in `cds_service.commands`.
"""

from __future__ import annotations

import argparse
import os
import sys

from cds_service.commands.audit import moment, run_audit_purge, run_audit_show
from cds_service.commands.data import run_data_export
from cds_service.commands.invoke import run_invoke
from cds_service.commands.models import (
    models_command,
    run_models_cohort,
    run_models_evaluate,
    run_models_explain,
    run_models_generate_cohort,
    run_models_train,
    run_models_validate,
)
from cds_service.commands.monitor import add_parser as add_monitor_parser
from cds_service.commands.promote import add_parser as add_promote_parser
from cds_service.commands.service import PIDFILE, run_check_config, run_reload, run_serve
from cds_service.commands.site import run_site_check
from cds_service.commands.stored import store_command
from cds_service.commands.suppressions import run_suppressions

DESCRIPTION = ("CDS Hooks decision-support service for Epic: serve and reload it, check and "
               "call it, read its audit log and suppressions, manage its models.")
EPILOG = ("Settings not given as options come from CDS_* environment variables (CDS_SITE_CONFIG, "
          "CDS_DATABASE_URL, ...; site_config/README.md). Runbooks: docs/operations.md.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cds-service", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")

    def site_config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--site-config", metavar="PATH",
                       help="site YAML file or directory (default: $CDS_SITE_CONFIG)")

    serve = sub.add_parser("serve", help="run the service under gunicorn",
                           description="Run the service under gunicorn until stopped (SIGTERM).")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1; 0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--workers", type=int, default=2,
                       help="worker processes, about one per core (default: 2)")
    serve.add_argument("--threads", type=int, default=4,
                       help="threads per worker (default: 4; a slow FHIR fallback does not "
                            "block others)")
    serve.add_argument("--max-requests", type=int, default=10000,
                       help="recycle a worker after this many requests, with jitter "
                            "(default: 10000; 0: never)")
    serve.add_argument("--access-log", action="store_true",
                       help="log one line per request (gunicorn's access log; off by default)")
    serve.add_argument("--log-format", choices=("json", "text"),
                       default=os.environ.get("CDS_LOG_FORMAT", "json"),
                       help="one JSON object per line (default; CDS_LOG_FORMAT) or plain text")
    serve.add_argument("--pidfile", metavar="PATH", default=PIDFILE,
                       help=f"where the master writes its pid, for `cds-service reload` "
                            f"(default: {PIDFILE})")
    serve.add_argument("--ops-port", type=int, metavar="PORT",
                       help="also listen on PORT (same --host) for /metrics and detailed health, "
                            "which then answer 404 on --port (default: $CDS_OPS_PORT; unset: "
                            "everything on --port)")
    serve.add_argument("--public-url", metavar="URL",
                       help="the URL Epic calls this service at, e.g. https://cds.example.org "
                            "(default: $CDS_PUBLIC_URL): a JWT's aud must name "
                            "URL/cds-services/<id> or one of the site's audiences")
    site_config_option(serve)
    serve.set_defaults(func=run_serve)

    reload = sub.add_parser(
        "reload", help="load changed site files and models into the running service",
        description="Signal the running service (SIGHUP to the master in --pidfile) to load and "
                    "validate its configuration and replace its workers; report whether it did. "
                    "Exit 1 when the configuration is refused (the running workers keep serving),"
                    " 2 when the service cannot be reached.")
    reload.add_argument("--pidfile", metavar="PATH", default=PIDFILE,
                        help=f"the pidfile `serve` wrote (default: {PIDFILE})")
    reload.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds to wait for the outcome (default: 60; the old workers get "
                             "30 to finish their calls)")
    reload.set_defaults(func=run_reload)

    check = sub.add_parser("check-config", help="validate the configuration and print it as "
                           "it takes effect (deployment settings, then each site; secrets masked)")
    check.add_argument("--json", action="store_true", help="print it as JSON")
    site_config_option(check)
    check.set_defaults(func=run_check_config)

    invoke = sub.add_parser("invoke", help="send a signed hook request built from a FHIR Bundle")
    invoke.add_argument("service", help="service id, e.g. kidney-risk")
    invoke.add_argument("--bundle", required=True, help="FHIR Bundle (JSON) with the patient")
    invoke.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    invoke.add_argument("--hook", help="hook to fire (default: the service's first hook)")
    invoke.add_argument("--select", action="append", default=[], metavar="TYPE/ID",
                        help="order-select selections (default: every draft order)")
    invoke.add_argument("--site", help="site whose development key signs (default: the only one)")
    invoke.add_argument("--json", action="store_true", help="print the response JSON")
    site_config_option(invoke)
    invoke.set_defaults(func=run_invoke)

    site = sub.add_parser("site", help="per-site checks")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    site_check = site_sub.add_parser(
        "check", help="readiness before go-live: the site's FHIR CapabilityStatement against "
                      "its prefetch templates, its orderables and its issuers' JWK Sets "
                      "(exit 1 when something required is unsupported)")
    site_check.add_argument("site", metavar="SITE", help="site id, e.g. demo-hospital")
    site_check.add_argument("--fhir-base", metavar="URL",
                            help="FHIR R4 base (default: the site's fhir_server, else each "
                                 "issuer's https iss)")
    site_check.add_argument("--timeout", type=float, default=10.0, metavar="S",
                            help="seconds per request (default: 10)")
    site_check.add_argument("--json", action="store_true",
                            help="print the report as JSON; when the check cannot run (exit 2), "
                                 "{site, error}")
    site_config_option(site_check)
    site_check.set_defaults(func=run_site_check)

    audit = sub.add_parser("audit", help="read and purge the audit log (CDS_DATABASE_URL)")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    show = audit_sub.add_parser(
        "show", help="audit records matching every filter given, oldest first",
        description="Audit records (who accessed which patient's data, when, through what, with "
                    "what result) matching every filter given, oldest first: one JSON object "
                    "per line, or a table.")
    show.add_argument("--patient", metavar="ID", help="patient id, as Epic sends it in context")
    show.add_argument("--user", metavar="ID", help="user id, e.g. PractitionerRole/123")
    show.add_argument("--hook-instance", metavar="UUID", help="one call's hookInstance")
    show.add_argument("--site", metavar="SITE", help="site id")
    show.add_argument("--service", metavar="ID", help="service id, e.g. kidney-risk")
    show.add_argument("--kind", choices=("invoke", "feedback"), help="kind of call")
    show.add_argument("--status", type=int, metavar="CODE", help="HTTP status, e.g. 401")
    show.add_argument("--outcome", metavar="TEXT",
                      help="part of the outcome text, e.g. suppressed, cards=0, 412")
    show.add_argument("--since", type=moment, metavar="WHEN",
                      help="from this time on (inclusive): ISO 8601 (UTC unless an offset is "
                           "given) or an age back from now such as 7d, 12h, 30m")
    show.add_argument("--until", type=moment, metavar="WHEN",
                      help="before this time (exclusive), same forms as --since")
    show.add_argument("--limit", type=int, metavar="N", help="at most N records")
    show.add_argument("--format", choices=("jsonl", "table"), default="jsonl",
                      help="jsonl: every field, one JSON object per line (default); table: the "
                           "main columns, aligned")
    show.set_defaults(func=store_command(run_audit_show))
    purge = audit_sub.add_parser("purge", help="delete audit records past the retention period")
    purge.add_argument("--older-than-days", type=int,
                       help="retention in days (default: $CDS_AUDIT_RETENTION_DAYS or 2190)")
    purge.set_defaults(func=store_command(run_audit_purge))

    suppressions = sub.add_parser(
        "suppressions", help="cards withheld because the same clinician overrode them",
        description="Alert-fatigue suppressions in force: a card a clinician overrode is not "
                    "shown to them again for that patient until the site's window "
                    "(alert_fatigue.override_window_hours) ends. `clear` ends them now; the "
                    "feedback that caused them stays on record.")
    suppressions_sub = suppressions.add_subparsers(dest="suppressions_command", required=True)
    for name, text in (("list", "suppressions in force, with when each expires"),
                       ("clear", "end the suppressions matching the filters now; say how many")):
        command = suppressions_sub.add_parser(name, help=text)
        command.add_argument("--site", metavar="SITE", help="site id")
        command.add_argument("--service", metavar="ID", help="service id, e.g. kidney-risk")
        command.add_argument("--patient", metavar="ID", help="patient id, as Epic sends it")
        command.add_argument("--user", metavar="ID", help="user id, e.g. PractitionerRole/123")
        if name == "list":
            command.add_argument("--format", choices=("table", "jsonl"), default="table",
                                 help="table (default) or one JSON object per line")
        else:
            command.add_argument("--all", action="store_true",
                                 help="every suppression, when no filter is given")
        site_config_option(command)
        command.set_defaults(func=store_command(run_suppressions))

    models = sub.add_parser("models", help="train, evaluate, validate and explain models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    gen = models_sub.add_parser("generate-cohort",
                                help="write the synthetic cohort as Bulk Data NDJSON + labels")
    gen.add_argument("--out", required=True, help="output directory")
    gen.add_argument("--patients", type=int, default=4000,
                     help="how many patients (default: 4000)")
    gen.add_argument("--seed", type=int, default=20261121,
                     help="random seed: the same seed writes the same cohort")
    gen.set_defaults(func=models_command(run_models_generate_cohort))
    tr = models_sub.add_parser("train", help="train, evaluate and export a model directory")
    tr.add_argument("--cohort", metavar="DIR",
                    help="`models cohort` output: labels at the spec's horizon, split in time")
    tr.add_argument("--ndjson", help="directory of *.ndjson (Bulk Data export), with --labels")
    tr.add_argument("--labels", help="CSV: patient_id,index_date,label")
    tr.add_argument("--spec", required=True, help="training spec (manifest without results)")
    tr.add_argument("--out", required=True, help="model directory to write, e.g. models/my-id")
    tr.add_argument("--train-fraction", type=float, metavar="F",
                    help="--cohort: share of patients, earliest index dates first, that train "
                         "(default: 0.75; the rest test)")
    tr.add_argument("--replace", action="store_true",
                    help="overwrite a model already in --out (refused otherwise)")
    tr.set_defaults(func=models_command(run_models_train))
    ev = models_sub.add_parser("evaluate", help="metrics of a model on a labelled cohort")
    ev.add_argument("model", help="model directory")
    ev.add_argument("--cohort", metavar="DIR",
                    help="`models cohort` output, labelled at the model's horizon")
    ev.add_argument("--ndjson", help="directory of *.ndjson (Bulk Data export), with --labels")
    ev.add_argument("--labels", help="CSV: patient_id,index_date,label")
    ev.add_argument("--compare", metavar="ID|DIR",
                    help="--cohort: comparator on the same patients, a model id (kfre-4var) or "
                         "directory, at its output of the model's horizon")
    ev.add_argument("--report", metavar="DIR",
                    help="--cohort: write report.md, metrics.json and figures here")
    ev.add_argument("--split", choices=("all", "test"), default="all",
                    help="--cohort: all patients (default), or only those after the model's "
                         "training boundary (its test split)")
    ev.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                    help="bootstrap resamples for the intervals (default: 1000)")
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    ev.add_argument("--site", help="--cohort: the site whose patients these are; writes "
                                   "provenance.json for `models promote`")
    ev.set_defaults(func=models_command(run_models_evaluate))
    va = models_sub.add_parser("validate", help="check manifest, artifact, sha256 and a smoke "
                               "prediction, as a worker does at start-up")
    va.add_argument("models", nargs="+", help="model directories")
    va.set_defaults(func=models_command(run_models_validate))
    ex = models_sub.add_parser("explain", help="one patient's score and contributions")
    ex.add_argument("model", help="model directory")
    ex.add_argument("--bundle", required=True, help="FHIR Bundle (JSON) with the patient")
    ex.add_argument("--now", help="as-of time, ISO 8601 (default: now)")
    ex.set_defaults(func=models_command(run_models_explain))
    co = models_sub.add_parser("cohort", help="time-to-event cohort from a Bulk Data export")
    co.add_argument("export_dir", help="directory of `cds-service data export`")
    co.add_argument("--spec", required=True, action="append", metavar="YAML",
                    help="training spec; repeat it for a comparator's features too (the union "
                         "by name; the first spec's `cohort:` section and horizon)")
    co.add_argument("--out", required=True, help="directory for cohort.csv/.json, report.md")
    co.set_defaults(func=models_command(run_models_cohort))
    add_promote_parser(models_sub)
    add_monitor_parser(models_sub)

    data = sub.add_parser("data", help="real data for models: Bulk FHIR export")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    export = data_sub.add_parser(
        "export", help="Group-level Bulk Data $export with SMART Backend Services into DIR "
                       "(NDJSON.gz + log); rerun the same command to resume (docs/export.md)")
    export.add_argument("site", metavar="SITE", help="site id with a `bulk_export` section")
    export.add_argument("--out", required=True, metavar="DIR",
                        help="new or empty directory, or the one of an export to resume")
    export.add_argument("--group", metavar="ID", help="FHIR Group id (default: "
                                                     "bulk_export.group)")
    export.add_argument("--since", metavar="DATE",
                        help="only resources changed since: 2024-01-31 (midnight UTC) or a "
                             "date-time with offset")
    export.add_argument("--type", metavar="TYPES",
                        help="comma-separated resource types (default: Patient,Condition,"
                             "Observation,MedicationRequest,Procedure,Encounter)")
    site_config_option(export)
    export.set_defaults(func=run_data_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "site_config", None):
        # Workers build their own app from the environment, so pass the path that way.
        os.environ["CDS_SITE_CONFIG"] = args.site_config
    if getattr(args, "public_url", None):
        os.environ["CDS_PUBLIC_URL"] = args.public_url
    if getattr(args, "ops_port", None):
        os.environ["CDS_OPS_PORT"] = str(args.ops_port)
    if args.func is not run_serve:  # serve configures logging for gunicorn too
        from cds_service.ops import logs

        logs.configure(fmt="text")
    try:
        return args.func(args)
    except BrokenPipeError:
        # `cds-service … | head`: the reader left. Python docs, "Note on SIGPIPE": point stdout
        # at devnull so the interpreter's final flush does not print a traceback either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
