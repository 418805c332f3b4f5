"""The HTTP benchmark runs end to end (quick mode) against real servers and writes complete
results; its payloads, load generator and floor app do what the figures rely on.

No speed is asserted: the numbers depend on the machine; only their presence and shape are.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from bench import load, payloads, service_bench
from bench.floor_app import create_app as create_floor_app
from bench.peer import venv as peer_venv
from bench.service_bench import GROUPS, QUICK, main
from tests.helpers.loopback import LoopbackHTTPServer

PEERS = tuple(g for g in GROUPS if g.kind == "peer")

NOW = datetime(2026, 11, 21, tzinfo=UTC)
SERVICE_STAGES = ("auth", "prefetch", "features", "model", "cards", "rest", "total")


def test_quick_run_writes_every_group_and_scenario(tmp_path: Path, capsys) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "service.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "service.md").read_text(encoding="utf-8")
    assert report["mode"] == "quick"
    for key in ("date", "python", "platform", "cpu_count", "cpus_usable"):
        assert report["environment"][key]
    assert report["environment"]["libraries"]["gunicorn"]
    assert set(report["payloads"]) == {"pv-3kb", "pv-100obs", "pv-1000obs", "os-10orders"}
    run = [g for g in GROUPS if g.kind != "peer"]  # quick runs leave the peer out
    assert [g["name"] for g in report["groups"]] == [g.name for g in run]
    assert [g["group"] for g in report["peer"]["not_run"]] == [g.name for g in PEERS]
    assert "Not run: not asked for" in markdown

    for group, spec in zip(report["groups"], run, strict=True):
        name = group["name"]
        assert [(s["payload"], s["connections"]) for s in group["scenarios"]] == list(
            spec.scenarios), name
        for s in group["scenarios"]:
            where = (name, s["payload"], s["connections"])
            assert s["count"] == QUICK.counts[(s["payload"], s["connections"])], where
            assert s["non_200"] == 0 and s["statuses"] == {"200": s["count"]}, where
            assert s["requests_per_s"] > 0 and s["elapsed_s"] > 0, where
            assert 0 < s["client_ms"]["p50"] <= s["client_ms"]["p95"] <= s["client_ms"]["p99"]
            assert s["payload_bytes"] == report["payloads"][s["payload"]]["bytes"], where
            assert s["response_bytes"] > 1000, where
            assert s["server_cpu_ms_per_request"] >= 0 and s["other_cpu_share"] >= 0, where
            total = s["server_ms"]["total"]
            assert total["n"] == s["count"] and 0 < total["p50"] <= total["p95"] <= total["p99"]
            if group["server"] == "service":
                for stage in SERVICE_STAGES:  # every call reports every stage it went through
                    assert s["server_ms"][stage]["n"] == s["count"], (where, stage)
                    assert s["server_ms"][stage]["p50"] <= s["server_ms"][stage]["p95"]
                assert s["server_ms"]["rest"]["p50"] >= 0 and "fhir_fallback" not in s["server_ms"]
            else:
                assert set(s["server_ms"]) == {"total"}, where
            row = f"| {s['payload']} | {s['connections']} | {s['count']:,} | 0 |"
            assert row in markdown, (where, row)

        memory = group["memory"]
        assert len(memory["workers"]) == group["workers"] == spec.workers
        pids = {memory["master"]["pid"], *(w["pid"] for w in memory["workers"])}
        assert len(pids) == group["workers"] + 1
        for process in (memory["master"], *memory["workers"]):
            assert process["rss_mb"] > 10 and process["peak_rss_mb"] >= process["rss_mb"]
            assert process["pss_mb"] > 0
        assert f"## {name}" in markdown

    models = {g["name"]: {m["id"] for m in g["models"]} for g in report["groups"]
              if g["server"] == "service"}
    assert models == {"service-1w": {"kfre-4var"}, "service-2w": {"kfre-4var"},
                      "service-shadow-2w": {"kfre-4var", "ckd-progression-lr"},
                      "service-1w-shared": {"kfre-4var"}, "service-2w-shared": {"kfre-4var"}}
    assert [g["name"] for g in report["groups"] if g["shared_cpus"]] == [
        "service-1w-shared", "service-2w-shared"]
    floor = next(g for g in report["groups"] if g["server"] == "floor")
    assert floor["models"] is None

    # The side-by-side rounds: floor and service (the peer only when asked), taking turns.
    rounds = report["rounds"]
    assert list(rounds["servers"]) == ["floor", "service", "service-orders"]
    assert rounds["rounds"] == QUICK.rounds
    assert [s["payload"] for s in rounds["servers"].values()] == ["pv-3kb", "pv-3kb",
                                                                  "os-10orders"]
    for kind, figures in rounds["servers"].items():
        assert [r["round"] for r in figures["rounds"]] == list(range(1, QUICK.rounds + 1))
        for r in figures["rounds"]:
            assert r["count"] == QUICK.round_count and r["statuses"] == {"200": r["count"]}, kind
        each = sorted(r["requests_per_s"] for r in figures["rounds"])
        assert each[0] <= figures["median"]["requests_per_s"] <= each[-1]
        assert figures["median"]["non_200"] == 0
    ratio = rounds["ratios"]["service_vs_floor"]
    assert ratio["rounds"] == [
        round(a["requests_per_s"] / b["requests_per_s"], 3)
        for a, b in zip(rounds["servers"]["service"]["rounds"],
                        rounds["servers"]["floor"]["rounds"], strict=True)]
    assert min(ratio["rounds"]) <= ratio["median"] <= max(ratio["rounds"])
    orders = rounds["ratios"]["orders_vs_pv"]
    assert len(orders["rounds"]) == QUICK.rounds
    assert min(orders["rounds"]) <= orders["median"] <= max(orders["rounds"])
    assert "## Side by side: pv-3kb, 1 worker, sequential" in markdown

    targets = report["targets"]
    assert targets["ratio_vs_floor_3kb_1w_seq"]["value"] == ratio["median"]
    assert targets["orders_vs_pv_1w_seq"]["value"] == orders["median"]
    assert targets["server_p50_3kb_ms"]["value"] == (
        rounds["servers"]["service"]["median"]["server_ms"]["p50"])
    for key in ("ratio_vs_floor_3kb_1w_seq", "server_p50_3kb_ms", "server_p99_3kb_ms",
                "server_p50_1mb_ms", "server_p99_1mb_ms", "orders_vs_pv_1w_seq",
                "scaling_2w_vs_1w_16c", "rss_per_worker_both_models_mb"):
        assert targets[key]["value"] > 0, key
        assert targets[key]["met"] in (True, False), key
        assert targets[key]["what"] in markdown
    peer = targets["ratio_vs_peer_3kb_1w_seq"]
    assert peer["value"] is None and peer["target"] == ">= 1 (stretch 1.5)"
    assert targets["non_200_total"] == {**targets["non_200_total"], "value": 0, "met": True}
    assert report["non_200_total"] == 0
    assert str(tmp_path / "service.json") in capsys.readouterr().out


def test_peer_not_run_when_its_virtualenv_cannot_be_built(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    report = service_bench.run(QUICK, groups=PEERS, say=lambda _: None, peer_cache=blocked,
                               pin=False, headline=False)
    assert report["groups"] == [] and report["non_200_total"] == 0
    reason = report["peer"]["reason"]
    assert reason.startswith("cannot build") and str(blocked) in reason
    assert report["peer"]["not_run"] == [{"group": g.name, "reason": reason} for g in PEERS]
    text = service_bench.markdown(report)
    assert f"## peer-1w\n\nNot run: {reason}" in text and "**Not run**" in text


def test_peer_virtualenv_failing_install_and_reuse(tmp_path: Path) -> None:
    with pytest.raises(peer_venv.Unavailable, match="exited with"):
        peer_venv.ensure(tmp_path, say=lambda _: None, python="/bin/false")
    assert peer_venv.ready(tmp_path) is None
    # A stamped virtualenv with the same requirements is reused: nothing is run.
    venv = tmp_path / peer_venv.NAME
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    stamp = {"requirements": list(peer_venv.REQUIREMENTS), "versions": {"healthchain": "0.16.1"}}
    (venv / peer_venv.STAMP).write_text(json.dumps(stamp))
    assert peer_venv.ensure(tmp_path, python="/bin/false") == (venv / "bin" / "python", stamp)
    stamp["requirements"] = ["healthchain==0.15.0"]
    (venv / peer_venv.STAMP).write_text(json.dumps(stamp))
    assert peer_venv.ready(tmp_path) is None


@pytest.mark.skipif(peer_venv.ready(peer_venv.default_cache()) is None,
                    reason="the peer's virtualenv is not built (python -m bench.service_bench)")
def test_peer_groups_answer_every_payload_when_built() -> None:
    report = service_bench.run(QUICK, groups=PEERS, say=lambda _: None)
    assert report["peer"]["not_run"] == [] and report["peer"]["versions"]["healthchain"]
    rounds = report["rounds"]
    assert list(rounds["servers"]) == ["floor", "service", "peer", "service-orders"]
    assert all(r["statuses"] == {"200": QUICK.round_count}
               for r in rounds["servers"]["peer"]["rounds"])
    assert report["targets"]["ratio_vs_peer_3kb_1w_seq"]["value"] == (
        rounds["ratios"]["service_vs_peer"]["median"])
    assert [g["name"] for g in report["groups"]] == [g.name for g in PEERS]
    for group, spec in zip(report["groups"], PEERS, strict=True):
        assert [(s["payload"], s["connections"]) for s in group["scenarios"]] == list(
            spec.scenarios)
        for s in group["scenarios"]:
            assert s["statuses"] == {"200": s["count"]} and s["server_ms"] == {}
            assert s["server_cpu_ms_per_request"] > 0
        workers = group["memory"]["workers"]
        assert len(workers) == spec.workers and all(w["rss_mb"] > 10 for w in workers)
        if spec.workers == 1:  # uvicorn serves in its only process
            assert workers[0]["pid"] == group["memory"]["master"]["pid"]


def test_pinning_splits_the_usable_cpus() -> None:
    assert service_bench.pinning(False) is None
    usable = os.sched_getaffinity(0)
    pins = service_bench.pinning(None)
    if len(usable) < 2:
        assert pins is None
    else:
        server, client = pins
        assert len(client) == 1 and server | client == usable and not server & client


def test_payloads_have_the_documented_shape_and_size() -> None:
    built = payloads.build(NOW)
    assert built == payloads.build(NOW)  # deterministic for a given date
    sizes = {name: p.size for name, p in built.items()}
    assert 2500 <= sizes["pv-3kb"] <= 3500
    assert 900_000 <= sizes["pv-1000obs"] <= 1_400_000
    assert sizes["pv-100obs"] < sizes["pv-1000obs"] / 5

    for p in built.values():
        first, second = payloads.new_hook_instance(), payloads.new_hook_instance()
        body = json.loads(p.body(first))
        assert body["hookInstance"] == first and body["hook"] == p.hook
        assert len(p.body(second)) == p.size and p.body(first) != p.body(second)

    for name, n in (("pv-100obs", 100), ("pv-1000obs", 1000)):
        prefetch = json.loads(built[name].body(payloads.new_hook_instance()))["prefetch"]
        observations = [e["resource"] for v in prefetch.values() if v.get("type") == "searchset"
                        for e in v.get("entry", ()) if e["resource"]["resourceType"]
                        == "Observation"]
        assert len(observations) == n == built[name].counts["observations"]
        assert len({o["id"] for o in observations}) == n
        for bundle in prefetch.values():
            dates = [e["resource"].get("effectiveDateTime") for e in bundle.get("entry", ())]
            dates = [d for d in dates if d]
            assert dates == sorted(dates, reverse=True)  # _sort=-date
            assert all(d < NOW.isoformat() for d in dates)

    orders = json.loads(built["os-10orders"].body(payloads.new_hook_instance()))["context"]
    drafts = [e["resource"] for e in orders["draftOrders"]["entry"]]
    assert len(drafts) == 10 and {d["status"] for d in drafts} == {"draft"}
    [selected] = orders["selections"]
    nsaid = next(d for d in drafts if d["medicationCodeableConcept"]["coding"][0]["code"] == "5640")
    assert selected == f"MedicationRequest/{nsaid['id']}"


def test_payload_verify_names_what_is_wrong() -> None:
    pv = payloads.build(NOW)["pv-3kb"]
    scored = "Kidney failure risk 8% at 2 years, 24% at 5 years (eGFR 28)"
    assert pv.verify({"cards": [{"summary": scored}]}) is None
    assert "expected 1 card" in pv.verify({"cards": []})
    assert "no model score" in pv.verify({"cards": [{"summary": "CKD G4: eGFR 28"}]})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/slow":
            time.sleep(1.0)
        status = 503 if self.path == "/fail" else 200
        body = b'{"cards": []}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Server-Timing", "auth;dur=0.25, total;dur=1.5")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server():
    server = LoopbackHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", load.MODES)
def test_load_sends_exactly_the_count_and_counts_failures(http_server, mode) -> None:
    paths = {3: "/fail", 7: "/slow"}
    sent = []

    def build(i: int) -> load.Request:
        sent.append(i)
        return paths.get(i, "/ok"), {"Content-Type": "application/json"}, b'{"i": %d}' % i

    result = load.run("127.0.0.1", http_server, build, 40, connections=4, warmup_count=8,
                      mode=mode, timeout=0.3)
    assert result.mode == mode and result.connections == 4
    assert len(result.samples) == 40 and result.elapsed_s > 0
    statuses = sorted(s.status for s in result.samples)
    assert statuses == [0] + [200] * 38 + [503]
    [timed_out] = [s for s in result.samples if s.status == 0]
    assert timed_out.error == "TimeoutError" and timed_out.latency_ns >= 0.3e9
    ok = [s for s in result.samples if s.status == 200]
    assert {s.server_timing for s in ok} == {"auth;dur=0.25, total;dur=1.5"}
    if mode == "threads":  # in processes mode `build` runs in the children
        assert sorted(sent) == sorted([*range(8), *range(40)])


def test_sequential_run_uses_one_connection(http_server) -> None:
    result = load.run("127.0.0.1", http_server, lambda i: ("/ok", {}, b"{}"), 5)
    assert result.mode == "sequential" and [s.status for s in result.samples] == [200] * 5


@pytest.mark.parametrize(("header", "parsed"), [
    ("auth;dur=0.123, prefetch;dur=1, total;dur=2.5",
     {"auth": 0.123, "prefetch": 1.0, "total": 2.5}),
    ("total;desc=\"all\";dur=3", {"total": 3.0}),
    ("cache, model;dur=x, cards;dur=0.5", {"cards": 0.5}),
    ("", {}),
    (None, {}),
])
def test_parse_server_timing(header, parsed) -> None:
    assert load.parse_server_timing(header) == parsed


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert [load.percentile(values, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert load.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        load.percentile([], 50)


def test_summary_counts_every_non_200() -> None:
    samples = [load.Sample(1_000_000, 200, 10, "auth;dur=0.1, total;dur=0.5"),
               load.Sample(2_000_000, 401, 10, "total;dur=0.2"),
               load.Sample(30_000_000, 0, 0, None, "TimeoutError")]
    figures = service_bench.summarize(load.Result(samples, 1.0), server_cpu_s=0.01,
                                      client_cpu_s=0.01, machine_cpu_s=0.02)
    assert figures["non_200"] == 2
    assert figures["statuses"] == {"200": 1, "401": 1, "0": 1}
    assert figures["errors"] == {"TimeoutError": 1}
    assert figures["server_ms"]["total"]["n"] == 1  # stage times of 200s only
    assert figures["requests_per_s"] == 3.0


def test_floor_app_parses_the_body_and_times_itself() -> None:
    client = create_floor_app().test_client()
    body = payloads.build(NOW)["pv-3kb"].body(payloads.new_hook_instance())
    response = client.post("/cds-services/kidney-risk", data=body,
                           content_type="application/json")
    assert response.status_code == 200
    assert len(response.get_json()["cards"]) == 1
    assert load.parse_server_timing(response.headers["Server-Timing"])["total"] > 0
    refused = client.post("/cds-services/kidney-risk", data=b"[]",
                          content_type="application/json")
    assert refused.status_code == 400
