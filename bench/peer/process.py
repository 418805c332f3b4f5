"""How the bench starts the peer and finds its worker processes (uvicorn, not gunicorn)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

HEALTH_PATH = "/health"  # HealthChainAPI's own route
SERVER = "uvicorn, uvloop event loop, httptools parser, no access log, log level warning"


def command(python: Path, host: str, port: int, workers: int) -> list[str]:
    return [str(python), "-m", "bench.peer.healthchain_app", "--host", host, "--port", str(port),
            "--workers", str(workers)]


def worker_pids(master: int, workers: int, children: Callable[[int], list[int]]) -> list[int]:
    """uvicorn with one worker serves in its own process; with more, its supervisor has one
    child per worker started by multiprocessing spawn, beside spawn's resource tracker."""
    if workers == 1:
        return [master]
    return [pid for pid in children(master) if b"spawn_main" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def markdown_line(peer: dict) -> str:
    """What the peer is, as the bench's markdown header says it."""
    versions = peer["versions"] or {}
    text = ("Peer: HealthChain " + (versions.get("healthchain") or "0.16.1") + " (`bench/peer/`), "
            "patient-view `kidney-risk` making one scikit-learn LogisticRegression prediction "
            "per call (eGFR and age from the prefetch) and answering one card, no "
            f"authentication; {peer['server']}; its own virtualenv ({peer['venv']}: "
            + ", ".join(peer["requirements"]) + ").")
    if versions:
        text += " Installed: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."
    if peer["reason"]:
        text += f" **Not run**: {peer['reason']}."
    return text
