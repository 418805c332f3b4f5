"""Shared fixtures: app and client from the factory, signed tokens, example payloads.

Every test client signs each request with a fresh RS384 JWT (Epic's shape: kid, typ, jti,
nbf = iat - 300, exp = iat + 900), from a key pair generated once per session; no private key
is ever committed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from flask.testing import FlaskClient

from cds_service import create_app
from tests.helpers.services import TEST_SERVICES

# Fixtures shared by several test modules; a test module never imports a fixture by hand.
pytest_plugins = [
    "tests.helpers.browser",
    "tests.helpers.fhir_server",
    "tests.helpers.jwks",
    "tests.helpers.servers",
    "tests.helpers.smart_server",
    "tests.helpers.storage",
]

ROOT = Path(__file__).resolve().parents[1]
# Published CDS Hooks and Epic example payloads, copied in (the folder's README names each source).
EXAMPLES = ROOT / "tests" / "fixtures" / "cds-hooks-examples"


def _forbid_reading_beside_the_checkout() -> None:
    """Fail any open() of a file beside the checkout (a sibling folder of data): a clone in an
    empty folder must pass. Hidden entries (~/.cache when cloned in $HOME), the interpreter's prefix
    and the temp dir stay readable."""
    parent = ROOT.parent
    if parent == parent.parent:
        return  # checked out at the filesystem root: nothing beside it is ours
    exempt = {ROOT.name}
    for allowed in (sys.prefix, sys.base_prefix, tempfile.gettempdir()):
        relative = os.path.relpath(allowed, parent)
        if not relative.startswith(os.pardir) and relative != os.curdir:
            exempt.add(relative.split(os.sep)[0])
    # A clone made directly in the temp dir (/tmp/x): its siblings are then the tests' own
    # temporary files, named by pytest (pytest-of-<user>), tempfile (tmp…) and our tools
    # (cds-…: the bench's work dirs, the metrics directory).
    in_tempdir = os.path.samefile(parent, tempfile.gettempdir())

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], str | os.PathLike):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        relative = os.path.relpath(path, parent)
        first = relative.split(os.sep)[0]
        if relative.startswith(os.pardir) or first in exempt or first.startswith("."):
            return
        if in_tempdir and first.startswith(("pytest-of-", "tmp", "cds-")):
            return
        raise PermissionError(f"a test opened {path}, outside the repository; copy what it "
                              "needs into tests/data/")

    sys.addaudithook(hook)


_forbid_reading_beside_the_checkout()


def pytest_configure(config):
    # The shifted-clock run (`make test-shifted`) must not pass by silently running unshifted.
    if os.environ.get("TEST_CLOCK_SHIFT") and "time_machine" not in sys.modules:
        raise pytest.UsageError("TEST_CLOCK_SHIFT is set but tests/clockshift is not on "
                                "PYTHONPATH: the clock was not moved")


def _loggers() -> dict[str, logging.Logger]:
    return {"": logging.root, **{name: logger for name, logger in
                                 logging.root.manager.loggerDict.items()
                                 if isinstance(logger, logging.Logger)}}


@pytest.fixture(autouse=True)
def _process_logging_restored():
    """A `cds-service` command run in-process configures the process's logging (`logs.configure`):
    a stderr handler on the stream pytest captured for that test, and every logger that existed
    disabled. Undo both after the test, or a thread still logging later (a FHIR fallback read
    past its call's deadline) writes to a closed stream, and later tests' loggers stay silent.
    pytest's own capture handlers come and go with each phase: they are left alone."""
    before = {name: (set(logger.handlers), logger.level, logger.disabled)
              for name, logger in _loggers().items()}
    yield
    for name, logger in _loggers().items():
        handlers, level, disabled = before.get(name, (set(), logger.level, logger.disabled))
        for handler in logger.handlers[:]:
            if (handler not in handlers and isinstance(handler, logging.StreamHandler)
                    and not type(handler).__module__.startswith("_pytest")):
                logger.removeHandler(handler)  # (a library's NullHandler from an import stays)
        if logger.level != level:  # setLevel clears every logger's cache: only when it moved
            logger.setLevel(level)
        logger.disabled = disabled


TEST_ISS = "https://ehr.test/api/FHIR/R4"
TEST_KID = "d3bmo5HzW61TUgikHZH+A8Tx4UOXz2iOs4KvVU4eLY0="  # Epic-style: standard base64
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def make_jwt(aud: str, *, key=_KEY, kid: str = TEST_KID, alg: str = "RS384",
             headers: dict | None = None, **claims) -> str:
    now = int(time.time())
    payload = {"iss": TEST_ISS, "sub": "test-client", "aud": aud, "iat": now, "nbf": now - 300,
               "exp": now + 900, "jti": str(uuid.uuid4()), **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid, "typ": "JWT",
                                                            **(headers or {})})


