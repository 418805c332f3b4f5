"""bench/cohort_scale.py runs end to end on a tiny export and writes its figures (the figures
themselves are for the machine that ran it: not asserted)."""

from __future__ import annotations

import json

from bench import cohort_scale


def test_the_cohort_bench_writes_its_table_and_the_ten_million_estimate(tmp_path):
    assert cohort_scale.main(["--patients", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cohort_scale.json").read_text())
    [run] = result["runs"]
    assert run["patients"] == 3 and run["resources"] > 3 and run["export_mib_ndjson"] >= 0
    assert run["peak_rss_mib"] > 0 and run["seconds"] > 0
    table = (tmp_path / "cohort_scale.md").read_text()
    assert "| patients/s |" in table and "Ten million patients" in table
