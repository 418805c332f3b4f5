"""The Docker image's defaults are a deployment's, not the demo's: no site configuration baked
in (the container exits 2 saying how to mount one), no development key and no sandbox unless the
operator turns them on (CDS_ALLOW_DEV_KEYS). The image is not built here: its ENV is read from
the Dockerfile and `cds-service serve` is run with it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from cds_service.protocol.errors import ConfigError
from tests.conftest import ROOT
from tests.helpers.servers import CLI, free_port

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
# A second issuer for the test site (conftest `site_file`), signing with a development key.
DEV_ISSUER = ("  - iss: https://dev-ehr.example.org\n    jwks_file: dev.jwks.json\n"
              "    dev_keypair: true\n")


def image_env() -> dict[str, str]:
    """The final stage's ENV, as `docker run` would set it."""
    final = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", final, re.MULTILINE):
        for pair in shlex.split(block.replace("\\\n", " ")):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def serve_in_image(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    host = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    # The image's own paths under /app do not exist here; the database goes to tmp_path.
    settings = {**image_env(), "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}",
                "CDS_MODELS_DIR": str(ROOT / "models"), **env}
    return subprocess.run([CLI, "serve", "--port", str(free_port()), *args],
                          env={**host, **settings}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


def test_the_image_bakes_in_no_site_and_no_development_keys():
    env = image_env()
    assert env["CDS_ALLOW_DEV_KEYS"] == "false"
    assert env["CDS_SITE_CONFIG"] == "/etc/cds/site_config"
    assert not re.search(r"^COPY\b.*site_config", DOCKERFILE, re.MULTILINE)
    assert "var/dev-keys" not in DOCKERFILE


def test_without_a_mounted_site_configuration_the_container_exits_2_saying_how_to_mount(tmp_path):
    assert not os.path.exists("/etc/cds/site_config")
    done = serve_in_image(tmp_path)
    assert done.returncode == 2, done.stderr
    assert "/etc/cds/site_config" in done.stderr
    assert '-v "$PWD/site_config:/etc/cds/site_config:ro"' in done.stderr


def test_the_demo_site_mounted_into_the_image_is_refused_for_its_development_key(tmp_path):
    done = serve_in_image(tmp_path, "--site-config", str(ROOT / "site_config"),
                          CDS_PUBLIC_URL="http://127.0.0.1:8000")
    assert done.returncode == 2, done.stderr
    assert "dev_keypair: development keys are off" in done.stderr
    assert "CDS_ALLOW_DEV_KEYS=true" in done.stderr


def test_a_development_key_is_refused_and_never_generated_unless_turned_on(make_app, tmp_path):
    with pytest.raises(ConfigError, match=r"issuers\[1\]\.dev_keypair: development keys are off"):
        make_app(ALLOW_DEV_KEYS=False, SITE_YAML=DEV_ISSUER)
    assert not list(tmp_path.glob("dev.*"))
    app = make_app(ALLOW_DEV_KEYS=True, SITE_YAML=DEV_ISSUER + "sandbox: true\n")
    assert (tmp_path / "dev.private.pem").exists()
    assert app.test_client().get("/sandbox/").status_code == 200


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None])
def test_allow_dev_keys_takes_true_or_false_only(make_app, value):
    # CDS_ALLOW_DEV_KEYS is read as JSON: `true`/`false` are booleans; `no` would be a truthy
    # string, and is refused rather than guessed.
    with pytest.raises(ConfigError, match="CDS_ALLOW_DEV_KEYS"):
        make_app(ALLOW_DEV_KEYS=value)
