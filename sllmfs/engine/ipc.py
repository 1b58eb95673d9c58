"""Client side of server-side copies: export CUDA tensors' allocations as IPC handles.

The sidecar, which keeps every segment pinned, opens the handles with
:meth:`sllmfs.engine.copy_engine.CopyEngine.copy_ipc` and copies into the tensors
itself, so the client never pins anything. One block per distinct cudaMalloc
allocation (the caching allocator's segment): tensors that share one go in a
single handle, and each tensor's place is (block index, byte offset).

Handles come from cudaIpcGetMemHandle on the allocation base (found with the
driver's cuMemGetAddressRange), through the runtime torch loaded. torch's own
``_share_cuda_`` is not used: it attaches a cross-process ref counter that a
non-torch receiver never releases, so those blocks would never be freed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sllmfs.engine.cudart import cuda_runtime
from sllmfs.engine.errors import CopyError, CudaUnavailable
from sllmfs.engine.native import EngineError, lib, translate

if TYPE_CHECKING:
    import torch


class BadTarget(CopyError, ValueError):
    """A tensor that cannot receive a server-side copy (not on a GPU, not contiguous)."""


def _check(name: str, t: Any, torch: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise BadTarget(f"target {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.device.type != "cuda":
        raise BadTarget(f"target {name!r} is on {t.device}; server-side copies need CUDA tensors (load it locally)")
    if not t.is_contiguous():
        raise BadTarget(f"target {name!r} is not contiguous; the sidecar writes each tensor as one byte range")


def export_targets(tensors: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int]]]:
    """(blocks, places) for the sidecar.

    blocks: one {"handle": 64 bytes, "size": allocation bytes, "device": PCI
    bus id} per distinct allocation; places: name -> (block index, offset of
    the tensor's first byte in the block). Empty tensors get no place. The
    caller must keep ``tensors`` alive until the sidecar has replied. Waits for
    the GPU first, so no pending kernel writes the tensors after the copy.
    """
    import torch

    for name, t in tensors.items():
        _check(name, t, torch)
    if not tensors:
        return [], {}
    for dev in {t.device.index or 0 for t in tensors.values()}:
        torch.cuda.synchronize(dev)
    cudart, fallback = cuda_runtime()  # torch is imported: its runtime, so both share the context
    blocks: list[dict[str, Any]] = []
    ranges: list[tuple[int, int, int]] = []  # (base, end, block index), looked up before asking CUDA
    places: dict[str, tuple[int, int]] = {}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            continue
        ptr = t.data_ptr()  # includes storage_offset * itemsize
        hit = next((r for r in ranges if r[0] <= ptr and ptr + nbytes <= r[1]), None)
        if hit is None:
            try:
                handle, base, size, _, bus = lib.ipc_export(ptr, cudart, fallback)
            except EngineError as e:
                raise translate(e, CudaUnavailable) from None
            hit = (int(base), int(base) + int(size), len(blocks))
            ranges.append(hit)
            blocks.append({"handle": bytes(handle), "size": int(size), "device": str(bus)})
        places[name] = (hit[2], ptr - hit[0])
    return blocks, places


SMALL_ALLOC = 1 << 20  # torch serves requests up to 1 MiB from its small pool (2 MiB segments), not from ours


def large_pool_bytes(sizes: Iterable[int]) -> int:
    """Bytes tensors of these sizes take from torch's large pool (512-byte rounding)."""
    return sum(-(-n // 512) * 512 for n in sizes if n > SMALL_ALLOC)


def reserve_segment(device: Any, nbytes: int) -> int:
    """Leave one free cudaMalloc of ``nbytes`` in torch's caching allocator, for the weights allocated next.

    torch splits a cached free block for later requests, so a model built right
    after this gets its weights from one allocation: the sidecar opens one IPC
    handle instead of one per weight (opens cost copy time even when overlapped:
    48.8 vs 52.3 GB/s for 227 allocations vs one, bench/results), and the model
    build pays one cudaMalloc instead of hundreds. Sized to the weights, so
    nothing stays reserved unused. Returns the bytes reserved (0 off CUDA).
    """
    import torch

    dev = torch.device(device)
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if dev.type != "cuda" or nbytes <= 0 or "max_split_size" in conf or "expandable_segments:True" in conf:
        return 0  # such allocators would not split the block (or need no help): it would sit unused
    torch.empty(nbytes, dtype=torch.uint8, device=dev)  # freed at once; the allocator keeps the block
    return nbytes
