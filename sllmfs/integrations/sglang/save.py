"""``sllmfs save --backend sglang --tensor-parallel-size N``: store SGLang's per-rank state.

Runs SGLang itself (one GPU per rank) on the stored ``hf`` variant with
``--load-format sllm`` reading the store directly (no sidecar needed) and
synchronous write-back: each rank loads by the any-TP path, post-processes
exactly as it would when serving, and commits its ``sglang.tp{N}.r{rank}…``
variant before the engine reports ready. Then the engine is shut down.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sllmfs.core import names
from sllmfs.core.errors import BadInput, SllmfsError
from sllmfs.integrations.sglang import LOAD_FORMAT, variants
from sllmfs.store.store import Store


def engine_args(store: Store, model: str, tp_size: int, *, dtype: str | None = None,
                quantization: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``sglang.Engine`` that produce this model's per-rank variants."""
    if tp_size < 1:
        raise BadInput(f"--tensor-parallel-size {tp_size} must be 1 or more")
    info = store.get(model)
    if names.HF_VARIANT not in info.variants:
        raise BadInput(f"model {model!r} has no hf variant; run `sllmfs save --model {model} ...` first")
    if "config.json" not in info.files:
        raise BadInput(f"model {model!r} was stored without config.json; SGLang cannot build it")
    args: dict[str, Any] = {
        "model_path": str(info.files_dir),  # config + tokenizer as saved; weights come from the loader
        "load_format": LOAD_FORMAT,
        "tp_size": tp_size,
        "model_loader_extra_config": json.dumps({
            "sllm_model": model, "sllm_storage_path": str(store.root), "sllm_write_back": "sync"}),
        "disable_cuda_graph": True,  # nothing is served: skip capture
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


def save_rank_variants(store: Store, model: str, tp_size: int, *, dtype: str | None = None,
                       quantization: str | None = None, extra: dict[str, Any] | None = None,
                       engine_factory: Callable[..., Any] | None = None, version: str | None = None) -> list[str]:
    """Run SGLang once on ``model`` with ``tp_size`` ranks; return its per-rank variant keys.

    Ranks already stored for this layout are loaded by the fast path and kept as they are.
    """
    kwargs = engine_args(store, model, tp_size, dtype=dtype, quantization=quantization, extra=extra)
    if engine_factory is None:
        try:
            import sglang
        except ImportError:
            raise BadInput("--backend sglang needs SGLang: pip install 'sllmfs[sglang]'") from None
        engine_factory = sglang.Engine
    if version is None:
        from sglang.version import __version__

        version = str(__version__)
    # loading is the work: every rank has written its variant when Engine() returns
    engine_factory(**kwargs).shutdown()
    made = sorted(k for k in store.get(model).variants if _ours(k, tp_size, version))
    ranks = {variants.parse(k).tp_rank for k in made}
    if ranks != set(range(tp_size)):
        raise SllmfsError(f"SGLang ran but the store holds ranks {sorted(ranks)} of {tp_size} for {model!r} "
                          f"(SGLang {version}); see the SGLang log above")
    return made


def _ours(key: str, tp_size: int, version: str) -> bool:
    if not variants.is_sglang(key):
        return False
    try:
        v = variants.parse(key)
    except BadInput:
        return False
    return v.tp_size == tp_size and v.version == version.lower()


def save_sglang(store: Store, model: str, local_model_path: str | None, tp_size: int, *,
                force: bool = False) -> list[str]:
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
        keys = save_rank_variants(store, model, tp_size)
    except SllmfsError as e:
        raise type(e)(f"{e} (model {model!r} [hf] is stored; run the same command again to retry the "
                      "per-rank state)") from None
    for key in keys:
        print(f"stored {model} [{key}]")
    return keys
