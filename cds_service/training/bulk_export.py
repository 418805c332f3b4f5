"""`cds-service data export`: a Group-level Bulk Data `$export` from the site's FHIR server into
a directory of gzipped NDJSON, with SMART Backend Services tokens.
Bulk Data Access IG 2.0: https://hl7.org/fhir/uv/bulkdata/export.html

What the output directory holds (part 2, the cohort builder, reads it):

    <Type>.<nnn>.ndjson.gz        one per manifest `output` entry, in manifest order
    Medication.referenced.ndjson.gz   Medications the exported MedicationRequests (and
                                  dispenses, administrations, statements) reference but the
                                  export did not contain (a Group export has no Medications:
                                  they are not in the Patient compartment)
    error/OperationOutcome.<nnn>.ndjson.gz, deleted/Bundle.<nnn>.ndjson.gz   as the server sent
    log.ndjson                    the export's events, in the Bulk Data client log format
                                  (github.com/smart-on-fhir/bulk-data-client, "Bulk Data Export
                                  Log Items"): kick-off, manifest, each file, totals
    export-state.json             what a rerun resumes from: the request, the status URL, the
                                  files finished; at the end, counts per type

An interrupted run (Ctrl-C, a network failure, a server error) is resumed by running the same
command again: it polls the saved status URL instead of kicking off a new export, and downloads
only the files not yet finished.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from cds_service.config import Site
from cds_service.data.fhir import InsecureFhirServer, check_fhir_server_url, parse_retry_after
from cds_service.training.errors import ExportError, OutDirInUse, ServerError, UnsafeUrl
from cds_service.training.smart_auth import (
    BackendServicesToken,
    default_scope,
    discover_token_endpoint,
    load_signing_key,
)

# What the CKD models and their cohort read: eGFR/creatinine/ACR (Observation), diagnoses,
# dialysis and transplant (Condition, Procedure), medicines, contacts, death (Patient).
DEFAULT_TYPES = ("Patient", "Condition", "Observation", "MedicationRequest", "Procedure",
                 "Encounter")
# Resources whose `medicationReference` points at a Medication we then read one by one.
MEDICATION_REFERRERS = ("MedicationRequest", "MedicationDispense", "MedicationAdministration",
                        "MedicationStatement")
STATE_FILE = "export-state.json"
LOG_FILE = "log.ndjson"
REFERENCED_MEDICATIONS = "Medication.referenced.ndjson.gz"
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_TIMEOUT = (10.0, 300.0)  # connect, read: a large file may pause between chunks


@dataclass(frozen=True)
class Waits:
    """How long to wait when the server says "later" (a 202 while the export runs, or 429 and
    5xx), and for how many such answers in a row before giving up. Tests pass `minimum=0`."""

    default: float = 10.0  # no Retry-After
    minimum: float = 1.0  # never poll faster, whatever Retry-After says
    maximum: float = 3600.0  # a Retry-After beyond this is taken as this
    retries: int = 8

    def after(self, response: requests.Response) -> float:
        asked = parse_retry_after(response.headers.get("Retry-After"))
        return min(max(self.default if asked is None else asked, self.minimum), self.maximum)


@dataclass(frozen=True)
class ExportRequest:
    """What to export; a rerun with the same request resumes, another one is refused."""

    fhir_url: str
    group: str
    types: tuple[str, ...] = DEFAULT_TYPES
    since: str | None = None

    def kickoff_url(self) -> str:
        query = {"_type": ",".join(self.types)}  # comma-joined: not every server reads repeats
        if self.since:
            query["_since"] = self.since
        # urlencode would escape `$`; the operation name goes in the path as it is.
        return f"{self.fhir_url.rstrip('/')}/Group/{self.group}/$export?{urlencode(query)}"


@dataclass
class ExportSummary:
    out_dir: str
    server: str
    group: str
    kickoff_url: str
    status_url: str | None = None
    kicked_off_at: str | None = None
    transaction_time: str | None = None
    completed_at: str | None = None
    # local name → {url, kind, type, count}. Keyed by name, not URL: names follow the manifest's
    # order, while a server may sign its file URLs afresh on every status answer.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    medications: dict[str, int] | None = None  # referenced, fetched, missing
    tokens: int = 0

    def counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for entry in self.files.values():
            if entry["kind"] == "output":
                totals[entry["type"]] = totals.get(entry["type"], 0) + entry["count"]
        if self.medications and self.medications["fetched"]:
            totals["Medication"] = totals.get("Medication", 0) + self.medications["fetched"]
        return totals


def parse_since(text: str) -> str:
    """`--since` as a FHIR instant: a date is midnight UTC; a date-time needs its offset."""
    try:
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ExportError(f"--since: {text!r} is not a date (2024-01-31) or date-time") from exc
    if moment.tzinfo is None:
        raise ExportError(f"--since: {text!r} needs a UTC offset (Z or +01:00)")
    return moment.isoformat()


def parse_types(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_TYPES
    types = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in types if not _TYPE.match(t)]
    if bad or not types:
        raise ExportError(f"--type: {', '.join(bad) or text!r} is not a FHIR resource type")
    return types


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class FhirSession:
    """The HTTP side of one export: the token only to the FHIR server's origin, over https (or
    loopback http when the site allows it); 401 → a new token, once; 429 and 5xx → wait as
    `Retry-After` says, up to `waits.retries` times in a row."""

    def __init__(self, fhir_url: str, session: requests.Session, *, waits: Waits,
                 allow_http_loopback: bool, report: Callable[[str], None],
                 sleep: Callable[[float], None]):
        self.fhir_url = fhir_url.rstrip("/")
        self.session = session
        self.waits = waits
        self.allow_http_loopback = allow_http_loopback
        self.report = report
        self.sleep = sleep
        self.token: BackendServicesToken | None = None
        parts = urlsplit(self.fhir_url)
        self._origin = (parts.scheme.lower(), parts.hostname, parts.port)

    def check(self, url: str, *, what: str, same_origin: bool = True) -> None:
        try:
            check_fhir_server_url(url.split("?", 1)[0],
                                  allow_http_loopback=self.allow_http_loopback)
        except InsecureFhirServer as exc:
            raise UnsafeUrl(f"{what} {url!r} is not https; nothing is sent there") from exc
        parts = urlsplit(url)
        if same_origin and (parts.scheme.lower(), parts.hostname, parts.port) != self._origin:
            raise UnsafeUrl(f"{what} {url!r} is not on the FHIR server {self.fhir_url}; the "
                            "access token is not sent there")

    def wait_retry(self, response: requests.Response, what: str, attempt: int) -> None:
        if attempt > self.waits.retries:
            raise ServerError(f"{what}: {response.status_code}{_outcome_text(response)}, "
                              f"{attempt} times in a row; rerun later to resume")
        delay = self.waits.after(response)
        self.report(f"  {what}: server answered {response.status_code}; retrying in "
                    f"{delay:g} s")
        self.sleep(delay)

    def request(self, method: str, url: str, *, what: str, with_token: bool = True,
                headers: dict[str, str] | None = None, stream: bool = False
                ) -> requests.Response:
        """The response to `method url` once it is neither a 401 nor transient; other statuses
        are the caller's to judge."""
        self.check(url, what=what, same_origin=with_token)
        refreshed = False
        attempt = 0
        while True:
            auth = self.token.auth() if with_token and self.token else None
            try:
                response = self.session.request(method, url, headers=headers, auth=auth,
                                                stream=stream, timeout=_TIMEOUT)
            except requests.RequestException as exc:
                attempt += 1
                if attempt > self.waits.retries:
                    raise ServerError(f"{what}: {url} unreachable ({type(exc).__name__}); "
                                      "rerun to resume") from exc
                self.report(f"  {what}: {type(exc).__name__}; retrying")
                self.sleep(self.waits.default)
                continue
            if response.status_code == 401 and auth and not refreshed and self.token:
                # The token lapsed between our check and the server's (clock skew, a token
                # revoked early): one new token, one more try.
                response.close()
                self.token.invalidate()
                refreshed = True
                continue
            if response.status_code in TRANSIENT_STATUSES:
                attempt += 1
                try:
                    self.wait_retry(response, what, attempt)
                finally:
                    response.close()
                continue
            return response


