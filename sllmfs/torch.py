"""PyTorch load API: fill pre-allocated tensors, or allocate and fill a state dict.

    from sllmfs.torch import load_dict, load_into
    sd = load_dict("org/model", device_map={"": 0})        # whole model on cuda:0
    load_into(model.state_dict(), "org/model")              # tensors the framework allocated
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sllmfs import dtypes
from sllmfs.client import connect
from sllmfs.errors import BadInput
from sllmfs.transfer import LoadStats, copy_into

DeviceMap = dict[str, Any] | str | int | torch.device


def load_into(tensors_by_name: dict[str, torch.Tensor], model: str, variant: str = "hf", *,
              socket: str | None = None, strict: bool = True, timeout: float = 120.0) -> LoadStats:
    """Copy the stored tensors of ``model`` into ``tensors_by_name`` (same names, shapes; dtype may differ)."""
    with connect(socket) as client, client.acquire(model, variant) as lease:
        return copy_into(lease, tensors_by_name, timeout=timeout, strict=strict)


def _device_for(name: str, device_map: DeviceMap) -> torch.device:
    """sllm-store style maps: {"": 0}, {"model.layers.0": 0, "lm_head": "cpu"}; the longest prefix wins."""
    if not isinstance(device_map, dict):
        return _as_device(device_map)
    best, dev = -1, None
    for prefix, d in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, dev = len(prefix), d
    if dev is None:
        raise BadInput(f"device_map places no device for tensor {name!r}; add a \"\" entry for the rest")
    return _as_device(dev)


def _as_device(d: Any) -> torch.device:
    if isinstance(d, int):
        return torch.device("cuda", d)
    return torch.device(d)


_ALIGN = 512  # each tensor's offset in its device's block: torch's own allocation granularity


def load_dict(model: str, device_map: DeviceMap = "cpu", variant: str = "hf", *, socket: str | None = None,
              dtype: torch.dtype | None = None, timeout: float = 120.0) -> dict[str, torch.Tensor]:
    """Allocate every stored tensor on its device (per ``device_map``) and fill it; tied names share memory.

    Each device's tensors are views of one block, in file order (as sllm-store's load_dict): one
    allocation, and one IPC handle for the sidecar's GPU copy however many tensors there are (each
    handle it opens costs copy time; small tensors would otherwise each land in their own).
    """
    with connect(socket) as client, client.acquire(model, variant) as lease:
        first: dict[tuple[int, int], str] = {}  # where a tensor's bytes lie -> the name that owns them
        layout: dict[torch.device, list[tuple[str, torch.dtype, int]]] = {}  # device -> (name, dtype, offset)
        ends: dict[torch.device, int] = {}
        for name, ref in lease.entries.items():
            if ref.nbytes and (ref.partition, ref.offset) in first:
                continue  # an alias (tied weights): shares its target, as in the checkpoint
            if ref.nbytes:
                first[(ref.partition, ref.offset)] = name
            kind = dtype or dtypes.to_torch(dtypes.by_code(ref.dtype))
            dev = _device_for(name, device_map)
            at = ends.get(dev, 0)
            layout.setdefault(dev, []).append((name, kind, at))
            ends[dev] = at + -(-math.prod(ref.shape) * kind.itemsize // _ALIGN) * _ALIGN
        out: dict[str, torch.Tensor] = {}
        for dev, items in layout.items():
            block = torch.empty(ends[dev], dtype=torch.uint8, device=dev)
            for name, kind, at in items:
                shape = lease.entries[name].shape
                out[name] = block[at:at + math.prod(shape) * kind.itemsize].view(kind).view(shape)
        for name, ref in lease.entries.items():
            if name not in out:
                out[name] = out[first[(ref.partition, ref.offset)]]
        copy_into(lease, out, timeout=timeout, strict=False)
    return out
