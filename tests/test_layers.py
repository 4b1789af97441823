"""The package's layers, as the README's Layout section draws them: imports point one way.

The front ends (the magics, the API, the tools, the server, the pytest plugin) use the engine;
the engine uses the cells it runs, the state it encodes and the store it records into; those
use only the data contract. A lower layer that imports a higher one fails here, deferred
imports inside functions included.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "durable_nb"

# What each part may import of durable_nb's own modules, besides itself.
CONTRACT = {"records", "options", "errors", "magic_lines", "crash_points", "backoff"}
ALLOWED: dict[str, set[str]] = {
    **{name: CONTRACT for name in CONTRACT},
    "state": CONTRACT,
    "store": CONTRACT,
    "cells": CONTRACT | {"state"},
    "engine": CONTRACT | {"state", "store", "cells"},
}
FRONT_ENDS = {"ipython", "tools", "server", "pytest_plugin", "api", "__init__", "__main__"}


def _part(module: str) -> str:
    """The layer a dotted module belongs to: durable_nb.store.db -> store."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("durable_nb")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("durable_nb"):
                if node.module is None or target == "durable_nb":  # from . import a, b
                    found |= {f"{target}.{alias.name}" for alias in node.names}
                else:
                    found.add(target)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_part() -> None:
    parts = {_part(_module_of(path)) for path in MODULES}
    assert parts <= set(ALLOWED) | FRONT_ENDS, parts - set(ALLOWED) - FRONT_ENDS


def _upward_imports(path: Path) -> list[str]:
    """The modules `path` imports that its part may not."""
    own = _part(_module_of(path))
    return sorted(target for target in _imports(path)
                  if _part(target) not in ALLOWED[own] | {own, "__init__"})


@pytest.mark.parametrize("path", [p for p in MODULES if _part(_module_of(p)) in ALLOWED],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path: Path) -> None:
    own = _part(_module_of(path))
    wrong = _upward_imports(path)
    assert not wrong, f"{own} may import only {sorted(ALLOWED[own])}; found {wrong}"


def test_the_checker_sees_a_deferred_upward_import(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The check itself can fail: a function-level import of the engine from the store.
    source = tmp_path / "durable_nb" / "store" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..engine import executor\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "durable_nb")
    assert _upward_imports(source) == ["durable_nb.engine"]


def _layout_modules() -> set[str]:
    """The modules the README's Layout section names, as paths inside the package."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named: set[str] = set()
    package = ""
    for line in block.splitlines():
        folder = re.match(r"^  (\w+)/", line)
        if folder:
            package = folder.group(1) + "/"
        elif re.match(r"^  \S", line) or not line.strip():
            package = ""  # a top-level entry
        if re.match(r"^(tests|notebooks|benchmarks|docs)/", line):
            break
        named |= {package + name for name in re.findall(r"\b(\w+\.py)\b", line)}
    return named


def test_the_readme_layout_names_every_module() -> None:
    modules = {str(path.relative_to(PACKAGE)) for path in MODULES
               if path.name != "__init__.py" or path.parent == PACKAGE}
    layout = _layout_modules()
    assert modules - layout == set(), "modules missing from the README's Layout section"
    assert layout - modules == set(), "the README's Layout section names modules that do not exist"
