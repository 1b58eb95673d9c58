"""SGLang plugin (entry point group ``sglang.srt.plugins``): makes ``sllm`` a load format.

SGLang ≥ 0.5.11 calls every plugin in that group from ``load_plugins()`` in each
process (CLI before argument parsing, Engine before ServerArgs, every scheduler
/TP worker). Two things are needed:

- the CLI accepts ``--load-format sllm``: SGLang's own ``add_load_format_choices``;
- ``LoadConfig`` turns ``"sllm"`` into our loader class instead of failing in
  ``LoadFormat("sllm")``; ``get_model_loader`` already instantiates a
  ``load_format`` that is a loader class, so no other SGLang code is hooked.

With patches/sglang-<release>-sllm.patch applied, ``LoadFormat.SLLM`` exists and
the patched ``get_model_loader`` builds the loader; the hook then steps aside.

Releases: those of sllmfs.integrations.sglang.compat (0.5.17 to 0.5.23). Starting
with ``--load-format sllm`` on another release, or with 0.5.23's
``--startup-weight-load-mode overlap``, is refused with one line: by the CLI before
anything starts (``prepare_server_args``), and again where ``LoadConfig`` is built
(the Python ``Engine`` and every scheduler).

Diagnostics: with ``SLLMFS_PROFILE_LOAD=<folder>`` each process profiles SGLang's
whole ``ModelRunner.load_model`` (the "Load weight" phase) into that folder.

Cost: SGLang loads plugins first thing in every process (``load_plugins()``). The hooks on
``LoadConfig`` and on the load phase wait for SGLang's own import of their modules
(integrations/common/after_import): resolving them at once would import the model runner in the
launching process, which never needs it (1.3 s of imports on a CPU host; bench/bench_plugin_cost.py,
bench/NOTES-coldstart.md #21.4).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sllmfs.core.errors import BadInput
from sllmfs.integrations.common.after_import import after_import
from sllmfs.integrations.sglang import LOAD_FORMAT, compat

LOAD_CONFIG = "sglang.srt.configs.load_config"  # LoadConfig._verify_load_format: where "sllm" becomes our loader
MODEL_RUNNER = "sglang.srt.model_executor.model_runner"  # imported by each scheduler, when it builds its model
PROFILE_ENV = "SLLMFS_PROFILE_LOAD"
_registered = False


def register() -> None:
    """Entry point ``sllmfs.integrations.sglang.plugin:register`` (no arguments, return value ignored).

    The hooks are SGLang's AROUND hooks (``hook(original, *args, **kwargs)``), applied here rather than
    through its HookRegistry: applying one there walks every attribute of every loaded module for stale
    references (``_propagate_patch``), ~20 ms per hook in each process; only ``prepare_server_args`` has
    such references (``from ... import prepare_server_args`` in the launch module, run as ``__main__``),
    rebound by name in SGLang's modules and ``__main__``."""
    global _registered
    if _registered:
        return
    from sllmfs.integrations.kernel_cache import activate  # kernel caches from the store (#21): first process only

    activate(framework="sglang", engine_defaults=compat.cache_defaults())
    from sglang.srt import server_args

    if LOAD_FORMAT not in server_args.LOAD_FORMAT_CHOICES:  # the same list object in every release
        server_args.add_load_format_choices([LOAD_FORMAT])
    _around(server_args, "prepare_server_args", _refuse_at_launch, rebind=True)  # argv -> ServerArgs, the CLI
    after_import(LOAD_CONFIG, _hook_load_config)
    if compat.is_supported(compat.installed_version()):  # elsewhere these targets may not exist
        after_import(MODEL_RUNNER, _hook_load_phase)
    _registered = True


def _hook_load_config(load_config: ModuleType) -> None:
    _around(load_config.LoadConfig, "_verify_load_format", _verify_load_format)


def _hook_load_phase(model_runner: ModuleType) -> None:
    """Around ``ModelRunner.load_model``, once SGLang imported it: the loader imported first, and the
    profile when asked for (outermost, as SGLang's registry would stack them: it sees the import too)."""
    from sllmfs.core.config import env_str  # here: a process that never builds a model needs no config parser

    _around(model_runner.ModelRunner, "load_model", _import_loader_first)
    if env_str(PROFILE_ENV):
        _around(model_runner.ModelRunner, "load_model", _profiled)


