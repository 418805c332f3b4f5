"""`cds-service models monitor [--site SITE] [--since DURATION] [--out report.md]
[--prom-file FILE]`: each model version's drift and card outcomes from the store
(cds_service/ops/model_monitor.py), as a markdown report and, for the alert rules, as Prometheus
gauges in a textfile."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`90m`, `24h`, `7d`, `2w`: a positive whole number and a unit."""
    match = re.fullmatch(r"([1-9][0-9]{0,5})([mhdw])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration is a whole number and m, h, d "
                                         "or w, e.g. 24h or 7d")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def run_models_monitor(args: argparse.Namespace, store, config) -> int:
    from cds_service.config import SHIPPED_MODELS_DIR
    from cds_service.ops.model_monitor import build_reports, render_markdown, write_prometheus
    from cds_service.records.usage import usage_since

    now = datetime.now(UTC)
    since = now - args.since
    reports = build_reports(usage_since(store, since, args.site),
                            Path(config["MODELS_DIR"] or SHIPPED_MODELS_DIR))
    stamp = "%Y-%m-%d %H:%M UTC"
    report = render_markdown(reports, since=since.strftime(stamp), generated=now.strftime(stamp))
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
        print(f"wrote {args.out}: {len(reports)} model version(s)", file=sys.stderr)  # noqa: T201
    else:
        print(report)  # noqa: T201
    if args.prom_file:
        write_prometheus(reports, Path(args.prom_file), now=now.timestamp())
    return 0


def add_parser(models_sub: argparse._SubParsersAction) -> None:
    from cds_service.commands.stored import store_command

    mo = models_sub.add_parser(
        "monitor", help="per model version: score and input drift (PSI) against training, "
                        "card acceptance and override rates, from the store")
    mo.add_argument("--site", help="only this site (default: every site in the store)")
    mo.add_argument("--since", type=parse_duration, default=timedelta(hours=24),
                    metavar="DURATION", help="window ending now: 90m, 24h, 7d, 2w (default 24h)")
    mo.add_argument("--out", metavar="FILE", help="write the markdown report here (default: "
                    "stdout)")
    mo.add_argument("--prom-file", metavar="FILE", help="also write the gauges in the "
                    "Prometheus text format (node_exporter textfile collector)")
    mo.set_defaults(func=store_command(run_models_monitor))