def _outcome_text(response: requests.Response) -> str:
    """The first OperationOutcome issue's diagnostics or details text, if the body is one."""
    try:
        body = response.json()
        issue = body["issue"][0]
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return f" ({text})" if isinstance(text, str) and text else ""


class ExportLog:
    """Appends Bulk Data client log items (one JSON object per line) to `log.ndjson`."""

    def __init__(self, path: Path, export_id: str | None):
        self.path = path
        self.export_id = export_id

    def event(self, event_id: str, detail: dict[str, Any]) -> None:
        row = {"exportId": self.export_id, "timestamp": _now(), "eventId": event_id,
               "eventDetail": detail}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


class ExportState:
    """`export-state.json`: written whole (to a temporary file, then renamed) after every step,
    so an interruption leaves the last finished step on disk."""

    def __init__(self, out_dir: Path, summary: ExportSummary):
        self.path = out_dir / STATE_FILE
        self.summary = summary

    @classmethod
    def open(cls, out_dir: Path, request: ExportRequest) -> ExportState:
        path = out_dir / STATE_FILE
        fresh = ExportSummary(out_dir=str(out_dir), server=request.fhir_url,
                              group=request.group, kickoff_url=request.kickoff_url())
        if not path.exists():
            others = [p.name for p in out_dir.iterdir()] if out_dir.exists() else []
            if others:
                raise OutDirInUse(f"{out_dir} is not empty and holds no {STATE_FILE}: choose a "
                                  "new directory for this export")
            out_dir.mkdir(parents=True, exist_ok=True)
            return cls(out_dir, fresh)
        try:
            saved = ExportSummary(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise OutDirInUse(f"{path} is unreadable; move it away to start over") from exc
        if saved.kickoff_url != fresh.kickoff_url:
            raise OutDirInUse(f"{out_dir} holds an export of {saved.kickoff_url}, not "
                              f"{fresh.kickoff_url}: choose a new directory for this one")
        saved.out_dir = str(out_dir)
        return cls(out_dir, saved)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.summary), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def export_site(site: Site, out_dir: Path, *, group: str | None = None,
                since: str | None = None, types: str | None = None,
                **options: Any) -> ExportSummary:
    """`cds-service data export SITE`: the site's `bulk_export` settings, with `group`,
    `since` and `types` (comma-separated) given on the command line taking precedence."""
    settings = site.bulk_export
    if settings is None:
        raise ExportError(f"site {site.id}: no `bulk_export` section in {site.source}")
    # Default FHIR base as `cds-service site check` finds it: the site's `fhir_server`, else an
    # issuer's https `iss` (Epic's `iss` is its FHIR R4 base).
    fhir_url = settings.fhir_url or site.fhir_server or next(
        (i.iss for i in site.issuers if i.iss.lower().startswith("https://")), None)
    if not fhir_url:
        raise ExportError(f"site {site.id}: set bulk_export.fhir_url (or fhir_server) in "
                          f"{site.source}")
    group = group or settings.group
    if not group:
        raise ExportError(f"site {site.id}: give --group or set bulk_export.group in "
                          f"{site.source}")
    request = ExportRequest(fhir_url=fhir_url, group=group, types=parse_types(types),
                            since=parse_since(since) if since else None)
    return export(request, out_dir, client_id=settings.client_id,
                  private_key_file=settings.private_key_file, kid=settings.kid,
                  algorithm=settings.algorithm, scope=settings.scope,
                  allow_http_loopback=settings.allow_http_loopback, **options)


