"""A rank's state: what a fast path fills and write-back stores (torch only, any framework)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sllmfs.core import dtypes


def rank_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state, shared storage kept once."""
    return filter_subtensors(model.state_dict())


def filter_subtensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SGLang's ShardedStateLoader._filter_subtensors, same result in O(n log n): SGLang's compares
    every pair of tensors in one storage, 0.1 s for a 7B model whose weights are views of one block.

    Drops empty tensors, and each contiguous tensor whose bytes another contiguous tensor of its
    storage covers (of two with the same bytes, the larger name goes); keeps non-contiguous ones."""
    groups: dict[tuple[torch.device, int], list[tuple[int, int, str]]] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not t.numel():
            continue
        if not t.is_contiguous():
            kept[name] = t
            continue
        start = t.data_ptr()
        groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(
            (start, -(start + t.numel() * t.element_size()), name))
    for group in groups.values():
        reach = None  # the furthest end among tensors starting at or before this one
        for _start, neg_end, name in sorted(group):
            if reach is None or -neg_end > reach:
                kept[name] = tensors[name]
                reach = -neg_end
    return {name: kept[name] for name in tensors if name in kept}  # the model's order (SGLang's groups by storage)


def state_problem(state: dict[str, torch.Tensor], entries: Mapping[str, Any]) -> str | None:
    """Why the stored tensors (name → dtype code, shape) do not match the model's own state, or None."""
    missing, extra = sorted(set(state) - set(entries)), sorted(set(entries) - set(state))
    if missing or extra:
        return f"tensor names differ (model lacks {extra[:3]}, store lacks {missing[:3]})"
    for name, t in state.items():
        e = entries[name]
        if list(t.shape) != list(e.shape) or dtypes.from_torch(t.dtype).code != dtypes.by_code(e.dtype).code:
            return f"{name} is {e.dtype}{list(e.shape)} in the store, {t.dtype}{list(t.shape)} in the model"
    return None
