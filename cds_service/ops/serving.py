"""gunicorn, as `cds-service serve` runs it: settings, server hooks, and the validated reload.

Why each setting (gunicorn documentation, "Settings" and "Design"):

- `gthread` workers with `threads` per process: a call waiting on a slow FHIR fallback read
  holds one thread, not the process, so other calls on that worker are answered meanwhile.
  `ops.worker.SharingThreadWorker`: gthread, sharing new connections out between workers.
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
- `pidfile` (`--pidfile`, var/cds-service.pid): the master's pid, for `cds-service reload`.
  `pgrep -f 'cds-service serve'` finds make's shell under `make run`, or another instance.

`cds-service reload` signals the master (SIGHUP) and reads the outcome from a status file beside
the pidfile (`reload_status_path`), which the master rewrites at start and after each reload:
its pid, a generation counted up per SIGHUP, and whether the configuration was accepted.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger

from cds_service.protocol.errors import ConfigError

log = logging.getLogger("cds_service.ops.serving")


class AccessLogger(Logger):
    """gunicorn's logger, with the access line built only under `--access-log`.

    gunicorn counts the access log as on whenever a logging dictionary is set (ours always is)
    and then formats every call's atoms (time, headers, sizes) for a `gunicorn.access` logger
    held at WARNING to drop (`logs.logconfig`)."""

    def access(self, resp, req, environ, request_time) -> None:
        if self.cfg.accesslog:
            super().access(resp, req, environ, request_time)


SETTINGS: dict[str, Any] = {
    "worker_class": "cds_service.ops.worker.SharingThreadWorker",
    "logger_class": AccessLogger,
    "threads": 4,
    "timeout": 30,
    "graceful_timeout": 30,
    "keepalive": 75,
    "proc_name": "cds-service",
    # gunicorn by default lets a loopback peer set the URL scheme with X-Forwarded-Proto and
    # the like. Nothing here may depend on a header the caller chooses: the public URL is
    # configured (PUBLIC_URL), so the scheme is always the listening socket's own.
    "secure_scheme_headers": {},
    # gunicorn's default access line has the request line with its query string and the Referer:
    # /smart/callback?code=…&state=… would put an authorization code in the log. The path only.
    "access_log_format": '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)s',
}
if Path("/dev/shm").is_dir():  # noqa: S108 - gunicorn's heartbeat files, not our data
    SETTINGS["worker_tmp_dir"] = "/dev/shm"  # noqa: S108

# gc.set_threshold's first value in a worker (`Server.load`).
GC_YOUNG_THRESHOLD = 50_000


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


def _pre_fork(server: Arbiter, worker: Any) -> None:
    # Python's gc docs (gc.freeze): freeze right before fork(), so a worker's collections never
    # visit, and so never write to, the objects it shares with the master (the loaded models
    # among them): those pages stay shared instead of being copied into every worker.
    gc.freeze()


def _worker_exit(server: Arbiter, worker: Any) -> None:
    """In the worker, as it stops (SIGTERM, reload, recycling): write queued call records."""
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("cds") if app is not None else None
    if runtime is not None:
        runtime.close()


def _child_exit(server: Arbiter, worker: Any) -> None:
    from cds_service.ops import metrics

    metrics.worker_exited(worker.pid)


class Server(BaseApplication):
    """gunicorn over a `Deployment` loaded in the master; workers build their app from it."""

    def __init__(self, args: argparse.Namespace, deployment, logconfig: dict):
        self.args = args
        self.deployment = deployment
        self.logconfig = logconfig
        super().__init__()

    def load_config(self) -> None:
        binds = [f"{self.args.host}:{self.args.port}"]
        ops_port = self.deployment.config.get("OPS_PORT") if self.deployment else None
        if ops_port:  # (the bench's floor app runs this Server with no deployment)
            # Same address: a pod's scraper reaches it; listeners.py routes by the local port.
            binds.append(f"{self.args.host}:{ops_port}")
        settings = {
            **SETTINGS,
            "bind": binds,
            "workers": self.args.workers,
            "threads": self.args.threads,
            "max_requests": self.args.max_requests,
            "max_requests_jitter": self.args.max_requests // 10,
            "accesslog": "-" if self.args.access_log else None,
            "logconfig_dict": self.logconfig,
            "child_exit": _child_exit,
            "worker_exit": _worker_exit,
            "pre_fork": _pre_fork,
        }
        if self.args.pidfile:
            settings["pidfile"] = str(Path(self.args.pidfile).absolute())
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
        # Everything loaded so far lives as long as the worker. Out of the collector's sight,
        # a collection walks only what calls allocate: a 1 MB prefetch's ~100,000 objects made
        # CPython's full collections walk the whole app and its libraries too, and parsing it
        # took 42 ms of CPU instead of 23 (issue 20, measured in-process).
        gc.collect()
        gc.freeze()
        # A call allocates its objects in one burst that lives until the call ends: a 1.1 MB
        # prefetch is ~100,000 containers, which at CPython's default threshold (700) set off
        # ~40 young and ~4 middle collections per call, each walking objects still in use
        # (issue 20, side by side: server p50 18.3 -> 16.7 ms; 3 KB calls and RSS unchanged).
        # Garbage in cycles still goes, after 50,000 allocations instead of 700.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        log.info("worker %d ready: sites %s, models %s", os.getpid(),
                 ", ".join(sorted(self.deployment.sites)),
                 ", ".join(f"{m.id} {m.version}" for m in self.deployment.models) or "none")
        return app


class ValidatingArbiter(Arbiter):
    """SIGHUP (`cds-service reload`, how a site change or model swap is deployed) loads and
    validates the files first, and only then replaces the workers.

    gunicorn stops the old workers as soon as new ones are spawned, and if the new ones cannot
    boot the master exits: a typo in the site YAML or a missing model would take the whole
    service down. Refuse the reload instead; the running workers keep serving. Either way the
    outcome goes to the reload status file.
    """

    generation = 0

    def start(self) -> None:
        super().start()
        self._report("started")

    def reload(self) -> None:
        from cds_service.app import load_deployment

        self.generation += 1
        # The deployment being replaced was frozen at the last fork (`_pre_fork`): let the
        # collector reclaim it once the old workers are gone.
        gc.unfreeze()
        try:
            deployment = load_deployment()
        except ConfigError as exc:
            self.log.error("configuration error: %s (reload refused; the current workers "
                           "keep serving)", exc)
            self._report("refused", error=f"configuration error: {exc}")
            return
        self.app.deployment = deployment
        super().reload()  # returns once the old workers have stopped (or graceful_timeout)
        self._report("reloaded")

    def _report(self, outcome: str, error: str | None = None) -> None:
        if not self.cfg.pidfile:
            return
        deployment = self.app.deployment
        status = {"pid": self.pid, "generation": self.generation, "outcome": outcome,
                  "sites": sorted(deployment.sites),
                  "models": [f"{m.id} {m.version}" for m in deployment.models],
                  "workers": sorted(self.WORKERS)}
        if error is not None:
            status["error"] = error
        path = reload_status_path(self.cfg.pidfile)
        try:
            scratch = path.with_name(f".{path.name}.{self.pid}")
            scratch.write_text(json.dumps(status), encoding="utf-8")
            scratch.replace(path)  # atomic: a reader never sees half a file
        except OSError as exc:
            self.log.warning("reload status not written to %s: %s", path, exc.strerror)


def reload_status_path(pidfile: str | Path) -> Path:
    """The master's reload status, beside its pidfile: var/cds-service.reload.json."""
    return Path(pidfile).with_suffix(".reload.json")


