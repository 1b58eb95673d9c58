"""From a lease to filled tensors: plan the copy pieces and run the copy engine.

One place decides how bytes reach a framework's pre-allocated tensors:
same dtype and shape → the native engine copies straight from the mapped
segments (CUDA or host target); a dtype cast → torch casts from the zero-copy
view. Nothing here knows about a particular framework.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sllmfs.core import dtypes
from sllmfs.core.config import env_str
from sllmfs.core.errors import BadInput, SidecarCannotCopy
from sllmfs.engine.copy_engine import CopyEngine, CudaUnavailable, Segment, address_of
from sllmfs.engine.ipc import export_targets  # imported up front: a first import inside a timed load costs ms
from sllmfs.store.format import ALIGNMENT, HUGE_PAGE

_log = logging.getLogger("sllmfs")

if TYPE_CHECKING:
    import torch

    from sllmfs.client.client import Lease


@dataclass
class LoadStats:
    bytes: int = 0
    seconds: float = 0.0
    tensors: int = 0
    cast_tensors: int = 0
    engine: dict[str, Any] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)  # targets the store lacks but that share a filled tensor's memory
    missing: list[str] = field(default_factory=list)  # targets left as they were (strict=False only)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def segments_of(lease: Lease) -> list[Any]:
    """The lease's mapped partitions as copy-engine segments, with their readiness bytes."""
    ready_base = address_of(lease.readiness)
    out = []
    for i, m in enumerate(lease.maps):
        size = lease.sizes[i]
        out.append(Segment(address_of(m) if size else 0, size, ready_base + lease.ready_base[i],
                           lease.ready_unit, (m, lease.readiness), page_size=HUGE_PAGE if lease.huge[i] else ALIGNMENT))
    return out


def _gpu_copy() -> str:
    """SLLMFS_GPU_COPY: who copies into CUDA tensors: ``auto`` (default: the sidecar when it can,
    else this process), ``sidecar`` (its refusal is an error), ``client`` (always this process)."""
    return env_str("SLLMFS_GPU_COPY", "auto")


def _sidecar_copy(lease: Lease, targets: dict[str, torch.Tensor], rows: list[tuple[int, int, int, int]],
                  timeout: float) -> dict[str, Any] | None:
    """Ask the sidecar, which keeps its segments pinned, to copy into our tensors; None: copy here."""
    by_ptr = {t.data_ptr(): t for t in targets.values() if t.numel()}
    wanted = {f"{r[2]:x}": by_ptr[r[2]] for r in rows}  # one entry per destination, ties copied once
    t0 = time.perf_counter()
    try:
        blocks, places = export_targets(wanted)
    except CudaUnavailable as e:  # e.g. VMM allocations (expandable_segments) have no legacy IPC handle
        if _gpu_copy() == "sidecar":
            raise
        _log.info("sllmfs: the sidecar cannot reach these tensors (%s); copying in this process", e)
        return None
    t1 = time.perf_counter()
    pieces = []
    for part, offset, ptr, nbytes in rows:
        block, at = places[f"{ptr:x}"]
        pieces.append([part, offset, block, at, nbytes])
    try:
        reply = lease.copy_to_gpu(blocks, pieces, timeout)
    except SidecarCannotCopy as e:
        if _gpu_copy() == "sidecar":
            raise
        _log.info("sllmfs: %s", e)
        return None
    reply.pop("ok", None)
    reply.update(path="sidecar", export_s=t1 - t0, request_s=time.perf_counter() - t1)
    return reply


def copy_into(lease: Lease, targets: dict[str, torch.Tensor], *, timeout: float = 120.0,
              strict: bool = True, mode: str = "auto") -> LoadStats:
    """Fill ``targets`` (name → pre-allocated tensor, on any devices) from ``lease``'s mapped segments.

    A target the store lacks is fine when it shares memory with one it has (tied embeddings:
    ``lm_head.weight`` is ``embed_tokens.weight``); others fail unless ``strict=False``, which
    leaves them as they are and names them in ``LoadStats.missing`` (as torch's load_state_dict)."""
    tied, missing = _split_absent(lease, targets)
    if missing and strict:
        raise BadInput(f"model {lease.model!r} [{lease.variant}] has no tensor {missing[0]!r} "
                       f"({len(missing)} missing); is it the right model and variant? "
                       "(strict=False leaves missing tensors as they are)")
    if tied or missing:
        targets = {n: t for n, t in targets.items() if n in lease.entries}
    if strict:
        extra = [n for n in lease.entries if n not in targets]
        if extra:
            raise BadInput(f"model {lease.model!r} [{lease.variant}] has tensor {extra[0]!r} that the target lacks "
                           f"({len(extra)} unused); pass strict=False to ignore them")
    t0 = time.perf_counter()
    by_device: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for name, t in targets.items():
        by_device.setdefault((t.device.type, t.device.index or 0), {})[name] = t
    stats = LoadStats()
    for (kind, index), group in by_device.items():
        s = _copy_to_device(lease, group, "host" if kind == "cpu" else kind, index, timeout, mode)
        stats.bytes += s.bytes
        stats.cast_tensors += s.cast_tensors
        stats.engine = s.engine
    stats.tensors = len(targets)
    stats.tied, stats.missing = tied, missing
    stats.seconds = time.perf_counter() - t0
    return stats


