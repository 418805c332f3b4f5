"""A site file for the SMART app's tests: trusts a `SmartServer`'s `iss` (tests/helpers/
smart_server.py) and enables the app on a loopback redirect URI."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


def write_smart_site(directory: Path, iss: str, redirect_uri: str, *, smart_extra: str = "",
                     name: str = "smart-site.yaml", site: str = "smart-site") -> Path:
    """The site YAML; its CDS Hooks issuer key is a throwaway (these tests launch the app, they
    do not call hooks)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="smart-test", alg="RS384", use="sig")
    jwks = directory / f"{site}.jwks.json"
    jwks.write_text(json.dumps({"keys": [public]}), encoding="utf-8")
    path = directory / name
    path.write_text(
        f"site: {site}\n"
        f"issuers:\n  - iss: {iss}\n    jwks_file: {jwks}\n"
        "prefetch:\n  allow_http_loopback: true\n"
        "smart_app:\n"
        "  client_id: cds-kidney-app\n"
        f"  redirect_uri: {redirect_uri}\n" + smart_extra,
        encoding="utf-8")
    return path
