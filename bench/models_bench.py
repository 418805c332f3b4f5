"""Micro-benchmark of the model step: feature extraction and one prediction per shipped model.

Run from the repository root with the project's virtualenv:

    python -m bench.models_bench                 # full run (>= 0.5 s per case), ~15 s
    python -m bench.models_bench --quick         # fixed small run count: a smoke test, not data
    python -m bench.models_bench --out DIR       # default: bench/results

It writes ``DIR/models.json`` (machine-readable: every case's statistics, the inputs, library
versions, platform, CPU count, date) and ``DIR/models.md`` (a short table), and prints the table.

Inputs (deterministic: a fixed cohort seed and fixed generator seeds):

- *typical*: 50 patients of the synthetic cohort (`cds_service.training.cohort`; ~15 Observations
  and a few Conditions each), each shaped as a CDS Hooks prefetch: the Patient plus an
  Observation and a Condition searchset Bundle. Calls cycle through the patients.
- *100 obs* / *1,000 obs* ("large prefetch"): one of those patients, whose Observations are
  replicated with fresh ids and dates spread over the 3 years before the prediction time (20 % of
  the results), padded with unrelated laboratory results under other LOINC codes (80 %), so most
  results match no feature, as in an Epic lab searchset.

Cases, for every model under ``models/*/manifest.yaml``:

- ``extract_typical``, ``extract_100_obs``, ``extract_1000_obs``: `features.extract` with the
  model's feature specs (Bundle flattening included);
- ``predict_vector``: `LoadedModel.predict_vector` on an extracted vector (score, secondary
  outputs, indicator and the per-feature explanation);
- ``estimator_predict_proba``: the bare estimator's ``predict_proba`` on one ready row;
- ``predict_full``: `LoadedModel.predict` on the typical prefetch (extraction + prediction).

The prediction cases use only the typical patients the model can score (no required input
missing), so the early "unavailable" return never shortens them.

Each call is timed on its own with `time.perf_counter_ns` after a warm-up; a case repeats until
its calls add up to at least 0.5 s (and at least 200 runs), and reports median, p95, mean and
min in microseconds with the run count. The garbage collector stays enabled, as when serving;
the cost of the timer itself (``timer_overhead_ns``) is recorded, not subtracted. The numbers
are for comparing runs on the same machine (before/after a change), not assertions about any
other machine: nothing here fails on a slow result.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import numpy as np

from bench import write_results
from cds_service.features import LOINC, UCUM, extract, group_by_patient
from cds_service.models.loaded import LoadedModel, load_model
from cds_service.training.cohort import generate_cohort

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
DEFAULT_OUT = ROOT / "bench" / "results"

COHORT_SEED = 20261121
TYPICAL_PATIENTS = 50
LARGE_SIZES = (100, 1000)
LARGE_SEED = 7
REPLICATED_SHARE = 0.2        # of a large prefetch: the patient's own results, re-dated
LARGE_SPAN_DAYS = 3 * 365     # dates spread over the 3 years before the prediction time
TARGET_P50_US = 1000.0        # target: server-side p50 <= 1 ms per patient-view request
FHIR_BASE = "https://fhir.example.org/api/FHIR/R4"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

# Common labs no shipped model reads: (LOINC, display, UCUM unit, typical value, sd).
OTHER_LABS = (
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 139.0, 3.0),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 4.5, 0.5),
    ("2075-0", "Chloride [Moles/volume] in Serum or Plasma", "mmol/L", 103.0, 3.0),
    ("2028-9", "Carbon dioxide, total [Moles/volume] in Serum or Plasma", "mmol/L", 24.0, 3.0),
    ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL", 30.0, 10.0),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 120.0, 30.0),
    ("17861-6", "Calcium [Mass/volume] in Serum or Plasma", "mg/dL", 9.2, 0.5),
    ("2777-1", "Phosphate [Mass/volume] in Serum or Plasma", "mg/dL", 4.0, 0.8),
    ("1751-7", "Albumin [Mass/volume] in Serum or Plasma", "g/dL", 3.9, 0.4),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 12.0, 1.5),
    ("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "%", 36.0, 4.0),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 7.0, 2.0),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 240.0, 60.0),
    ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
     "U/L", 25.0, 10.0),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 180.0, 35.0),
    ("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation", "mg/dL",
     100.0, 30.0),
    ("2731-8", "Parathyrin.intact [Mass/volume] in Serum or Plasma", "pg/mL", 90.0, 40.0),
    ("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", "m[IU]/L", 2.0, 1.0),
)

CASES = {
    "extract_typical": "features.extract, one typical patient's prefetch",
    "extract_100_obs": "features.extract, large prefetch of 100 Observations",
    "extract_1000_obs": "features.extract, large prefetch of 1,000 Observations",
    "predict_vector": "LoadedModel.predict_vector: score + secondary outputs + explanation",
    "estimator_predict_proba": "bare estimator predict_proba on one row",
    "predict_full": "LoadedModel.predict on a typical prefetch (extract + predict_vector)",
}


@dataclass(frozen=True)
class Settings:
    mode: str
    min_seconds: float      # summed call time per case
    min_runs: int
    max_runs: int
    warmup_runs: int
    warmup_seconds: float


FULL = Settings("full", min_seconds=0.5, min_runs=200, max_runs=2_000_000, warmup_runs=20,
                warmup_seconds=0.1)
QUICK = Settings("quick", min_seconds=0.0, min_runs=20, max_runs=20, warmup_runs=3,
                 warmup_seconds=0.0)


# ---------------------------------------------------------------------------------------------
# Timing


def measure(call: Callable[[Any], Any], inputs: Sequence[Any], settings: Settings) -> dict:
    """Time `call(inputs[i])` one call at a time, cycling through `inputs`."""
    if not inputs:
        raise ValueError("no inputs to time")
    n = len(inputs)
    warmup_ns = int(settings.warmup_seconds * 1e9)
    start = perf_counter_ns()
    i = 0
    while i < settings.warmup_runs or perf_counter_ns() - start < warmup_ns:
        call(inputs[i % n])
        i += 1
    budget_ns = int(settings.min_seconds * 1e9)
    samples: list[int] = []
    total = 0
    i = 0
    while (len(samples) < settings.min_runs or total < budget_ns) \
            and len(samples) < settings.max_runs:
        arg = inputs[i % n]
        i += 1
        t0 = perf_counter_ns()
        call(arg)
        elapsed = perf_counter_ns() - t0
        samples.append(elapsed)
        total += elapsed
    return summarize(samples)


def summarize(samples_ns: Sequence[int]) -> dict:
    ordered = sorted(samples_ns)
    n = len(ordered)
    p95 = ordered[max(0, math.ceil(0.95 * n) - 1)]  # nearest rank

    def us(ns: float) -> float:
        return round(ns / 1000.0, 3)

    return {"median_us": us(statistics.median(ordered)), "p95_us": us(p95),
            "mean_us": us(statistics.fmean(ordered)), "min_us": us(ordered[0]), "runs": n,
            "total_s": round(sum(ordered) / 1e9, 4)}


# ---------------------------------------------------------------------------------------------
# Inputs


def searchset(resources: Sequence[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"{FHIR_BASE}/{r['resourceType']}/{r['id']}", "resource": r,
                       "search": {"mode": "match"}} for r in resources]}


def prefetch(patient: dict, observations: Sequence[dict], conditions: Sequence[dict]) -> list:
    """One patient as a patient-view prefetch: Patient + Observation and Condition searchsets."""
    return [patient, searchset(observations), searchset(conditions)]


def _split(resources: Sequence[dict]) -> tuple[dict, list[dict], list[dict]]:
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    return (patient, [r for r in resources if r["resourceType"] == "Observation"],
            [r for r in resources if r["resourceType"] == "Condition"])


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _other_lab(obs_id: str, patient: dict, when: datetime, lab: tuple, value: float) -> dict:
    code, display, unit, _, _ = lab
    return {
        "resourceType": "Observation", "id": obs_id, "meta": copy.deepcopy(patient.get("meta", {})),
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory",
                                  "display": "Laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}],
                 "text": display},
        "subject": {"reference": f"Patient/{patient['id']}"},
        "effectiveDateTime": _stamp(when),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def large_prefetch(resources: Sequence[dict], n_obs: int, *, now: datetime,
                   seed: int = LARGE_SEED) -> tuple[list, dict]:
    """A prefetch of `n_obs` Observations around one patient's own (see the module docstring)."""
    patient, observations, conditions = _split(resources)
    rng = np.random.default_rng([seed, n_obs])
    minutes = rng.integers(0, LARGE_SPAN_DAYS * 24 * 60, n_obs)
    dates = [now - timedelta(minutes=int(m)) for m in minutes]
    n_copies = min(n_obs, max(1, round(n_obs * REPLICATED_SHARE)))
    out = []
    for k in range(n_copies):
        obs = copy.deepcopy(observations[k % len(observations)])
        obs["id"] = f"bench-{n_obs}-{k:05d}"
        obs["effectiveDateTime"] = _stamp(dates[k])
        out.append(obs)
    labs = rng.integers(0, len(OTHER_LABS), n_obs)
    noise = rng.normal(0.0, 1.0, n_obs)
    for k in range(n_copies, n_obs):
        lab = OTHER_LABS[int(labs[k])]
        value = round(abs(lab[3] + lab[4] * float(noise[k])), 1)
        out.append(_other_lab(f"bench-{n_obs}-{k:05d}", patient, dates[k], lab, value))
    out.sort(key=lambda o: o["effectiveDateTime"], reverse=True)  # _sort=-date
    bundle = prefetch(patient, out, conditions)
    return bundle, {"observations": n_obs, "replicated_from_patient": n_copies,
                    "unrelated_labs": n_obs - n_copies, "conditions": len(conditions),
                    "patient": patient["id"], "span_days": LARGE_SPAN_DAYS,
                    "json_bytes": _size(bundle)}


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


