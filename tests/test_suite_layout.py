"""The suite's own layout: shared code lives in tests/helpers/, fixtures arrive through
conftest's `pytest_plugins`, and no test module imports another one."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import in `path`, nested ones too; name is None for `import m`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = ".".join(path.relative_to(TESTS.parent).parent.parts)
            module = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}".rstrip(".")
            found.extend((module, alias.name) for alias in node.names)
    return found


def fixtures(path: Path) -> set[str]:
    """Names of the functions in `path` decorated with `pytest.fixture` (called or not)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) in ("pytest.fixture", "fixture"):
                    names.add(node.name)
    return names


def test_no_module_of_the_suite_imports_a_test_module():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for module, name in imports(path):
            imported = f"{module}.{name}" if module == "tests" and name else module
            if imported.startswith("tests.test_"):
                offenders.append(f"{path.relative_to(TESTS.parent)} imports {imported}")
    assert offenders == [], "move what they share into tests/helpers/"


def test_no_test_module_imports_a_fixture():
    shared = {path.relative_to(TESTS.parent).with_suffix("").as_posix().replace("/", "."):
              fixtures(path) for path in [TESTS / "conftest.py", *TESTS.glob("helpers/*.py")]}
    assert shared["tests.helpers.fhir_server"] >= {"fhir_server"}  # the scan finds fixtures
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        for module, name in imports(path):
            if name in shared.get(module, ()):
                offenders.append(f"{path.name} imports the fixture {module}.{name}")
    assert offenders == [], "list the module in tests/conftest.py's pytest_plugins instead"
