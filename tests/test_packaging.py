"""The installed package (the Docker image installs it non-editable) carries every data file the
code reads: a file left out of `[tool.setuptools.package-data]` works in a checkout and fails
at import in the image."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_data_file_of_the_packages_is_declared_as_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = config["tool"]["setuptools"]["package-data"]
    undeclared = []
    for package in ("cds_service", "hooks"):
        root = ROOT / package
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            owner = path.parent
            while not (owner / "__init__.py").exists():  # the package a data dir belongs to
                owner = owner.parent
            relative = path.relative_to(owner)
            name = ".".join(owner.relative_to(ROOT).parts)
            if not any(relative.match(pattern) for pattern in package_data.get(name, ())):
                undeclared.append(str(path.relative_to(ROOT)))
    assert undeclared == []