@dataclass(frozen=True)
class Inputs:
    now: datetime
    typical: list[list]          # prefetch per patient, patient-id order
    typical_ids: list[str]
    large: dict[int, list]       # n_obs -> prefetch
    description: dict


def build_inputs(models: Sequence[LoadedModel]) -> Inputs:
    cohort = generate_cohort(TYPICAL_PATIENTS, seed=COHORT_SEED)
    d = cohort.index_date
    now = datetime(d.year, d.month, d.day, tzinfo=UTC)
    groups = group_by_patient(r for kind in ("Patient", "Observation", "Condition")
                              for r in cohort.resources[kind])
    ids = sorted(groups)
    typical = [prefetch(*_split(groups[pid])) for pid in ids]
    n_obs = [len(_split(groups[pid])[1]) for pid in ids]
    n_cond = [len(_split(groups[pid])[2]) for pid in ids]
    sizes = [_size(p) for p in typical]
    # The large prefetch grows from the first patient every model can score.
    base = next(pid for pid, p in zip(ids, typical, strict=True)
                if all(not extract(m.manifest.features, p, now=now).missing_required
                       for m in models))
    large, large_desc = {}, {}
    for size in LARGE_SIZES:
        large[size], large_desc[f"obs_{size}"] = large_prefetch(groups[base], size, now=now)
    description = {
        "cohort": {"generator": "cds_service.training.cohort.generate_cohort",
                   "n_patients": TYPICAL_PATIENTS, "seed": COHORT_SEED,
                   "index_date": d.isoformat(), "now": now.isoformat()},
        "typical": {"patients": len(ids), "shape": "Patient + Observation searchset Bundle + "
                    "Condition searchset Bundle",
                    "observations": _spread(n_obs), "conditions": _spread(n_cond),
                    "json_bytes": _spread(sizes)},
        **large_desc,
    }
    return Inputs(now=now, typical=typical, typical_ids=ids, large=large,
                  description=description)


