"""``--load-format sllm``: vLLM model loader backed by the sllmfs sidecar.

Any-TP path (``load_weights``): the ``hf`` variant, mapped zero-copy, feeds vLLM's own
``model.load_weights``, so vLLM shards and fuses the tensors for this rank as its default
loader does; vLLM then post-processes. Afterwards this rank's state is written back
(``vllm.tp…`` variant, the state vLLM's ShardedStateLoader keeps). Fast path (``load_model``):
that stored state is copied straight into a freshly built, post-processed model. A per-rank
variant that does not fit (missing, other layout, damaged) means the any-TP path with a
warning, never a wrongly filled model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
from vllm.utils.torch_utils import set_default_torch_dtype

from sllmfs.core.errors import BadInput, Corrupt, NotFound
from sllmfs.core.names import HF_VARIANT
from sllmfs.engine.copy_engine import CopyError
from sllmfs.integrations.common import options, variants, writeback
from sllmfs.integrations.common.copy import copy_into
from sllmfs.integrations.common.locate import Located
from sllmfs.integrations.common.snapshot import snapshot
from sllmfs.integrations.common.source import weights_as_filled
from sllmfs.integrations.common.state import rank_state, state_problem
from sllmfs.integrations.common.variants import RankVariant, layout_problem
from sllmfs.integrations.vllm import VLLM
from sllmfs.store.store import Identity

log = logging.getLogger("sllmfs.integrations.vllm")

EXTRA_KEYS = options.COMMON_KEYS  # --model-loader-extra-config keys this loader reads

class Unfit(Exception):
    """The per-rank variant cannot serve this model; take the any-TP path."""


def current_variant(model_config: ModelConfig) -> RankVariant:
    """The per-rank variant this process would use (from vLLM's parallel state)."""
    import vllm
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    pp = get_pp_group()
    return variants.make(VLLM, tp_size=get_tensor_model_parallel_world_size(), tp_rank=get_tensor_model_parallel_rank(),
                         pp_size=pp.world_size, pp_rank=pp.rank_in_group, dtype=model_config.dtype,
                         quant=model_config.quantization, version=vllm.__version__)


def per_rank_problem(vllm_config: VllmConfig, model: nn.Module | None = None) -> str | None:
    """Why a per-rank variant (fast path and write-back) cannot serve this start, or None. Kept to
    what the variant key and the fast path's order are known right for: the key records TP and PP
    only (data, context and expert parallelism split experts by other ranks), and the fast path
    post-processes before the bytes are in, so no model whose post-processing derives values from
    its weights (quantization, MLA's absorbed matrices, an fp8 KV cache's scales)."""
    par, mc = vllm_config.parallel_config, vllm_config.model_config
    for what, size in (("data parallel", getattr(par, "data_parallel_size", 1)),
                       ("prefill context parallel", getattr(par, "prefill_context_parallel_size", 1)),
                       ("decode context parallel", getattr(par, "decode_context_parallel_size", 1))):
        if size and size > 1:
            return f"{what} size {size}"
    if getattr(par, "enable_expert_parallel", False):
        return "expert parallelism"
    if mc.quantization is not None:
        return f"quantization {mc.quantization}"
    if getattr(mc, "use_mla", False):
        return "MLA attention"
    kv = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if kv != "auto":
        return f"KV cache dtype {kv}"
    if model is not None and any(getattr(getattr(m, "quant_method", None), "uses_meta_device", False)
                                 for m in model.modules()):
        return "online quantization builds its weights while loading"
    return None


class SllmModelLoader(BaseModelLoader, options.LoaderSettings):
    def __init__(self, load_config: LoadConfig, *, source_factory: options.SourceFactory | None = None):
        super().__init__(load_config)
        self._read_config(load_config.model_loader_extra_config, EXTRA_KEYS, source_factory)

    def _locate(self, model_config: ModelConfig) -> Located:
        return options.located(self.extra, model_config.model)

    def download_model(self, model_config: ModelConfig) -> None:
        with self.source_factory(self._locate(model_config)).open(HF_VARIANT, gpu_first=False):
            pass  # present and resident: nothing to download

    # -- any-TP path: vLLM calls this between building and post-processing the model --

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        if getattr(model, "secondary_weights", ()):
            raise BadInput(f"{type(model).__name__} loads weights from a second checkpoint; "
                           "--load-format sllm does not serve those yet, use the default loader")
        source = self.source_factory(self._locate(model_config))
        try:
            with source.open(HF_VARIANT, gpu_first=False) as lease:  # read as CPU views
                loaded = model.load_weights(_hf_weights(lease))  # type: ignore[operator]  # vLLM models define it
        except NotFound:
            raise NotFound(f"model {source.model!r} has no hf variant in the sllmfs store; "
                           f"run `sllmfs save --model {source.model} --local-model-path <checkpoint>`") from None
        except Corrupt as e:
            raise Corrupt(f"model {source.model!r}: {e}; run `sllmfs verify {source.model}` and "
                          f"`sllmfs save --model {source.model} --force ...`") from None
        if model_config.quantization is None and loaded is not None:  # as vLLM's default loader checks
            missing = sorted({n for n, _ in model.named_parameters()} - set(loaded))
            if missing:
                raise BadInput(f"the stored checkpoint of {source.model!r} has no tensor for {missing[0]} "
                               f"(and {len(missing) - 1} more parameters)")

    # -- the whole load: the fast path first, else vLLM's own sequence with the any-TP path --

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        t0 = time.perf_counter()
        located = self._locate(model_config)
        want = current_variant(model_config)
        unfit = per_rank_problem(vllm_config)
        if unfit:  # the any-TP path only, and no variant written: it could not be served right
            log.info("sllmfs: no per-rank state for %r with %s; loading the hf variant", located.model, unfit)
            model, replace = None, False
        else:
            model, replace = self._fast_path(located, want, vllm_config, model_config, prefix)
        if model is None:
            # the hf version this state comes from: its write-back must not land on a model replaced since
            base = writeback.hf_identity(located.storage_path, located.model)
            model = super().load_model(vllm_config, model_config, prefix)
            self.path_taken = "any-tp"
            if self.write_back_mode != writeback.OFF and not unfit and not per_rank_problem(vllm_config, model):
                self._write_back(located, want, model, replace, base)
        log.info("sllmfs: loaded %r rank %d/%d by the %s path in %.3f s", located.model, want.tp_rank,
                 want.tp_size, self.path_taken, time.perf_counter() - t0)
        return model

    def _fast_path(self, located: Located, want: RankVariant, vllm_config: VllmConfig, model_config: ModelConfig,
                   prefix: str) -> tuple[nn.Module | None, bool]:
        """(model, False) on success; (None, replace-the-stored-variant?) when it cannot serve."""
        source = self.source_factory(located)
        try:
            with source.open(want.key) as lease:
                problem = layout_problem(lease.metadata, want)
                if problem:
                    raise Unfit(problem)
                model = self._build_post_processed(vllm_config, model_config, prefix)
                state = rank_state(model)
                problem = state_problem(state, lease.entries)
                if problem:
                    raise Unfit(problem)
                copy_into(lease, {name: t.data for name, t in state.items()}, log=log)
        except NotFound:
            log.info("sllmfs: %r has no %s yet; loading the hf variant (any TP size)%s", located.model, want.key,
                     "" if self.write_back_mode == writeback.OFF else " and writing it back")
            return None, False
        except (Unfit, Corrupt, CopyError) as e:
            log.warning("sllmfs: stored %s of %r is not usable (%s); loading the hf variant instead%s", want.key,
                        located.model, e, "" if self.write_back_mode == writeback.OFF else " and replacing it")
            return None, True
        self.path_taken = "fast"
        return model.eval(), False

    def _build_post_processed(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str) -> nn.Module:
        """The model as vLLM builds it, post-processed before any weight is in (as vLLM's
        ShardedStateLoader does): its tensors have their final shapes; their bytes come from the store."""
        load = vllm_config.load_config
        target = torch.device(load.device or vllm_config.device_config.device)
        with set_default_torch_dtype(model_config.dtype):
            with target:
                model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            problem = per_rank_problem(vllm_config, model)
            if problem:
                raise Unfit(problem)
            process_weights_after_loading(model, model_config, target)
        return model

    def _write_back(self, located: Located, want: RankVariant, model: nn.Module, replace: bool,
                    base: Identity | None) -> None:
        wb = writeback.WriteBack(located.storage_path, located.model, want,
                                 snapshot(rank_state(model)),  # device → host now, before vLLM goes on
                                 replace=replace, base=base,
                                 socket=None if self.extra.get("sllm_storage_path") else located.socket)
        self.write_back = wb
        if self.write_back_mode == writeback.SYNC:
            wb.run()
        else:
            wb.start()


def _hf_weights(lease: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU view) pairs in file order, tied names included (vLLM's models skip what they tie),
    each as soon as its bytes are verified: the first start streams beside the sidecar's fill."""
    return weights_as_filled(lease)
