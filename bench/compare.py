"""This checkout's service against another commit's, side by side: was a change faster?

    python -m bench.compare eda93a9                      # 12 rounds of 400 x pv-3kb
    python -m bench.compare eda93a9 --payload pv-1000obs --rounds 6 --requests 40
    python -m bench.compare HEAD~3 --out /tmp/cmp        # default: bench/results

The other commit's tree is taken with `git archive` into a temporary directory and served by
this virtualenv (so it must run on the dependencies installed now); this checkout is served as
it is, uncommitted changes included. Both get the same site (this checkout's `site_config`, the
demo's development key) and the same server settings as `bench.service_bench`'s service-1w: one
worker, `--max-requests 0`, JSON logs at WARNING to a file, pinned to CPU 0 with the load
generator on CPU 1 (`--no-pin`: every CPU shared).

Both servers start together and take turns: each round sends `--requests` calls of one payload
(over one keep-alive connection, a fresh token and hookInstance per call) to each server, the
order alternating from round to round, after `--warmup` unrecorded calls each. This machine's
speed drifts by a third within minutes (issue 20), so one server measured after the other
compares two moments, not two programs; in turns, a drift moves both. Reported per round and as
medians: requests/s, server-side total p50/p99 (`Server-Timing`), client p50, CPU per call of
the worker, and each round's ratio of this checkout to the other commit. Written to
`OUT/compare.json` and `OUT/compare.md`; exit 1 if any response was not 200.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import load, write_results
from bench.payloads import build
from bench.service_bench import (
    DEFAULT_OUT,
    HOST,
    REQUEST_TIMEOUT_S,
    ROOT,
    SITE_CONFIG,
    Batch,
    BenchError,
    Group,
    Server,
    Signer,
    _jwks_file,
    _median,
    check_payload,
    environment,
    measured,
    pinning,
)

ROUNDS, REQUESTS, WARMUP = 12, 400, 100
THIS, OTHER = "this", "other"


def archive(rev: str, into: Path) -> str:
    """Extract commit `rev` of this repository into `into`; its full hash. BenchError if git
    does not know it."""
    def git(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], check=False,  # noqa: S603, S607
                              capture_output=True, **kwargs)

    found = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", text=True)
    if found.returncode != 0:
        raise BenchError(f"git does not know the commit {rev!r} in {ROOT}")
    commit = found.stdout.strip()
    into.mkdir(parents=True)
    tar = git("archive", "--format=tar", commit)
    if tar.returncode != 0:
        raise BenchError(f"git archive {commit}: {tar.stderr.decode(errors='replace').strip()}")
    unpacked = subprocess.run(["tar", "-x", "-C", str(into)], input=tar.stdout,  # noqa: S603, S607
                              capture_output=True, check=False)
    if unpacked.returncode != 0:
        raise BenchError(f"tar: {unpacked.stderr.decode(errors='replace').strip()}")
    return commit


def compare(rev: str, *, payload: str = "pv-3kb", rounds: int = ROUNDS,
            requests: int = REQUESTS, warmup: int = WARMUP, pin: bool | None = None,
            say=print) -> dict:
    payloads = build()
    if payload not in payloads:
        raise BenchError(f"no payload {payload!r}; one of {', '.join(payloads)}")
    if rounds < 1 or requests < 1 or warmup < 0:
        raise BenchError("rounds and requests must be >= 1, warmup >= 0")
    signer = Signer(_jwks_file())
    pins = pinning(pin)
    usable = os.sched_getaffinity(0)
    tmp = Path(tempfile.mkdtemp(prefix="cds-bench-compare-"))
    try:
        commit = archive(rev, tmp / "code")
        servers = {label: Server(Group(f"service-{label}", "service", 1), tmp / label,
                                 SITE_CONFIG, cpus=pins and pins[0],
                                 code=tmp / "code" if label == OTHER else None)
                   for label in (THIS, OTHER)}
        if pins:
            os.sched_setaffinity(0, pins[1])
        figures: dict[str, list[dict]] = {label: [] for label in servers}
        try:
            batches = {}
            for label, server in servers.items():
                server.start()
                check_payload(server, payloads[payload], signer)
                batches[label] = Batch(server, payloads[payload], warmup + rounds * requests,
                                       signer)
                if warmup:
                    load.run(HOST, server.port, batches[label], warmup,
                             timeout=REQUEST_TIMEOUT_S)
            order = list(servers)
            for r in range(rounds):
                offset = warmup + r * requests
                for label in order[r % 2:] + order[:r % 2]:
                    server, batch = servers[label], batches[label]
                    figures[label].append({"round": r + 1, **measured(
                        server, lambda s=server, b=batch, o=offset: load.run(
                            HOST, s.port, lambda i: b(o + i), requests,
                            timeout=REQUEST_TIMEOUT_S))})
                say(f"round {r + 1}: " + ", ".join(
                    f"{label} {figures[label][-1]['requests_per_s']} req/s" for label in order))
        finally:
            for server in servers.values():
                server.stop()
    finally:
        os.sched_setaffinity(0, usable)
        shutil.rmtree(tmp, ignore_errors=True)

    def per_round(value) -> list[float | None]:
        """this ÷ other of `value(round's figures)`, round by round."""
        out = []
        for mine, theirs in zip(figures[THIS], figures[OTHER], strict=True):
            a, b = value(mine), value(theirs)
            out.append(round(a / b, 3) if a is not None and b else None)
        return out

    ratios = {"requests_per_s": per_round(lambda f: f["requests_per_s"]),
              "server_p50": per_round(lambda f: f["server_ms"].get("total", {}).get("p50")),
              "cpu_per_call": per_round(lambda f: f["server_cpu_ms_per_request"])}
    return {
        "benchmark": "compare",
        "environment": environment(),
        "other_commit": commit,
        "other_rev": rev,
        "payload": payload,
        "rounds": rounds,
        "requests_per_round": requests,
        "warmup": warmup,
        "pin": {"server_cpus": sorted(pins[0]), "client_cpus": sorted(pins[1])} if pins
        else None,
        "servers": {label: {"median": {
            "requests_per_s": _median([f["requests_per_s"] for f in rows]),
            "server_p50_ms": _median([f["server_ms"].get("total", {}).get("p50")
                                      for f in rows]),
            "server_p99_ms": _median([f["server_ms"].get("total", {}).get("p99")
                                      for f in rows]),
            "client_p50_ms": _median([f["client_ms"]["p50"] for f in rows]),
            "cpu_ms_per_call": _median([f["server_cpu_ms_per_request"] for f in rows]),
        }, "rounds": rows} for label, rows in figures.items()},
        "ratios": {name: {"rounds": values, "median": _median(values)}
                   for name, values in ratios.items()},
        "non_200_total": sum(f["non_200"] for rows in figures.values() for f in rows),
    }


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown(report: dict) -> str:
    env, git = report["environment"], report["environment"].get("git") or {}
    this = (git.get("commit") or "?")[:10] + (" + uncommitted changes"
                                               if git.get("uncommitted_changes") else "")
    pin = report["pin"]
    lines = [
        "# Side by side: this checkout against another commit",
        "",
        f"`python -m bench.compare {report['other_rev']}`, {env['date']}: this checkout "
        f"({this}) against {report['other_commit'][:10]}, {report['payload']}, "
        f"{report['rounds']} rounds of {report['requests_per_round']} calls each after "
        f"{report['warmup']} warm-up calls, one worker each, taking turns; "
        + (f"servers on CPU {', '.join(map(str, pin['server_cpus']))}, the load generator on "
           f"CPU {', '.join(map(str, pin['client_cpus']))}." if pin
           else "client and servers sharing every CPU."),
        "",
        "| server | req/s | server p50 / p99 ms | client p50 ms | CPU ms per call |",
        "|---|--:|--:|--:|--:|",
    ]
    for label, name in ((THIS, "this checkout"), (OTHER, report["other_commit"][:10])):
        m = report["servers"][label]["median"]
        lines.append(f"| {name} | {_f(m['requests_per_s'], 1)} | {_f(m['server_p50_ms'])} / "
                     f"{_f(m['server_p99_ms'])} | {_f(m['client_p50_ms'])} | "
                     f"{_f(m['cpu_ms_per_call'])} |")
    lines.append("")
    for name, label in (("requests_per_s", "req/s"), ("server_p50", "server p50"),
                        ("cpu_per_call", "CPU per call")):
        ratio = report["ratios"][name]
        lines.append(f"- {label}, this ÷ other: median {_f(ratio['median'])} (rounds: "
                     f"{', '.join(_f(v, 2) for v in ratio['rounds'])})")
    lines += ["", f"Non-200 responses: {report['non_200_total']}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="This checkout's service against another commit's, taking turns.")
    parser.add_argument("rev", help="the other commit (a hash, tag, branch, HEAD~1, ...)")
    parser.add_argument("--payload", default="pv-3kb",
                        help="pv-3kb, pv-100obs, pv-1000obs or os-10orders (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--requests", type=int, default=REQUESTS, help="per server and round")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="per server, not recorded")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction,
                        help="servers on CPU 0, the load generator on the second usable CPU "
                             "(default: on when 2+ CPUs are usable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for compare.json and compare.md (default: %(default)s)")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        sys.stderr.write(text + "\n")

    try:
        report = compare(args.rev, payload=args.payload, rounds=args.rounds,
                         requests=args.requests, warmup=args.warmup, pin=args.pin, say=say)
    except BenchError as exc:
        sys.stderr.write(f"compare: {exc}\n")
        return 2
    text = markdown(report)
    try:
        json_path, md_path = write_results(args.out, "compare", report, text)
    except OSError as exc:
        sys.stderr.write(f"compare: cannot write the results to {args.out}: {exc}\n")
        return 2
    sys.stdout.write(text + f"\nwrote {json_path} and {md_path}\n")
    return 1 if report["non_200_total"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
