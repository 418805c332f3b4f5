"""The `cds-service` command line and `make run`, as operators use them (no server needed)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess

import pytest

from cds_service.cli import build_parser, main
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
    # The demo's tokens name the URL it listens on: the public URL is configuration, not Host.
    assert "CDS_PUBLIC_URL=http://127.0.0.1:8000 " in make_run()
    assert "CDS_ALLOW_DEV_KEYS=true " in make_run()  # the demo's key and sandbox, explicitly
    assert "CDS_PUBLIC_URL=http://0.0.0.0:8001 " in make_run("PORT=8001", "HOST=0.0.0.0")
    assert "serve --host 0.0.0.0 --port 8001 --workers 3" in make_run(
        "PORT=8001", "HOST=0.0.0.0", "WORKERS=3")
    # A HOST or PORT the shell exports (zsh, PaaS) does not move the service.
    assert "serve --host 127.0.0.1 --port 8000 --workers 2" in make_run(
        env={"HOST": "build-box", "PORT": "80"})


def all_parsers(parser: argparse.ArgumentParser, name: str = "cds-service"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {command}")


def test_every_option_of_every_command_says_what_it_does():
    undocumented = [f"{name} {action.option_strings or action.dest}"
                    for name, parser in all_parsers(build_parser())
                    for action in parser._actions
                    if not isinstance(action, argparse._SubParsersAction)
                    and action.help in (None, "", argparse.SUPPRESS)]
    assert undocumented == []


def test_serve_help_describes_each_option(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    options = text.split("options:\n", 1)[1].split("\n\n")[0]
    # "  --option METAVAR  help…": the help on the same line, or on the next, deeper ones.
    described = {}
    for entry in re.split(r"\n(?=  -)", options):
        first, *more = entry.strip().splitlines()
        invocation, _, help_text = first.partition("  ")
        described[invocation.split()[0].rstrip(",")] = " ".join([help_text, *more]).strip()
    assert set(described) >= {"--host", "--port", "--workers", "--threads", "--max-requests",
                              "--access-log", "--log-format", "--site-config"}
    assert [option for option, help_text in described.items() if not help_text] == []


def test_top_level_help_speaks_to_operators(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "keep options and names stable" not in text
    assert "CDS_SITE_CONFIG" in text and "docs/operations.md" in text


def test_invoke_names_the_site_option_when_the_site_is_not_configured(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.delenv("CDS_DEFAULT_SITE", raising=False)
    monkeypatch.setenv("CDS_SITE_CONFIG", "")  # restored after main() sets it
    bundle = str(ROOT / "examples" / "bundles" / "ckd-patient-nsaid.json")
    code = main(["invoke", "kidney-risk", "--bundle", bundle, "--site", "nowhere",
                 "--site-config", str(ROOT / "site_config")])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("invoke: --site: no site 'nowhere' in ")
    assert "(configured: demo-hospital)" in error and "DEFAULT_SITE" not in error

    # Two sites and no --site: which one signs is the caller's choice, said in the same terms.
    for name in ("north", "south"):
        (tmp_path / f"{name}.yaml").write_text(f"site: {name}\n", encoding="utf-8")
    assert main(["invoke", "kidney-risk", "--bundle", bundle, "--site-config",
                 str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("invoke: --site: 2 sites are configured (north, south)")
