"""`cds-service site check`: a site's readiness before go-live (the checks are in
`cds_service.ops.sitecheck`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cds_service.protocol.errors import ConfigError


def run_site_check(args: argparse.Namespace) -> int:
    from cds_service.config import load_sites
    from cds_service.ops.sitecheck import SiteCheckError, check_site, render
    from cds_service.service import index_services
    from hooks import SERVICES

    try:
        if not 0 < args.timeout <= 300:
            raise SiteCheckError("--timeout: give seconds between 0 and 300")
        path = os.environ.get("CDS_SITE_CONFIG")
        sites = load_sites(path, index_services(SERVICES))
        if args.site not in sites:
            raise SiteCheckError(f"no site {args.site!r} in {path or 'the built-in defaults'} "
                                 f"(configured: {', '.join(sites)})")
        report = check_site(sites[args.site], fhir_base=args.fhir_base, timeout=args.timeout)
    except (ConfigError, SiteCheckError) as exc:
        print(f"site check: {exc}", file=sys.stderr)  # noqa: T201
        if args.json:  # scripts read stdout: the reason the check could not run, as JSON
            print(json.dumps({"site": args.site, "error": str(exc)}, indent=2))  # noqa: T201
        return 2
    print(render(report, as_json=args.json))  # noqa: T201
    return report.exit_code
