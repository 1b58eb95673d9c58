"""``--load-format sllm``: SGLang model loader backed by the sllmfs sidecar.

Fast path: this rank's post-processed state (variant ``sglang.tp…``, the state
SGLang's ShardedStateLoader keeps) is copied straight into the tensors of a
freshly built model, then SGLang's post-load hook runs. Any-TP path: the ``hf``
variant, mapped zero-copy, feeds ``model.load_weights`` and the quantization
post-processing, like SGLang's default loader; afterwards this rank's state is
written back so the next start is fast. A per-rank variant that does not fit
(missing, other layout, damaged) means the any-TP path with a warning, never
a wrongly filled model.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.loader import (
    BaseModelLoader,
    DefaultModelLoader,
    _get_quantization_config,
    _initialize_model,
)
from sglang.srt.model_loader.utils import set_default_torch_dtype
from torch import nn

from sllmfs.core.errors import BadInput, Corrupt, NotFound
from sllmfs.core.names import HF_VARIANT
from sllmfs.engine.copy_engine import CopyError
from sllmfs.integrations.common import options, overlap, writeback
from sllmfs.integrations.common.locate import Located
from sllmfs.integrations.common.snapshot import snapshot
from sllmfs.integrations.common.source import Lease, WeightSource, weights_as_filled
from sllmfs.integrations.common.state import rank_state
from sllmfs.integrations.common.variants import layout_problem
from sllmfs.integrations.sglang import fastpath, variants
from sllmfs.integrations.sglang.fastpath import Unfit
from sllmfs.integrations.sglang.variants import RankVariant
from sllmfs.store.store import Identity

log = logging.getLogger("sllmfs.integrations.sglang")

# --model-loader-extra-config keys this loader reads
EXTRA_KEYS = options.COMMON_KEYS | {
    "sllm_overlap",  # true (default): the fast path copies beside the model build when the variant has a plan
}

def current_variant(model_config: ModelConfig, draft_model_idx: int | None = None) -> RankVariant:
    """The per-rank variant this process would use (from SGLang's parallel state)."""
    from sglang.srt.runtime_context import get_parallel
    from sglang.version import __version__

    ps = get_parallel()
    return variants.make(tp_size=ps.tp_size, tp_rank=ps.tp_rank, pp_size=ps.pp_size, pp_rank=ps.pp_rank,
                         ep_size=ps.moe_ep_size, dtype=model_config.dtype, quant=model_config.quantization,
                         sglang_version=__version__,
                         draft=(draft_model_idx or 0) if getattr(model_config, "is_draft_model", False) else None)


def hf_weights(lease: Lease, draft_model_idx: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU view) pairs in file order, as ``model.load_weights`` expects them, tied names included,
    each as soon as its bytes are verified: the first start streams beside the sidecar's fill."""
    pairs = weights_as_filled(lease)
    if draft_model_idx is not None:  # multi-layer MTP draft: SGLang's own filter
        return DefaultModelLoader._filter_mtp_weights(pairs, "", draft_model_idx)
    return pairs


def load_any_tp(model: nn.Module, lease: Lease, target_device: torch.device,
                draft_model_idx: int | None = None) -> None:
    """Feed the hf tensors to the model's loader, then the quant post-processing."""
    if getattr(model, "secondary_weights", ()):
        raise BadInput(f"{type(model).__name__} loads weights from a second checkpoint; "
                       "--load-format sllm does not serve those yet, use the default loader")
    DefaultModelLoader.load_weights_and_postprocess(model, hf_weights(lease, draft_model_idx), target_device)


class SllmModelLoader(BaseModelLoader, options.LoaderSettings):
    # SGLang >= 0.5.19 adds this to the free GPU memory it sampled before the load, for weights already
    # resident then (a weight daemon's). Ours are allocated and copied during the load, as the default
    # loader's are; the sidecar holds host memory only. So none: 0, said here rather than inherited.
    preloaded_weights_bytes: int = 0

    def __init__(self, load_config: LoadConfig, *, source_factory: options.SourceFactory | None = None):
        super().__init__(load_config)
        self._read_config(load_config.model_loader_extra_config, EXTRA_KEYS, source_factory)
        self.overlap = _truthy(self.extra.get("sllm_overlap", True))
        self.copy_ran: str | None = None  # fast path: fastpath.AFTER or BESIDE the model build
        self._candidates: overlap.Candidates | None = None  # from the any-TP build, for write-back's plan
        self._base: Identity | None = None  # the hf version the any-TP path loaded

    # -- where the weights are ------------------------------------------------

    def _locate(self, model_config: ModelConfig) -> Located:
        return options.located(self.extra, model_config.model_path)

    def download_model(self, model_config: ModelConfig) -> None:
        located = self._locate(model_config)
        with self.source_factory(located).open(HF_VARIANT, gpu_first=False):
            pass  # present and resident: nothing to download

    # -- loading ----------------------------------------------------------------

    def load_model(self, *, model_config: ModelConfig, device_config: DeviceConfig) -> nn.Module:
        if getattr(model_config, "modelopt_quant", None):
            raise BadInput("--load-format sllm does not run ModelOpt quantization; quantize and save the "
                           "checkpoint first, or use the default loader")
        t0 = time.perf_counter()
        located = self._locate(model_config)
        source = self.source_factory(located)
        want = current_variant(model_config, self.load_config.draft_model_idx)
        target = torch.device(device_config.device)
        quant_config = _get_quantization_config(model_config, self.load_config)

        def new_model() -> nn.Module:
            with target:
                return _initialize_model(model_config, self.load_config, quant_config)

        t_located = time.perf_counter()
        with set_default_torch_dtype(model_config.dtype):
            model, replace = self._fast_path(source, want, new_model, target)
            t_fast = time.perf_counter()
            if model is None:
                # the hf version this state comes from: its write-back must not land on a model replaced since
                self._base = writeback.hf_identity(located.storage_path, located.model)
                model = self._any_tp_path(source, want, new_model, target)
                if self.write_back_mode != writeback.OFF:
                    self._write_back(located, want, model, replace)
        t_loaded = time.perf_counter()
        _free_staging(target, collect=self.path_taken != "fast")  # the fast path stages nothing
        log.info("sllmfs: loaded %r rank %d/%d by the %s path in %.3f s (locate %.3f, fast path %.3f, "
                 "any-TP %.3f, free %.3f)", located.model, want.tp_rank, want.tp_size, self.path_taken,
                 time.perf_counter() - t0, t_located - t0, t_fast - t_located, t_loaded - t_fast,
                 time.perf_counter() - t_loaded)
        return model.eval()

    def _fast_path(self, source: WeightSource, want: RankVariant, new_model: Callable[[], nn.Module],
                   target: torch.device) -> tuple[nn.Module | None, bool]:
        """(model, None) on success; (None, replace-the-stored-variant?) when it cannot serve."""
        key = want.key
        try:
            with source.open(key) as lease:
                problem = layout_problem(lease.metadata, want)
                if problem:
                    raise Unfit(problem)
                plan = overlap.read_plan(lease.metadata, lease.entries) if self.overlap else None
                model, self.copy_ran = fastpath.load(lease, new_model, target, plan)
        except NotFound:
            log.info("sllmfs: %r has no %s yet; loading the hf variant (any TP size)%s", source.model, key,
                     "" if self.write_back_mode == writeback.OFF else " and writing it back")
            return None, False
        except (Unfit, Corrupt, CopyError) as e:
            log.warning("sllmfs: stored %s of %r is not usable (%s); loading the hf variant instead%s",
                        key, source.model, e, "" if self.write_back_mode == writeback.OFF else " and replacing it")
            return None, True
        self.path_taken = "fast"
        return model, False

    def _any_tp_path(self, source: WeightSource, want: RankVariant, new_model: Callable[[], nn.Module],
                     target: torch.device) -> nn.Module:
        # a start that writes back also logs the build's allocations, for the next start's overlap
        allocations = overlap.AllocationLog(target) if self.write_back_mode != writeback.OFF else None
        try:
            with source.open(HF_VARIANT, gpu_first=False) as lease:  # read as CPU views
                with allocations or nullcontext():
                    model = new_model()
                self._candidates = overlap.candidates(model, allocations) if allocations else None
                load_any_tp(model, lease, target, self.load_config.draft_model_idx)
        except NotFound:
            raise NotFound(f"model {source.model!r} has no hf variant in the sllmfs store; "
                           f"run `sllmfs save --model {source.model} --local-model-path <checkpoint>`") from None
        except Corrupt as e:
            raise Corrupt(f"model {source.model!r}: {e}; run `sllmfs verify {source.model}` and "
                          f"`sllmfs save --model {source.model} --force ...`") from None
        self.path_taken = "any-tp"
        return model

    def _write_back(self, located: Located, want: RankVariant, model: nn.Module, replace: bool) -> None:
        state = rank_state(model)
        metadata = {overlap.PLAN_KEY: overlap.make_plan(self._candidates, model, state)} if self._candidates else None
        self._candidates = None  # holds the build's tensors
        wb = writeback.WriteBack(located.storage_path, located.model, want,
                                 snapshot(state),  # GPU → host now, before SGLang goes on
                                 replace=replace, metadata=metadata, base=self._base,
                                 socket=None if self.extra.get("sllm_storage_path") else located.socket)
        self.write_back = wb
        if self.write_back_mode == writeback.SYNC:
            wb.run()
        else:
            wb.start()


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


def _free_staging(target: torch.device, *, collect: bool = True) -> None:
    """SGLang sizes the KV cache from free GPU memory right after us: leave nothing cached."""
    if collect:  # a full collection in SGLang's big heap costs a noticeable part of a fast load
        gc.collect()
    if target.type == "cuda":
        torch.cuda.empty_cache()
