"""Development key pair for the bundled demo site: generated on first run, never committed.

The demo site trusts the public half (a JWK Set file, like a key exchanged out of band with a
hospital); `cds-service invoke` signs requests with the private half, the way Epic signs with
its own key (RS384, `kid` header; Epic CDS Hooks tutorial, "Trusting CDS Clients").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ALGORITHM = "RS384"


def private_key_path(jwks_file: Path) -> Path:
    return jwks_file.with_name(jwks_file.name.replace(".jwks.json", "") + ".private.pem")


def ensure_dev_keypair(jwks_file: Path) -> Path:
    """Create `<name>.jwks.json` and `<name>.private.pem` beside it unless they exist."""
    private_file = private_key_path(jwks_file)
    if jwks_file.exists() and private_file.exists():
        return private_file
    jwks_file.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public_jwk.update({"kid": jwt.utils.base64url_encode(os.urandom(12)).decode(),
                       "alg": ALGORITHM, "use": "sig"})
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    jwks_file.write_text(json.dumps({"keys": [public_jwk]}, indent=2), encoding="utf-8")
    return private_file


def load_signing_key(jwks_file: Path) -> tuple[object, str]:
    """(private key, kid) of the development pair whose public JWK Set is `jwks_file`."""
    private = serialization.load_pem_private_key(
        private_key_path(jwks_file).read_bytes(), password=None
    )
    kid = json.loads(jwks_file.read_text(encoding="utf-8"))["keys"][0]["kid"]
    return private, kid
