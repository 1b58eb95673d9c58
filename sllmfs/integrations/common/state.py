"""A rank's state: what a fast path fills and write-back stores (torch only, any framework)."""

from __future__ import annotations

import torch
from torch import nn


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
