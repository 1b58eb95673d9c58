"""``sllmfs save --backend vllm --tensor-parallel-size N``: store vLLM's per-rank state ahead of time.

Runs vLLM itself (one GPU per rank) on the stored ``hf`` variant with ``--load-format sllm`` reading
the store directly (no sidecar needed) and synchronous write-back: each rank loads by the any-TP
path, post-processes as it would when serving, and commits its ``vllm.tp{N}.r{rank}…`` variant
before ``LLM()`` returns; then the engine is shut down. The first ``--load-format sllm`` start of
that layout is then a fast-path start. Nothing here imports vLLM at import time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sllmfs.core.errors import BadInput, SllmfsError
from sllmfs.core.scratch import scratch_dir
from sllmfs.integrations.common import variants
from sllmfs.integrations.common.ahead import stored_for_rank_state
from sllmfs.integrations.vllm import LOAD_FORMAT, VLLM
from sllmfs.store.store import Store

EngineFactory = Callable[..., Any]  # vllm.LLM, or a stand-in that loads the same way (CPU tests)


def engine_args(store: Store, model: str, tp_size: int, *, config_dir: Path, dtype: str | None = None,
                quantization: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` that produce this model's per-rank variants; ``config_dir``
    receives the model's checked metadata files (the engine reads its config there)."""
    info = stored_for_rank_state(store, model, tp_size, "vLLM")
    config = info.meta_files().write_to(config_dir)
    args: dict[str, Any] = {
        "model": str(config),  # config (and tokenizer) as saved, checked; weights come from the loader
        "load_format": LOAD_FORMAT,
        "tensor_parallel_size": tp_size,
        "model_loader_extra_config": {"sllm_model": model, "sllm_storage_path": str(store.root),
                                      "sllm_write_back": "sync"},
        "skip_tokenizer_init": True,  # nothing is served
        "enforce_eager": True,  # no compile, no CUDA graphs: the weights are the work
        # after the weights, vLLM sets up attention and its KV cache: the portable backend and a short
        # context keep a save from needing kernels (FA2/FA3) or KV memory it does not use
        "attention_backend": "TRITON_ATTN",
        "max_model_len": min(256, _context_length(config / "config.json")),
    }
    if dtype:
        args["dtype"] = dtype
    if quantization:
        args["quantization"] = quantization
    return args


def _context_length(config: Path) -> int:
    """The model's own context length (vLLM refuses a max_model_len above it); 256 when unknown."""
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return 256
    return value if isinstance(value, int) and value > 0 else 256


def save_rank_variants(store: Store, model: str, tp_size: int, *, dtype: str | None = None,
                       quantization: str | None = None, engine_factory: EngineFactory | None = None,
                       version: str | None = None) -> list[str]:
    """Run vLLM once on ``model`` with ``tp_size`` ranks; return its per-rank variant keys.

    Ranks already stored for this layout are loaded by the fast path and kept as they are."""
    with scratch_dir("sllmfs-save-") as tmp:
        kwargs = engine_args(store, model, tp_size, config_dir=Path(tmp) / "config", dtype=dtype,
                             quantization=quantization)
        return _run(store, model, tp_size, kwargs, engine_factory, version)


def _run(store: Store, model: str, tp_size: int, kwargs: dict[str, Any], engine_factory: EngineFactory | None,
         version: str | None) -> list[str]:
    if engine_factory is None or version is None:
        try:
            import vllm
        except ImportError:
            raise BadInput("--backend vllm needs vLLM (pip install vllm==0.26.0)") from None
        engine_factory = engine_factory or _vllm_llm
        version = version or str(vllm.__version__)
    try:
        engine = engine_factory(**kwargs)  # loading is the work: every rank has written its variant now
    except SllmfsError:
        raise
    except Exception as e:  # vLLM's own failure (no GPU, out of memory, ...): one line, its log is above
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise SllmfsError(f"vLLM did not start on {model!r} with {tp_size} rank(s): {type(e).__name__}: {first}") from e
    shutdown = getattr(engine, "shutdown", None)
    if callable(shutdown):
        shutdown()
    made = sorted(k for k in store.get(model).variants if _ours(k, tp_size, version))
    ranks = {variants.parse(VLLM, k).tp_rank for k in made}
    if ranks != set(range(tp_size)):
        raise SllmfsError(f"vLLM ran but the store holds ranks {sorted(ranks)} of {tp_size} for {model!r} "
                          f"(vLLM {version}); see vLLM's log above: a model whose per-rank state sllmfs does not "
                          "keep (quantized, MLA, data/expert parallel) loads from the hf variant every time")
    return made


def _vllm_llm(**kwargs: Any) -> Any:
    from vllm import LLM  # imported here: vLLM's failures to import count as its failures to start

    return LLM(**kwargs)


def _ours(key: str, tp_size: int, version: str) -> bool:
    if not variants.is_framework(VLLM, key):
        return False
    try:
        v = variants.parse(VLLM, key)
    except BadInput:
        return False
    return v.tp_size == tp_size and v.version == version.lower()


def require_vllm() -> None:
    """Refuse before anything is stored (the store not even created) when vLLM is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise BadInput("--backend vllm needs vLLM (pip install vllm==0.26.0); nothing was stored. Without it, "
                       "save with --backend transformers: vLLM loads that variant at any TP size")


def save_vllm(store: Store, model: str, local_model_path: str | None, tp_size: int, *, force: bool = False,
              engine_factory: EngineFactory | None = None, version: str | None = None) -> list[str]:
    """The CLI's ``save --backend vllm``: store the checkpoint (if needed), then its per-rank state.

    Says what it stored as it goes (stdout), so a failure after the hf variant is never silent."""
    from sllmfs.store import sources
    from sllmfs.store.save import save_model

    if engine_factory is None:
        require_vllm()
    if force or not store.has(model):
        save_model(store, model, sources.resolve(model, local_model_path), force=force)
        print(f"stored {model} [hf]", flush=True)
    try:
        keys = save_rank_variants(store, model, tp_size, engine_factory=engine_factory, version=version)
    except SllmfsError as e:
        raise type(e)(f"{e} (model {model!r} [hf] is stored; run the same command again to retry the "
                      "per-rank state)") from None
    for key in keys:
        print(f"stored {model} [{key}]")
    return keys