def export(request: ExportRequest, out_dir: Path, *, client_id: str, private_key_file: Path,
           kid: str, algorithm: str = "RS384", scope: str | None = None,
           allow_http_loopback: bool = False, waits: Waits = Waits(),
           report: Callable[[str], None] = _stderr, sleep: Callable[[float], None] = time.sleep,
           session: requests.Session | None = None) -> ExportSummary:
    """Run (or resume) one export into `out_dir`; see the module docstring. Raises ExportError
    with what was finished saved for a rerun."""
    state = ExportState.open(out_dir, request)
    summary = state.summary
    if summary.completed_at:
        report(f"{out_dir}: export already complete ({summary.completed_at})")
        return summary
    state.save()  # from now on the directory is this export's, even if the kick-off fails
    http = FhirSession(request.fhir_url, session or requests.Session(), waits=waits,
                       allow_http_loopback=allow_http_loopback, report=report, sleep=sleep)
    http.check(request.fhir_url, what="FHIR server")
    smart = discover_token_endpoint(http.session, http.fhir_url)
    http.check(smart["token_endpoint"], what="token endpoint", same_origin=False)
    hydrate = any(t in MEDICATION_REFERRERS for t in request.types)
    scope_types = request.types + (("Medication",) if hydrate else ())
    http.token = BackendServicesToken(
        http.session, token_url=smart["token_endpoint"], client_id=client_id,
        key=load_signing_key(private_key_file, kid=kid, algorithm=algorithm), kid=kid,
        algorithm=algorithm, scope=scope or default_scope(scope_types, smart),
        on_retry=lambda response, attempt: http.wait_retry(response, "token", attempt))
    log = ExportLog(out_dir / LOG_FILE, summary.status_url)
    try:
        _run(request, out_dir, state, http, log, hydrate)
    finally:
        summary.tokens += http.token.issued
        state.save()
    return summary


