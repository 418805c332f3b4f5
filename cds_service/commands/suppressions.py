"""`cds-service suppressions list` and `clear`: the cards withheld because the same clinician
overrode them (alert fatigue), and ending them now."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from cds_service.commands.stored import print_rows

# What an operator reads of a suppression: whose, which topic, since and until when.
SUPPRESSION_COLUMNS = ("time", "expires", "site", "service_id", "user_id", "patient_id",
                       "topic_code", "indicator", "card_uuid")


def run_suppressions(args: argparse.Namespace, store, config) -> int:
    from cds_service.config import load_sites
    from cds_service.records.suppression import active_overrides
    from cds_service.service import index_services
    from hooks import SERVICES

    filters = {column: value for column, value in (
        ("site", args.site), ("service_id", args.service), ("patient_id", args.patient),
        ("user_id", args.user)) if value is not None}
    if args.suppressions_command == "clear" and not filters and not args.all:
        print("suppressions clear: name whose with --site, --service, --patient or --user, "  # noqa: T201
              "or give --all", file=sys.stderr)
        return 2
    sites = load_sites(config["SITE_CONFIG"], index_services(SERVICES))
    windows = {site.id: site.override_window for site in sites.values()}
    active = active_overrides(store, windows, now=datetime.now(UTC), **filters)
    if args.suppressions_command == "list":
        if active or args.format == "jsonl":
            print_rows(active, SUPPRESSION_COLUMNS, args.format)
        else:
            print("no suppressions in force", file=sys.stderr)  # noqa: T201
        return 0
    removed = store.delete_overrides([row["id"] for row in active])
    print(f"cleared {removed} suppression(s)")  # noqa: T201
    return 0
