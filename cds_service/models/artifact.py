"""Model artifacts: skops files only, checked against the manifest's sha256 before loading.

Pickle (and joblib, which is pickle) executes code on load, so a model file from anywhere but our
own pipeline could run anything in every worker. skops stores an estimator as data and refuses, at
load, any type it has not been told to trust; we trust scikit-learn's defaults (skops' own list)
plus the few types named in `TRUSTED_TYPES`, and never the types a file declares about itself.
https://skops.readthedocs.io/en/stable/persistence.html
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import skops.io as sio

from cds_service.models.errors import ModelError

# Beyond skops' defaults: our estimators, and scikit-learn's tree predictor (plain arrays) so a
# gradient-boosting model can be shipped. Adding a type here is a security review.
TRUSTED_TYPES = frozenset({
    "cds_service.models.estimators.KidneyFailureRiskEquation",
    "cds_service.models.estimators.LogColumns",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
})

# Formats that run code when loaded. Refused by name and by content.
UNSAFE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".sav", ".dill", ".pt", ".pth"})
SKOPS_SUFFIX = ".skops"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_pickle(head: bytes) -> bool:
    # Pickle protocol 2+ starts with PROTO (0x80) and the protocol number; joblib's compressed
    # files start with a zlib/gzip/xz header around a pickle.
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:2] in (
        b"\x78\x9c", b"\x78\x01", b"\x78\xda", b"\x1f\x8b") or head[:6] == b"\xfd7zXZ\x00"


def check_safe_format(path: Path) -> None:
    """Refuse anything that is not a skops archive, naming why."""
    if path.suffix.lower() in UNSAFE_SUFFIXES:
        raise ModelError(f"{path.name}: {path.suffix} files are pickle-based and can run code "
                         f"when loaded; export the model with skops ({SKOPS_SUFFIX}) instead")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if _looks_like_pickle(head):
        raise ModelError(f"{path.name}: content is a pickle/joblib stream, which can run code "
                         "when loaded; export the model with skops instead")
    if path.suffix.lower() != SKOPS_SUFFIX or not zipfile.is_zipfile(path):
        raise ModelError(f"{path.name}: not a skops archive ({SKOPS_SUFFIX} zip with schema.json)")
    with zipfile.ZipFile(path) as archive:
        if "schema.json" not in archive.namelist():
            raise ModelError(f"{path.name}: not a skops archive (no schema.json)")


# The artifact holds the estimator and the ordered feature names it was fitted on, so a manifest
# whose features were reordered or renamed after export is refused instead of silently feeding
# the model the wrong columns.
ARTIFACT_FORMAT = "cds-model/1"


def save(estimator: Any, path: Path, feature_names: Sequence[str]) -> str:
    """Write `estimator` and its input names as a skops file and return its sha256."""
    if path.suffix != SKOPS_SUFFIX:
        raise ModelError(f"{path.name}: model artifacts are written as {SKOPS_SUFFIX} files")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = sio.dumps({"format": ARTIFACT_FORMAT, "features": list(feature_names),
                      "estimator": estimator})
    path.write_bytes(canonical(data))
    return sha256_file(path)


def canonical(data: bytes) -> bytes:
    """The same skops archive with the same bytes for the same estimator.

    skops names each array file and tags each node (`__id__`) with `id()` of the object, a
    memory address that differs from run to run, and stamps every zip entry with the current
    time. Renumbering the ids in the order schema.json first mentions them (same id, same number:
    shared objects stay shared) and fixing the timestamps at the zip epoch makes the artifact,
    and its sha256, a function of the model alone.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        schema = json.loads(archive.read("schema.json"))
        numbers: dict[str, int] = {}  # an array file is named by its node's id

        def number(value: Any) -> int:
            return numbers.setdefault(str(value), len(numbers))

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                out = {}
                for key, value in node.items():
                    if key == "__id__":
                        out[key] = number(value)
                    elif key == "file" and isinstance(value, str) and value.endswith(".npy"):
                        out[key] = f"{number(value[:-4])}.npy"
                    else:
                        out[key] = walk(value)
                return out
            if isinstance(node, list):
                return [walk(v) for v in node]
            return node

        schema = walk(schema)
        renamed = {f"{old}.npy": f"{new}.npy" for old, new in numbers.items()}
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            entries = sorted(archive.infolist(), key=lambda i: renamed.get(i.filename, i.filename))
            for info in entries:
                name = renamed.get(info.filename, info.filename)
                body = (json.dumps(schema, indent=2).encode() if name == "schema.json"
                        else archive.read(info.filename))
                entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type = info.compress_type
                entry.external_attr = info.external_attr
                target.writestr(entry, body)
    return out.getvalue()


def load(path: Path, expected_sha256: str) -> tuple[Any, tuple[str, ...]]:
    """(estimator, feature names) from a skops artifact, after checking its format, sha256 and
    the types it contains."""
    if not path.is_file():
        raise ModelError(f"{path}: artifact file not found")
    check_safe_format(path)
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise ModelError(f"{path.name}: sha256 {actual} does not match the manifest "
                         f"({expected_sha256}); the file changed after export")
    data = path.read_bytes()
    try:
        needed = set(sio.get_untrusted_types(data=data))
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a usable skops file"
        raise ModelError(f"{path.name}: unreadable skops archive: {exc}") from exc
    refused = sorted(needed - TRUSTED_TYPES)
    if refused:
        raise ModelError(f"{path.name}: contains types that are not trusted: {', '.join(refused)}"
                         " (see TRUSTED_TYPES in cds_service/models/artifact.py)")
    try:
        content = sio.loads(data, trusted=sorted(needed))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path.name}: skops could not load the artifact: {exc}") from exc
    if not isinstance(content, dict) or content.get("format") != ARTIFACT_FORMAT:
        raise ModelError(f"{path.name}: not a {ARTIFACT_FORMAT} artifact (export it with "
                         "`cds-service models train`)")
    return content["estimator"], tuple(content["features"])
