"""`cds-service` command line. Operators script against it: keep options and names stable.

    cds-service serve [--host H] [--port P] [--workers N] [--site-config PATH]
    cds-service check-config [--site-config PATH]
    cds-service invoke SERVICE --bundle FILE [--url URL] [--hook HOOK] [--select Type/id]...
    cds-service audit purge [--older-than-days N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from cds_service.errors import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from cds_service import create_app

    # Validate once in the master so a bad configuration stops start-up with a clear message,
    # instead of every worker failing to boot.
    try:
        create_app().extensions["cds"].close()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return 2

    class Application(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread" if args.threads > 1 else "sync")
            self.cfg.set("timeout", 30)
            self.cfg.set("graceful_timeout", 30)
            self.cfg.set("accesslog", "-" if args.access_log else None)
            self.cfg.set("proc_name", "cds-service")

        def load(self):
            return create_app()

    Application().run()
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from cds_service import create_app

    try:
        app = create_app()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    rt = app.extensions["cds"]
    for site in rt.sites.values():
        print(f"site {site.id} ({site.source})")  # noqa: T201
        for service_id, enabled in site.services.items():
            print(f"  {service_id}: {', '.join(enabled.service.hooks)}")  # noqa: T201
            for key, template in enabled.prefetch.items():
                print(f"    prefetch {key}: {template}")  # noqa: T201
    rt.close()
    return 0


def _invoke(args: argparse.Namespace) -> int:
    from cds_service.config import choose_default_site, load_sites
    from cds_service.invoke import InvokeError, build_request, format_cards, load_bundle, send
    from cds_service.registry import index_services
    from hooks import SERVICES

    try:
        sites = load_sites(os.environ.get("CDS_SITE_CONFIG"), index_services(SERVICES))
        site = choose_default_site(sites, args.site or os.environ.get("CDS_DEFAULT_SITE"))
        body = build_request(site, args.service, load_bundle(args.bundle), hook=args.hook,
                             selections=args.select)
        response = send(args.url, site, args.service, body)
    except (ConfigError, InvokeError) as exc:
        print(f"invoke: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        answer = response.json()
    except ValueError:
        answer = {"text": response.text}
    if args.json or response.status_code != 200:
        print(json.dumps(answer, indent=2))  # noqa: T201
    else:
        print(format_cards(answer))  # noqa: T201
    return 0 if response.status_code == 200 else 1


def _audit_purge(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from cds_service.config import DEFAULTS
    from cds_service.store import Store

    app_config = dict(DEFAULTS)
    for key in ("DATABASE_URL", "AUDIT_RETENTION_DAYS"):
        if f"CDS_{key}" in os.environ:
            app_config[key] = os.environ[f"CDS_{key}"]
    days = args.older_than_days or int(app_config["AUDIT_RETENTION_DAYS"])
    cutoff = datetime.now(UTC) - timedelta(days=days)
    with Store(app_config["DATABASE_URL"]) as store:
        removed = store.purge_audit(cutoff)
    print(f"removed {removed} audit records older than {cutoff:%Y-%m-%d} ({days} days)")  # noqa: T201
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cds-service", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def site_config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--site-config", metavar="PATH",
                       help="site YAML file or directory (default: $CDS_SITE_CONFIG)")

    serve = sub.add_parser("serve", help="run the service under gunicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--threads", type=int, default=4,
                       help="threads per worker (a slow FHIR fallback does not block others)")
    serve.add_argument("--access-log", action="store_true", help="gunicorn access log on stdout")
    site_config_option(serve)
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate the site configuration and print it")
    site_config_option(check)
    check.set_defaults(func=_check_config)

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
    invoke.set_defaults(func=_invoke)

    audit = sub.add_parser("audit", help="audit log maintenance")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    purge = audit_sub.add_parser("purge", help="delete audit records past the retention period")
    purge.add_argument("--older-than-days", type=int,
                       help="retention in days (default: $CDS_AUDIT_RETENTION_DAYS or 2190)")
    purge.set_defaults(func=_audit_purge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "site_config", None):
        # Workers build their own app from the environment, so pass the path that way.
        os.environ["CDS_SITE_CONFIG"] = args.site_config
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
