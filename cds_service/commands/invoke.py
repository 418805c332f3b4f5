"""`cds-service invoke`: send one signed hook request built from a FHIR Bundle (the work is in
`cds_service.tools.invoke`) and print the cards."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cds_service.protocol.errors import ConfigError


def run_invoke(args: argparse.Namespace) -> int:
    from cds_service.config import choose_default_site, load_sites
    from cds_service.service import index_services
    from cds_service.tools.invoke import InvokeError, build_request, format_cards, load_bundle, send
    from hooks import SERVICES

    try:
        path = os.environ.get("CDS_SITE_CONFIG")
        sites = load_sites(path, index_services(SERVICES))
        if args.site and args.site not in sites:
            raise InvokeError(f"--site: no site {args.site!r} in "
                              f"{path or 'the built-in defaults'} (configured: {', '.join(sites)})")
        if not args.site and not os.environ.get("CDS_DEFAULT_SITE") and len(sites) > 1:
            raise InvokeError(f"--site: {len(sites)} sites are configured ({', '.join(sites)}); "
                              "name the one whose development key signs")
        site = choose_default_site(sites, args.site or os.environ.get("CDS_DEFAULT_SITE"))
        body = build_request(site, args.service, load_bundle(args.bundle), hook=args.hook,
                             selections=args.select)
        response = send(args.url, site, args.service, body,
                        public_url=os.environ.get("CDS_PUBLIC_URL") or None)
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
        print(format_cards(answer, body["context"]))  # noqa: T201
    return 0 if response.status_code == 200 else 1
