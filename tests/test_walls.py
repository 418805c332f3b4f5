"""The walls (issue 17): feature extraction and the services' clinical logic import nothing from
the HTTP layer, the FHIR client, prefetch, the store or metrics; timing is the caller's job
(`HookRequest.stage`).

Read from the source with `ast`, so an import inside a function or an `if TYPE_CHECKING:` block
counts too. A module is matched by its dotted parts, not its full path, so the rule holds for
the flat `cds_service` and for its packages (`cds_service.ops.metrics`, `cds_service.data.fhir`,
`cds_service.protocol.views`, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Last dotted parts of cds_service modules on the far side of the wall: metrics, the FHIR client
# and prefetch (and the modules they are built from), the HTTP layer, and the store with the
# records modules it is built from (`tables`, `database`, `overrides`, `recorder`, `spool`).
FORBIDDEN = frozenset({"metrics", "store", "fhir", "fhir_client", "read_budget", "prefetch",
                       "prefetch_values", "prefetch_fallback", "prefetch_resolve", "views", "http",
                       "spool", "tables", "database", "overrides", "recorder"})
WALLED = sorted(
    {*(ROOT / "hooks").glob("*.py"),  # the services and their shared _ modules
     *(ROOT / "cds_service").glob("features*.py"),
     *(ROOT / "cds_service" / "features").rglob("*.py")})


def imported(path: Path, root: Path = ROOT) -> set[str]:
    """Every module named by an import in `path` (under `root`), absolute; `from a import b`
    gives a and a.b (b may be a module)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def crosses_wall(module: str) -> bool:
    top, *rest = module.split(".")
    return top == "flask" or (top == "cds_service" and bool(FORBIDDEN & set(rest)))


@pytest.mark.parametrize(("module", "crosses"), [
    ("flask", True),
    ("flask.g", True),
    ("cds_service.metrics", True),
    ("cds_service.ops.metrics", True),
    ("cds_service.ops.metrics.stage", True),
    ("cds_service.store.Call", True),
    ("cds_service.records.store", True),
    ("cds_service.fhir", True),
    ("cds_service.data.fhir", True),
    ("cds_service.data.prefetch.Prefetch", True),
    ("cds_service.data.fhir_client", True),
    ("cds_service.data.prefetch_resolve.resolve_prefetch", True),
    ("cds_service.protocol.views", True),
    ("cds_service.protocol.http", True),
    ("cds_service.records.spool", True),
    ("cds_service.records.tables", True),
    ("cds_service.records.database.StoreUnavailable", True),
    ("cds_service.records.overrides", True),
    ("cds_service.records.recorder.Recorder", True),
    ("cds_service.features", False),
    ("cds_service.features.codes", False),
    ("cds_service.cards", False),
    ("cds_service.protocol.cards", False),
    ("cds_service.registry", False),
    ("cds_service.data.units", False),
    ("metrics", False),  # not ours: a third-party module of that name
    ("hooks._kidney", False),
])
def test_the_wall_is_drawn_by_module_name(module, crosses):
    assert crosses_wall(module) is crosses


def test_relative_imports_are_resolved(tmp_path):
    package = tmp_path / "cds_service" / "features"
    package.mkdir(parents=True)
    (package / "engine.py").write_text("from ..ops import metrics\nfrom . import codes\n")
    names = imported(package / "engine.py", root=tmp_path)
    assert {"cds_service.ops.metrics", "cds_service.features.codes"} <= names
    assert crosses_wall("cds_service.ops.metrics")


def test_the_walled_modules_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in WALLED}
    assert {"hooks/_kidney.py", "hooks/_medications.py", "hooks/_prescribing.py",
            "hooks/kidney_risk.py", "hooks/nephrotoxic_order_check.py"} <= names
    assert any(name.startswith("cds_service/features") for name in names)


@pytest.mark.parametrize("path", WALLED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_clinical_code_imports_nothing_past_the_wall(path):
    assert sorted(m for m in imported(path) if crosses_wall(m)) == []


# --- the house: no import cycles, no module over 500 lines, models and trust in their rooms ---

OURS = sorted({*(ROOT / "cds_service").rglob("*.py"), *(ROOT / "hooks").glob("*.py")})
MAX_LINES = 500


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths, root: Path = ROOT) -> dict[str, set[str]]:
    """Our module → our modules it imports (runtime or type-only: `imported` reads them all)."""
    modules = {module_name(path, root): path for path in paths}
    return {name: {m for m in imported(path, root) if m in modules and m != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_type_only_cycle(tmp_path):
    package = tmp_path / "cds_service"
    package.mkdir()
    (package / "config.py").write_text("from cds_service.service import Service\n")
    (package / "service.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from cds_service.config import Site\n")
    (package / "app.py").write_text("from cds_service import config\n")
    graph = import_graph(sorted(package.glob("*.py")), root=tmp_path)
    assert cycles(graph) == [["cds_service.config", "cds_service.service"]]


def test_no_import_cycles():
    assert cycles(import_graph(OURS)) == []


def test_no_module_of_the_service_is_over_500_lines():
    lengths = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
               for path in (ROOT / "cds_service").rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("path", sorted((ROOT / "cds_service" / "models").glob("*.py")),
                         ids=lambda p: p.name)
def test_models_import_nothing_from_the_http_layer(path):
    # protocol.errors is the exception root (no Flask in it); the rest of protocol/ is HTTP.
    http = ("flask", "flask_smorest", "webargs", "werkzeug", "cds_service.protocol.views",
            "cds_service.protocol.http", "cds_service.protocol.schemas")
    assert sorted(m for m in imported(path)
                  if any(m == h or m.startswith(h + ".") for h in http)) == []


@pytest.mark.parametrize("path", sorted((ROOT / "cds_service" / "trust").glob("*.py")),
                         ids=lambda p: p.name)
def test_trust_code_knows_no_clinical_service(path):
    assert sorted(m for m in imported(path) if m.split(".")[0] == "hooks") == []
    text = path.read_text(encoding="utf-8")
    assert not [s for s in ("kidney", "nephrotoxic", "egfr") if s in text.lower()]
