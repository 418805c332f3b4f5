"""Fallback reads: fetching from fhirServer the prefetch keys the EHR did not send.

All fallback reads (`read_jobs`) run on the caller's executor, at most `max_parallel_reads` at a
time for one call, under one `ReadBudget` (cds_service.data.read_budget): a deadline measured
from the call's start and byte caps per answer and per call. When the call stops waiting, reads
still in flight are cut off, so their threads are free for other calls at the deadline. Each
read's failure comes back in its `FetchOutcome`; `cds_service.data.prefetch_resolve` turns them
into the 412.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from cds_service.data.fhir import (
    FhirInvalidResponse,
    FhirNotFound,
    FhirRequestError,
    FhirTimeout,
    InsecureFhirServer,
)
from cds_service.data.fhir_client import ReadOnlyFHIRClient
from cds_service.data.prefetch import PrefetchSettings
from cds_service.data.prefetch_values import Unusable, classify
from cds_service.data.read_budget import ReadBudget, bounded_session

# The name log filters match: records keep it though the code now lives here.
logger = logging.getLogger("cds_service.data.prefetch")


@dataclass
class FetchJob:
    """One prefetch key to read from fhirServer, or a prefetched searchset to page on."""

    key: str
    url: str | None  # relative URL to fetch; None when continuing a prefetched searchset
    search: bool
    read_type: str | None
    why: str  # why the prefetch value could not be used
    resources: list[dict] | None = None  # pages on hand
    next_url: str | None = None


@dataclass
class FetchOutcome:
    """What reading one `FetchJob` gave: its value, or the error that stopped it."""

    value: Any = None
    urls: list[str] = field(default_factory=list)
    truncated: bool = False
    error: FhirRequestError | None = None


def read_jobs(
    jobs: list[FetchJob],
    *,
    fhir_server: str,
    access_token: str | None,
    settings: PrefetchSettings,
    executor: concurrent.futures.Executor,
    optional: frozenset[str],
    deadline: float,
) -> tuple[list[FetchJob], dict[str, FetchOutcome]]:
    """Run `jobs` on `executor` within `deadline`; the jobs that count and each one's outcome.

    A job still running at the deadline (or never started) has timed out; once a required key
    has failed, the jobs without an outcome are dropped. Raises `InsecureFhirServer` before
    anything is sent when fhirServer may not receive the token.
    """
    budget = ReadBudget(deadline, max_response_bytes=settings.max_response_bytes,
                        max_total_bytes=settings.max_total_bytes)
    parallel = max(1, settings.max_parallel_reads)
    session = bounded_session(min(len(jobs), parallel))
    try:
        client = ReadOnlyFHIRClient(
            fhir_server,
            access_token=access_token,
            session=session,
            budget=budget,
            allow_http_loopback=settings.allow_http_loopback,
            max_redirects=settings.max_redirects,
            max_rate_limit_retries=settings.max_rate_limit_retries,
        )
    except InsecureFhirServer:
        session.close()
        raise

    # At most `parallel` reads at a time: one call cannot take every executor thread, so a slow
    # server holds back its own calls only. Each read runs in a copy of the caller's context, so
    # its log lines carry the request's correlation fields (cds_service.ops.logs).
    waiting = list(jobs)
    futures: dict[concurrent.futures.Future, FetchJob] = {}

    def submit_next() -> None:
        job = waiting.pop(0)
        futures[executor.submit(contextvars.copy_context().run, _run_job, client, job,
                                settings.max_pages)] = job

    while waiting and len(futures) < parallel:
        submit_next()
    outcomes: dict[str, FetchOutcome] = {}
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
            outcomes[job.key] = FetchOutcome(
                error=FhirTimeout("FHIR server did not answer within the deadline")
            )
    return jobs, outcomes


def _run_job(client: ReadOnlyFHIRClient, job: FetchJob, max_pages: int) -> FetchOutcome:
    """Fetch one key (and its further pages). Runs on the executor; never raises for FHIR
    failures, which come back in `FetchOutcome.error`."""
    outcome = FetchOutcome()
    try:
        if job.url is not None:
            outcome.urls.append(job.url)
            body = client.get_json(job.url)
            verdict = classify(body, search=job.search, read_type=job.read_type)
            if isinstance(verdict, Unusable):
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
                if isinstance(verdict, Unusable):
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

