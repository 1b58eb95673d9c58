"""From a lease to filled tensors: plan the copy pieces and run the copy engine.

One place decides how bytes reach a framework's pre-allocated tensors:
same dtype and shape → the native engine copies straight from the mapped
segments (CUDA or host target); a dtype cast → torch casts from the zero-copy
view. Nothing here knows about a particular framework.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sllmfs.core import dtypes
from sllmfs.core.config import env_str
from sllmfs.core.errors import BadInput, SidecarCannotCopy
from sllmfs.engine.copy_engine import CopyEngine, CudaUnavailable, Segment, address_of
from sllmfs.engine.ipc import export_targets  # imported up front: a first import inside a timed load costs ms
from sllmfs.protocol.messages import Readiness
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
    # each device's copy ("cuda:0", "host"): its engine stats with "start"/"end" (time.perf_counter()),
    # so a caller can see the links' copies overlap
    links: dict[str, dict[str, Any]] = field(default_factory=dict)

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


def sidecar_copies() -> bool:
    """Whether CUDA tensors are copied by the sidecar when it can (acquire's ``gpu_first`` then holds)."""
    return _gpu_copy() != "client"


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
    by_device: dict[Link, dict[str, torch.Tensor]] = {}
    for name, t in targets.items():
        by_device.setdefault(_link(t), {})[name] = t

    def job(link: Link, group: dict[str, torch.Tensor]) -> Job:
        return lambda held, engines: _copy_to_device(held, group, link[0], link[1], timeout, mode, engines)

    stats = _all_links(lease, {link: job(link, group) for link, group in by_device.items()})
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
                    mode: str, engines: _Engines) -> LoadStats:
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
    stats.engine = _copy_rows(lease, targets, rows, target, device, timeout, mode, engines)
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
               target: str, device: int, timeout: float, mode: str, engines: _Engines) -> dict[str, Any]:
    """Copy (partition, offset, destination address, nbytes) rows into ``targets``' memory; engine stats."""
    if not rows:
        return {}
    rows.sort(key=lambda r: (r[0], r[1]))  # readiness order: the fill runs front to back
    if target == "cuda" and _gpu_copy() != "client":
        copied = _sidecar_copy(lease, targets, rows, timeout)
        if copied is not None:
            return copied
    engine, segs = engines.get(lease, target, device, mode)
    return engine.copy(segs, np.array(rows, dtype=np.uint64), timeout=timeout, progress=engines.check)


class Cancelled(Exception):
    """A device's copy stopped because another device's copy of the same load failed."""


Link = tuple[str, int]  # ("cuda", 1) or ("host", 0): one copy engine and one PCIe link (or memcpy) each


def _link(t: torch.Tensor) -> Link:
    return ("host", 0) if t.device.type == "cpu" else (t.device.type, t.device.index or 0)


class _Engines:
    """This process's copy engines for one load, one per (lease, device), closed together at the end.

    A pin (cudaHostRegister) is process-wide: the engine that pinned a segment must not release it
    while another device's copy still reads it, so nothing is released until every copy is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[int, str, int], tuple[CopyEngine, list[Any]]] = {}
        self.stop = threading.Event()  # one device's copy failed: the others stop at their next block

    def check(self, done: int, total: int) -> None:
        """The engines' progress callback: raising stops that copy (the load fails anyway)."""
        if self.stop.is_set():
            raise Cancelled("another device's copy of this load failed")

    def get(self, lease: Lease, target: str, device: int, mode: str) -> tuple[CopyEngine, list[Any]]:
        key = (id(lease), target, device)
        with self._lock:
            if key not in self._open:
                self._open[key] = (CopyEngine(target=target, device=device, mode=mode), segments_of(lease))
            return self._open[key]

    def close(self) -> None:
        """Release and close every engine, even after one fails (each holds pins and a pinned ring);
        the first failure is raised once all are closed."""
        failed: BaseException | None = None
        for engine, segs in self._open.values():
            try:
                for s in segs:
                    engine.release(s)
            except BaseException as e:
                failed = failed or e
            finally:
                try:
                    engine.close()
                except BaseException as e:
                    failed = failed or e
        self._open.clear()
        if failed is not None:
            raise failed


Job = Callable[["Lease", _Engines], LoadStats]  # one device's copy, given the lease to copy from


