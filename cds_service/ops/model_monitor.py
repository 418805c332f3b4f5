"""Live monitoring per model version, from the store: score and input-missingness drift against
the training reference (PSI, cds_service/models/drift.py) and what clinicians did with the cards
each active version drove. Rendered as a markdown report and as Prometheus gauges.

Computed by `cds-service models monitor`, run on a schedule (a cron job or Kubernetes CronJob
every 15 minutes), never by a worker: a PSI needs the window's whole score distribution, a scan
and a three-table join on the store that must not sit on a request path nor in a scrape (which
every Prometheus replica repeats, under a scrape timeout), and the workers' own histograms count
only since each worker started. The gauges go to a file in the Prometheus text format
(`--prom-file`) for node_exporter's textfile collector, atomically replaced; the alert rules in
ops/prometheus/cds-alerts.yml read them, and `cds_model_monitor_last_run_timestamp_seconds`
says when they were last refreshed.

Label values are site and service ids, model ids and versions, and input names: all from our
configuration and manifests, never from a request, never a patient or user.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from cds_service.models.drift import (
    PSI_MODERATE,
    PSI_SIGNIFICANT,
    Reference,
    band,
    bin_proportions,
    missing_psi,
    parse_reference,
    psi,
)
from cds_service.models.errors import ModelError
from cds_service.models.manifest import load_manifest
from cds_service.records.usage import VersionUsage

LABELS = ("site", "service", "model_id", "model_version", "role")
# Below this many scored predictions a PSI is reported but the alert does not fire on it: PSI is
# biased upwards in small samples (Yurdakul 2018: n·PSI is asymptotically chi-square), about
# (bins − 1)·(1/n_live + 1/n_training) for two samples of one population, so 13 bins and 200
# predictions against a large training set give ~0.06 from noise alone, under 0.1.
MIN_PREDICTIONS = 200
# Metric name -> help text: the names docs/operations.md catalogues and the alert rules read.
METRICS = {
    "cds_model_predictions": "Predictions recorded in the monitoring window (scored or not).",
    "cds_model_scored_predictions": "Predictions with a score in the monitoring window.",
    "cds_model_score_psi": "PSI of the window's scores against the training reference "
                           "(> 0.25 significant shift).",
    "cds_model_input_missing_ratio": "Share of the window's predictions missing the input "
                                     "(not observed: imputed or missing).",
    "cds_model_input_missing_reference_ratio": "The input's missing rate in training.",
    "cds_model_input_missing_psi": "PSI of the input's missingness against training.",
    "cds_model_cards": "Cards issued in the window by calls this active version scored.",
    "cds_model_card_feedback": "Of those cards, how many were accepted or overridden.",
    "cds_model_card_override_ratio": "Overridden / (accepted + overridden) cards.",
    "cds_model_card_acceptance_ratio": "Accepted / (accepted + overridden) cards.",
    "cds_model_monitor_last_run_timestamp_seconds": "When `models monitor` last wrote these "
                                                    "gauges (Unix time).",
}


@dataclass(frozen=True)
class InputDrift:
    name: str
    live: float
    reference: float | None
    psi: float | None


@dataclass(frozen=True)
class VersionReport:
    usage: VersionUsage
    reference: Reference | None
    reference_note: str
    live_bins: tuple[float, ...]
    score_psi: float | None
    inputs: tuple[InputDrift, ...]

    @property
    def labels(self) -> dict[str, str]:
        site, service, model_id, version, _, role = self.usage.key
        return dict(site=site, service=service, model_id=model_id, model_version=version,
                    role=role)

    def ratio(self, count: int) -> float | None:
        total = self.usage.cards_with_feedback
        return count / total if total else None


def _reference(models_dir: Path, key: tuple, cache: dict) -> tuple[Reference | None, str]:
    """The training reference of this exact build, if MODELS_DIR still holds it."""
    _, _, model_id, version, sha256, _ = key
    if model_id not in cache:
        try:
            cache[model_id] = load_manifest(models_dir / model_id)
        except ModelError as exc:
            cache[model_id] = exc
    manifest = cache[model_id]
    if isinstance(manifest, ModelError):
        return None, f"manifest not readable: {manifest}"
    if (manifest.version, manifest.artifact_sha256) != (version, sha256):
        return None, (f"{models_dir / model_id} now holds {manifest.version} sha256 "
                      f"{str(manifest.artifact_sha256)[:12]}, not this build")
    reference = parse_reference(manifest.monitoring_reference, manifest.source)
    if reference is None:
        return None, "no monitoring_reference in the manifest (trained before it existed: retrain)"
    return reference, "training split of " + str(manifest.training_data.get("source", "?"))


def build_reports(usage: Mapping[tuple, VersionUsage], models_dir: Path
                  ) -> list[VersionReport]:
    cache: dict = {}
    reports = []
    for key in sorted(usage):
        entry = usage[key]
        reference, note = _reference(models_dir, key, cache)
        edges = reference.edges if reference else None
        live = tuple(bin_proportions(entry.scores, edges) if edges else ())
        score_psi = (psi(reference.proportions, live)
                     if reference is not None and entry.scores else None)
        names = sorted({*entry.missing, *(reference.missing_rate if reference else ())})
        inputs = []
        for name in names:
            rate = entry.missing.get(name, 0) / entry.predictions if entry.predictions else 0.0
            ref = reference.missing_rate.get(name) if reference else None
            inputs.append(InputDrift(name, rate, ref, missing_psi(ref, rate)
                                     if ref is not None and entry.predictions else None))
        reports.append(VersionReport(entry, reference, note, live, score_psi, tuple(inputs)))
    return reports


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def render_markdown(reports: Iterable[VersionReport], *, since: str, generated: str) -> str:
    reports = list(reports)
    parts = [f"# Model monitoring\n\nWindow: predictions and cards since {since} (generated "
             f"{generated}). PSI reading (Siddiqi 2006; Yurdakul 2018): < {PSI_MODERATE} "
             f"stable, {PSI_MODERATE}-{PSI_SIGNIFICANT} moderate shift, > {PSI_SIGNIFICANT} "
             f"significant shift; fewer than {MIN_PREDICTIONS} scored predictions make it "
             "noisy. An input is missing when it was not observed (imputed, or missing and "
             "not scored).\n"]
    if not reports:
        parts.append("No predictions in the window.\n")
    for r in reports:
        u, labels = r.usage, r.labels
        parts.append(f"## {labels['model_id']} {labels['model_version']} ({labels['role']}) — "
                     f"{labels['site']} / {labels['service']}\n")
        parts.append(f"- sha256 `{u.key[4][:12]}`; predictions {u.predictions}, scored "
                     f"{len(u.scores)}\n- reference: {r.reference_note}\n"
                     f"- score PSI: **{_num(r.score_psi)}** ({band(r.score_psi)})\n")
        if r.reference is not None and u.scores:
            rows = ["| score bin | training | live |", "|---|---|---|"]
            edges = r.reference.edges
            for k, (e, a) in enumerate(zip(r.reference.proportions, r.live_bins, strict=True)):
                opening = "[" if k == 0 else "("
                rows.append(f"| {opening}{edges[k]:g}, {edges[k + 1]:g}] | {_pct(e)} | "
                            f"{_pct(a)} |")
            parts.append("\n".join(rows) + "\n")
        if r.inputs:
            rows = ["| input | missing, training | missing, live | PSI |", "|---|---|---|---|"]
            rows += [f"| {i.name} | {_pct(i.reference)} | {_pct(i.live)} | {_num(i.psi)} |"
                     for i in r.inputs]
            parts.append("\n".join(rows) + "\n")
        if labels["role"] == "active":
            parts.append(f"Cards: {u.cards} issued, {u.cards_with_feedback} with feedback: "
                         f"{u.accepted} accepted ({_pct(r.ratio(u.accepted))}), {u.overridden} "
                         f"overridden ({_pct(r.ratio(u.overridden))}).\n")
        else:
            parts.append("Shadow: scored and recorded, drives no card.\n")
    return "\n".join(parts)


def write_prometheus(reports: Iterable[VersionReport], path: Path, *, now: float) -> None:
    """The gauges in the text exposition format, written atomically (write_to_textfile renames
    a temporary file into place, as node_exporter's textfile collector requires)."""
    registry = CollectorRegistry()
    gauges = {name: Gauge(name, text, (*LABELS, "input") if "input" in name else
                          (() if name.endswith("timestamp_seconds") else LABELS),
                          registry=registry) for name, text in METRICS.items()}
    for r in reports:
        labels, u = r.labels, r.usage
        gauges["cds_model_predictions"].labels(**labels).set(u.predictions)
        gauges["cds_model_scored_predictions"].labels(**labels).set(len(u.scores))
        if r.score_psi is not None:
            gauges["cds_model_score_psi"].labels(**labels).set(r.score_psi)
        for i in r.inputs:
            gauges["cds_model_input_missing_ratio"].labels(**labels, input=i.name).set(i.live)
            if i.reference is not None:
                gauges["cds_model_input_missing_reference_ratio"].labels(
                    **labels, input=i.name).set(i.reference)
            if i.psi is not None:
                gauges["cds_model_input_missing_psi"].labels(**labels, input=i.name).set(i.psi)
        if labels["role"] == "active":
            gauges["cds_model_cards"].labels(**labels).set(u.cards)
            gauges["cds_model_card_feedback"].labels(**labels).set(u.cards_with_feedback)
            for name, count in (("override", u.overridden), ("acceptance", u.accepted)):
                ratio = r.ratio(count)
                if ratio is not None:
                    gauges[f"cds_model_card_{name}_ratio"].labels(**labels).set(ratio)
    gauges["cds_model_monitor_last_run_timestamp_seconds"].set(now)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