def _around(owner: Any, name: str, hook: Callable[..., Any], *, rebind: bool = False) -> None:
    """``hook(original, *args, **kwargs)`` in place of ``owner.name`` (a method: ``args[0]`` is self).
    ``rebind``: also where a loaded module holds the original under the same name (``from x import f``)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return hook(original, *args, **kwargs)

    setattr(owner, name, wrapper)
    if rebind:  # SGLang's launchers, and a user's script run as __main__
        for mod_name in [n for n in list(sys.modules) if n.startswith("sglang.") or n == "__main__"]:
            module = sys.modules.get(mod_name)
            if getattr(module, "__dict__", {}).get(name) is original:
                setattr(module, name, wrapper)


def startup_problem(load_format: Any, startup_weight_load_mode: Any = None) -> str | None:
    """Why SGLang cannot start with this load format here (release, startup mode), or None."""
    if not (isinstance(load_format, str) and load_format.lower() == LOAD_FORMAT):
        return None
    return compat.version_problem(compat.installed_version()) or compat.overlap_problem(
        load_format, startup_weight_load_mode)


def _refuse_at_launch(original: Any, *args: Any, **kwargs: Any) -> Any:
    """The CLI's ServerArgs: a start that cannot work ends here with one line and exit status 1, as
    argparse ends a bad flag (this function only ever runs for the command line)."""
    server_args = original(*args, **kwargs)
    problem = startup_problem(getattr(server_args, "load_format", None),
                              getattr(server_args, "startup_weight_load_mode", None))
    if problem:
        raise SystemExit(f"sllmfs: {problem}")
    return server_args


def _published_startup_mode() -> Any:
    """``--startup-weight-load-mode`` of this process's published config (0.5.23+), else None."""
    try:
        from sglang.srt.runtime_context import get_model

        return getattr(get_model(), "startup_weight_load_mode", None)
    except (ImportError, ValueError, RuntimeError, AttributeError):  # older release, or nothing published
        return None


def _import_loader_first(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """Import our loader before SGLang's load phase starts its clock, where SGLang's own loaders are
    imported too (with its model module); importing it inside the phase cost 0.07 s of it."""
    fmt = getattr(getattr(self, "server_args", None), "load_format", None)
    if isinstance(fmt, str) and fmt.lower() == LOAD_FORMAT:
        import sllmfs.integrations.sglang.loader  # noqa: F401
    return original(self, *args, **kwargs)


def _profiled(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """SGLang's load phase under cProfile: <folder>/load-<pid>.prof and a cumulative-time summary .txt."""
    import cProfile
    import io
    import pstats
    from pathlib import Path

    from sllmfs.core.config import env_str

    folder = Path(env_str(PROFILE_ENV))
    folder.mkdir(parents=True, exist_ok=True)
    prof = cProfile.Profile()
    try:
        return prof.runcall(original, self, *args, **kwargs)
    finally:
        base = folder / f"load-{os.getpid()}"
        prof.dump_stats(f"{base}.prof")
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
        Path(f"{base}.txt").write_text(text.getvalue())


def _verify_load_format(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    fmt = self.load_format
    is_sllm = (isinstance(fmt, str) and fmt.lower() == LOAD_FORMAT) or getattr(fmt, "value", None) == LOAD_FORMAT
    problem = startup_problem(LOAD_FORMAT, _published_startup_mode()) if is_sllm else None
    if problem:
        raise BadInput(problem)
    if isinstance(fmt, str) and fmt.lower() == LOAD_FORMAT and not _patched():
        from sllmfs.integrations.sglang.loader import SllmModelLoader

        self.load_format = SllmModelLoader  # get_model_loader: "isinstance(load_format, type)" branch
        return None
    return original(self, *args, **kwargs)


def _patched() -> bool:
    from sglang.srt.configs.load_config import LoadFormat

    return LOAD_FORMAT in LoadFormat._value2member_map_
