"""``sllmfs save --backend sglang --tensor-parallel-size N``: store SGLang's per-rank state.

Runs SGLang itself (one GPU per rank) on the stored ``hf`` variant with
``--load-format sllm`` reading the store directly (no sidecar needed) and
synchronous write-back: each rank loads by the any-TP path, post-processes
exactly as it would when serving, and commits its ``sglang.tp{N}.r{rank}…``
variant before the engine reports ready. Then the engine is shut down.

The engine holds only what producing that state needs: no CUDA graphs, a KV cache
of a few thousand tokens, no tokenizer; it runs in a process of its own, so an
engine that dies (out of memory, killed) cannot take this command's report with it.
What the store holds afterwards is the verdict: every rank committed is a success
whatever the engine did after, and a rerun keeps what is stored (a complete set
starts no engine; a partial one loads its stored ranks by the fast path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sllmfs.core.errors import BadInput, SllmfsError
from sllmfs.core.scratch import scratch_dir
from sllmfs.integrations.common.ahead import stored_for_rank_state
from sllmfs.integrations.common.variants import RankVariant
from sllmfs.integrations.sglang import LOAD_FORMAT, variants
from sllmfs.store.store import Store

# The engine serves nothing: SGLang still sizes a KV pool, capped at this many tokens (a few MB
# even for a 70B model), and needs the static fraction only to accept the loaded weights.
SAVE_KV_TOKENS = 4096
SAVE_MEM_FRACTION = 0.9  # SGLang leaves (1 - this) of the free memory measured before the load unused


def engine_args(store: Store, model: str, tp_size: int, *, config_dir: Path, dtype: str | None = None,
                quantization: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``sglang.Engine`` that produce this model's per-rank variants;
    ``config_dir`` receives the model's checked metadata files (the engine reads its config there)."""
    info = stored_for_rank_state(store, model, tp_size, "SGLang")
    args: dict[str, Any] = {
        # config as saved, checked against its digests; weights come from the loader
        "model_path": str(info.meta_files().write_to(config_dir)),
        "load_format": LOAD_FORMAT,
        "tp_size": tp_size,
        "model_loader_extra_config": json.dumps({
            "sllm_model": model, "sllm_storage_path": str(store.root), "sllm_write_back": "sync"}),
        # only what loading needs: no graph capture (its memory was the OOM beside a sidecar),
        # a token KV pool, no tokenizer (a checkpoint may have none), no prefix cache, one request slot
        "disable_cuda_graph": True,
        "skip_tokenizer_init": True,
        "max_total_tokens": SAVE_KV_TOKENS,
        "max_running_requests": 1,
        "chunked_prefill_size": SAVE_KV_TOKENS // 2,
        "disable_radix_cache": True,
        "mem_fraction_static": SAVE_MEM_FRACTION,
        "skip_server_warmup": True,
        # after the weights, SGLang sets up attention and sampling; the portable backends keep a
        # save from needing kernels the machine may lack (FA3 was missing on the H100 image)
        "attention_backend": "triton",
        "sampling_backend": "pytorch",
        "log_level": "warning",
    }
    if dtype:
        args["dtype"] = dtype
    if quantization:
        args["quantization"] = quantization
    args.update(extra or {})
    return args


@dataclass
class SaveReport:
    """What ``save --backend sglang`` left in the store for one TP size (the store is the verdict)."""

    model: str
    tp_size: int
    kept: list[str] = field(default_factory=list)  # complete before this run: no engine was started
    stored: list[str] = field(default_factory=list)  # committed by this run's engine
    engine_rc: int | None = None  # None: no engine ran

    @property
    def keys(self) -> list[str]:
        return sorted(self.kept + self.stored)


def rank_sets(store: Store, model: str, tp_size: int, version: str) -> dict[RankVariant, list[str]]:
    """This SGLang version's stored per-rank keys for ``tp_size``, grouped by layout (dtype,
    quantization, ...: everything but the rank); a layout is complete with ``tp_size`` keys."""
    out: dict[RankVariant, list[str]] = {}
    for key in store.get(model).variants:
        if not variants.is_sglang(key):
            continue
        try:
            v = variants.parse(key)
        except BadInput:
            continue
        if v.tp_size == tp_size and v.version == version.lower():
            out.setdefault(replace(v, tp_rank=0), []).append(key)
    return {layout: sorted(keys) for layout, keys in out.items()}


def _complete(sets: dict[RankVariant, list[str]], tp_size: int) -> list[str] | None:
    for keys in sets.values():
        if len(keys) == tp_size:
            return keys
    return None


def engine_command(kwargs: dict[str, Any]) -> list[str]:
    """The engine's own process: ``python -m sllmfs.integrations.sglang.save '<kwargs as JSON>'``."""
    return [sys.executable, "-m", "sllmfs.integrations.sglang.save", json.dumps(kwargs)]


