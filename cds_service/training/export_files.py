"""The exported NDJSON files: downloading one (with the token only when the manifest
`requiresAccessToken`) into gzip, whole or not at all, and reading one back."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests

from cds_service.training.errors import ServerError
from cds_service.training.export_http import FhirSession, outcome_text


def download(url: str, path: Path, http: FhirSession, *, with_token: bool) -> int:
    """Stream one NDJSON file into `path` (gzip) and count its resources. Written beside it
    first and renamed when whole, so an interruption never leaves a file that looks finished.
    Files that do not `requiresAccessToken` (pre-signed URLs) get no token: it would leak."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    for attempt in range(1, http.waits.retries + 2):
        response = http.request("GET", url, what=f"download {path.name}", stream=True,
                                with_token=with_token,
                                headers={"Accept": "application/fhir+ndjson"})
        if response.status_code != 200:
            detail = outcome_text(response)  # reads the (small) error body before closing
            response.close()
            raise ServerError(f"download: {url} answered {response.status_code}{detail}; "
                              "rerun to resume")
        try:
            count = _write_ndjson(response.iter_content(chunk_size=1 << 16), partial)
        except requests.RequestException as exc:  # the connection broke mid-file
            if attempt > http.waits.retries:
                raise ServerError(f"download: {url} broke off ({type(exc).__name__}); rerun "
                                  "to resume") from exc
            http.report(f"  {path.name}: broke off; downloading it again")
            http.sleep(http.waits.default)
            continue
        finally:
            response.close()
        os.replace(partial, path)
        return count
    raise AssertionError("unreachable")  # pragma: no cover


def _write_ndjson(chunks: Iterable[bytes], path: Path) -> int:
    lines = 0
    last = b"\n"
    with gzip.open(path, "wb") as out:
        for chunk in chunks:
            if not chunk:
                continue
            out.write(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
        if last != b"\n":  # a last line without its newline is still a resource
            out.write(b"\n")
            lines += 1
    return lines


def read_ndjson(path: Path) -> Iterator[dict[str, Any]]:
    """Resources of one `.ndjson` or `.ndjson.gz` file, streamed; blank lines skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
