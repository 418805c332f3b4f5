"""`cds-service audit show` and `audit purge`: read the audit log by patient, user, call or
time, and delete what is past the retention period."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta

from cds_service.commands.stored import print_rows

_AGE = re.compile(r"(\d+)([mhd])")
_AGE_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def moment(text: str) -> datetime:
    """--since / --until: an ISO 8601 date or time (UTC unless it names an offset), or an age
    back from now (30m, 12h, 7d)."""
    age = _AGE.fullmatch(text.strip())
    if age:
        return datetime.now(UTC) - timedelta(**{_AGE_UNITS[age[2]]: int(age[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 date or time (2026-03-01, 2026-03-01T08:00Z) nor "
            "an age (30m, 12h, 7d)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def run_audit_show(args: argparse.Namespace, store, config) -> int:
    from cds_service.records.audit import REVIEW_COLUMNS

    if args.since and args.until and args.since >= args.until:
        print("audit: --since must be before --until", file=sys.stderr)  # noqa: T201
        return 2
    filters = {column: value for column, value in (
        ("patient_id", args.patient), ("user_id", args.user), ("hook_instance", args.hook_instance),
        ("site", args.site), ("service_id", args.service), ("kind", args.kind),
        ("status", args.status)) if value is not None}
    rows = store.iter_audit(since=args.since, until=args.until, limit=args.limit,
                            outcome_contains=args.outcome, **filters)
    print_rows(rows, REVIEW_COLUMNS, args.format)
    return 0


def run_audit_purge(args: argparse.Namespace, store, config) -> int:
    days = args.older_than_days or int(config["AUDIT_RETENTION_DAYS"])
    cutoff = datetime.now(UTC) - timedelta(days=days)
    removed = store.purge_audit(cutoff)
    print(f"removed {removed} audit records older than {cutoff:%Y-%m-%d} ({days} days)")  # noqa: T201
    return 0