def _run(request: ExportRequest, out_dir: Path, state: ExportState, http: FhirSession,
         log: ExportLog, hydrate: bool) -> None:
    summary = state.summary
    if summary.status_url:
        http.report(f"Resuming the export of Group {request.group} ({summary.status_url})")
    else:
        summary.status_url = _kick_off(request, http, log)
        summary.kicked_off_at = _now()
        log.export_id = summary.status_url
        state.save()
    manifest = _wait_for_manifest(summary.status_url, http)
    summary.transaction_time = manifest.get("transactionTime")
    if not summary.files:  # first sight of the manifest (not a resumed download)
        log.event("status_complete", {"transactionTime": summary.transaction_time})
    requires_token = bool(manifest.get("requiresAccessToken"))
    entries = list(_manifest_files(manifest))
    todo = [e for e in entries if e[3] not in summary.files]
    http.report(f"Export ready: {len(entries)} files ({len(entries) - len(todo)} already "
                "downloaded)")
    for url, kind, resource_type, name in todo:
        count = _download(url, out_dir / name, http, with_token=requires_token)
        summary.files[name] = {"url": url, "kind": kind, "type": resource_type, "count": count}
        log.event("download_complete", {"fileUrl": url, "resourceCount": count,
                                        "fileSize": (out_dir / name).stat().st_size})
        http.report(f"  {name}: {count} resources")
        state.save()
    if hydrate and summary.medications is None:
        summary.medications = _fetch_medications(out_dir, summary, http)
        log.event("_medications_referenced", dict(summary.medications))
        state.save()
    _delete_export(summary.status_url, http)
    summary.completed_at = _now()
    counts = summary.counts()
    log.event("export_complete", {
        "files": len(summary.files), "resources": sum(counts.values()),
        "_server": request.fhir_url, "_group": request.group, "_resourcesByType": counts})
    state.save()
    errors = sum(e["count"] for e in summary.files.values() if e["kind"] == "error")
    http.report(f"Done: {sum(counts.values())} resources "
                f"({', '.join(f'{t} {n}' for t, n in counts.items()) or 'none'}) in {out_dir}"
                + (f"; the server reported {errors} issues in error/" if errors else ""))


def _kick_off(request: ExportRequest, http: FhirSession, log: ExportLog) -> str:
    url = request.kickoff_url()
    http.report(f"Kick-off: {url}")
    response = http.request("GET", url, what="kick-off", headers={
        "Accept": "application/fhir+json", "Prefer": "respond-async"})
    location = response.headers.get("Content-Location")
    log.event("kickoff", {"exportUrl": url, "errorCode": None if response.status_code == 202
                          else response.status_code,
                          "requestParameters": {"_type": ",".join(request.types),
                                                "_since": request.since}})
    if response.status_code != 202 or not location:
        raise ServerError(f"kick-off: {url} answered {response.status_code}"
                          f"{_outcome_text(response)}"
                          + ("" if response.status_code != 202 else " without Content-Location"))
    return urljoin(url, location)


def _wait_for_manifest(status_url: str, http: FhirSession) -> dict[str, Any]:
    started = time.monotonic()
    while True:
        response = http.request("GET", status_url, what="status",
                                headers={"Accept": "application/json"})
        if response.status_code == 200:
            try:
                manifest = response.json()
            except ValueError as exc:
                raise ServerError(f"status: {status_url} sent a manifest that is not JSON"
                                  ) from exc
            if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                raise ServerError(f"status: {status_url} sent a manifest without `output`")
            return manifest
        if response.status_code != 202:
            gone = response.status_code in (404, 410)
            raise ServerError(
                f"status: {status_url} answered {response.status_code}"
                f"{_outcome_text(response)}"
                + (f"; the server no longer has this export: move {STATE_FILE} away (or use a "
                   "new directory) to start a new one" if gone else ""))
        delay = http.waits.after(response)
        progress = response.headers.get("X-Progress")
        http.report(f"  export in progress{f' ({progress})' if progress else ''}; "
                    f"{time.monotonic() - started:.0f} s so far, next check in {delay:g} s")
        http.sleep(delay)


