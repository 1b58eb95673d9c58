"""The layering rules of docs/architecture.md, checked on the source: a stage imports only the
stages below it (function-level imports included), so the data path stays the floor plan."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sllmfs"

# stage -> the stages it may import (besides itself); the table in docs/architecture.md
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "store": {"core"},
    "protocol": {"core"},
    "engine": {"core", "protocol"},
    "origin": {"core", "store"},
    "fuse": {"core", "store", "protocol"},
    "client": {"core", "store", "protocol", "engine"},
    "ops": {"core", "store", "protocol", "client"},
    "sidecar": {"core", "store", "protocol", "engine", "fuse", "origin", "ops"},
    "integrations": {"core", "store", "protocol", "client", "engine"},
    "cli": {"core", "store", "protocol", "engine", "origin", "fuse", "client", "ops", "sidecar", "integrations"},
    "__main__": {"cli"},
    "__init__": set(),
}
NATIVE = {"_native": "engine", "_hashread": "store"}  # compiled modules and the one stage that binds each


def _stage(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else path.stem


def _imports(path: Path) -> set[str]:
    """The sllmfs stages a module imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "sllmfs" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("sllmfs.")}
    return found


def test_every_stage_imports_only_the_stages_below_it() -> None:
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        stage = _stage(path)
        assert stage in ALLOWED, f"{path}: stage {stage!r} is not in docs/architecture.md's table"
        for used in _imports(path) - {stage}:
            if NATIVE.get(used) == stage:
                continue
            if used not in ALLOWED[stage]:
                broken.append(f"{path.relative_to(PACKAGE.parent)} ({stage}) imports {used}")
    assert not broken, "layering broken:\n" + "\n".join(broken)


def test_no_relative_imports() -> None:
    """Absolute imports only: a moved module breaks loudly, and the rule above sees every import."""
    rel = [str(p) for p in PACKAGE.rglob("*.py")
           for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    assert not rel, rel


def test_the_table_is_acyclic() -> None:
    seen: dict[str, int] = {}

    def visit(stage: str, path: tuple[str, ...]) -> None:
        assert stage not in path, " -> ".join((*path, stage))
        if seen.get(stage):
            return
        for below in ALLOWED[stage]:
            visit(below, (*path, stage))
        seen[stage] = 1

    for s in ALLOWED:
        visit(s, ())