def _spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------------------------------------
# Cases


def model_cases(model: LoadedModel, inputs: Inputs) -> tuple[dict, dict]:
    """case name -> (call, inputs), and what was used."""
    specs = model.manifest.features
    now = inputs.now
    vectors = [extract(specs, p, now=now) for p in inputs.typical]
    scoreable = [i for i, v in enumerate(vectors) if not v.missing_required]
    if not scoreable:
        raise RuntimeError(f"{model.id}: no typical patient has every required input")
    ready = [vectors[i] for i in scoreable]
    rows = [np.array([v.row()], dtype=float) for v in ready]
    prefetches = [inputs.typical[i] for i in scoreable]

    def extract_one(resources: Any) -> Any:
        return extract(specs, resources, now=now)

    def predict_one(resources: Any) -> Any:
        return model.predict(resources, now=now)

    cases = {
        "extract_typical": (extract_one, inputs.typical),
        "extract_100_obs": (extract_one, [inputs.large[100]]),
        "extract_1000_obs": (extract_one, [inputs.large[1000]]),
        "predict_vector": (model.predict_vector, ready),
        "estimator_predict_proba": (model.estimator.predict_proba, rows),
        "predict_full": (predict_one, prefetches),
    }
    used = {"typical_patients": len(inputs.typical), "scoreable_patients": len(scoreable)}
    return cases, used


def environment() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "numpy": metadata.version("numpy"),
        "scikit-learn": metadata.version("scikit-learn"),
        "skops": metadata.version("skops"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
    }


def model_dirs(models_dir: Path = MODELS_DIR) -> list[Path]:
    return sorted(p.parent for p in models_dir.glob("*/manifest.yaml"))


