"""The fast path: build the model, post-process it, fill it with this rank's stored state.

As SGLang's ShardedStateLoader: the stored state is what the model holds after its
quantization post-processing, so post-processing runs first (the tensors get their final
shapes) and the stored bytes then overwrite whatever it produced. With a plan in the
variant (sllmfs.integrations.common.overlap) the copy starts before the build and runs beside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import nn

from sllmfs.integrations.common import overlap
from sllmfs.integrations.common.copy import copy_into, copy_spans
from sllmfs.integrations.common.state import rank_state, state_problem
from sllmfs.integrations.sglang.compat import post_load_weights
from sllmfs.integrations.torch import mirror_layout

log = logging.getLogger("sllmfs.integrations.sglang")


class Unfit(Exception):
    """The per-rank variant cannot serve this model; take the any-TP path."""


def _post_process(model: nn.Module) -> set[int]:
    return overlap.post_process(model, lambda quant_method, module: quant_method.process_weights_after_loading(module))


def _checked_state(model: nn.Module, lease: Any) -> dict[str, torch.Tensor]:
    state = rank_state(model)
    problem = state_problem(state, lease.entries)
    if problem:
        raise Unfit(problem)
    return state


AFTER, BESIDE = "after the build", "beside the build"


def load(lease: Any, new_model: Callable[[], nn.Module], target: torch.device,
         plan: overlap.Plan | None) -> tuple[nn.Module, str]:
    """A model filled from ``lease`` and when the copy ran; raises Unfit when the stored state does not fit."""
    laid = mirror_layout(lease, [(name, target) for name in plan.views.values()]) if plan else None
    if plan is None or laid is None:
        return _load_after_build(lease, new_model), AFTER
    return _load_beside_build(lease, new_model, target, plan, *laid), BESIDE


def _load_after_build(lease: Any, new_model: Callable[[], nn.Module]) -> nn.Module:
    t0 = time.perf_counter()
    model = new_model()
    t1 = time.perf_counter()
    _post_process(model)
    t2 = time.perf_counter()
    state = _checked_state(model, lease)
    copy_into(lease, {name: t.data for name, t in state.items()}, log=log)
    post_load_weights(model)
    log.info("sllmfs: fast path: model init %.3f s, post-process %.3f s, fill %.3f s",
             t1 - t0, t2 - t1, time.perf_counter() - t2)
    return model


def _load_beside_build(lease: Any, new_model: Callable[[], nn.Module], target: torch.device, plan: overlap.Plan,
                       views: dict[str, torch.Tensor], spans: list[Any]) -> nn.Module:
    t0 = time.perf_counter()
    places = {name: v.data_ptr() for name, v in views.items()}  # fixed now: the build may rebind tensors
    copy = overlap.Background(lambda: copy_spans(lease, spans, log=log), overlap.resolve(target))
    try:
        with overlap.Redirect(target, plan, {i: views[name] for i, name in plan.views.items()}) as redirect:
            model = new_model()
        t1 = time.perf_counter()
        touched = _post_process(model)
        t2 = time.perf_counter()
        owned, from_block, rest = _left_to_copy(_checked_state(model, lease), lease, places, spans, touched)
        stray = _stray_in_block(model, owned, spans)
        if stray:
            raise Unfit(f"{stray} lies inside the copied block but is not its own stored tensor there (the "
                        f"allocation plan does not fit this build{_where(redirect)})")
        model.eval()  # what SGLang's loaders return; done here while the copy still runs
    except BaseException:
        copy.join_quietly()  # the block must outlive the copy writing into it
        raise
    try:
        copy.join()
    except BaseException:
        copy.join_quietly()
        raise
    t3 = time.perf_counter()
    for dst, stored in from_block:
        dst.copy_(stored)  # copied along in a run: no second trip over PCIe
    copy_into(lease, rest, log=log)
    post_load_weights(model)
    unused = sum(lease.entries[n].nbytes for n in plan.views.values() if n not in owned)
    if unused:
        log.warning("sllmfs: %.2f GB of the copied block holds no tensor of the model (%d of %d planned tensors "
                    "were not its views%s); they were copied again after the build. If this repeats, set "
                    "sllm_overlap false", unused / 1e9, len(plan.views) - len(owned), len(plan.views),
                    _where(redirect))
    log.info("sllmfs: fast path beside the build: model init %.3f s (copy running), post-process %.3f s, "
             "copy done %.3f s after start, then %d tensors from the block and %d from the host in %.3f s",
             t1 - t0, t2 - t1, t3 - t0, len(from_block), len(rest), time.perf_counter() - t3)
    return model


def _where(redirect: overlap.Redirect) -> str:
    if redirect.same_build:
        return ""
    at = redirect.diverged_at if redirect.diverged_at is not None else redirect.calls
    return f"; the build differs from the recorded one from allocation {at} of {len(redirect.build)}"


def _left_to_copy(state: dict[str, torch.Tensor], lease: Any, places: dict[str, int], spans: list[Any],
                  touched: set[int]) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]],
                                          dict[str, torch.Tensor]]:
    """Split the model's state: the tensors that are their own views of the block, (destination bytes,
    block bytes) pairs for what else the copy carried along, and tensors to copy from the host (those
    post-processing touched among them). Raises Unfit if a tensor lies in the block at another's place."""
    owned, from_block, rest = {}, [], {}
    for name, t in state.items():
        own = name in places and t.data_ptr() == places[name]
        if own:
            owned[name] = t
            if t.data_ptr() not in touched:
                continue  # filled by the block copy
            rest[name] = t.data  # post-processing may have changed it after the bytes landed: again
            continue
        if not own and _inside(t, spans):
            raise Unfit(f"{name} lies inside the copied block at another tensor's place (the allocation plan "
                        "does not fit this build)")
        stored = None if name in places else _block_bytes(lease.entries[name], spans)
        if stored is not None and t.is_contiguous() and t.device == stored.device:
            from_block.append((t.detach().reshape(-1).view(torch.uint8), stored))
        else:
            rest[name] = t.data
    return owned, from_block, rest


def _stray_in_block(model: nn.Module, owned: dict[str, torch.Tensor], spans: list[Any]) -> str | None:
    """A parameter or buffer inside the block that is not (part of) a filled tensor, e.g. a non-persistent
    buffer that got a view meant for a weight: the name, or None."""
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in owned.values()]
    for name, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        if t.numel() and _inside(t, spans):
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            if not any(a <= lo and hi <= b for a, b in ranges):
                return name
    return None


def _block_bytes(ref: Any, spans: list[Any]) -> torch.Tensor | None:
    """The block's copy of a stored tensor that was not planned but lies within a copied run, if any."""
    for partition, offset, dst in spans:
        if ref.partition == partition and offset <= ref.offset and ref.offset + ref.nbytes <= offset + dst.numel():
            return dst[ref.offset - offset : ref.offset - offset + ref.nbytes]  # type: ignore[no-any-return]
    return None


def _inside(t: torch.Tensor, spans: list[Any]) -> bool:
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return bool(spans) and t.device == spans[0][2].device and any(
        lo < s[2].data_ptr() + s[2].numel() and s[2].data_ptr() < hi for s in spans if s[2].numel())
