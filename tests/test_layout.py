"""The layout's rules, read from the source: imports run one way (the library uses neither the
service nor the scripts; benchmarks use neither the tests nor private names), and no two modules
share a name."""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# top-level package -> the project's packages it must never import
FORBIDDEN = {
    "captioner": {"api", "training", "tests", "bench"},
    "training": {"api", "tests", "bench"},
    "api": {"training", "tests", "bench"},
    "bench": {"tests"},
}
PROJECT = {"captioner", "api", "training", "tests", "bench"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in `path`, relative ones resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT).parent.parts
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def _sources(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("top", sorted(FORBIDDEN))
def test_imports_run_one_way(top):
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in _sources(top)
        for module, _ in _imports(path)
        if module.split(".")[0] in FORBIDDEN[top]
    ]
    assert not wrong


def test_benchmarks_use_no_private_names_of_the_project():
    private = [
        f"{path.relative_to(ROOT)}: {module}.{name}"
        for path in _sources("bench")
        for module, names in _imports(path)
        if module.split(".")[0] in PROJECT
        for name in names
        if name.startswith("_")
    ]
    assert not private


def test_no_two_modules_share_a_name():
    names = Counter(
        path.name
        for top in ("captioner", "api", "training")
        for path in _sources(top)
        if path.name != "__init__.py"
    )
    assert [name for name, n in names.items() if n > 1] == []


def test_the_rules_see_a_wrong_import(tmp_path, monkeypatch):
    """The checks above can fail: a library module importing the service is caught."""
    bad = tmp_path / "captioner" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from api.app import create_app\nfrom . import _private\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _imports(bad) == [("api.app", ["create_app"]), ("captioner", ["_private"])]
    with pytest.raises(AssertionError):
        test_imports_run_one_way("captioner")
