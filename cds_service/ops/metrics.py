"""Prometheus metrics, served at `/metrics`; catalogue and alerts in docs/operations.md.

gunicorn runs several worker processes and a scrape reaches one of them, so `cds-service serve`
sets `PROMETHEUS_MULTIPROC_DIR` before anything imports prometheus_client: each worker then
writes its samples to files there and `/metrics` aggregates every worker's files
(prometheus_client "Multiprocess Mode"). Without it (tests, one process) the default registry is
served.

Label values come only from our own configuration and code (site ids, service ids, hooks,
prefetch keys, card topics, model ids) or from small fixed sets: never from the request body
unchecked, never a patient, user or encounter id. A value outside the known set is `unknown`, so
a caller cannot create series.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

# prometheus_client's multiprocess values ask the kernel for the pid on every increment, to
# notice a fork: about thirty getpid() calls per patient-view. The pid changes only at a fork,
# so it is kept here and renewed in the child; MultiProcessValue's `process_identifier` is the
# hook for that. Replaced before the first metric below is built; a multiprocess value made
# before this import would keep its own handle on this process's files, so nothing may make
# one earlier (`cds-service serve` imports this module while loading, before any metric).
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid  # noqa: PLW0603 - one value per process, set again only in a forked child
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)
if getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: _pid)

UNKNOWN = "unknown"
STAGES = ("auth", "prefetch", "fhir_fallback", "features", "model", "cards")
# Server-side latency: Epic's whole round trip should be "on the order of 500 ms" (CDS Hooks 2.0
# §Performance), so the interesting range is 1 ms to 1 s.
_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
_SCORE = (.01, .02, .05, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1)
_DIFFERENCE = (.001, .005, .01, .02, .05, .1, .2, .5, 1)

REQUESTS = Counter(
    "cds_requests", "CDS service invocations and feedback calls.",
    ("site", "service", "hook", "status"))
REQUEST_SECONDS = Histogram(
    "cds_request_duration_seconds", "Server-side time of CDS service and feedback calls.",
    ("site", "service", "hook"), buckets=_LATENCY)
STAGE_SECONDS = Histogram(
    "cds_stage_duration_seconds",
    "Server-side time per stage of a call: " + ", ".join(STAGES) + ".",
    ("site", "service", "stage"), buckets=_LATENCY)
PREFETCH_KEYS = Counter(
    "cds_prefetch_keys",
    "Prefetch keys per call: hit (Epic prefetched it), null (Epic sent null), miss (not sent "
    "or unusable: read from the FHIR server or left missing).",
    ("site", "service", "key", "result"))
FHIR_SECONDS = Histogram(
    "cds_fhir_request_duration_seconds", "FHIR fallback reads, by outcome class.",
    ("site", "status_class"), buckets=_LATENCY)
JWT_REJECTIONS = Counter(
    "cds_jwt_rejections", "Refused JWTs by reason (cds_service.trust.auth).", ("site", "reason"))
MODEL_SECONDS = Histogram(
    "cds_model_inference_seconds", "Model scoring time (features excluded).",
    ("model_id", "model_version", "role"), buckets=_LATENCY)
MODEL_SCORE = Histogram(
    "cds_model_score", "Predicted risk, for drift against the model's validation cohort.",
    ("model_id", "model_version", "role"), buckets=_SCORE)
MODEL_UNAVAILABLE = Counter(
    "cds_model_unavailable", "Calls a model could not score (required inputs missing).",
    ("model_id", "model_version", "role"))
SHADOW_DIFFERENCE = Histogram(
    "cds_shadow_score_difference", "Absolute difference between shadow and active scores.",
    ("service", "active_model", "shadow_model"), buckets=_DIFFERENCE)
CARDS = Counter(
    "cds_cards", "Cards returned.", ("site", "service", "indicator", "topic"))
CARDS_SUPPRESSED = Counter(
    "cds_cards_suppressed", "Cards withheld by alert-fatigue suppression.",
    ("site", "service", "topic"))
FEEDBACK = Counter(
    "cds_feedback", "Feedback outcomes stored (replays not counted), by the card's topic.",
    ("site", "service", "outcome", "topic"))
STORE_WRITE_FAILURES = Counter(
    "cds_store_write_failures",
    "Calls whose audit record, issued cards and predictions could not be written.")
STORE_UP = Gauge(
    "cds_store_up",
    "1 when this worker's last use of the shared store (PostgreSQL or SQLite) succeeded, 0 when "
    "it failed or timed out. The lowest of the live workers.", multiprocess_mode="livemin")
SPOOL_BACKLOG = Gauge(
    "cds_spool_backlog",
    "Call records spooled on local disk and not yet in the store (this worker's, and those of "
    "dead workers it is replaying). Summed over live workers.", multiprocess_mode="livesum")
SPOOL_REJECTED = Counter(
    "cds_spool_rejected",
    "Call records the store refused for good (not an outage): moved to the spool's rejected/ "
    "directory, never retried.")
SUPPRESSION_FAIL_OPEN = Counter(
    "cds_suppression_fail_open",
    "Calls whose cards were shown unsuppressed because the override lookup failed or took "
    "longer than its deadline.", ("site", "service"))
MODEL_INFO = Gauge(
    "cds_model_info", "Models loaded by live workers (value 1).",
    ("model_id", "model_version", "sha256"), multiprocess_mode="livemax")


@lru_cache(maxsize=4096)
def _child(metric, *labels: str):
    """`metric.labels(*labels)`, cached: prometheus_client validates and locks on every call,
    and a call makes about twenty of them. Label values are bounded (module docstring)."""
    return metric.labels(*labels)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition() -> tuple[bytes, str]:
    """The `/metrics` body and content type: every worker's samples in multiprocess mode."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """gunicorn `child_exit`: drop a dead worker's live gauges (its counters are kept)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


