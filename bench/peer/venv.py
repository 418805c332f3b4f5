"""The peer's virtualenv: HealthChain and its serving stack, built once into a cache directory.

`ensure(cache)` returns the interpreter of `<cache>/healthchain-0.16.1/`, creating the
virtualenv with `python -m venv` and `pip install`-ing `REQUIREMENTS` the first time. A stamp
file written after a successful install (the requirements and the installed versions) marks it
ready: a later run with the same requirements reuses it; an interrupted or failed install leaves
no stamp and is started over. Anything that stops the build (no network, an unwritable cache, a
failing pip) raises `Unavailable` with the reason, which the bench reports as "not run".

The cache is `$CDS_BENCH_CACHE`, else `~/.cache/cds-bench` (`--peer-cache` overrides both).
Building takes about 20 s with PyPI reachable and about 400 MB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

NAME = "healthchain-0.16.1"
# Versions installed and measured together (2026-12): healthchain 0.16.1 pulls fastapi and
# pydantic 2; uvicorn[standard] brings httptools; uvloop is named for the event loop.
REQUIREMENTS = ("healthchain==0.16.1", "scikit-learn==1.9.1", "uvicorn[standard]==0.55.0",
                "uvloop==0.23.0", "httptools==0.9.0")
REPORTED = ("healthchain", "fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools",
            "scikit-learn", "numpy")
STAMP = "bench-peer-ready.json"
INSTALL_TIMEOUT_S = 900.0
ENV_CACHE = "CDS_BENCH_CACHE"


class Unavailable(Exception):
    """The peer's virtualenv cannot be built or used; the message says why."""


def default_cache() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "cds-bench")


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def ready(cache: Path) -> dict | None:
    """The stamp of a usable virtualenv under `cache`, or None."""
    venv = cache / NAME
    try:
        stamp = json.loads((venv / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stamp.get("requirements") != list(REQUIREMENTS) or not python_of(venv).exists():
        return None
    return stamp


def ensure(cache: Path, say=print, python: str = sys.executable) -> tuple[Path, dict]:
    """The virtualenv's interpreter and its stamp (installed versions); builds it if needed."""
    stamp = ready(cache)
    venv = cache / NAME
    if stamp is not None:
        return python_of(venv), stamp
    say(f"peer: building {venv} (pip install {' '.join(REQUIREMENTS)})")
    log = cache / f"{NAME}.install.log"
    try:
        if venv.exists():
            shutil.rmtree(venv)  # no stamp: a partial or outdated install
        cache.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            for command in ([python, "-m", "venv", str(venv)],
                            [str(python_of(venv)), "-m", "pip", "install",
                             "--disable-pip-version-check", *REQUIREMENTS]):
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603
                                      stdin=subprocess.DEVNULL, timeout=INSTALL_TIMEOUT_S,
                                      check=False)
                if done.returncode != 0:
                    raise Unavailable(f"`{' '.join(command[-3:])}` exited with "
                                      f"{done.returncode}: {_last_line(log)} (log: {log})")
        stamp = {"requirements": list(REQUIREMENTS), "versions": _versions(python_of(venv))}
        (venv / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"cannot build {venv}: {type(exc).__name__}: {exc}") from exc
    return python_of(venv), stamp


def resolve(wanted: bool, cache: Path, say=print) -> tuple[dict, Path | None]:
    """The peer's description for the report and its interpreter; None (and the reason in the
    description) when it is not wanted or cannot be built. `not_run`: filled by the bench."""
    from bench.peer.process import SERVER

    info = {"requirements": list(REQUIREMENTS), "server": SERVER, "venv": str(cache / NAME),
            "versions": None, "reason": None, "not_run": []}
    if not wanted:
        info["reason"] = "not asked for (--no-peer, or --quick without --peer)"
        return info, None
    try:
        python, stamp = ensure(cache, say)
    except Unavailable as exc:
        say(f"peer: not run: {exc}")
        info["reason"] = str(exc)
        return info, None
    info["versions"] = stamp["versions"]
    return info, python


def _versions(python: Path) -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
            f"{list(REPORTED)!r}}}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True,  # noqa: S603
                          timeout=60, check=False)
    if done.returncode != 0:
        raise Unavailable(f"the installed virtualenv does not answer: {done.stderr[-300:]}")
    return json.loads(done.stdout)


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    return lines[-1][:300] if lines else "(no output)"