def installed_version() -> str:
    """SGLang's version: from its package metadata (importing SGLang costs ~20 s), else from SGLang
    itself (a copy without metadata, e.g. unpacked onto PYTHONPATH)."""
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        pass
    try:
        from sglang.version import __version__
    except ImportError:
        raise BadInput("--backend sglang needs SGLang: pip install 'sllmfs[sglang]'") from None
    return str(__version__)


def save_rank_variants(store: Store, model: str, tp_size: int, *, dtype: str | None = None,
                       quantization: str | None = None, extra: dict[str, Any] | None = None,
                       version: str | None = None,
                       command: Callable[[dict[str, Any]], Sequence[str]] = engine_command,
                       say: Callable[[str], None] = lambda line: None) -> SaveReport:
    """Run SGLang once on ``model`` with ``tp_size`` ranks (unless a complete set is stored already);
    report what the store holds. ``command``: the engine's process (tests give a stand-in);
    ``say``: each stored key as soon as it is known."""
    with scratch_dir("sllmfs-save-") as tmp:
        return _save_rank_variants(store, model, tp_size, engine_args(
            store, model, tp_size, config_dir=Path(tmp) / "config", dtype=dtype, quantization=quantization,
            extra=extra), version, command, say)


def _save_rank_variants(store: Store, model: str, tp_size: int, kwargs: dict[str, Any], version: str | None,
                        command: Callable[[dict[str, Any]], Sequence[str]],
                        say: Callable[[str], None]) -> SaveReport:
    version = version or installed_version()
    report = SaveReport(model, tp_size)
    done = _complete(rank_sets(store, model, tp_size, version), tp_size)
    if done:
        report.kept = done
        return report
    before = {k for keys in rank_sets(store, model, tp_size, version).values() for k in keys}
    report.engine_rc = _run_engine(list(command(kwargs)))
    sets = rank_sets(store, model, tp_size, version)
    after = {k for keys in sets.values() for k in keys}
    report.stored = sorted(after - before)
    report.kept = sorted(after & before)
    for key in report.stored:
        say(key)
    full = _complete(sets, tp_size)
    if full is None:
        kept = f"stored: {', '.join(sorted(after))}; a rerun keeps them" if after else "nothing per-rank stored"
        raise SllmfsError(
            f"SGLang {version} {_ended(report.engine_rc)} with {len(after)} of {tp_size} ranks of {model!r} stored "
            f"({kept}); see the SGLang log above, then run the same command again")
    report.kept = sorted(k for k in report.kept if k in full)
    report.stored = sorted(k for k in report.stored if k in full)
    return report


def _ended(rc: int | None) -> str:
    if rc is None or rc == 0:
        return "exited normally"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _run_engine(argv: list[str]) -> int:
    """Run the engine's process to its end; its output goes to our stderr (stdout is the report).

    Its own session: when SGLang tears its process tree down after a failure, this one survives
    to report. An interrupt here stops the engine's whole group (we started it)."""
    proc = subprocess.Popen(argv, stdout=sys.stderr, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise


def save_sglang(store: Store, model: str, local_model_path: str | None, tp_size: int, *,
                force: bool = False) -> SaveReport:
    """The CLI's ``save --backend sglang``: store the checkpoint (if needed), then its per-rank state.

    Says what it stored as it goes (stdout), so a failure after the hf variant is never silent."""
    import importlib.util

    from sllmfs.store import sources
    from sllmfs.store.save import save_model

    if importlib.util.find_spec("sglang") is None:  # before anything is stored
        raise BadInput("--backend sglang needs SGLang (pip install 'sllmfs[sglang]'); nothing was stored. "
                       "Without it, save with --backend transformers: SGLang loads that variant at any TP size")
    if force or not store.has(model):
        save_model(store, model, sources.resolve(model, local_model_path), force=force)
        print(f"stored {model} [hf]", flush=True)
    try:
        report = save_rank_variants(store, model, tp_size,
                                    say=lambda key: print(f"stored {model} [{key}]", flush=True))
    except SllmfsError as e:
        raise type(e)(f"{e} (model {model!r} [hf] is stored)") from None
    for key in report.kept:
        print(f"kept {model} [{key}] (already stored)", flush=True)
    if report.engine_rc:
        print(f"sllmfs: SGLang {_ended(report.engine_rc)} after every rank was stored; the per-rank state "
              "is complete", file=sys.stderr, flush=True)
    return report


def _engine_main(kwargs_json: str) -> None:
    """The engine's process: every rank has written its variant when Engine() returns."""
    import sglang

    sglang.Engine(**json.loads(kwargs_json)).shutdown()


if __name__ == "__main__":  # SGLang's spawned ranks re-import the main module: only the engine process gets here
    _engine_main(sys.argv[1])