def _manifest_files(manifest: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(url, kind, type, local name) for each `output`, `error` and `deleted` entry."""
    for kind, folder in (("output", ""), ("error", "error/"), ("deleted", "deleted/")):
        seen: dict[str, int] = {}
        for entry in manifest.get(kind) or ():
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            resource_type = entry.get("type") if isinstance(entry.get("type"), str) else "Unknown"
            if not _TYPE.match(resource_type):
                resource_type = "Unknown"
            n = seen.get(resource_type, 0)
            seen[resource_type] = n + 1
            yield entry["url"], kind, resource_type, f"{folder}{resource_type}.{n:03d}.ndjson.gz"


def _download(url: str, path: Path, http: FhirSession, *, with_token: bool) -> int:
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
            detail = _outcome_text(response)  # reads the (small) error body before closing
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


def medication_id(reference: Any, fhir_url: str) -> str | None:
    """`Medication/<id>` (relative, or absolute on this server, any `_history` dropped) → id;
    contained (`#…`), other servers' and non-Medication references → None."""
    if not isinstance(reference, str):
        return None
    base = fhir_url.rstrip("/") + "/"
    if reference.startswith(base):
        reference = reference[len(base):]
    parts = reference.split("/")
    if len(parts) in (2, 4) and parts[0] == "Medication" and parts[1]:
        return parts[1]
    return None


def _fetch_medications(out_dir: Path, summary: ExportSummary, http: FhirSession
                       ) -> dict[str, int]:
    """Read the Medications that exported medication resources reference and the export did
    not contain, one GET each, into `Medication.referenced.ndjson.gz`."""
    exported: set[str] = set()
    wanted: dict[str, None] = {}  # ordered, for a stable output file
    for name, entry in summary.files.items():
        if entry["kind"] != "output":
            continue
        if entry["type"] == "Medication":
            exported.update(r.get("id") for r in read_ndjson(out_dir / name))
        elif entry["type"] in MEDICATION_REFERRERS:
            for resource in read_ndjson(out_dir / name):
                ref = (resource.get("medicationReference") or {}).get("reference")
                med = medication_id(ref, http.fhir_url)
                if med:
                    wanted[med] = None
    todo = [m for m in wanted if m not in exported]
    http.report(f"Medications referenced but not exported: {len(todo)}")
    fetched = missing = 0
    partial = out_dir / (REFERENCED_MEDICATIONS + ".part")
    with gzip.open(partial, "wt", encoding="utf-8") as out:
        for n, med in enumerate(todo, 1):
            url = f"{http.fhir_url}/Medication/{med}"
            response = http.request("GET", url, what="Medication read",
                                    headers={"Accept": "application/fhir+json"})
            if response.status_code in (404, 410):
                missing += 1
                continue
            if response.status_code != 200:
                raise ServerError(f"Medication read: {url} answered {response.status_code}"
                                  f"{_outcome_text(response)}; rerun to resume")
            try:
                resource = response.json()
            except ValueError as exc:
                raise ServerError(f"Medication read: {url} sent no JSON") from exc
            out.write(json.dumps(resource, separators=(",", ":")) + "\n")
            fetched += 1
            if n % 100 == 0:
                http.report(f"  Medications: {n}/{len(todo)}")
    os.replace(partial, out_dir / REFERENCED_MEDICATIONS)
    if missing:
        http.report(f"  {missing} referenced Medications were not found (404/410)")
    return {"referenced": len(todo), "fetched": fetched, "missing": missing}


def _delete_export(status_url: str | None, http: FhirSession) -> None:
    """Tell the server it may drop the files (Bulk Data IG: "Delete a Bulk Data Request").
    Epic runs one export per client and Group at a time, so a job left behind blocks the next
    one. A failure here loses nothing: it is reported and the export still completes."""
    if not status_url:
        return
    try:
        response = http.request("DELETE", status_url, what="delete export")
    except ExportError as exc:
        http.report(f"  could not release the export on the server: {exc}")
        return
    if response.status_code not in (200, 202, 204, 404, 410):
        http.report(f"  could not release the export on the server: {response.status_code}")
