"""PyTorch load API: fill pre-allocated tensors, or allocate and fill a state dict.

    from sllmfs.torch import load_dict, load_into
    sd = load_dict("org/model", device_map={"": 0})        # whole model on cuda:0
    load_into(model.state_dict(), "org/model")              # tensors the framework allocated
"""

from __future__ import annotations

from typing import Any

import torch

from sllmfs import dtypes
from sllmfs.client import connect
from sllmfs.errors import BadInput
from sllmfs.gpu_ipc import reserve_segment, weight_bytes
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


def load_dict(model: str, device_map: DeviceMap = "cpu", variant: str = "hf", *, socket: str | None = None,
              dtype: torch.dtype | None = None, timeout: float = 120.0) -> dict[str, torch.Tensor]:
    """Allocate every stored tensor on its device (per ``device_map``) and fill it; tied names share memory."""
    with connect(socket) as client, client.acquire(model, variant) as lease:
        places = {name: _device_for(name, device_map) for name in lease.entries}
        if dtype is None:  # each GPU's tensors in one allocation: one IPC handle, one cudaMalloc
            for dev in set(places.values()):
                reserve_segment(dev, weight_bytes(lease.entries[n] for n, d in places.items() if d == dev))
        out: dict[str, torch.Tensor] = {}
        by_place: dict[tuple[int, int], torch.Tensor] = {}
        for name, ref in lease.entries.items():
            key = (ref.partition, ref.offset)
            if ref.nbytes and key in by_place:  # an alias (tied weights): share, as in the checkpoint
                out[name] = by_place[key]
                continue
            stored = dtypes.to_torch(dtypes.by_code(ref.dtype))
            out[name] = torch.empty(ref.shape, dtype=dtype or stored, device=places[name])
            if ref.nbytes:  # empty tensors may share an offset with a real one
                by_place[key] = out[name]
        copy_into(lease, out, timeout=timeout, strict=False)
    return out
