"""The validation report: an `EvaluationResult` (cds_service.training.evaluation) as
OUT_DIR/report.md (markdown tables), OUT_DIR/metrics.json (the result itself) and three figures
(roc.png, calibration.png, decision_curve.png) referenced from the markdown.

Everything drawn comes from the result, so the figures can be redrawn from metrics.json. The
figures use matplotlib's Agg renderer, its default style and no date or software version in the
PNG metadata: the same result gives the same bytes. matplotlib is the `train` extra
(pyproject.toml); it is imported only when figures are drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cds_service.training.evaluation import (
    STATUS_OK,
    Estimate,
    EvaluationResult,
    ModelMetrics,
    Population,
)

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
ROC_FILE = "roc.png"
CALIBRATION_FILE = "calibration.png"
DECISION_FILE = "decision_curve.png"

HOW_TO_READ = """\
Each number is computed on all patients; the interval beside it is a
{pct} bootstrap percentile interval (Efron B, Tibshirani RJ, *An Introduction to the Bootstrap*,
1993, ch. 13): patients were resampled with replacement {n_bootstrap} times (seed {seed}) and
resamples with a single outcome class were skipped. **AUROC** is the probability that a patient
who had the outcome was given a higher risk than one who did not (Mann-Whitney form: Hanley JA,
McNeil BJ, *Radiology* 1982;143:29); 0.5 is chance. **AUPRC** is average precision, the
step-wise area under the precision-recall curve (Davis J, Goadrich M, ICML 2006); compare it with
the prevalence, what chance earns. **Brier** is the mean squared error of the risk (Brier GW,
*Mon Weather Rev* 1950;78:1); lower is better. **Calibration slope** is b in logit P(y) = a +
b·logit(p) (Cox DR, *Biometrika* 1958;45:562): 1 is ideal, below 1 the risks are too extreme (an
overfitted model). **Calibration intercept** (calibration-in-the-large) is a with logit(p) as an
offset: 0 is ideal, below 0 the risks are too high on average (Van Calster B et al., *J Clin
Epidemiol* 2016;74:167; *BMC Med* 2019;17:230). **O/E** is observed over expected events, sum(y)
/ sum(p) (Debray TPA et al., *BMJ* 2017;356:i6460): 1 is ideal, above 1 the model under-predicts.
The calibration plot groups patients by predicted risk and puts each group's observed rate
against its mean prediction; points on the diagonal are well calibrated. **Net benefit** at a
threshold pt is TP/n - FP/n · pt/(1 - pt) (Vickers AJ, Elkin EB, *Med Decis Making* 2006;26:565):
true positives per patient, less false positives weighted by the odds of the threshold. A model
is useful at pt when its net benefit exceeds both treat-all and treat-none (0). The thresholds
are the decisions the cards support (KDIGO 2024, practice points 2.2.1-2.2.3); "> x" means a
risk of exactly x is not flagged. **Comparisons** are model minus comparator, with a paired
bootstrap interval (both models scored on the same resampled patients); an interval that
excludes 0 is a difference the data support. **Subgroups** with fewer than {min_events} events or
non-events show why instead of a number: their estimates would be noise.
"""


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_estimate(e: Estimate, digits: int = 3) -> str:
    """"0.842 (0.819 to 0.858)"; "n/a" when not estimable."""
    if e.value is None:
        return "n/a"
    if e.lower is None or e.upper is None:
        return f"{fmt(e.value, digits)} (no interval)"
    return f"{fmt(e.value, digits)} ({fmt(e.lower, digits)} to {fmt(e.upper, digits)})"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


def _status_text(population: Population, min_events: int) -> str:
    return f"{population.status} (< {min_events})" if population.status != "one class" else (
        "one class: no estimate")


def render_markdown(result: EvaluationResult, *, title: str,
                    cohort: Mapping[str, Any] | None = None) -> str:
    """The report's markdown; `cohort` adds rows to the cohort table (e.g. exclusions)."""
    overall = result.overall
    horizon = (f"{result.horizon_years:g}-year" if result.horizon_years is not None
               else "fixed-horizon")
    conf = _pct(result.confidence)
    parts = [f"# {title}",
             f"_Outcome: {horizon} kidney failure. Models: "
             + ", ".join(f"`{m}`" for m in result.models)
             + (f"; comparator `{result.comparator}`" if result.comparator else "")
             + f". {conf} bootstrap percentile intervals, {result.n_bootstrap} resamples, seed "
               f"{result.seed}. Written from {METRICS_FILE}._"]

    cohort_rows: list[tuple[str, Any]] = [
        ("patients", overall.n), ("events", overall.events),
        ("non-events", overall.n - overall.events),
        ("prevalence", fmt(overall.prevalence, 4)),
        ("bootstrap resamples skipped (one outcome class)", overall.skipped_resamples)]
    if result.horizon_years is not None:
        cohort_rows.insert(0, ("horizon (years)", f"{result.horizon_years:g}"))
    cohort_rows += [(str(k), v) for k, v in (cohort or {}).items()]
    parts.append("## Cohort\n\n" + _table(("item", "value"), cohort_rows))

    parts.append(f"## Discrimination\n\nValue ({conf} CI).\n\n" + _table(
        ("model", "AUROC", "AUPRC", "Brier"),
        [(f"`{m.model}`", fmt_estimate(m.auroc), fmt_estimate(m.auprc),
          fmt_estimate(m.brier, 4)) for m in overall.models])
        + f"\n\nAUPRC of chance = prevalence = {fmt(overall.prevalence, 4)}.\n\n"
        f"![ROC curves]({ROC_FILE})")

    calibration = _table(
        ("model", "mean predicted", "observed rate", "O/E", "slope", "intercept"),
        [(f"`{m.model}`", fmt(m.mean_predicted, 4), fmt(overall.prevalence, 4),
          fmt_estimate(m.observed_expected), fmt_estimate(m.calibration_slope),
          fmt_estimate(m.calibration_intercept)) for m in overall.models])
    bins = _table(
        ("model", "group", "predicted range", "n", "events", "mean predicted", "observed"),
        [(f"`{m.model}`", k + 1, f"{fmt(b.p_min, 4)} to {fmt(b.p_max, 4)}", b.n, b.events,
          fmt(b.mean_predicted, 4), fmt(b.observed, 4))
         for m in overall.models for k, b in enumerate(m.calibration_bins)])
    parts.append(f"## Calibration\n\n{calibration}\n\n![Calibration]({CALIBRATION_FILE})\n\n"
                 f"Groups by predicted risk (the points of the plot):\n\n{bins}")

    if result.thresholds:
        rows = []
        for t in result.thresholds:
            for m in overall.models:
                te = next(x for x in m.thresholds if x.name == t.name)
                rows.append((t.name, ("> " if t.above else "≥ ") + _pct(t.value),
                             f"`{m.model}`", te.flagged, te.true_positives,
                             fmt_estimate(te.net_benefit, 4), fmt(te.treat_all, 4), "0"))
        sources = "\n".join(f"- {t.name}: {t.source}" for t in result.thresholds if t.source)
        parts.append(
            "## Decision curve at the named thresholds\n\n" + _table(
                ("threshold", "flag when risk", "model", "flagged", "true positives",
                 "net benefit", "treat all", "treat none"), rows)
            + (f"\n\n{sources}" if sources else "")
            + f"\n\n![Decision curve]({DECISION_FILE})")
    else:
        parts.append(f"## Decision curve\n\n![Decision curve]({DECISION_FILE})")

    if overall.comparisons:
        rows = []
        for c in overall.comparisons:
            rows.append((f"`{c.model}` − `{c.comparator}`", "AUROC",
                         fmt_estimate(c.auroc_difference)))
            rows += [(f"`{c.model}` − `{c.comparator}`", f"net benefit at {name}",
                      fmt_estimate(e, 4)) for name, e in c.net_benefit_difference]
        parts.append(f"## Comparison with `{result.comparator}`\n\nPaired bootstrap: both "
                     f"models on the same resampled patients. Difference ({conf} CI).\n\n"
                     + _table(("models", "metric", "difference"), rows))

    if result.subgroups:
        header = ["variable", "level", "n", "events", "model", "AUROC", "Brier", "O/E",
                  "slope", "intercept"] + [f"NB {t.name}" for t in result.thresholds]
        rows = []
        for s in result.subgroups:
            r = s.result
            if r.status != STATUS_OK:
                rows.append([s.variable, s.level, r.n, r.events,
                             f"**{_status_text(r, result.min_events)}**"]
                            + [""] * (len(header) - 5))
                continue
            for m in r.models:
                rows.append([s.variable, s.level, r.n, r.events, f"`{m.model}`",
                             fmt_estimate(m.auroc), fmt_estimate(m.brier, 4),
                             fmt_estimate(m.observed_expected),
                             fmt_estimate(m.calibration_slope),
                             fmt_estimate(m.calibration_intercept)]
                            + [fmt_estimate(te.net_benefit, 4) for te in m.thresholds])
        text = "## Subgroups\n\n" + _table(header, rows)
        compared = [(s, c) for s in result.subgroups for c in s.result.comparisons]
        if compared:
            text += f"\n\nDifference from `{result.comparator}` (paired):\n\n" + _table(
                ["variable", "level", "model", "AUROC difference"]
                + [f"NB difference {t.name}" for t in result.thresholds],
                [[s.variable, s.level, f"`{c.model}`", fmt_estimate(c.auroc_difference)]
                 + [fmt_estimate(e, 4) for _, e in c.net_benefit_difference]
                 for s, c in compared])
        parts.append(text)

    parts.append("## How to read this\n\n" + HOW_TO_READ.format(
        pct=conf, n_bootstrap=result.n_bootstrap, seed=result.seed,
        min_events=result.min_events).strip())
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def _save(draw: Callable[[Any], None], path: Path) -> Path:
    """Draw on a fresh Figure (no pyplot state) in matplotlib's default style and save a PNG
    with no Software (version) or date metadata, so equal inputs give equal bytes."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        fig = Figure(figsize=(6, 5), dpi=100)
        FigureCanvasAgg(fig)
        draw(fig.add_subplot())
        fig.tight_layout()
        fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _roc(ax: Any, models: Sequence[ModelMetrics], title: str) -> None:
    for m in models:
        fpr, tpr = zip(*m.roc, strict=True) if m.roc else ((), ())
        ax.plot(fpr, tpr, drawstyle="default", linewidth=1.5,
                label=f"{m.model} (AUROC {fmt(m.auroc.value)})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set(xlabel="1 − specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=f"ROC curves: {title}",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")


def _calibration(ax: Any, models: Sequence[ModelMetrics], title: str) -> None:
    top = 0.0
    for m in models:
        xs = [b.mean_predicted for b in m.calibration_bins]
        ys = [b.observed for b in m.calibration_bins]
        top = max(top, *xs, *ys)
        ax.plot(xs, ys, marker="o", linewidth=1.2, label=f"{m.model} (groups by predicted risk)")
    top = min(1.0, top * 1.05) or 1.0
    ax.plot([0, top], [0, top], linestyle="--", color="grey", linewidth=0.8,
            label="ideal (observed = predicted)")
    ax.set(xlabel="mean predicted risk", ylabel="observed event rate",
           title=f"Calibration: {title}", xlim=(0, top), ylim=(0, top))
    ax.legend(loc="upper left", fontsize="small")


def _decision(ax: Any, result: EvaluationResult, title: str) -> None:
    models = result.overall.models
    prevalence = result.overall.prevalence
    grid = [d.threshold for d in models[0].decision_curve]
    for m in models:
        ax.plot(grid, [d.net_benefit for d in m.decision_curve], linewidth=1.5, label=m.model)
    ax.plot(grid, [d.treat_all for d in models[0].decision_curve], color="grey",
            linewidth=1.0, label="treat all")
    ax.axhline(0.0, color="black", linewidth=1.0, label="treat none")
    for t in result.thresholds:
        ax.axvline(t.value, color="tab:red", linestyle=":", linewidth=0.8)
        ax.annotate(t.name, (t.value, 0.02), xycoords=("data", "axes fraction"),
                    rotation=90, va="bottom", ha="right", fontsize="x-small", color="tab:red")
    ax.set(xlabel="threshold probability", ylabel="net benefit",
           title=f"Decision curve: {title}", xlim=(0, max(grid) if grid else 1),
           ylim=(-0.5 * prevalence, 1.1 * prevalence))
    ax.legend(loc="upper right", fontsize="small")


def write_report(result: EvaluationResult, out_dir: Path, *, title: str = "Validation",
                 cohort: Mapping[str, Any] | None = None) -> list[Path]:
    """Write report.md, metrics.json and the three figures into `out_dir` (created); returns
    the paths written. Used by `cds-service models evaluate --report`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models = result.overall.models
    figures = [
        _save(lambda ax: _roc(ax, models, title), out_dir / ROC_FILE),
        _save(lambda ax: _calibration(ax, models, title), out_dir / CALIBRATION_FILE),
        _save(lambda ax: _decision(ax, result, title), out_dir / DECISION_FILE),
    ]
    metrics = out_dir / METRICS_FILE
    metrics.write_text(result.to_json(), encoding="utf-8")
    report = out_dir / REPORT_FILE
    report.write_text(render_markdown(result, title=title, cohort=cohort), encoding="utf-8")
    return [report, metrics, *figures]
