"""What a hostile or broken FHIR server can cost one worker of the real service.

Run from the repository root with the project's virtualenv:

    python -m bench.fhir_bounds              # writes bench/results/fhir_bounds.{json,md}
    python -m bench.fhir_bounds --out DIR

Each scenario gets a fresh `cds-service serve --workers 1` (gthread, 4 threads, 16 FHIR
threads) on the demo site, with `prefetch.allow_http_loopback` and the scenario's loopback
servers (bench/hostile_fhir.py) in `fhir_servers`; deadline 2.5 s, caps at their defaults
(16 MiB per answer, 32 MiB per call, 8 reads at a time). One warm-up call with full prefetch,
then the scenario: a kidney-risk patient-view (bench.payloads pv-3kb) signed with the demo key,
its `egfr` key (or all 8 keys) left out so the service must read them from the named server:

- big-1key, big-8keys: 50 MB answers, streamed without a Content-Length.
- drip-1key, drip-headers-8keys: a byte every 0.5 s, in the body / inside a header line.
- healthy-beside-drip: the 8-key dripping call, and once its reads are all in flight, a call
  whose one missing key a healthy server answers at once.
- refused: a fhirServer not in the list, 8 keys missing (nothing may be contacted).

Figures: HTTP status and seconds per call; the worker's RSS (VmRSS) and peak RSS (VmHWM) before
the scenario and 1 s after it, in MB (10^6 bytes); bytes and connections the servers saw.
Targets (reported, not asserted): answered within deadline + 0.5 s, peak RSS growth < 100 MB,
the healthy call as fast as alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench import write_results
from bench.hostile_fhir import MIB, ConnectionCounter, HostileFhirServer
from bench.payloads import new_hook_instance, pv_3kb
from bench.service_bench import (
    DEFAULT_OUT,
    DEMO_ISS,
    DEMO_SITE,
    SITE_CONFIG,
    Group,
    Server,
    Signer,
    _jwks_file,
    environment,
    memory,
)

DEADLINE_S = 2.5
TARGET_SLACK_S = 0.5
TARGET_PEAK_GROWTH_MB = 100.0
DRIP_S = 0.5
SIZE = 50 * MIB
KEYS = ("egfr", "creatinine", "patient", "uacr", "hba1c", "bp", "conditions", "medications")
GROUP = Group("fhir-bounds-1w", "service", 1)


def site_file(directory: Path, servers: list[str]) -> Path:
    site = yaml.safe_load(DEMO_SITE.read_text(encoding="utf-8"))
    for issuer in site.get("issuers", ()):
        if "jwks_file" in issuer:
            issuer["jwks_file"] = str((SITE_CONFIG / issuer["jwks_file"]).resolve())
    site["prefetch"] = {**site.get("prefetch", {}), "allow_http_loopback": True,
                        "deadline_seconds": DEADLINE_S}
    site["fhir_servers"] = servers
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "site.yaml"
    path.write_text("# The demo site, loopback FHIR servers allowed; by bench.fhir_bounds.\n"
                    + yaml.safe_dump(site, sort_keys=False), encoding="utf-8")
    return path


class Caller:
    def __init__(self, server: Server, signer: Signer):
        self.server, self.signer = server, signer
        self.template = json.loads(pv_3kb(_now()).body(new_hook_instance()))

    def body(self, fhir_server: str | None, missing: tuple[str, ...]) -> dict:
        body = json.loads(json.dumps(self.template))
        body["hookInstance"] = new_hook_instance()
        for key in missing:
            del body["prefetch"][key]
        if fhir_server:
            body["fhirServer"] = fhir_server
            body["fhirAuthorization"] = {"access_token": "bench-token", "token_type": "Bearer",
                                         "expires_in": 300, "scope": "patient/*.read",
                                         "subject": "bench"}
        return body

    def call(self, body: dict) -> dict:
        url = self.server.base + "/cds-services/kidney-risk"
        request = urllib.request.Request(  # noqa: S310 - loopback
            url, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.signer.token(url)}"})
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                status, text = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read()
        seconds = time.monotonic() - started
        try:
            issues = [i.get("diagnostics") for i in json.loads(text).get("issue", ())]
        except (ValueError, AttributeError):
            issues = []
        return {"status": status, "seconds": round(seconds, 3), "issues": issues[:3]}


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


def scenario(name: str, tmp: Path, signer: Signer, servers: dict[str, HostileFhirServer],
             run) -> dict:
    # No server of its own (refused): the demo's Epic base, which is never called here.
    site = site_file(tmp / name, [s.url for s in servers.values()] or [DEMO_ISS])
    server = Server(GROUP, tmp / name, site)
    server.start()
    try:
        caller = Caller(server, signer)
        warm = caller.call(caller.body(None, ()))
        if warm["status"] != 200:
            raise SystemExit(f"{name}: warm-up call answered {warm}; log:\n{server.log_tail()}")
        [worker] = server.worker_pids()
        before = memory(worker)
        calls = run(caller, servers)
        time.sleep(1.0)
        after = memory(worker)
    finally:
        server.stop()
        for s in servers.values():
            s.close()
    return {
        "name": name,
        "calls": calls,
        "rss_before_mb": before["rss_mb"], "rss_after_mb": after["rss_mb"],
        "peak_before_mb": before["peak_rss_mb"], "peak_after_mb": after["peak_rss_mb"],
        "rss_growth_mb": round(after["rss_mb"] - before["rss_mb"], 1),
        "peak_growth_mb": round(after["peak_rss_mb"] - before["peak_rss_mb"], 1),
        "servers": {label: {"connections": s.connections,
                            "mb_sent": round(s.bytes_sent / 1e6, 2)}
                    for label, s in servers.items()},
    }


def one_call(label: str, missing: tuple[str, ...]):
    def run(caller: Caller, servers: dict[str, HostileFhirServer]) -> dict:
        return {"call": caller.call(caller.body(servers[label].url, missing))}
    return run


def beside_drip(caller: Caller, servers: dict[str, HostileFhirServer]) -> dict:
    alone = caller.call(caller.body(servers["healthy"].url, ("egfr",)))
    out: dict[str, Any] = {}
    stuck = threading.Thread(target=lambda: out.update(
        drip=caller.call(caller.body(servers["drip"].url, KEYS))))
    stuck.start()
    deadline = time.monotonic() + 5
    while servers["drip"].connections < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    out["healthy_alone"] = alone
    out["healthy_beside"] = caller.call(caller.body(servers["healthy"].url, ("egfr",)))
    stuck.join(30)
    return out


def refused(caller: Caller, servers: dict[str, HostileFhirServer]) -> dict:
    with ConnectionCounter() as listener:
        call = caller.call(caller.body(f"http://127.0.0.1:{listener.port}/fhir", KEYS))
        time.sleep(0.2)
        return {"call": call, "listener_connections": listener.accepted}


def run_all(say=print) -> dict:
    signer = Signer(_jwks_file())
    egfr = json.loads(pv_3kb(_now()).body(new_hook_instance()))["prefetch"]["egfr"]
    results = []
    with tempfile.TemporaryDirectory(prefix="fhir-bounds-") as directory:
        tmp = Path(directory)
        plans = [
            ("big-1key", {"big": lambda: HostileFhirServer(size=SIZE)},
             one_call("big", ("egfr",))),
            ("big-8keys", {"big": lambda: HostileFhirServer(size=SIZE)}, one_call("big", KEYS)),
            ("drip-1key", {"drip": lambda: HostileFhirServer(drip=DRIP_S)},
             one_call("drip", ("egfr",))),
            ("drip-headers-8keys", {"drip": lambda: HostileFhirServer(drip=DRIP_S,
                                                                      drip_in="headers")},
             one_call("drip", KEYS)),
            ("healthy-beside-drip",
             {"drip": lambda: HostileFhirServer(drip=DRIP_S),
              "healthy": lambda: HostileFhirServer(body=json.dumps(egfr).encode())},
             beside_drip),
            ("refused", {}, refused),
        ]
        for name, makers, run in plans:
            servers = {label: make() for label, make in makers.items()}
            result = scenario(name, tmp, signer, servers, run)
            say(f"{name}: {json.dumps(result['calls'])} peak +{result['peak_growth_mb']} MB")
            results.append(result)
    return {"environment": environment(), "deadline_s": DEADLINE_S, "drip_interval_s": DRIP_S,
            "answer_mib": SIZE / MIB, "scenarios": results, "targets": targets(results)}


def targets(results: list[dict]) -> dict:
    limit = DEADLINE_S + TARGET_SLACK_S
    slowest = max(c["seconds"] for r in results for c in r["calls"].values()
                  if isinstance(c, dict))
    peak = max(r["peak_growth_mb"] for r in results)
    beside = next(r for r in results if r["name"] == "healthy-beside-drip")["calls"]
    return {
        "answered_within_deadline_plus_0.5s": {"value": slowest, "limit": limit,
                                               "met": slowest <= limit},
        "peak_rss_growth_under_100mb": {"value": peak, "limit": TARGET_PEAK_GROWTH_MB,
                                        "met": peak < TARGET_PEAK_GROWTH_MB},
        "healthy_call_beside_drip": {
            "alone_s": beside["healthy_alone"]["seconds"],
            "beside_s": beside["healthy_beside"]["seconds"],
            "met": beside["healthy_beside"]["status"] == 200
            and beside["healthy_beside"]["seconds"] < 0.5},
    }


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# FHIR read bounds (bench.fhir_bounds)",
        "",
        f"{env['date']}, commit {env['git']['commit']}, Python {env['python']}, "
        f"{env['cpus_usable']} CPUs. One gunicorn worker per scenario; deadline "
        f"{report['deadline_s']} s; big answers {report['answer_mib']:g} MiB; drip one byte per "
        f"{report['drip_interval_s']} s. RSS in MB (10^6 bytes), 1 s after the scenario.",
        "",
        "| scenario | call | status | seconds | RSS before | RSS after | peak growth | "
        "servers saw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["scenarios"]:
        seen = ", ".join(f"{k}: {v['connections']} conn, {v['mb_sent']} MB"
                         for k, v in r["servers"].items())
        if "listener_connections" in r["calls"]:
            seen = f"listener: {r['calls']['listener_connections']} conn"
        for label, call in r["calls"].items():
            if not isinstance(call, dict):
                continue
            lines.append(f"| {r['name']} | {label} | {call['status']} | {call['seconds']:.2f} | "
                         f"{r['rss_before_mb']} | {r['rss_after_mb']} | "
                         f"{r['peak_growth_mb']} | {seen} |")
    t = report["targets"]
    within = t["answered_within_deadline_plus_0.5s"]
    lines += [
        "",
        "Targets:",
        "",
        f"- every call answered within deadline + 0.5 s ({within['limit']} s):"
        f" slowest {within['value']:.2f} s — {'met' if within['met'] else 'NOT met'}",
        f"- worker peak RSS growth < 100 MB: largest {t['peak_rss_growth_under_100mb']['value']} MB"
        f" — {'met' if t['peak_rss_growth_under_100mb']['met'] else 'NOT met'}",
        f"- healthy call beside a dripping one: {t['healthy_call_beside_drip']['beside_s']:.3f} s "
        f"(alone {t['healthy_call_beside_drip']['alone_s']:.3f} s) — "
        f"{'met' if t['healthy_call_beside_drip']['met'] else 'NOT met'}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = run_all()
    text = markdown(report)
    write_results(args.out, "fhir_bounds", report, text)
    print(text)  # noqa: T201 - the command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
