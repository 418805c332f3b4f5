"""Prefetch resolution: each key from the EHR's prefetch or a fallback read, or a 412.

`resolve_prefetch` applies the per-key rules of `cds_service.data.prefetch`.

Only the FHIR servers the site allows (`PrefetchSettings.fhir_servers`) are read: a request
naming any other is answered from its prefetch alone, and nothing is sent there (no DNS, no
connect). Where that leaves a required key missing the 412 reads the same whatever the host,
port or scheme: the answer and its timing must not tell the caller what listens where.

Failures become `FhirAccessError` (412) naming each key and the reason class; missing data
without FHIR access becomes `PrefetchUnavailable` (412). The access token is never logged nor put
in a message.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from cds_service.data.fhir import FhirRequestError, InsecureFhirServer
from cds_service.data.prefetch import (
    Prefetch,
    PrefetchSettings,
    is_search,
    read_type_of,
    render_template,
)
from cds_service.data.prefetch_fallback import FetchJob, FetchOutcome, read_jobs
from cds_service.data.prefetch_values import Usable, classify
from cds_service.ops import metrics
from cds_service.protocol.errors import FhirAccessError, Issue, PrefetchUnavailable

# The name log filters match: records keep it though the code now lives here.
logger = logging.getLogger("cds_service.data.prefetch")

# The 412 for a fhirServer the site does not allow: one text whatever the URL (see module doc).
REFUSED_SERVER = "the FHIR server named in the request is not one this site allows"


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

    See `cds_service.data.prefetch` for the per-key rules. Raises `PrefetchUnavailable` when
    required data is missing and there is no FHIR access, `FhirAccessError` when the FHIR server
    fails or is not one `settings.fhir_servers` allows. `executor` must run callables in threads of
    this process (the client holds a session); fetches still running when this returns have
    had their connections shut down and end at once.
    """
    deadline = time.monotonic() + max(0.0, settings.deadline_s)
    context = context if isinstance(context, Mapping) else {}
    given = prefetch if isinstance(prefetch, Mapping) else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    truncated: set[str] = set()
    jobs: list[FetchJob] = []

    for key, template in templates.items():
        if not isinstance(template, str):
            template = ""  # config is linted at load; tolerate anyway: unsatisfiable
        search = is_search(template)
        # A read's URL names the type to check what was sent against; a search's URL is needed
        # only to fetch it, so one that was sent is rendered only if it has to be fetched.
        sent_search = search and key in given
        rendered = render_template(template, context) if template and not sent_search else None
        read_type = None if search else read_type_of(template, rendered)
        if key in given:
            value = given[key]
            if value is None:
                values[key], sources[key] = None, "null"
                metrics.prefetch_key(key, "null")
                continue
            verdict = classify(value, search=search, read_type=read_type)
            if isinstance(verdict, Usable):
                values[key], sources[key] = verdict.value, "prefetch"
                metrics.prefetch_key(key, "hit")
                if verdict.next_url:
                    jobs.append(
                        FetchJob(
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
        if sent_search and template:
            rendered = render_template(template, context)
        if rendered is None:
            values[key], sources[key] = None, "unsatisfiable"
            logger.info("prefetch key %r: template unsatisfiable from the hook context", key)
            continue
        jobs.append(FetchJob(key, url=rendered, search=search, read_type=read_type, why=why))

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


def _keep_partial(job: FetchJob, why: str, values: dict, truncated: set[str]) -> None:
    logger.warning(
        "prefetch key %r: searchset has a next page that is not followed (%s);"
        " using the %d resources given",
        job.key,
        why,
        len(job.resources or ()),
    )
    values[job.key] = job.resources
    truncated.add(job.key)


def _refuse(jobs: list[FetchJob], optional: frozenset[str], values: dict, sources: dict,
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
    jobs: list[FetchJob],
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

    try:
        jobs, outcomes = read_jobs(
            jobs,
            fhir_server=fhir_server,  # type: ignore[arg-type]
            access_token=access_token,
            settings=settings,
            executor=executor,
            optional=optional,
            deadline=deadline,
        )
    except InsecureFhirServer as exc:
        for job in jobs:
            if job.url is None:  # prefetched pages are usable; the token just cannot go there
                _keep_partial(job, exc.reason, values, truncated)
        jobs = [job for job in jobs if job.url is not None]
        outcomes = {job.key: FetchOutcome(error=exc) for job in jobs}
    _apply(jobs, outcomes, optional, values, sources, truncated, fetched)


def _apply(
    jobs: list[FetchJob],
    outcomes: dict[str, FetchOutcome],
    optional: frozenset[str],
    values: dict,
    sources: dict,
    truncated: set[str],
    fetched: list[str],
) -> None:
    failures: list[tuple[FetchJob, FhirRequestError]] = []
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