def run(settings: Settings, models_dir: Path = MODELS_DIR) -> dict:
    models = [load_model(d) for d in model_dirs(models_dir)]
    if not models:
        raise RuntimeError(f"no models under {models_dir}")
    inputs = build_inputs(models)
    timer = measure(lambda _: None, [None], settings)
    report: dict[str, Any] = {
        "benchmark": "models",
        "mode": settings.mode,
        "environment": environment(),
        "settings": {"min_seconds_per_case": settings.min_seconds,
                     "min_runs": settings.min_runs, "max_runs": settings.max_runs,
                     "warmup_runs": settings.warmup_runs,
                     "warmup_seconds": settings.warmup_seconds,
                     "timer": "time.perf_counter_ns around each call, gc enabled",
                     "timer_overhead_ns": round(timer["median_us"] * 1000)},
        "inputs": inputs.description,
        "cases": CASES,
        "models": {},
    }
    for model in models:
        cases, used = model_cases(model, inputs)
        results = {name: measure(call, args, settings) for name, (call, args) in cases.items()}
        report["models"][model.id] = {
            "version": model.version, "sha256": model.sha256,
            "estimator": type(model.estimator).__name__,
            "n_features": len(model.manifest.features), "explanation": model.method,
            "inputs_used": used, "cases": results,
        }
    report["context"] = context(report)
    return report


def context(report: dict) -> dict:
    out = {"target_p50_us": TARGET_P50_US,
           "target": "server-side p50 <= 1 ms for a whole ~3 KB patient-view request",
           "typical_model_step": {}}
    for model_id, entry in report["models"].items():
        full = entry["cases"]["predict_full"]["median_us"]
        out["typical_model_step"][model_id] = {
            "predict_full_median_us": full,
            "fraction_of_target": round(full / TARGET_P50_US, 4)}
    return out


# ---------------------------------------------------------------------------------------------
# Output


def _num(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    typical = report["inputs"]["typical"]
    lines = [
        "# Model step micro-benchmark",
        "",
        f"`python -m bench.models_bench` ({report['mode']} run), {env['date']}: Python "
        f"{env['python']}, numpy {env['numpy']}, scikit-learn {env['scikit-learn']}, "
        f"{env['platform']}, {env['cpu_count']} CPUs ({env['cpus_usable']} usable). "
        "Microseconds per call (one patient), one call timed at a time; for comparing runs on "
        "the same machine, not a guarantee elsewhere. Case definitions and inputs: "
        "`models.json` and the module docstring.",
        "",
        f"Typical = {typical['patients']} synthetic patients, each as a patient-view prefetch "
        f"(per patient, median: {typical['observations']['median']:g} Observations, "
        f"{typical['conditions']['median']:g} Condition(s), "
        f"{typical['json_bytes']['median'] / 1000:.1f} KB of JSON); 100 / 1,000 obs = one "
        "patient's results re-dated over 3 years (20 %) among unrelated labs (80 %).",
        "",
        "| model | case | median µs | p95 µs | mean µs | runs |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for model_id, entry in report["models"].items():
        for name, r in entry["cases"].items():
            lines.append(f"| {model_id} | {name} | {_num(r['median_us'])} | "
                         f"{_num(r['p95_us'])} | {_num(r['mean_us'])} | {r['runs']:,} |")
    parts = [f"{mid} {_num(c['predict_full_median_us'])} µs "
             f"({c['fraction_of_target'] * 100:.0f} % of 1 ms)"
             for mid, c in report["context"]["typical_model_step"].items()]
    lines += [
        "",
        "The target is a server-side p50 ≤ 1 ms for a whole ~3 KB patient-view request; "
        "the model step alone on a typical patient of these inputs (extraction + one "
        "prediction with its explanation, `predict_full` median) takes "
        + " and ".join(parts) + ".",
        "",
    ]
    return "\n".join(lines)


def write(report: dict, out: Path) -> tuple[Path, Path]:
    return write_results(out, "models", report, markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.models_bench",
        description="Time feature extraction and one prediction per shipped model.")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.min_runs} runs per case instead of >= "
                             f"{FULL.min_seconds} s (a smoke test; numbers are not data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for models.json and models.md (default: %(default)s)")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR,
                        help="directory holding <model-id>/manifest.yaml (default: %(default)s)")
    args = parser.parse_args(argv)
    report = run(QUICK if args.quick else FULL, args.models_dir)
    json_path, md_path = write(report, args.out)
    sys.stdout.write(markdown(report) + f"\nwrote {json_path} and {md_path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
