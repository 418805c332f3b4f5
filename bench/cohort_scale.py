"""Scale of `cds-service models cohort`: peak memory and time on large generated exports.

Run from the repository root with the project's virtualenv:

    python -m bench.cohort_scale                         # 20, 2,000, 20,000 and 100,000 patients
    python -m bench.cohort_scale --patients 500 5000     # other sizes
    python -m bench.cohort_scale --out DIR               # default: bench/results

It writes ``DIR/cohort_scale.json`` and ``DIR/cohort_scale.md`` and prints the table. Not a
test: nothing fails on a slow or large result; the figures are for this machine.

The export (deterministic, `random.Random(seed)`) has the layout of `cds-service data export`:
``Patient``, ``Observation``, ``Condition``, ``Procedure``, ``Encounter`` and
``MedicationRequest`` as ``<Type>.001.ndjson.gz``, ``Medication.referenced.ndjson.gz`` and a
``log.ndjson``, written patient by patient (the generator holds one patient). Per patient:
eGFR every ~90 days for 3-8 years (declining from 35-75 at 0-6 per year, some as serum
creatinine in µmol/L instead), urine ACR, systolic BP, HbA1c, diabetes / hypertension
Conditions, an encounter per result, a MedicationRequest referencing one of 50 Medications,
haemodialysis sessions three times a week once eGFR falls below 12, and death for ~5 %.
Resources of different patients are interleaved across a file as an export would have them
(patients are written in id order within blocks of 1,000 then blocks shuffled), so nothing
depends on the export being sorted by patient.

Each size runs `build_cohort` in a fresh interpreter (`python -c`), whose peak resident set
size is read from `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` after it exits; time is
wall-clock for the whole command (spill + per-patient pass + outputs). The smallest size is
the fixed cost: the interpreter with the libraries the command imports (scikit-learn and numpy
through `cds_service.training`, the UCUM unit registry); what a larger export adds to it is the
figure that must not grow with the number of patients.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "models" / "specs" / "ckd-progression-lr.yaml"
# A fixed start for every generated history: nothing depends on today's date.
START = date(2012, 1, 1)
LOINC, SNOMED, ICD = "http://loinc.org", "http://snomed.info/sct", \
    "http://hl7.org/fhir/sid/icd-10-cm"
TYPES = ("Patient", "Observation", "Condition", "Procedure", "Encounter", "MedicationRequest")


def _obs(pid: str, rid: str, day: date, code: str, value: float, unit: str) -> dict:
    return {"resourceType": "Observation", "id": rid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": day.isoformat(),
            "valueQuantity": {"value": value, "unit": unit}}


def patient(rng: random.Random, n: int) -> dict[str, list[dict]]:
    pid = f"pt-{n:07d}"
    out: dict[str, list[dict]] = {t: [] for t in TYPES}
    born = date(rng.randint(1930, 1985), rng.randint(1, 12), rng.randint(1, 28))
    egfr, slope = rng.uniform(35, 75), rng.uniform(0, 6)
    start = START + timedelta(days=rng.randint(0, 700))
    years = rng.uniform(3, 8)
    p = {"resourceType": "Patient", "id": pid, "birthDate": born.isoformat(),
         "gender": rng.choice(("male", "female"))}
    out["Patient"].append(p)
    if rng.random() < 0.4:
        out["Condition"].append({"resourceType": "Condition", "id": f"{pid}-dm",
                                 "subject": {"reference": f"Patient/{pid}"},
                                 "code": {"coding": [{"system": ICD, "code": "E11.9"}]},
                                 "onsetDateTime": start.isoformat()})
    if rng.random() < 0.7:
        out["Condition"].append({"resourceType": "Condition", "id": f"{pid}-htn",
                                 "subject": {"reference": f"Patient/{pid}"},
                                 "code": {"coding": [{"system": ICD, "code": "I10"}]},
                                 "onsetDateTime": start.isoformat()})
    day, k, dialysis_from = start, 0, None
    while (day - start).days < years * 365.25:
        k += 1
        value = max(4.0, egfr - slope * (day - start).days / 365.25 + rng.gauss(0, 3))
        if rng.random() < 0.3:
            # As serum creatinine, µmol/L, roughly the level that gives this eGFR.
            out["Observation"].append(_obs(pid, f"{pid}-cr-{k}", day, "14682-9",
                                           round(88.4 * 90 / value, 1), "umol/L"))
        else:
            out["Observation"].append(_obs(pid, f"{pid}-egfr-{k}", day, "62238-1",
                                           round(value), "mL/min/{1.73_m2}"))
        out["Observation"].append(_obs(pid, f"{pid}-acr-{k}", day, "9318-7",
                                       round(rng.lognormvariate(4, 1.3), 1), "mg/g"))
        out["Observation"].append(_obs(pid, f"{pid}-sbp-{k}", day, "8480-6",
                                       round(rng.gauss(135, 17)), "mm[Hg]"))
        out["Observation"].append(_obs(pid, f"{pid}-a1c-{k}", day, "4548-4",
                                       round(rng.gauss(6.5, 1), 1), "%"))
        out["Encounter"].append({"resourceType": "Encounter", "id": f"{pid}-enc-{k}",
                                 "status": "finished", "subject": {"reference": f"Patient/{pid}"},
                                 "period": {"start": day.isoformat(), "end": day.isoformat()}})
        out["MedicationRequest"].append({
            "resourceType": "MedicationRequest", "id": f"{pid}-mr-{k}", "status": "active",
            "intent": "order", "subject": {"reference": f"Patient/{pid}"},
            "authoredOn": day.isoformat(),
            "medicationReference": {"reference": f"Medication/med-{rng.randrange(50)}"}})
        if value < 12 and dialysis_from is None:
            dialysis_from = day
        day += timedelta(days=rng.randint(60, 120))
    if dialysis_from is not None:
        for s in range(120):  # ~40 weeks, three sessions a week
            session = dialysis_from + timedelta(days=s * 7 // 3)
            out["Procedure"].append({
                "resourceType": "Procedure", "id": f"{pid}-hd-{s}", "status": "completed",
                "subject": {"reference": f"Patient/{pid}"},
                "code": {"coding": [{"system": SNOMED, "code": "302497006"}]},
                "performedDateTime": session.isoformat()})
    if rng.random() < 0.05:
        p["deceasedDateTime"] = (day + timedelta(days=rng.randint(1, 200))).isoformat()
    return out


def generate(directory: Path, n_patients: int, seed: int) -> dict[str, int]:
    """Write the export; returns resources per type."""
    rng = random.Random(seed)  # noqa: S311 (synthetic data, reproducible by seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = {t: gzip.open(directory / f"{t}.001.ndjson.gz", "wt", encoding="utf-8",
                          compresslevel=1) for t in TYPES}
    counts = dict.fromkeys(TYPES, 0)
    counts_bytes = 0
    blocks = list(range(0, n_patients, 1000))
    rng.shuffle(blocks)
    try:
        for block in blocks:
            for n in range(block, min(block + 1000, n_patients)):
                for rtype, resources in patient(rng, n).items():
                    for r in resources:
                        line = json.dumps(r, separators=(",", ":")) + "\n"
                        files[rtype].write(line)
                        counts_bytes += len(line)
                    counts[rtype] += len(resources)
    finally:
        for fh in files.values():
            fh.close()
    with gzip.open(directory / "Medication.referenced.ndjson.gz", "wt", encoding="utf-8") as fh:
        for m in range(50):
            fh.write(json.dumps({"resourceType": "Medication", "id": f"med-{m}", "code": {
                "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                            "code": str(197361 + m)}]}}) + "\n")
    counts["Medication"] = 50
    counts["_ndjson_bytes"] = counts_bytes
    log = [{"eventId": "status_complete", "eventDetail": {"transactionTime": "2024-01-01"}},
           {"eventId": "export_complete", "eventDetail": {
               "_server": "https://bench.invalid/fhir", "_group": "bench",
               "_resourcesByType": counts}}]
    (directory / "log.ndjson").write_text("".join(json.dumps(e) + "\n" for e in log),
                                          encoding="utf-8")
    return counts


def run_one(export: Path, out: Path) -> dict[str, float]:
    code = ("import sys; from pathlib import Path; "
            "from cds_service.training.export_cohort import build_cohort; "
            "build_cohort(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(export), str(SPEC), str(out)],  # noqa: S603
                   check=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    if peak < before:
        peak = before
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(peak / 1024, 1),
            "peak_is_max_so_far": peak == before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[20, 2000, 20000, 100000])
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    rows = []
    # Smallest first: RUSAGE_CHILDREN is the maximum over children so far, so each figure is
    # that run's own peak only while sizes grow (flagged otherwise).
    for n in sorted(args.patients):
        with tempfile.TemporaryDirectory(prefix="cds-cohort-bench-") as work:
            export = Path(work) / "export"
            counts = generate(export, n, args.seed)
            ndjson_bytes = counts.pop("_ndjson_bytes")
            size = sum(p.stat().st_size for p in export.iterdir())
            measured = run_one(export, Path(work) / "out")
            summary = json.loads((Path(work) / "out" / "cohort.json").read_text())["counts"]
        rows.append({"patients": n, "resources": sum(counts.values()),
                     "resources_by_type": counts, "export_mib_gzipped": round(size / 2**20, 1),
                     "export_mib_ndjson": round(ndjson_bytes / 2**20, 1),
                     "included": summary["included"], "events": summary["events"], **measured})
        print(f"{n} patients: {rows[-1]['resources']} resources, {measured}", flush=True)  # noqa: T201
    result = {"benchmark": "cohort_scale", "command": "python -m bench.cohort_scale "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "python": platform.python_version(), "platform": platform.platform(),
              "cpus": os.cpu_count(), "spec": str(SPEC.relative_to(ROOT)), "seed": args.seed,
              "runs": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cohort_scale.json").write_text(json.dumps(result, indent=2) + "\n",
                                           encoding="utf-8")
    lines = ["# Cohort from a Bulk Data export: scale", "",
             f"`{result['command'].strip()}`, {result['date']}: Python {result['python']}, "
             f"{result['platform']}, {result['cpus']} CPUs. Generated exports (bench/"
             "cohort_scale.py docstring), spec ckd-progression-lr; peak RSS of the whole "
             "`build_cohort` process, wall-clock seconds. For this machine only.", "",
             "| patients | resources | export (gz) MiB | NDJSON MiB | included | peak RSS MiB | "
             "seconds | patients/s |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {r['patients']:,} | {r['resources']:,} | {r['export_mib_gzipped']} | "
              f"{r['export_mib_ndjson']} | {r['included']:,} | {r['peak_rss_mib']} | "
              f"{r['seconds']} | {r['patients'] / r['seconds']:,.0f} |" for r in rows]
    base, top = rows[0], rows[-1]
    lines += ["", f"From {base['patients']:,} to {top['patients']:,} patients "
              f"({top['patients'] // max(base['patients'], 1):,} times as many) peak RSS went from "
              f"{base['peak_rss_mib']} to {top['peak_rss_mib']} MiB.", ""]
    # Ten million patients, extrapolated linearly from the largest run: memory does not grow
    # with patients (above), time does, and the spill (SQLite, deleted at the end) holds each
    # resource's NDJSON line plus its keys, so it needs about the uncompressed export on disk.
    rate = top["patients"] / top["seconds"]
    scale = 10_000_000 / top["patients"]
    lines += [f"Ten million patients on this machine, extrapolated from the largest run: about "
              f"{10_000_000 / rate / 3600:.1f} hours single-threaded at {rate:,.0f} patients/s, "
              f"peak RSS as above, and about {top['export_mib_ndjson'] * scale / 1024:,.0f} GiB "
              "of disk for the spill (the uncompressed NDJSON), beside "
              f"{top['export_mib_gzipped'] * scale / 1024:,.0f} GiB of gzipped export.", ""]
    (out / "cohort_scale.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
