"""What the commands on the store (`audit`, `suppressions`) share: opening the store named by
CDS_DATABASE_URL, and printing its rows as JSON lines or a table."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from cds_service.protocol.errors import ConfigError


def store_command(func):
    """Commands on the store named by CDS_DATABASE_URL: an unreachable or misnamed database is
    said plainly, exit 2."""

    def run(args: argparse.Namespace) -> int:
        from cds_service.app import resolve_config
        from cds_service.records.database import StoreUnavailable
        from cds_service.records.store import Store

        config = resolve_config()
        try:
            with Store(config["DATABASE_URL"]) as store:
                return func(args, store, config)
        except (ConfigError, StoreUnavailable) as exc:
            print(f"{args.command}: {exc}", file=sys.stderr)  # noqa: T201
            return 2

    return run


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return list(value) if isinstance(value, tuple) else value


def print_rows(rows, columns: Sequence[str], output: str) -> None:
    """Stored rows as JSON lines (every field, times ISO 8601 UTC) or as an aligned table of
    `columns` (times to the second)."""
    if output == "jsonl":
        for row in rows:
            print(json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False))  # noqa: T201
        return

    def cell(value: object) -> str:
        if isinstance(value, datetime):
            return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return "-" if value is None else str(value)

    lines = [list(columns), *([cell(row.get(name)) for name in columns] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for line in lines:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True))  # noqa: T201
              .rstrip())