def models_loaded(models: Iterable) -> None:
    for model in models:
        _child(MODEL_INFO, model.id, model.version, model.sha256).set(1)


@dataclass
class CallTimer:
    """Stage times of one call, shared with the FHIR fallback threads (they run in a copy of the
    request's context, which holds this same object)."""

    site: str
    service: str
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


_current: ContextVar[CallTimer | None] = ContextVar("cds_call_timer", default=None)


def start_call(site: str, service: str) -> CallTimer:
    timer = CallTimer(site, service)
    _current.set(timer)
    return timer


def current_call() -> CallTimer | None:
    return _current.get()


def end_call() -> None:
    _current.set(None)


class stage:  # noqa: N801 - used as `with metrics.stage(name):`, like a function
    """Time a stage of the current call (no-op outside one). Stages may repeat; they add up.
    A class, not a generator-based context manager: a call enters half a dozen, and this is a
    third of the cost."""

    __slots__ = ("name", "started", "timer")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        self.timer = _current.get()
        self.started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        if self.timer is not None:
            self.timer.add(self.name, time.perf_counter() - self.started)


def observe_fhir(status_class: str, seconds: float) -> None:
    timer = _current.get()
    _child(FHIR_SECONDS, timer.site if timer else UNKNOWN, status_class).observe(seconds)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "error"


def observe_prediction(role: str, prediction, seconds: float) -> None:
    labels = (prediction.model_id, prediction.model_version, role)
    _child(MODEL_SECONDS, *labels).observe(seconds)
    if prediction.score is None:
        _child(MODEL_UNAVAILABLE, *labels).inc()
    else:
        _child(MODEL_SCORE, *labels).observe(prediction.score)


def observe_shadow(active, shadow) -> None:
    if active.score is None or shadow.score is None:
        return
    timer = _current.get()
    _child(
        SHADOW_DIFFERENCE,
        timer.service if timer else UNKNOWN,
        f"{active.model_id}:{active.model_version}",
        f"{shadow.model_id}:{shadow.model_version}",
    ).observe(abs(shadow.score - active.score))


def prefetch_key(key: str, result: str) -> None:
    timer = _current.get()
    if timer is not None:  # keys are the site's configured template names: bounded
        _child(PREFETCH_KEYS, timer.site, timer.service, key, result).inc()


# Stages timed around others: their own time is what is left once the inner ones are taken out,
# so the stages of a call add up to (about) its server-side time.
_INNER = {"prefetch": ("fhir_fallback",), "cards": ("features", "model")}


def _exclusive(seconds: dict[str, float]) -> dict[str, float]:
    out = dict(seconds)
    for outer, inner in _INNER.items():
        if outer in out:
            out[outer] = max(0.0, out[outer] - sum(seconds.get(i, 0.0) for i in inner))
    return out


def count_request(site: str, service: str, hook: str, status: int, seconds: float) -> None:
    _child(REQUESTS, site, service, hook, str(status)).inc()
    _child(REQUEST_SECONDS, site, service, hook).observe(seconds)
    timer = _current.get()
    if timer is not None:
        for name, value in _exclusive(timer.seconds).items():
            _child(STAGE_SECONDS, site, service, name).observe(value)


def server_timing(total_s: float) -> str:
    """`Server-Timing` header (W3C Server Timing): this call's stages and `total` (from the
    blueprint's first hook to its last, request parsing and response included), in ms."""
    timer = _current.get()
    stages = _exclusive(timer.seconds) if timer is not None else {}
    parts = [f"{name};dur={stages[name] * 1000:.3f}" for name in STAGES if name in stages]
    return ", ".join([*parts, f"total;dur={total_s * 1000:.3f}"])


def _topic(card) -> str:
    return card.source.topic.code if card.source.topic is not None else "none"


def count_cards(site: str, service: str, cards, kept) -> None:
    shown = {id(card) for card in kept}
    for card in cards:
        if id(card) in shown:
            _child(CARDS, site, service, card.indicator, _topic(card)).inc()
        else:
            _child(CARDS_SUPPRESSED, site, service, _topic(card)).inc()


def count_feedback(site: str, service: str, new, store) -> None:
    """Newly stored feedback by outcome and the topic of the card it names (our issued-cards
    record: feedback carries only the card uuid). Never fails the call that stored it."""
    if not new:
        return
    try:
        topics = store.card_topics(site, service, {item.card for item in new})
    except Exception:  # noqa: BLE001 - metrics must not turn a stored feedback into an error
        topics = {}
    for item in new:
        _child(FEEDBACK, site, service, item.outcome, topics.get(item.card, UNKNOWN)).inc()


def store_up(up: bool) -> None:
    STORE_UP.set(1 if up else 0)


def spool_backlog(records: int) -> None:
    SPOOL_BACKLOG.set(records)


def suppression_failed_open(site: str, service: str) -> None:
    _child(SUPPRESSION_FAIL_OPEN, site, service).inc()


def rejected(site: str | None, reason: str) -> None:
    _child(JWT_REJECTIONS, site or UNKNOWN, reason).inc()