class ReloadError(Exception):
    """The running service could not be asked to reload, or did not take the new files."""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process; signalling it will say so
    return True


def _read_status(pidfile: Path) -> dict | None:
    try:
        return json.loads(reload_status_path(pidfile).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def running_master(pidfile: str | Path) -> tuple[int, dict]:
    """The pid and reload status of the running master that wrote `pidfile`; ReloadError when
    there is none."""
    pidfile = Path(pidfile)
    try:
        text = pidfile.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReloadError(f"no pidfile {pidfile}: the service is not running here, or was "
                          "started with another --pidfile") from None
    except OSError as exc:
        raise ReloadError(f"cannot read {pidfile}: {exc.strerror}") from exc
    try:
        pid = int(text.strip())
    except ValueError:
        raise ReloadError(f"{pidfile} holds no process id") from None
    if not _running(pid):
        raise ReloadError(f"stale pidfile {pidfile}: no process {pid} (the service stopped "
                          "without removing it; remove the file)")
    # A pidfile left by a crash can name a pid the system has since given to another process,
    # which SIGHUP would terminate: only a master that wrote its status is signalled, and on
    # Linux only a process whose command line (or gunicorn's title) names cds-service.
    status = _read_status(pidfile)
    try:
        ours = b"cds-service" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        ours = True  # no /proc (macOS): the status file is the check
    if status is None or status.get("pid") != pid or not ours:
        raise ReloadError(f"process {pid} named by {pidfile} has written no reload status to "
                          f"{reload_status_path(pidfile)}: still starting, or not a cds-service "
                          "master (a stale pidfile)")
    return pid, status


def request_reload(pidfile: str | Path, *, timeout: float = 60.0) -> dict:
    """SIGHUP the master named by `pidfile` and wait for its verdict (the new reload status:
    `outcome` "reloaded", or "refused" with the `error`). ReloadError when the master cannot be
    signalled, stops meanwhile, or does not answer within `timeout` seconds."""
    pidfile = Path(pidfile)
    pid, before = running_master(pidfile)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise ReloadError(f"not allowed to signal process {pid}: run as the user the service "
                          "runs as") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _read_status(pidfile)
        if (status is not None and status.get("pid") == pid
                and status["generation"] > before["generation"]):
            return status
        if not _running(pid):
            raise ReloadError(f"the service (pid {pid}) stopped during the reload: see its log")
        time.sleep(0.1)
    raise ReloadError(f"no outcome from pid {pid} within {timeout:g} s: see its log")


def run(args: argparse.Namespace, logconfig: dict) -> int:
    """Load and validate in the master, then serve until stopped. Exit 2 on a bad config."""
    metrics_dir, created = prepare_metrics_dir()
    master = os.getpid()
    from cds_service.app import load_deployment
    from cds_service.ops import memory

    memory.tune_allocator()  # before the models load and the workers fork: they inherit it

    try:
        try:
            deployment = load_deployment()
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)  # noqa: T201
            hint = _site_config_hint()
            if hint:
                print(hint, file=sys.stderr)  # noqa: T201
            return 2
        if deployment.config.get("OPS_PORT") == args.port:
            print(f"serve: --ops-port {args.port} is the public --port; give another",  # noqa: T201
                  file=sys.stderr)
            return 2
        problem = _pidfile_problem(Path(args.pidfile))
        if problem:
            print(f"serve: --pidfile {args.pidfile}: {problem}", file=sys.stderr)  # noqa: T201
            return 2
        ValidatingArbiter(Server(args, deployment, logconfig)).run()
        return 0
    finally:
        # Workers are forked inside `run()` and leave through here too: only the master cleans.
        if os.getpid() == master:
            if created:
                shutil.rmtree(metrics_dir, ignore_errors=True)
            status = _read_status(Path(args.pidfile))
            if status is not None and status.get("pid") == master:
                reload_status_path(args.pidfile).unlink(missing_ok=True)


def _site_config_hint() -> str | None:
    """How to provide the site configuration when the configured path is absent: the Docker
    image names one (CDS_SITE_CONFIG=/etc/cds/site_config) and ships none."""
    path = os.environ.get("CDS_SITE_CONFIG")
    if not path or Path(path).exists():
        return None
    return (f"No site configuration at {path}. Mount your site files there, e.g.\n"
            f"  docker run -v \"$PWD/site_config:{path}:ro\" -e CDS_PUBLIC_URL=https://cds.example.org"
            " ... cds-service:0.1.0\n"
            "or point CDS_SITE_CONFIG (serve --site-config) at a file or directory of site YAML "
            "files (site_config/README.md).")


def _pidfile_problem(pidfile: Path) -> str | None:
    """Why gunicorn could not write `pidfile` (it would fail with a traceback), or None."""
    try:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {pidfile.parent}: {exc.strerror}"
    try:
        holder = int(pidfile.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    # A container's master is PID 1 at every start: a pidfile naming itself is its own, stale.
    if holder != os.getpid() and _running(holder):
        return (f"process {holder} holds it (another cds-service serve?); stop that one or "
                "give another --pidfile")
    return None
