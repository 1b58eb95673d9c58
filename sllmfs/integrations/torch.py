"""PyTorch load API: fill pre-allocated tensors, or allocate and fill a state dict.

    from sllmfs.integrations.torch import load_dict, load_into
    sd = load_dict("org/model", device_map={"": 0})        # whole model on cuda:0
    load_into(model.state_dict(), "org/model")              # tensors the framework allocated
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, overload

import torch

from sllmfs.client.client import connect
from sllmfs.client.transfer import LoadStats, copy_into, copy_spans, sidecar_copies
from sllmfs.core import dtypes
from sllmfs.core.errors import BadInput
from sllmfs.core.names import HF_VARIANT
from sllmfs.store.format import ALIGNMENT

DeviceMap = dict[str, Any] | str | int | torch.device


def load_into(tensors_by_name: dict[str, torch.Tensor], model: str, variant: str = HF_VARIANT, *,
              socket: str | None = None, strict: bool = True, timeout: float = 120.0) -> LoadStats:
    """Copy the stored tensors of ``model`` into ``tensors_by_name`` (same names, shapes; dtype may differ)."""
    gpu_first = sidecar_copies() and any(t.is_cuda for t in tensors_by_name.values())
    with connect(socket) as client, client.acquire(model, variant, gpu_first=gpu_first) as lease:
        return copy_into(lease, tensors_by_name, timeout=timeout, strict=strict)


def _any_gpu(device_map: DeviceMap) -> bool:
    devices = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(_as_device(d).type == "cuda" for d in devices)


def _device_for(name: str, device_map: DeviceMap) -> torch.device:
    """sllm-store style maps: {"": 0}, {"model.layers.0": 0, "lm_head": "cpu"}; the longest prefix wins."""
    if not isinstance(device_map, dict):
        return _as_device(device_map)
    dev = _map_entry(name, device_map)
    if dev is None:
        raise BadInput(f"device_map places no device for tensor {name!r}; add a \"\" entry for the rest")
    return _as_device(dev)


def _map_entry(name: str, device_map: dict[str, Any]) -> Any | None:
    """The device the longest prefix of ``name`` in ``device_map`` gives, or None where none matches."""
    best, dev = -1, None
    for prefix, d in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, dev = len(prefix), d
    return dev


def _as_device(d: Any) -> torch.device:
    try:
        dev = torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
    except (RuntimeError, TypeError):
        raise BadInput(f"device_map: {d!r} is not a device (try \"cpu\", \"cuda\", \"cuda:1\" or 0)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"device_map asks for {dev}, but torch {torch.__version__} sees no GPU here; "
                           "use device_map=\"cpu\"")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInput(f"device_map asks for {dev}, but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


_ALIGN = 512  # each tensor's offset in its device's block when packed: torch's own allocation granularity
_GAP = 64 << 10  # store padding up to this is copied along with a run; a longer gap starts a new run


@overload
def load_dict(model: str, device_map: DeviceMap = ..., variant: str = ..., *, socket: str | None = ...,
              dtype: torch.dtype | None = ..., timeout: float = ...,
              return_stats: Literal[False] = ...) -> dict[str, torch.Tensor]: ...


@overload
def load_dict(model: str, device_map: DeviceMap = ..., variant: str = ..., *, socket: str | None = ...,
              dtype: torch.dtype | None = ..., timeout: float = ...,
              return_stats: Literal[True]) -> tuple[dict[str, torch.Tensor], LoadStats]: ...


def load_dict(model: str, device_map: DeviceMap = "cpu", variant: str = HF_VARIANT, *, socket: str | None = None,
              dtype: torch.dtype | None = None, timeout: float = 120.0, return_stats: bool = False) -> Any:
    """Allocate every stored tensor on its device (per ``device_map``) and fill it; tied names share memory.

    Each device's tensors are views of one block (as sllm-store's load_dict): one allocation, and one
    IPC handle for the sidecar's GPU copy however many tensors (each handle costs copy time). Without
    a dtype cast the block mirrors the store's layout, so whole runs of tensors are copied as one
    piece (no per-tensor work in the copy); with one, tensors are packed and cast one by one.
    A map over several GPUs fills them at once, each over its own link. Returns the state dict, or
    (state dict, LoadStats) with ``return_stats`` (``LoadStats.links``: each device's copy window).
    """
    gpu_first = sidecar_copies() and _any_gpu(device_map)
    with connect(socket) as client, client.acquire(model, variant, gpu_first=gpu_first) as lease:
        # tied names: one tensor, as in the checkpoint, where both go to one device or the map places only
        # the stored name (the tie follows it); else each its own copy
        shared = {n: t for n, t in lease.shares.items()
                  if (isinstance(device_map, dict) and _map_entry(n, device_map) is None)
                  or _device_for(n, device_map) == _device_for(t, device_map)}
        placed = [(name, _device_for(name, device_map)) for name in lease.entries if name not in shared]
        mirrored = None if dtype is not None else _mirrored(lease, placed, timeout)
        if mirrored is None:
            out = _packed(lease, placed, dtype)
            stats = copy_into(lease, out, timeout=timeout, strict=False)
        else:
            out, stats = mirrored
        for name, target in shared.items():
            out[name] = out[target]
    return (out, stats) if return_stats else out


def _stored(ref: Any) -> torch.dtype:
    return _torch_dtype(ref.dtype)


@functools.cache
def _torch_dtype(code: str) -> torch.dtype:
    return dtypes.to_torch(dtypes.by_code(code))  # type: ignore[no-any-return]


def _mirrored(lease: Any, placed: list[tuple[str, torch.device]],
              timeout: float) -> tuple[dict[str, torch.Tensor], LoadStats] | None:
    """Views laid out as the store lays the bytes, filled by whole runs; None if a tensor sits unaligned."""
    laid = mirror_layout(lease, placed)
    if laid is None:
        return None
    out, spans = laid
    return out, copy_spans(lease, spans, timeout=timeout)


Span = tuple[int, int, torch.Tensor]  # (partition, offset, uint8 destination as long as the range)


Mirror = tuple[dict[str, torch.Tensor], list[Span]]


def mirror_layout(lease: Any, placed: list[tuple[str, torch.device]]) -> Mirror | None:
    """Allocate one block per device holding ``placed`` as the store lays their bytes: the views by name
    and the spans that fill them (nothing copied yet); None if a tensor sits unaligned for its dtype."""
    runs: dict[torch.device, list[list[tuple[str, Any, torch.dtype]]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, dev in sorted(placed, key=lambda p: (lease.entries[p[0]].partition, lease.entries[p[0]].offset)):
        ref = lease.entries[name]
        kind = _stored(ref)
        if not ref.nbytes:
            out[name] = torch.empty(ref.shape, dtype=kind, device=dev)
            continue
        if ref.offset % kind.itemsize:
            return None
        mine = runs.setdefault(dev, [])
        last = mine[-1][-1][1] if mine else None
        # a run goes on while the next tensor lands _ALIGN-aligned in the block (kernels want aligned weights;
        # a safetensors-layout variant packs tensors back to back) and the store's gap before it is small
        if last is None or last.partition != ref.partition or not 0 <= ref.offset - last.offset - last.nbytes <= _GAP \
                or (ref.offset - mine[-1][0][1].offset) % _ALIGN:
            mine.append([])
        mine[-1].append((name, ref, kind))
    spans: list[Span] = []
    for dev, dev_runs in runs.items():
        lengths = [run[-1][1].offset + run[-1][1].nbytes - run[0][1].offset for run in dev_runs]
        block = torch.empty(sum(-(-n // ALIGNMENT) * ALIGNMENT for n in lengths), dtype=torch.uint8, device=dev)
        at = 0
        for run, n in zip(dev_runs, lengths, strict=True):
            first = run[0][1].offset
            spans.append((run[0][1].partition, first, block[at:at + n]))
            for name, ref, kind in run:
                lo = at + ref.offset - first
                out[name] = block[lo:lo + ref.nbytes].view(kind).view(ref.shape)
            at += -(-n // ALIGNMENT) * ALIGNMENT
    return out, spans


def _packed(lease: Any, placed: list[tuple[str, torch.device]], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Views packed in file order (a dtype cast changes every size)."""
    layout: dict[torch.device, list[tuple[str, torch.dtype, int]]] = {}
    ends: dict[torch.device, int] = {}
    for name, dev in placed:
        ref = lease.entries[name]
        kind = dtype or _stored(ref)
        at = ends.get(dev, 0)
        layout.setdefault(dev, []).append((name, kind, at))
        ends[dev] = at + -(-math.prod(ref.shape) * kind.itemsize // _ALIGN) * _ALIGN
    out: dict[str, torch.Tensor] = {}
    for dev, items in layout.items():
        block = torch.empty(ends[dev], dtype=torch.uint8, device=dev)
        for name, kind, at in items:
            shape = lease.entries[name].shape
            out[name] = block[at:at + math.prod(shape) * kind.itemsize].view(kind).view(shape)
    return out
