"""`cds-service data export`: a site's Group-level Bulk FHIR export (the client is
`cds_service.training.bulk_export`), with exit statuses a script can act on."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cds_service.protocol.errors import ConfigError


def run_data_export(args: argparse.Namespace) -> int:
    from cds_service.config import load_sites
    from cds_service.service import index_services
    from cds_service.training.bulk_export import export_site
    from cds_service.training.errors import ExportError
    from hooks import SERVICES

    try:
        path = os.environ.get("CDS_SITE_CONFIG")
        sites = load_sites(path, index_services(SERVICES))
        if args.site not in sites:
            raise ConfigError(f"no site {args.site!r} in {path or 'the built-in defaults'} "
                              f"(configured: {', '.join(sites)})")
        summary = export_site(sites[args.site], Path(args.out), group=args.group,
                              since=args.since, types=args.type)
    except ConfigError as exc:
        print(f"data export: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except ExportError as exc:
        print(f"data export: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        print("data export: interrupted; run the same command again to resume",  # noqa: T201
              file=sys.stderr)
        return 130
    print(json.dumps({"out": summary.out_dir, "group": summary.group,  # noqa: T201
                      "server": summary.server, "counts": summary.counts()}, indent=2))
    return 0
