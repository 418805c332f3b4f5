"""`python -m bench.compare`: this checkout and another commit served side by side, in turns.

No speed is asserted; only that both servers ran what they should and every figure is there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import compare
from bench.service_bench import ROOT, SITE_CONFIG, BenchError, Group, Server

needs_git = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="needs this repository's git history")


def test_the_other_commits_tree_comes_first_on_the_servers_path(tmp_path: Path) -> None:
    other = tmp_path / "code"
    server = Server(Group("service-other", "service", 1), tmp_path / "run", SITE_CONFIG,
                    code=other)
    assert server.environment()["PYTHONPATH"].split(":")[0] == str(other)
    this = Server(Group("service-this", "service", 1), tmp_path / "run", SITE_CONFIG)
    assert this.environment()["PYTHONPATH"].split(":")[0] == str(ROOT)


@needs_git
def test_archive_extracts_the_commit_and_names_it(tmp_path: Path) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert compare.archive("HEAD", tmp_path / "code") == head
    shown = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:cds_service/ids.py"],
                           capture_output=True, check=True).stdout
    assert (tmp_path / "code" / "cds_service" / "ids.py").read_bytes() == shown
    with pytest.raises(BenchError, match="does not know"):
        compare.archive("no-such-commit-anywhere", tmp_path / "nothing")


@needs_git
def test_a_quick_comparison_writes_every_figure(tmp_path: Path) -> None:
    assert compare.main(["HEAD", "--rounds", "2", "--requests", "6", "--warmup", "2",
                         "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare.json").read_text(encoding="utf-8"))
    assert report["non_200_total"] == 0
    assert report["other_rev"] == "HEAD" and len(report["other_commit"]) == 40
    for label in ("this", "other"):
        rounds = report["servers"][label]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(r["count"] == 6 and r["non_200"] == 0 for r in rounds)
        median = report["servers"][label]["median"]
        assert median["requests_per_s"] > 0 and median["server_p50_ms"] > 0
    for name in ("requests_per_s", "server_p50", "cpu_per_call"):
        assert len(report["ratios"][name]["rounds"]) == 2
        assert report["ratios"][name]["median"] is not None
    text = (tmp_path / "compare.md").read_text(encoding="utf-8")
    assert report["other_commit"][:10] in text and "req/s, this ÷ other" in text


def test_an_unknown_payload_is_refused_before_anything_starts() -> None:
    with pytest.raises(BenchError, match="no payload"):
        compare.compare("HEAD", payload="pv-9tb")
