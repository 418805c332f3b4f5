"""Benchmarks of the service (`python -m bench.<name>`); see each module."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, name: str, report: dict, markdown: str) -> tuple[Path, Path]:
    """`out/<name>.json` (every figure) and `out/<name>.md` (the tables); their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return json_path, md_path
