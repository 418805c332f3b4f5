"""docs/epic-integration.md, section 1, followed to the letter from a fresh copy of the repository.

The guide marks the blocks a newcomer runs: `# newcomer-step` (shell, run in order),
`# newcomer-file: PATH` (YAML saved to PATH) and `# newcomer-server` (the server, started in the
background; its port and the matching `--url` are swapped for a free one). Editing the guide
changes what this test runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import yaml

from cds_service import create_app
from cds_service.config import load_sites
from cds_service.service import index_services
from cds_service.tools.invoke import build_request, load_bundle, signing_token
from hooks import SERVICES
from tests.conftest import ROOT
from tests.helpers.servers import free_port, request

GUIDE = ROOT / "docs" / "epic-integration.md"
DOC_PORT = "8001"
BLOCK = re.compile(r"^```(sh|yaml)\n(.*?)^```", re.DOTALL | re.MULTILINE)
CARD = "[warning] Kidney failure risk 8% at 2 years, 24% at 5 years (eGFR 27, urine ACR 380 mg/g)"


def newcomer_blocks() -> list[tuple[str, str, str]]:
    """(kind, argument, text) of each marked block, in document order."""
    blocks = []
    for _, text in BLOCK.findall(GUIDE.read_text(encoding="utf-8")):
        first = text.splitlines()[0]
        if first == "# newcomer-step":
            blocks.append(("step", "", text))
        elif first == "# newcomer-server":
            blocks.append(("server", "", text))
        elif first.startswith("# newcomer-file: "):
            blocks.append(("file", first.removeprefix("# newcomer-file: ").strip(), text))
    return blocks


def fresh_clone(tmp_path: Path) -> Path:
    """What a clone holds that the steps read, plus the `.venv/` that `make run` creates."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(ROOT / "examples", clone / "examples")
    (clone / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return clone


def run_step(text: str, clone: Path, env: dict) -> str:
    done = subprocess.run(["bash", "-e", "-c", text], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, f"step failed:\n{text}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def start_server(text: str, clone: Path, env: dict, port: int, log) -> subprocess.Popen:
    command = text.replace(f"--port {DOC_PORT}", f"--port {port}").replace(
        f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{port}")
    process = subprocess.Popen(["bash", "-e", "-c", command], cwd=clone, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, (clone / "serve.log").read_text()
        try:
            if request(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                return process
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"server did not start: {(clone / 'serve.log').read_text()}")


def test_a_newcomer_configures_a_new_site_and_gets_its_card(tmp_path):
    blocks = newcomer_blocks()
    kinds = [kind for kind, _, _ in blocks]
    assert kinds.count("server") == 1 and kinds.count("file") == 1 and "step" in kinds
    port = free_port()
    clone = fresh_clone(tmp_path)
    # The newcomer's shell: no deployment settings from this test run leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    outputs = []
    server = None
    log = (clone / "serve.log").open("w")
    try:
        for kind, argument, text in blocks:
            if kind == "file":
                # The guide's mkdir step made the directory; the file is saved as shown.
                (clone / argument).write_text(text, encoding="utf-8")
            elif kind == "server":
                server = start_server(text, clone, env, port, log)
            else:
                assert server is not None or "invoke" not in text, "invoke before the server"
                text = text.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{port}")
                outputs.append(run_step(text, clone, env))
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        log.close()

    checked, *_ = [out for out in outputs if "site riverside" in out]
    assert "        egfr: Observation?patient={{context.patientId}}&code=" in checked
    assert "1558024" in checked
    jwks = clone / "var" / "dev-keys" / "riverside.jwks.json"
    private = jwks.with_name("riverside.private.pem")
    assert jwks.is_file() and private.stat().st_mode & 0o077 == 0
    # The card, computed from the eGFR coded only with the site's local component code and the
    # urine ACR converted from mg/mmol.
    cards, as_json = outputs[-2], outputs[-1]
    assert cards.startswith(CARD + "\n"), cards
    assert "suggestion: Refer to nephrology (create ServiceRequest)" in cards
    assert '"code": "204417"' in as_json and "REFERRAL TO NEPHROLOGY (RIVERSIDE)" in as_json
    # What the guide shows as the output is what came out, dated as in the example file (invoke
    # moves a synthetic example's dates to today: its `timestamp` is 2026-11-21).
    moved_by = (datetime.now(UTC).date() - date(2026, 11, 21)).days
    as_written = re.sub(r"\d{4}-\d{2}-\d{2}", lambda m: (
        date.fromisoformat(m[0]) - timedelta(days=moved_by)).isoformat(), cards.strip())
    assert as_written in GUIDE.read_text(encoding="utf-8")


def test_without_the_guides_code_mapping_the_local_egfr_is_not_read(tmp_path):
    """The card above depends on `code_mappings`: the same call without it has no eGFR 27."""
    [(path, text)] = [(arg, text) for kind, arg, text in newcomer_blocks() if kind == "file"]
    site = yaml.safe_load(text)
    assert site.pop("code_mappings")
    site["issuers"][0]["jwks_file"] = str(tmp_path / "riverside.jwks.json")
    site_file = tmp_path / Path(path).name
    site_file.write_text(yaml.safe_dump(site), encoding="utf-8")
    app = create_app({"SITE_CONFIG": str(site_file), "PUBLIC_URL": "http://localhost",
                      "ALLOW_DEV_KEYS": True,
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}",
                      "REPLAY_CACHE_URL": f"sqlite:///{tmp_path / 'replay.sqlite3'}"})
    [riverside] = load_sites(site_file, index_services(SERVICES)).values()
    body = build_request(riverside, "kidney-risk",
                         load_bundle(str(ROOT / "examples/bundles/local-codes-patient.json")))
    url = "http://localhost/cds-services/kidney-risk"
    response = app.test_client().post(
        url, json=body, headers={"Authorization": f"Bearer {signing_token(riverside, url)}"})
    assert response.status_code == 200, response.get_json()
    assert "eGFR 27" not in str(response.get_json()["cards"])