def _all_links(lease: Lease, jobs: dict[Link, Job]) -> LoadStats:
    """Run each device's copy; several GPUs copy at once, each over its own link (a thread each: the
    engine and the sidecar's copy release the GIL). The sidecar answers one request per connection
    at a time, so each further GPU copies through a lease of its own on its own connection."""
    out = LoadStats()
    gpus = [link for link in jobs if link[0] == "cuda"]
    with ExitStack() as stack:
        held: dict[Link, Lease] = {link: lease for link in jobs}
        if len(gpus) > 1 and _gpu_copy() != "client":
            for link in gpus[1:]:
                sibling = _sibling(lease)
                if sibling is not None:
                    stack.callback(_close_sibling, sibling)
                    held[link] = sibling
        engines = _Engines()
        stack.callback(engines.close)  # before the siblings' maps go (LIFO)
        results: dict[Link, LoadStats] = {}
        errors: list[BaseException] = []

        def run(link: Link) -> None:
            start = time.perf_counter()
            try:
                results[link] = jobs[link](held[link], engines)
            except BaseException as e:  # re-raised below, in the caller's thread
                errors.append(e)
                engines.stop.set()  # the load fails: the other devices need not copy their share
                return
            results[link].links[_name(link)] = {**results[link].engine, "start": start, "end": time.perf_counter()}

        # GPUs that ask the sidecar through one lease (no sibling) take turns: one thread for all of them.
        # Copies this process makes itself run side by side: the engines share the process's pins
        # (csrc/pins.h; two engines pinning the same segments on their own once failed on the H200 pair).
        asks = _gpu_copy() != "client"
        order: dict[int, list[Link]] = {}
        for link in jobs:
            order.setdefault(id(held[link]) if asks and link[0] == "cuda" else id(link), []).append(link)

        def run_in_turn(links: list[Link]) -> None:
            for x in links:
                run(x)

        threads = [threading.Thread(target=run_in_turn, args=(ls,), name="sllmfs-copy") for ls in order.values()]
        if len(threads) == 1:
            threads[0].run()  # one link: no thread to start
        else:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            if lease.readiness.find(bytes([Readiness.FAILED])) >= 0:  # the fill or pull failed: its own reason
                raise lease.failure() from errors[0]
            raise errors[0]
    for link in jobs:
        s = results[link]
        out.bytes += s.bytes
        out.cast_tensors += s.cast_tensors
        out.engine = s.engine
        out.links.update(s.links)
    return out


def _name(link: Link) -> str:
    return "host" if link == ("host", 0) else f"{link[0]}:{link[1]}"


def _sibling(lease: Lease) -> Lease | None:
    """A second lease of the same bytes on a connection of its own; None when the sidecar now holds
    other memory for this variant (replaced or refilled since): that GPU then waits its turn."""
    from sllmfs.client.client import Client

    client = Client(lease.client.path, timeout=lease.client.timeout)
    try:
        sibling = client.acquire(lease.model, lease.variant)
    except BaseException:
        client.close()
        raise
    if sibling.segment_ids != lease.segment_ids:
        _close_sibling(sibling)
        return None
    return sibling


def _close_sibling(sibling: Lease) -> None:
    try:
        sibling.release()
    finally:
        sibling.client.close()


def copy_spans(lease: Lease, spans: list[tuple[int, int, torch.Tensor]], *, timeout: float = 120.0,
               mode: str = "auto") -> LoadStats:
    """Copy whole byte ranges: (partition, offset, destination) with a contiguous uint8 destination as long
    as the range. One piece per range however many tensors it holds: for a caller that lays its
    tensors out as the store does (sllmfs.integrations.torch.load_dict), so no per-tensor work is left to do."""
    t0 = time.perf_counter()
    by_device: dict[Link, list[tuple[int, int, torch.Tensor]]] = {}
    for span in spans:
        dst = span[2]
        if not dst.is_contiguous() or dst.element_size() != 1:
            raise BadInput(f"model {lease.model!r} [{lease.variant}]: the destination of the bytes at partition "
                           f"{span[0]} offset {span[1]} must be a contiguous uint8 tensor")
        by_device.setdefault(_link(dst), []).append(span)

    def job(link: Link, group: list[tuple[int, int, torch.Tensor]]) -> Job:
        def copy(held: Lease, engines: _Engines) -> LoadStats:
            rows = [(p, off, dst.data_ptr(), dst.numel()) for p, off, dst in group if dst.numel()]
            targets = {f"span{i}": dst for i, (_p, _o, dst) in enumerate(group)}
            s = LoadStats(bytes=sum(r[3] for r in rows))
            s.engine = _copy_rows(held, targets, rows, link[0], link[1], timeout, mode, engines)
            if link[0] == "cuda":
                import torch

                torch.cuda.synchronize(link[1])
            return s
        return copy

    stats = _all_links(lease, {link: job(link, group) for link, group in by_device.items()})
    stats.tensors = len(spans)
    stats.seconds = time.perf_counter() - t0
    return stats