class SigningClient(FlaskClient):
    """A test client that signs every request the way Epic does, unless told otherwise.

    `app.config["TEST_SIGNER"] = (private_key, kid, iss)` signs as another issuer;
    `headers={"Authorization": None}` sends no Authorization header.
    """

    def open(self, *args, **kwargs):
        headers = dict(kwargs.pop("headers", None) or {})
        if "Authorization" in headers and headers["Authorization"] is None:
            del headers["Authorization"]  # send no Authorization header at all
        elif "Authorization" not in headers:
            path = args[0] if args and isinstance(args[0], str) else kwargs.get("path", "/")
            key, kid, iss = self.application.config.get("TEST_SIGNER", (_KEY, TEST_KID, TEST_ISS))
            token = make_jwt("http://localhost" + path, key=key, kid=kid, iss=iss)
            headers["Authorization"] = f"Bearer {token}"
        return super().open(*args, headers=headers, **kwargs)


DEMO_ISS = "https://demo-ehr.example.org/api/FHIR/R4"
DEMO_JWKS = ROOT / "var" / "dev-keys" / "demo-hospital.jwks.json"


def demo_signer():
    """Sign as the bundled demo site's issuer, with its generated development key."""
    from cds_service.trust.devkeys import ensure_dev_keypair, load_signing_key

    ensure_dev_keypair(DEMO_JWKS)
    key, kid = load_signing_key(DEMO_JWKS)
    return key, kid, DEMO_ISS


@pytest.fixture(scope="session")
def test_jwks_file(tmp_path_factory) -> Path:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_KEY.public_key()))
    public.update(kid=TEST_KID, alg="RS384", use="sig")
    path = tmp_path_factory.mktemp("trust") / "test.jwks.json"
    path.write_text(json.dumps({"keys": [public]}), encoding="utf-8")
    return path


@pytest.fixture
def site_file(tmp_path, test_jwks_file):
    """Write a site YAML that trusts the test issuer; `extra` is appended verbatim."""

    def _write(extra: str = "", name: str = "site.yaml", site: str = "test-site") -> str:
        path = tmp_path / name
        path.write_text(
            f"site: {site}\nissuers:\n  - iss: {TEST_ISS}\n    jwks_file: {test_jwks_file}\n"
            + extra,
            encoding="utf-8",
        )
        return str(path)

    return _write


def fhir_servers_yaml(urls) -> str:
    """The site's `fhir_servers` list, or nothing (the default: its fhir_server and issuers)."""
    return "fhir_servers:\n" + "".join(f"  - {url}\n" for url in urls) if urls else ""


@pytest.fixture
def make_app(tmp_path, site_file):
    apps = []

    def _make(**config):
        """`SITE_YAML="..."` appends site keys to the trusted test site; `FHIR_SERVERS=[url]`
        lists the FHIR bases its calls may read from (a local test server's, say)."""
        config.setdefault("DATABASE_URL", f"sqlite:///{tmp_path / 'cds.sqlite3'}")
        config.setdefault("REPLAY_CACHE_URL", f"sqlite:///{tmp_path / 'replay.sqlite3'}")
        config.setdefault("SPOOL_DIR", str(tmp_path / f"spool-{len(apps)}"))
        config.setdefault("SERVICES", TEST_SERVICES)
        # The test client's own URL: SigningClient signs `aud` = http://localhost/<path>.
        config.setdefault("PUBLIC_URL", "http://localhost")
        config.setdefault("ALLOW_DEV_KEYS", True)  # a test site may ask for the sandbox
        extra = config.pop("SITE_YAML", "") + fhir_servers_yaml(config.pop("FHIR_SERVERS", ()))
        if "SITE_CONFIG" not in config and "CDS_SITE_CONFIG" not in os.environ:
            config["SITE_CONFIG"] = site_file(extra, name=f"test-site-{len(apps)}.yaml")
        app = create_app(config)
        app.config["TESTING"] = True
        app.test_client_class = SigningClient
        apps.append(app)
        return app

    yield _make
    for app in apps:
        app.extensions["cds"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
