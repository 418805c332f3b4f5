"""The `cds-service` command line and `make run`, as operators use them (no server needed)."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import ROOT


def make_run(*variables: str, env: dict | None = None) -> str:
    """The command `make run` would run, with its line continuations joined."""
    result = subprocess.run(["make", "-n", "-C", str(ROOT), "run", *variables],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    [serve] = [line for line in result.stdout.replace("\\\n", " ").splitlines()
               if "cds-service serve" in line]
    return " ".join(serve.split())


def test_make_run_defaults_and_variables_reach_the_serve_command():
    assert "serve --host 127.0.0.1 --port 8000 --workers 2" in make_run()
    assert "serve --host 0.0.0.0 --port 8001 --workers 3" in make_run(
        "PORT=8001", "HOST=0.0.0.0", "WORKERS=3")
    # A HOST or PORT the shell exports (zsh, PaaS) does not move the service.
    assert "serve --host 127.0.0.1 --port 8000 --workers 2" in make_run(
        env={"HOST": "build-box", "PORT": "80"})