def _split_absent(lease: Lease, targets: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Targets the store lacks: (tied to a stored target's memory, truly missing)."""
    absent = [n for n in targets if n not in lease.entries]
    if not absent:
        return [], []
    filled = {_place(t) for n, t in targets.items() if n in lease.entries and t.numel()}
    tied = [n for n in absent if targets[n].numel() and _place(targets[n]) in filled]
    return tied, [n for n in absent if n not in tied]


def _place(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.data_ptr(), tuple(t.shape), t.dtype)


def _copy_to_device(lease: Lease, targets: dict[str, torch.Tensor], target: str, device: int, timeout: float,
                    mode: str) -> LoadStats:
    t0 = time.perf_counter()
    stats = LoadStats()
    rows: list[tuple[int, int, int, int]] = []
    casts: list[str] = []
    seen: set[int] = set()
    for name, dst in targets.items():
        ref = lease.entries[name]
        if tuple(dst.shape) != ref.shape:
            raise BadInput(f"tensor {name!r}: stored shape {list(ref.shape)}, target {list(dst.shape)}")
        if dtypes.from_torch(dst.dtype).code != dtypes.by_code(ref.dtype).code:
            casts.append(name)
            continue
        if not dst.is_contiguous():
            raise BadInput(f"tensor {name!r}: the target is not contiguous")
        if ref.nbytes and dst.data_ptr() not in seen:  # tied targets share memory: copy once
            seen.add(dst.data_ptr())
            rows.append((ref.partition, ref.offset, dst.data_ptr(), ref.nbytes))
            stats.bytes += ref.nbytes
    plan_s = time.perf_counter() - t0
    stats.engine = _copy_rows(lease, targets, rows, target, device, timeout, mode)
    if casts:
        views = lease.tensors(timeout=timeout)
        for name in casts:
            targets[name].copy_(views[name])
            stats.bytes += lease.entries[name].nbytes
        stats.cast_tensors = len(casts)
    if target == "cuda":
        import torch

        torch.cuda.synchronize(device)
    stats.engine["plan_s"] = plan_s  # client-side bookkeeping before the copy starts
    return stats


def _copy_rows(lease: Lease, targets: dict[str, torch.Tensor], rows: list[tuple[int, int, int, int]],
               target: str, device: int, timeout: float, mode: str) -> dict[str, Any]:
    """Copy (partition, offset, destination address, nbytes) rows into ``targets``' memory; engine stats."""
    if not rows:
        return {}
    rows.sort(key=lambda r: (r[0], r[1]))  # readiness order: the fill runs front to back
    if target == "cuda" and _gpu_copy() != "client":
        copied = _sidecar_copy(lease, targets, rows, timeout)
        if copied is not None:
            return copied
    with CopyEngine(target=target, device=device, mode=mode) as engine:
        segs = segments_of(lease)
        try:
            return engine.copy(segs, np.array(rows, dtype=np.uint64), timeout=timeout)
        finally:
            for s in segs:
                engine.release(s)


def copy_spans(lease: Lease, spans: list[tuple[int, int, torch.Tensor]], *, timeout: float = 120.0,
               mode: str = "auto") -> LoadStats:
    """Copy whole byte ranges: (partition, offset, destination) with a contiguous uint8 destination as long
    as the range. One piece per range however many tensors it holds: for a caller that lays its
    tensors out as the store does (sllmfs.integrations.torch.load_dict), so no per-tensor work is left to do."""
    t0 = time.perf_counter()
    stats = LoadStats()
    by_device: dict[tuple[str, int], list[tuple[int, int, torch.Tensor]]] = {}
    for span in spans:
        dst = span[2]
        if not dst.is_contiguous() or dst.element_size() != 1:
            raise BadInput(f"model {lease.model!r} [{lease.variant}]: the destination of the bytes at partition "
                           f"{span[0]} offset {span[1]} must be a contiguous uint8 tensor")
        by_device.setdefault((dst.device.type, dst.device.index or 0), []).append(span)
    for (kind, index), group in by_device.items():
        rows = [(p, off, dst.data_ptr(), dst.numel()) for p, off, dst in group if dst.numel()]
        targets = {f"span{i}": dst for i, (_p, _o, dst) in enumerate(group)}
        stats.engine = _copy_rows(lease, targets, rows, "host" if kind == "cpu" else kind, index, timeout, mode)
        stats.bytes += sum(r[3] for r in rows)
        if kind == "cuda":
            import torch

            torch.cuda.synchronize(index)
    stats.tensors = len(spans)
    stats.seconds = time.perf_counter() - t0
    return stats
