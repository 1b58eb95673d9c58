"""Hooks that wait for a module's import (integrations/common/after_import), with real modules on disk."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from sllmfs.integrations.common.after_import import after_import, pending


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A package folder on sys.path and a fresh package name in it (imports are once per process)."""
    name = f"sllmfs_after_{uuid.uuid4().hex[:10]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path / name, name
    sys.path.remove(str(tmp_path))
    for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[m]


def test_a_hook_runs_after_the_module_code_and_before_the_importer_sees_it(modules: tuple[Path, str]) -> None:
    folder, pkg = modules
    (folder / "late.py").write_text("VALUE = 1\ndef f():\n    return 'original'\n")
    seen: list[tuple[int, str]] = []

    def hook(module: ModuleType) -> None:
        seen.append((module.VALUE, module.f()))
        original = module.f
        module.f = lambda: "hooked " + original()

    after_import(f"{pkg}.late", hook)
    assert f"{pkg}.late" not in sys.modules and pending(f"{pkg}.late")  # nothing imported by asking
    late = importlib.import_module(f"{pkg}.late")
    assert seen == [(1, "original")] and late.f() == "hooked original"
    assert not pending(f"{pkg}.late")
    assert type(late.__loader__).__name__ == "SourceFileLoader" and late.__spec__.loader is late.__loader__
    importlib.reload(late)  # a hook runs once: a reload is the module's own business
    assert seen == [(1, "original")]


def test_an_imported_module_is_hooked_at_once_and_hooks_run_in_order(modules: tuple[Path, str]) -> None:
    folder, pkg = modules
    (folder / "early.py").write_text("")
    (folder / "twice.py").write_text("")
    early = importlib.import_module(f"{pkg}.early")
    order: list[str] = []
    after_import(f"{pkg}.early", lambda m: order.append(f"now {m is early}"))
    after_import(f"{pkg}.twice", lambda m: order.append("first"))
    after_import(f"{pkg}.twice", lambda m: order.append("second"))
    importlib.import_module(f"{pkg}.twice")
    assert order == ["now True", "first", "second"]


def test_a_failing_hook_is_one_warning_and_the_import_goes_on(modules: tuple[Path, str],
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    folder, pkg = modules
    (folder / "target.py").write_text("X = 2\n")

    def broken(module: ModuleType) -> None:
        raise AttributeError("no such method in this release")

    after_import(f"{pkg}.target", broken)
    assert importlib.import_module(f"{pkg}.target").X == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"sllmfs: warning: hook on {pkg}.target not applied: AttributeError: no such method in this release"]


def test_hooks_wait_through_a_failed_import_and_a_missing_module(modules: tuple[Path, str]) -> None:
    folder, pkg = modules
    (folder / "flaky.py").write_text("raise RuntimeError('not yet')\n")
    ran: list[str] = []
    after_import(f"{pkg}.flaky", lambda m: ran.append(m.__name__))
    after_import(f"{pkg}.absent", lambda m: ran.append("absent"))
    with pytest.raises(RuntimeError, match="not yet"):
        importlib.import_module(f"{pkg}.flaky")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"{pkg}.absent")
    assert ran == [] and pending(f"{pkg}.flaky") and pending(f"{pkg}.absent")
    (folder / "flaky.py").write_text("OK = True\n")
    importlib.invalidate_caches()
    assert importlib.util.find_spec(f"{pkg}.flaky") is not None  # a probe (pkgutil, an availability check)
    assert ran == [] and pending(f"{pkg}.flaky")  # imports nothing and leaves the hook waiting
    assert importlib.import_module(f"{pkg}.flaky").OK
    assert ran == [f"{pkg}.flaky"]

