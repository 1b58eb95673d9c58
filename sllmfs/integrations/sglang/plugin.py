"""SGLang plugin (entry point group ``sglang.srt.plugins``): makes ``sllm`` a load format.

SGLang ≥ 0.5.11 calls every plugin in that group from ``load_plugins()`` in each
process (CLI before argument parsing, Engine before ServerArgs, every scheduler
/TP worker), then applies the hooks registered here. Two things are needed:

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

Cost: SGLang loads plugins first thing in every process (``load_plugins()``). The load phase's
hooks wait for SGLang's own import of the model runner (integrations/common/after_import):
resolving them there would import it in the launching process, which never needs it
(1.3 s of imports on a CPU host; bench/bench_plugin_cost.py, bench/NOTES-coldstart.md #21.4).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sllmfs.core.config import env_str
from sllmfs.core.errors import BadInput
from sllmfs.integrations.common.after_import import after_import
from sllmfs.integrations.sglang import LOAD_FORMAT, compat

VERIFY_TARGET = "sglang.srt.configs.load_config.LoadConfig._verify_load_format"
CLI_TARGET = "sglang.srt.server_args.prepare_server_args"  # argv -> ServerArgs, in the launching process
MODEL_RUNNER = "sglang.srt.model_executor.model_runner"  # imported by each scheduler, when it builds its model
LOAD_PHASE_TARGET = f"{MODEL_RUNNER}.ModelRunner.load_model"  # SGLang times this
PROFILE_ENV = "SLLMFS_PROFILE_LOAD"
_registered = False


def register() -> None:
    """Entry point ``sllmfs.integrations.sglang.plugin:register`` (no arguments, return value ignored)."""
    global _registered
    if _registered:
        return
    from sllmfs.integrations.kernel_cache import activate  # kernel caches from the store (#21): first process only

    activate(framework="sglang", engine_defaults=compat.cache_defaults())
    from sglang.srt import server_args
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if LOAD_FORMAT not in server_args.LOAD_FORMAT_CHOICES:  # the same list object in every release
        server_args.add_load_format_choices([LOAD_FORMAT])
    HookRegistry.register(VERIFY_TARGET, _verify_load_format, HookType.AROUND)
    HookRegistry.register(CLI_TARGET, _refuse_at_launch, HookType.AROUND)
    if compat.is_supported(compat.installed_version()):  # elsewhere these targets may not exist
        after_import(MODEL_RUNNER, _hook_load_phase)
    _registered = True


def _hook_load_phase(model_runner: ModuleType) -> None:
    """Around ``ModelRunner.load_model``, once SGLang imported it: the loader imported first, and the
    profile when asked for (outermost, as SGLang's registry would stack them: it sees the import too)."""
    _around(model_runner.ModelRunner, "load_model", _import_loader_first)
    if env_str(PROFILE_ENV):
        _around(model_runner.ModelRunner, "load_model", _profiled)


def _around(cls: type, name: str, hook: Callable[..., Any]) -> None:
    """``hook(original, self, *args, **kwargs)`` in place of the method (SGLang's AROUND convention)."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return hook(original, *args, **kwargs)

    setattr(cls, name, wrapper)


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
