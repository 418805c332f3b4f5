"""`cds-service serve`, `reload` and `check-config`: run the service, swap in changed
configuration, and show the configuration as it takes effect."""

from __future__ import annotations

import argparse
import sys

from cds_service.protocol.errors import ConfigError

# The gunicorn master's pid, relative to the working directory as the default SQLite store is.
PIDFILE = "var/cds-service.pid"


def run_serve(args: argparse.Namespace) -> int:
    from cds_service.ops import logs, serving

    logs.configure(fmt=args.log_format)
    return serving.run(args, logs.logconfig(args.log_format, access_log=args.access_log))


def run_reload(args: argparse.Namespace) -> int:
    from cds_service.ops.serving import ReloadError, request_reload

    try:
        status = request_reload(args.pidfile, timeout=args.timeout)
    except ReloadError as exc:
        print(f"reload: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if status["outcome"] != "reloaded":
        print(f"reload refused: {status.get('error', status['outcome'])}\n"  # noqa: T201
              "The running workers keep serving the previous configuration.", file=sys.stderr)
        return 1
    print(f"reloaded (master pid {status['pid']}): sites {', '.join(status['sites'])}; "  # noqa: T201
          f"models {', '.join(status['models']) or 'none'}; "
          f"workers {', '.join(map(str, status['workers']))}")
    return 0


def run_check_config(args: argparse.Namespace) -> int:
    from cds_service import create_app
    from cds_service.effective import effective_config, render

    try:
        app = create_app()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        print(render(effective_config(app), as_json=args.json))  # noqa: T201
    finally:
        app.extensions["cds"].close()
    return 0
