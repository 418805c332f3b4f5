"""gunicorn, as `cds-service serve` runs it: settings, server hooks, and the validated reload.

Why each setting (gunicorn documentation, "Settings" and "Design"):

- `gthread` workers with `threads` per process: a call waiting on a slow FHIR fallback read
  holds one thread, not the process, so other calls on that worker are answered meanwhile.
  Each worker holds one copy of the models (loaded once in the master, inherited by fork).
- `timeout` 30 s: a worker silent that long (stuck, not merely busy: gthread's main loop keeps
  the heartbeat) is killed and replaced. Well above the prefetch deadline (2.5 s by default).
- `graceful_timeout` 30 s: on SIGTERM or a reload, calls in flight get this long to finish.
- `keepalive` 75 s: Epic and load balancers reuse connections; a server that closes an idle
  connection before the balancer does (AWS ALB: 60 s idle) races it and yields sporadic 502s.
- `max_requests` 10000 (`--max-requests`) with a jitter of a tenth of it: workers are recycled
  now and then, bounding any slow leak, and not all at once.
- `worker_tmp_dir` /dev/shm: the heartbeat file on a disk-backed /tmp can stall workers in
  containers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from cds_service.errors import ConfigError

log = logging.getLogger("cds_service.serving")

SETTINGS: dict[str, Any] = {
    "worker_class": "gthread",
    "threads": 4,
    "timeout": 30,
    "graceful_timeout": 30,
    "keepalive": 75,
    "proc_name": "cds-service",
}
if Path("/dev/shm").is_dir():  # noqa: S108 - gunicorn's heartbeat files, not our data
    SETTINGS["worker_tmp_dir"] = "/dev/shm"  # noqa: S108


def prepare_metrics_dir() -> tuple[str, bool]:
    """`PROMETHEUS_MULTIPROC_DIR` for this run, emptied (prometheus_client requires a clean
    directory per run); created under the temp dir when the operator set none. Must run before
    anything imports prometheus_client. Returns the path and whether we created it."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        path = tempfile.mkdtemp(prefix="cds-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        return path, True
    directory = Path(given)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return given, False


def _worker_exit(server: Arbiter, worker: Any) -> None:
    """In the worker, as it stops (SIGTERM, reload, recycling): write queued call records."""
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("cds") if app is not None else None
    if runtime is not None:
        runtime.close()


def _child_exit(server: Arbiter, worker: Any) -> None:
    from cds_service import metrics

    metrics.worker_exited(worker.pid)


class Server(BaseApplication):
    """gunicorn over a `Deployment` loaded in the master; workers build their app from it."""

    def __init__(self, args: argparse.Namespace, deployment, logconfig: dict):
        self.args = args
        self.deployment = deployment
        self.logconfig = logconfig
        super().__init__()

    def load_config(self) -> None:
        settings = {
            **SETTINGS,
            "bind": f"{self.args.host}:{self.args.port}",
            "workers": self.args.workers,
            "threads": self.args.threads,
            "max_requests": self.args.max_requests,
            "max_requests_jitter": self.args.max_requests // 10,
            "accesslog": "-" if self.args.access_log else None,
            "logconfig_dict": self.logconfig,
            "child_exit": _child_exit,
            "worker_exit": _worker_exit,
        }
        if self.args.threads <= 1:
            settings["worker_class"] = "sync"
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn 24+ opens a control socket at one fixed path per user by default: two
            # instances on one host would take it from each other, and nothing here uses it.
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        from cds_service import create_app

        app = create_app(deployment=self.deployment)
        log.info("worker %d ready: sites %s, models %s", os.getpid(),
                 ", ".join(sorted(self.deployment.sites)),
                 ", ".join(f"{m.id} {m.version}" for m in self.deployment.models) or "none")
        return app


class ValidatingArbiter(Arbiter):
    """SIGHUP (`kill -HUP`, how a site change or model swap is deployed) loads and validates
    the files first, and only then replaces the workers.

    gunicorn stops the old workers as soon as new ones are spawned, and if the new ones cannot
    boot the master exits: a typo in the site YAML or a missing model would take the whole
    service down. Refuse the reload instead; the running workers keep serving.
    """

    def reload(self) -> None:
        from cds_service.app import load_deployment

        try:
            deployment = load_deployment()
        except ConfigError as exc:
            self.log.error("configuration error: %s (reload refused; the current workers "
                           "keep serving)", exc)
            return
        self.app.deployment = deployment
        super().reload()


def run(args: argparse.Namespace, logconfig: dict) -> int:
    """Load and validate in the master, then serve until stopped. Exit 2 on a bad config."""
    metrics_dir, created = prepare_metrics_dir()
    master = os.getpid()
    from cds_service.app import load_deployment

    try:
        try:
            deployment = load_deployment()
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)  # noqa: T201
            return 2
        ValidatingArbiter(Server(args, deployment, logconfig)).run()
        return 0
    finally:
        # Workers are forked inside `run()` and leave through here too: only the master cleans.
        if created and os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
