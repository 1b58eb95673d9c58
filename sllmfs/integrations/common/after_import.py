"""Run a function when a module is imported, in whichever process imports it, and not sooner.

A plugin that hooks a module the engine imports late (SGLang's model runner, vLLM's model loaders)
would otherwise import that module while the plugins load, in every process, the launching one
too, which never uses it: over a second of imports on a start (bench/bench_plugin_cost.py). Here
the hook waits for the engine's own import of the module and runs right after the module's code,
before the importer gets it.

One finder on ``sys.meta_path`` (a dict lookup per import) watches the names asked for; it finds
the module through the other finders and only wraps the loader's ``exec_module``. A hook that
raises is one warning line: the engine's import goes on (as SGLang's own hook registry does).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

Then = Callable[[ModuleType], None]
_lock = threading.Lock()
_pending: dict[str, list[Then]] = {}


def after_import(name: str, then: Then) -> None:
    """``then(module)`` once module ``name`` is imported: at once when it is already."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            if not any(isinstance(f, _Watcher) for f in sys.meta_path):
                sys.meta_path.insert(0, _Watcher())
            _pending.setdefault(name, []).append(then)
            return
    _run(then, module)


def pending(name: str) -> bool:
    """Whether hooks still wait for ``name`` (it has not been imported since they were added)."""
    with _lock:
        return name in _pending


def _run(then: Then, module: ModuleType) -> None:
    try:
        then(module)
    except Exception as e:  # never fail the engine's import over a hook
        print(f"sllmfs: warning: hook on {module.__name__} not applied: {type(e).__name__}: {e}", file=sys.stderr)


class _Watcher:
    """The meta path finder: steps aside for every module but the watched ones."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname not in _pending:  # unlocked: a dict lookup on every import of the process
            return None
        spec = _find_elsewhere(self, fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            # the hooks stay pending until the module's code runs: a find_spec() probe imports nothing
            spec.loader = _ThenLoader(spec.loader)  # type: ignore[assignment]
        return spec


def _find_elsewhere(me: _Watcher, fullname: str, path: Any, target: Any) -> ModuleSpec | None:
    for finder in list(sys.meta_path):
        find = getattr(finder, "find_spec", None)
        if finder is me or find is None:
            continue
        spec = find(fullname, path, target)
        if spec is not None:
            return spec  # type: ignore[no-any-return]
    return None


class _ThenLoader:
    """The module's own loader, then the hooks; the module keeps its real loader (``__loader__``)."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        if module.__spec__ is not None and module.__spec__.loader is self:
            module.__spec__.loader = self.loader
        with _lock:
            thens = _pending.pop(module.__name__, [])
        try:
            self.loader.exec_module(module)
        except BaseException:
            with _lock:  # the import failed: the hooks wait for the next attempt
                _pending.setdefault(module.__name__, [])[:0] = thens
            raise
        done = sys.modules.get(module.__name__, module)  # a module may replace itself in sys.modules
        for then in thens:
            _run(then, done)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
