"""Prefetch: template lint and rendering, classification of what the EHR sent, fallback fetch.

CDS Hooks 2.0 §Prefetch Template: the EHR MAY satisfy any subset of a service's prefetch templates;
"it is the service's responsibility to check prefetch data against its templates and
programmatically retrieve anything missing", and to answer 412 when it cannot. For each key:

- a resource (read) or a Bundle (search): used as given (the Bundle's resources; a read given a
  Bundle holding that one resource is unwrapped). Source "prefetch".
- `null`: the EHR has no data (rule 48). None, not refetched. Source "null".
- absent, not an object (the 2.0 spec's own example sends `"user": "123"`), an OperationOutcome,
  or a Bundle with an error/fatal OperationOutcome entry (rule 49): fetched from fhirServer with
  the bearer token; a read answered 404 is None. Source "fetched".
- template unsatisfiable from the context (e.g. no encounterId): None, nothing sent.
  Source "unsatisfiable".
- a key in `optional` that cannot be obtained: None. Source "optional-missing".
- keys the service did not ask for are ignored (rule 46).

Search results are lists of resources: OperationOutcome entries and `search.mode: outcome`
entries are dropped and pages are merged. Epic's "no results" searchset (total 0, one
OperationOutcome entry, severity warning, code 4101) is therefore an empty list.

Pagination (2.0 lets the EHR page prefetch results, rule 53). Decision: a `next` link is followed,
for prefetched and fetched searchsets alike, when the request carries a token and fhirServer and
the link is under fhirServer, up to `PrefetchSettings.max_pages` pages in total and within the
deadline; a failure while following it fails like any fetch (412). Without a token, or when the
link points elsewhere or the page cap is reached, the pages on hand are used, a warning is logged
and the key is listed in `Prefetch.truncated` so a service that needs completeness can refuse.

Only the FHIR servers the site allows (`PrefetchSettings.fhir_servers`) are read: a request
naming any other is answered from its prefetch alone, and nothing is sent there (no DNS, no
connect). Where that leaves a required key missing the 412 reads the same whatever the host,
port or scheme: the answer and its timing must not tell the caller what listens where.

All fallback reads run on the caller's executor, at most `max_parallel_reads` at a time for one
call, under one `ReadBudget` (cds_service.data.read_budget): a deadline measured from the call's
start and byte caps per answer and per call. When the call stops waiting, reads still in flight
are cut off, so their threads are free for other calls at the deadline. Failures become
`FhirAccessError` (412) naming each key and the reason class; missing data without FHIR access
becomes `PrefetchUnavailable` (412). The access token is never logged nor put in a message.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests

from cds_service.data.fhir import (
    FhirInvalidResponse,
    FhirNotFound,
    FhirRequestError,
    FhirTimeout,
    InsecureFhirServer,
    allowed_by,
)
from cds_service.data.fhir_client import ReadOnlyFHIRClient
from cds_service.data.read_budget import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_TOTAL_BYTES,
    ReadBudget,
    bounded_session,
)
from cds_service.ops import metrics
from cds_service.protocol.errors import FhirAccessError, Issue, PrefetchUnavailable

logger = logging.getLogger("cds_service.data.prefetch")

USER_TOKENS: Mapping[str, str] = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}

# CDS Hooks 2.0 §Prefetch tokens (rules 40-41): `{{context.<root field>}}` or a user token.
TOKEN_RE = re.compile(r"\{\{(context\.[A-Za-z][A-Za-z0-9]*|" + "|".join(USER_TOKENS) + r")\}\}")
_ANY_TOKEN_RE = re.compile(r"\{\{(.*?)\}\}")
_RESOURCE_TYPE_RE = re.compile(r"[A-Z][A-Za-z]+")
_ID_RE = re.compile(r"[A-Za-z0-9\-.]+")
# context.userId is `[ResourceType]/[id]` (patient-view, order-select, order-sign).
_USER_REF_RE = re.compile(r"([A-Z][A-Za-z]+)/([^/?#\s]+)")
# Rule 43 (query subset): no _include/_revinclude/_has, no chaining, only the `:in` modifier.
_FORBIDDEN_PARAMS = ("_include", "_revinclude", "_has")


# The 412 for a fhirServer the site does not allow: one text whatever the URL (see module doc).
REFUSED_SERVER = "the FHIR server named in the request is not one this site allows"


@dataclass(frozen=True)
class PrefetchSettings:
    """How hard to try for data the EHR did not prefetch, and where.

    `fhir_servers`: the FHIR bases calls may read from (a request's fhirServer must equal one or
    lie below it); empty reads from nowhere. The site configuration fills it in.
    `allow_http_loopback` lets tests use a plain-http FHIR server on 127.0.0.0/8, ::1 or
    localhost; it must stay False in production (rule 20: fhirServer MUST be https).
    Each call uses and closes its own connections: a `ReadBudget` can cut them off without
    touching another call's.
    """

    deadline_s: float = 2.5
    max_pages: int = 10
    allow_http_loopback: bool = False
    max_redirects: int = 3
    max_rate_limit_retries: int = 2
    fhir_servers: tuple[str, ...] = ()
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_parallel_reads: int = 8

    def allows(self, fhir_server: Any) -> bool:
        """Whether `fhir_server` may be read from (and receive the token). Pure: no DNS."""
        return allowed_by(fhir_server, self.fhir_servers)


class Prefetch(Mapping[str, Any]):
    """key -> resource dict (read), list of resource dicts (search) or None.

    `sources[key]` is "prefetch", "null", "fetched", "unsatisfiable" or "optional-missing";
    `fetched` lists the relative URLs requested from fhirServer (for the audit log);
    `truncated` holds search keys whose results are known to be incomplete (see module doc).
    """

    def __init__(
        self,
        values: Mapping[str, Any],
        sources: Mapping[str, str],
        fetched: list[str] | None = None,
        truncated: set[str] | frozenset[str] = frozenset(),
    ):
        self._values = dict(values)
        self.sources: dict[str, str] = dict(sources)
        self.fetched: list[str] = list(fetched or [])
        self.truncated: frozenset[str] = frozenset(truncated)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:  # no resource contents: they are PHI
        return f"Prefetch(sources={self.sources!r})"


# -- templates -------------------------------------------------------------------------------


def is_search(template: str) -> bool:
    """Templates containing `?` are searches; the others are reads."""
    return "?" in template


def lint_template(template: str) -> list[str]:
    """Problems with a discovery prefetch template (rules 39-43); [] when it is fine.

    Used at configuration load, so messages name the offending token or parameter.
    """
    if not isinstance(template, str) or not template.strip():
        return ["template must be a non-empty string"]
    problems: list[str] = []
    for match in _ANY_TOKEN_RE.finditer(template):
        if TOKEN_RE.fullmatch(match.group(0)):
            continue
        inner = match.group(1)
        if re.fullmatch(r"context\.[A-Za-z][A-Za-z0-9]*(\.[^{}]*)+", inner):
            problems.append(f"token {match.group(0)} is not a root-level context field (rule 41)")
        else:
            problems.append(
                f"token {match.group(0)} is not {{{{context.<field>}}}} or a user token"
                f" ({', '.join(USER_TOKENS)}) (rule 40)"
            )
    skeleton = _ANY_TOKEN_RE.sub("T", template)
    if "{" in skeleton or "}" in skeleton:
        problems.append("unbalanced '{{' or '}}'")
    if any(c.isspace() for c in template):
        problems.append("template contains whitespace")
    path, sep, query = template.partition("?")
    if ":" in path or path.startswith("/"):
        problems.append("template must be a relative URL, not an absolute URL or path")
        return problems
    if "#" in template:
        problems.append("template must not contain a fragment")
    if sep:
        if not _RESOURCE_TYPE_RE.fullmatch(path):
            problems.append(f"search must be 'Type?params', got path {path!r} (rule 39)")
        problems.extend(_lint_query(query))
    elif path != "{{context.userId}}":
        parts = path.split("/")
        ok = (
            len(parts) == 2
            and _RESOURCE_TYPE_RE.fullmatch(parts[0]) is not None
            and (TOKEN_RE.fullmatch(parts[1]) is not None or _ID_RE.fullmatch(parts[1]) is not None)
        )
        if not ok:
            problems.append(
                f"template {template!r} is neither a read 'Type/id' nor a search 'Type?params'"
                " (rule 39)"
            )
    return problems


def _lint_query(query: str) -> list[str]:
    if not query:
        return ["search has no parameters"]
    problems = []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if not part or not name:
            problems.append("search has an empty parameter")
            continue
        if "{{" in name:
            problems.append(f"parameter name {name!r} contains a token")
            continue
        if not eq or not value:
            problems.append(f"parameter {name!r} has no value")
        base, _, modifier = name.partition(":")
        if base in _FORBIDDEN_PARAMS or base.startswith("_has"):
            problems.append(f"parameter {base!r} is outside the prefetch query subset (rule 43)")
        elif "." in name:
            problems.append(f"chained parameter {name!r} is outside the query subset (rule 43)")
        elif modifier and modifier != "in":
            problems.append(
                f"modifier ':{modifier}' on {base!r} is outside the query subset;"
                " only ':in' is allowed (rule 43)"
            )
    return problems


def render_template(template: str, context: Mapping) -> str | None:
    """The relative URL for `template` in this hook context, or None when any token cannot be
    satisfied (absent, empty, non-primitive context value; user token of another type).

    Substituted values are percent-encoded; `{{context.userId}}` expands to `Type/id` (rule 42).
    User tokens derive from context.userId only: `PractitionerRole/123` gives
    userPractitionerRoleId=123, and userPractitionerId stays unsatisfiable (it would take a read).
    """
    if not isinstance(template, str):
        return None
    if not isinstance(context, Mapping):
        context = {}
    user = _user_reference(context.get("userId"))
    unsatisfied = False

    def substitute(match: re.Match) -> str:
        nonlocal unsatisfied
        value = _token_value(match.group(1), context, user)
        if value is None:
            unsatisfied = True
            return ""
        return value

    rendered = _ANY_TOKEN_RE.sub(substitute, template)
    if unsatisfied or "{{" in rendered or "}}" in rendered:
        return None
    return rendered


def _user_reference(user_id: Any) -> tuple[str, str] | None:
    if not isinstance(user_id, str):
        return None
    match = _USER_REF_RE.fullmatch(user_id)
    if not match or match.group(2) in (".", ".."):
        return None
    return match.group(1), match.group(2)


def _token_value(name: str, context: Mapping, user: tuple[str, str] | None) -> str | None:
    if name == "context.userId":
        return None if user is None else f"{quote(user[0], safe='')}/{quote(user[1], safe='')}"
    if name in USER_TOKENS:
        if user is None or user[0] != USER_TOKENS[name]:
            return None
        return quote(user[1], safe="")
    match = re.fullmatch(r"context\.([A-Za-z][A-Za-z0-9]*)", name)
    if not match:
        return None
    value = _primitive(context.get(match.group(1)))
    return None if value is None else quote(value, safe="")


def _primitive(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str) and value.strip() and value not in (".", ".."):
        return value
    return None


def _read_type(template: str, rendered: str | None) -> str | None:
    """The resource type a read template reads, when known."""
    path = (rendered or template).split("?", 1)[0]
    first = path.split("/", 1)[0]
    return first if _RESOURCE_TYPE_RE.fullmatch(first) else None


# -- prefetch values -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Usable:
    value: Any  # dict | list[dict] | None
    next_url: str | None = None


@dataclass(frozen=True)
class _Unusable:
    why: str


def _is_error_outcome(resource: Mapping) -> bool:
    issues = resource.get("issue")
    if not isinstance(issues, list) or not issues:
        return True  # an OperationOutcome that says nothing is not evidence of success
    for issue in issues:
        severity = issue.get("severity") if isinstance(issue, Mapping) else None
        if severity not in ("warning", "information"):
            return True
    return False


def _parse_bundle(bundle: Mapping) -> tuple[list[dict], str | None, bool]:
    """(resources, next link, has an error OperationOutcome) from a Bundle, tolerating junk."""
    resources: list[dict] = []
    error = False
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, Mapping):
            continue
        resource = entry.get("resource")
        if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
            continue
        search = entry.get("search")
        mode = search.get("mode") if isinstance(search, Mapping) else None
        if resource["resourceType"] == "OperationOutcome":
            # Epic answers an empty search with a searchset (total 0) whose only entry is an
            # OperationOutcome, severity warning, code 4101 "Resource request returns no results.",
            # search.mode "outcome" (fhir.epic.com CDS Hooks tutorial, example request, prefetch
            # key "conditions"): information, not an error. Only error/fatal issues are failures.
            error = error or _is_error_outcome(resource)
            continue
        if mode == "outcome":
            continue
        resources.append(resource)  # type: ignore[arg-type]
    next_url = None
    links = bundle.get("link")
    for link in links if isinstance(links, list) else ():
        if (
            isinstance(link, Mapping)
            and link.get("relation") == "next"
            and isinstance(link.get("url"), str)
            and link["url"].strip()
        ):
            next_url = link["url"].strip()
            break
    return resources, next_url, error


def classify(value: Any, *, search: bool, read_type: str | None = None) -> _Usable | _Unusable:
    """Whether a (non-null) prefetch value or FHIR answer can stand for its template's result.

    Rules 45, 49, 50, 54: a search needs a Bundle; a read needs a resource of `read_type`, or a
    Bundle holding exactly one (unwrapped) or none (None). OperationOutcomes, error-bearing
    Bundles and anything that is not a FHIR resource are unusable.
    """
    if not isinstance(value, Mapping):
        return _Unusable(f"is a JSON {_json_type(value)}, not a FHIR resource")
    resource_type = value.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        return _Unusable("has no resourceType")
    if resource_type == "OperationOutcome":
        return _Unusable("is an OperationOutcome")
    if resource_type == "Bundle":
        resources, next_url, error = _parse_bundle(value)
        if error:
            return _Unusable("is a Bundle carrying an error OperationOutcome")
        if search:
            return _Usable(resources, next_url)
        if not resources:
            return _Usable(None)
        if len(resources) == 1 and read_type in (None, resources[0].get("resourceType")):
            return _Usable(resources[0])
        return _Unusable(f"is a Bundle that does not hold exactly one {read_type or 'resource'}")
    if search:
        return _Unusable(f"is a {resource_type}, not a search Bundle")
    if read_type is not None and resource_type != read_type:
        return _Unusable(f"is a {resource_type}, not a {read_type}")
    return _Usable(value)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


# -- resolution ------------------------------------------------------------------------------


@dataclass
class _Job:
    key: str
    url: str | None  # relative URL to fetch; None when continuing a prefetched searchset
    search: bool
    read_type: str | None
    why: str  # why the prefetch value could not be used
    resources: list[dict] | None = None  # pages on hand
    next_url: str | None = None


@dataclass
class _Outcome:
    value: Any = None
    urls: list[str] = field(default_factory=list)
    truncated: bool = False
    error: FhirRequestError | None = None


def resolve_prefetch(
    templates: Mapping[str, str],
    *,
    context: Mapping,
    prefetch: Mapping | None,
    fhir_server: str | None,
    access_token: str | None,
    settings: PrefetchSettings,
    executor: concurrent.futures.Executor,
    optional: frozenset[str] = frozenset(),
) -> Prefetch:
    """Every key of `templates` resolved from `prefetch` or, failing that, from `fhir_server`.

    See the module docstring for the per-key rules. Raises `PrefetchUnavailable` when required
    data is missing and there is no FHIR access, `FhirAccessError` when the FHIR server fails
    or is not one `settings.fhir_servers` allows. `executor` must run callables in threads of
    this process (the client holds a session); fetches still running when this returns have
    had their connections shut down and end at once.
    """
    deadline = time.monotonic() + max(0.0, settings.deadline_s)
    context = context if isinstance(context, Mapping) else {}
    given = prefetch if isinstance(prefetch, Mapping) else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    truncated: set[str] = set()
    jobs: list[_Job] = []

    for key, template in templates.items():
        if not isinstance(template, str):
            template = ""  # config is linted at load; tolerate anyway: unsatisfiable
        search = is_search(template)
        rendered = render_template(template, context) if template else None
        read_type = None if search else _read_type(template, rendered)
        if key in given:
            value = given[key]
            if value is None:
                values[key], sources[key] = None, "null"
                metrics.prefetch_key(key, "null")
                continue
            verdict = classify(value, search=search, read_type=read_type)
            if isinstance(verdict, _Usable):
                values[key], sources[key] = verdict.value, "prefetch"
                metrics.prefetch_key(key, "hit")
                if verdict.next_url:
                    jobs.append(
                        _Job(
                            key,
                            url=None,
                            search=True,
                            read_type=None,
                            why="has more pages",
                            resources=verdict.value,
                            next_url=verdict.next_url,
                        )
                    )
                continue
            why = f"was sent but {verdict.why}"
            logger.warning("prefetch key %r %s; fetching it instead", key, why)
        else:
            why = "was not prefetched"
        metrics.prefetch_key(key, "miss")
        if rendered is None:
            values[key], sources[key] = None, "unsatisfiable"
            logger.info("prefetch key %r: template unsatisfiable from the hook context", key)
            continue
        jobs.append(_Job(key, url=rendered, search=search, read_type=read_type, why=why))

    fetched: list[str] = []
    if jobs and _has_access(fhir_server, access_token) and not settings.allows(fhir_server):
        logger.warning("fhirServer is not one this site allows; answering from prefetch alone")
        _refuse(jobs, optional, values, sources, truncated)
    elif jobs:
        # Timed only when there is something to read: a 412 for want of a token reads nothing.
        reading = _has_access(fhir_server, access_token)
        with metrics.stage("fhir_fallback") if reading else contextlib.nullcontext():
            _run_jobs(
                jobs,
                fhir_server=fhir_server,
                access_token=access_token,
                settings=settings,
                executor=executor,
                optional=optional,
                deadline=deadline,
                values=values,
                sources=sources,
                truncated=truncated,
                fetched=fetched,
            )
    ordered = {key: values[key] for key in templates}
    return Prefetch(ordered, {key: sources[key] for key in templates}, fetched, truncated)


def _keep_partial(job: _Job, why: str, values: dict, truncated: set[str]) -> None:
    logger.warning(
        "prefetch key %r: searchset has a next page that is not followed (%s);"
        " using the %d resources given",
        job.key,
        why,
        len(job.resources or ()),
    )
    values[job.key] = job.resources
    truncated.add(job.key)


def _refuse(jobs: list[_Job], optional: frozenset[str], values: dict, sources: dict,
            truncated: set[str]) -> None:
    """No read for any job: the fhirServer is not allowed. Nothing here depends on the URL."""
    missing = []
    for job in jobs:
        if job.url is None:
            _keep_partial(job, REFUSED_SERVER, values, truncated)
        elif job.key in optional:
            values[job.key], sources[job.key] = None, "optional-missing"
        else:
            missing.append(job)
    if missing:
        raise FhirAccessError(
            f"{REFUSED_SERVER}; prefetch data was not fetched: "
            + ", ".join(repr(j.key) for j in missing),
            issues=[
                Issue(f"{REFUSED_SERVER}; prefetch key '{j.key}' {j.why} and was not fetched",
                      code="security", expression=(f"prefetch.{j.key}",))
                for j in missing
            ],
        )


def _has_access(fhir_server: Any, access_token: Any) -> bool:
    return bool(isinstance(fhir_server, str) and fhir_server
                and isinstance(access_token, str) and access_token)


def _run_jobs(
    jobs: list[_Job],
    *,
    fhir_server: str | None,
    access_token: str | None,
    settings: PrefetchSettings,
    executor: concurrent.futures.Executor,
    optional: frozenset[str],
    deadline: float,
    values: dict,
    sources: dict,
    truncated: set[str],
    fetched: list[str],
) -> None:
    if not _has_access(fhir_server, access_token):
        missing = []
        for job in jobs:
            if job.url is None:
                _keep_partial(job, "no FHIR access", values, truncated)
            elif job.key in optional:
                values[job.key], sources[job.key] = None, "optional-missing"
            else:
                missing.append(job)
        if missing:
            raise PrefetchUnavailable(
                "Prefetch data is missing and the request carries no fhirServer and"
                " fhirAuthorization to fetch it: " + ", ".join(repr(j.key) for j in missing),
                issues=[
                    Issue(
                        f"prefetch key '{j.key}' {j.why}, and the request carries no fhirServer"
                        " and fhirAuthorization access token to fetch it",
                        code="incomplete",
                        expression=(f"prefetch.{j.key}",),
                    )
                    for j in missing
                ],
            )
        return

    budget = ReadBudget(deadline, max_response_bytes=settings.max_response_bytes,
                        max_total_bytes=settings.max_total_bytes)
    parallel = max(1, settings.max_parallel_reads)
    session = bounded_session(min(len(jobs), parallel))
    try:
        client = ReadOnlyFHIRClient(
            fhir_server,  # type: ignore[arg-type]
            access_token=access_token,
            session=session,
            budget=budget,
            allow_http_loopback=settings.allow_http_loopback,
            max_redirects=settings.max_redirects,
            max_rate_limit_retries=settings.max_rate_limit_retries,
        )
    except InsecureFhirServer as exc:
        session.close()
        for job in jobs:
            if job.url is None:  # prefetched pages are usable; the token just cannot go there
                _keep_partial(job, exc.reason, values, truncated)
        outcomes = {job.key: _Outcome(error=exc) for job in jobs if job.url is not None}
        _apply(
            [job for job in jobs if job.url is not None],
            outcomes,
            optional,
            values,
            sources,
            truncated,
            fetched,
        )
        return

    # At most `parallel` reads at a time: one call cannot take every executor thread, so a slow
    # server holds back its own calls only. Each read runs in a copy of the caller's context, so
    # its log lines carry the request's correlation fields (cds_service.ops.logs).
    waiting = list(jobs)
    futures: dict[concurrent.futures.Future, _Job] = {}

    def submit_next() -> None:
        job = waiting.pop(0)
        futures[executor.submit(contextvars.copy_context().run, _run_job, client, job,
                                settings.max_pages)] = job

    while waiting and len(futures) < parallel:
        submit_next()
    outcomes: dict[str, _Outcome] = {}
    pending = set(futures)
    gave_up = False
    while pending and not gave_up:
        done, pending = concurrent.futures.wait(
            pending,
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=concurrent.futures.FIRST_COMPLETED,
        )
        if not done:
            break  # deadline
        for future in done:
            job = futures[future]
            outcomes[job.key] = future.result()
        # A required key failed: the request fails anyway, so stop waiting for the others.
        gave_up = any(o.error is not None and k not in optional for k, o in outcomes.items())
        while waiting and not gave_up and len(pending) < parallel:
            submit_next()
            pending.add(next(reversed(futures)))
    for future in pending:
        future.cancel()
    if pending:
        budget.expire()  # reads still in flight fail now and free their threads
    _close_when_done(session, list(futures))
    if gave_up:
        jobs = [job for job in jobs if job.key in outcomes]
    else:
        for job in [futures[f] for f in pending] + waiting:
            outcomes[job.key] = _Outcome(
                error=FhirTimeout("FHIR server did not answer within the deadline")
            )
    _apply(jobs, outcomes, optional, values, sources, truncated, fetched)


def _apply(
    jobs: list[_Job],
    outcomes: dict[str, _Outcome],
    optional: frozenset[str],
    values: dict,
    sources: dict,
    truncated: set[str],
    fetched: list[str],
) -> None:
    failures: list[tuple[_Job, FhirRequestError]] = []
    for job in jobs:
        outcome = outcomes[job.key]
        fetched.extend(outcome.urls)
        if outcome.error is None:
            values[job.key] = outcome.value
            if job.url is not None:
                sources[job.key] = "fetched"
            if outcome.truncated:
                truncated.add(job.key)
            continue
        logger.warning("prefetch key %r: %s", job.key, outcome.error.reason)
        if job.url is None and job.key in optional:
            _keep_partial(job, outcome.error.reason, values, truncated)
        elif job.key in optional:
            values[job.key], sources[job.key] = None, "optional-missing"
        else:
            failures.append((job, outcome.error))
    if not failures:
        return
    message = "; ".join(f"{error.reason} for prefetch key '{job.key}'" for job, error in failures)
    raise FhirAccessError(
        message,
        issues=[
            Issue(
                f"{error.reason} for prefetch key '{job.key}'",
                code=_issue_code(error),
                expression=(f"prefetch.{job.key}",),
            )
            for job, error in failures
        ],
    )


def _issue_code(error: FhirRequestError) -> str:
    code = getattr(error, "issue_code", "exception")
    return code if isinstance(code, str) else "exception"


def _run_job(client: ReadOnlyFHIRClient, job: _Job, max_pages: int) -> _Outcome:
    """Fetch one key (and its further pages). Runs on the executor; never raises for FHIR
    failures, which come back in `_Outcome.error`."""
    outcome = _Outcome()
    try:
        if job.url is not None:
            outcome.urls.append(job.url)
            body = client.get_json(job.url)
            verdict = classify(body, search=job.search, read_type=job.read_type)
            if isinstance(verdict, _Unusable):
                raise FhirInvalidResponse(f"FHIR server answer {verdict.why}")
            if not job.search:
                outcome.value = verdict.value
                return outcome
            resources, next_url = list(verdict.value), verdict.next_url
        else:
            resources, next_url = list(job.resources or ()), job.next_url
        pages, seen = 1, set()
        while next_url:
            try:
                absolute = client.absolute_url(next_url)
                on_server = client.is_on_server(absolute)
            except ValueError:
                absolute, on_server = next_url, False
            if pages >= max(1, max_pages):
                why = f"page cap of {max_pages} reached"
            elif not on_server:
                why = "next link is outside fhirServer"
            elif absolute in seen:
                why = "next link repeats"
            else:
                seen.add(absolute)
                outcome.urls.append(client.relative_url(absolute))
                verdict = classify(client.get_json(absolute), search=True)
                if isinstance(verdict, _Unusable):
                    raise FhirInvalidResponse(f"FHIR server answer {verdict.why}")
                resources.extend(verdict.value)
                next_url = verdict.next_url
                pages += 1
                continue
            logger.warning("prefetch key %r: %s; using %d resources", job.key, why, len(resources))
            outcome.truncated = True
            break
        outcome.value = resources
    except FhirNotFound as exc:
        if job.search or job.url is None:
            outcome.error = exc
        else:
            outcome.value = None  # a read of a resource that does not exist: known empty
    except FhirRequestError as exc:
        outcome.error = exc
    return outcome


def _close_when_done(session: requests.Session, futures: list[concurrent.futures.Future]) -> None:
    """Close a per-call session once every fetch has finished, even those still running after
    the deadline (`ReadBudget.expire` has cut their connections off)."""
    remaining = len(futures)
    lock = threading.Lock()

    def done(_: concurrent.futures.Future) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            session.close()

    for future in futures:
        future.add_done_callback(done)
