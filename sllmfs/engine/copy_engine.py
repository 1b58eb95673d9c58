"""Copy engine: move bytes from mapped cache segments into tensors already allocated.

A thin wrapper over the native engine (``csrc/``, module ``sllmfs._native``).
The caller maps the sidecar's segments, lists *pieces* (segment, source offset,
destination address, nbytes) and calls :meth:`CopyEngine.copy`; the engine
starts on the first chunk the cache marks ready, keeps the PCIe link busy with
several streams and a pinned staging ring, and returns only when every byte has
landed, or raises. Which path it uses (in-place registration, staging, both) is
chosen by the ``mode``; the measured reasons for the default are in
``bench/NOTES-copy-engine.md``.

``target="host"`` runs the same pipeline with memcpy into host memory: that is
what the tests use on machines without a GPU.

Server-side copies (the sidecar copies into a client's tensors): the sidecar
pins each segment once with :meth:`CopyEngine.register` after filling it, the
client exports its allocations with :func:`sllmfs.engine.ipc.export_targets`, and
:meth:`CopyEngine.copy_ipc` opens them, copies and closes them. Nothing here
imports torch unless the caller already has (see :mod:`sllmfs.engine.cudart`).

Around it: ``errors`` (what a copy fails with), ``segments`` (what it reads, and the
mode their page size picks), ``cudart`` (which CUDA runtime), ``native`` (the compiled
module). The error classes and Segment are re-exported here: this API takes and raises them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sllmfs.core.config import usable_cpus
from sllmfs.engine.cudart import cuda_runtime, device_by_bus
from sllmfs.engine.errors import (
    BadPieces,
    ChunkFailed,
    CopyError,
    CudaError,
    CudaUnavailable,
    ReadinessTimeout,
    ShortSegment,
    SourceCorrupt,
    SourceReadFailed,
)
from sllmfs.engine.native import EngineError, lib, translate
from sllmfs.engine.relay import Relay, summarize
from sllmfs.engine.segments import (
    MODES,
    FileSegment,
    MappedSegment,
    MiB,
    Segment,
    SegmentLike,
    address_of,
    choose_mode,
    map_segment,
    segment_tuples,
)

__all__ = [
    "BadPieces", "ChunkFailed", "CopyEngine", "CopyError", "CudaError", "CudaUnavailable", "FileSegment",
    "ReadinessTimeout", "Relay", "Segment", "ShortSegment", "SourceCorrupt", "SourceReadFailed", "address_of",
    "map_segment",
]

IPC_HANDLE_BYTES = 64


def _bind_xxh3() -> None:
    """File sources are checksummed with python xxhash's own xxh3 (the manifests' digests)."""
    import xxhash._xxhash as ext

    if not lib.bind_xxh3(ext.__file__):
        raise CopyError("file sources need xxh3 from python xxhash's library, which does not expose it")


def _default_threads() -> int:
    # Staging is memcpy-bound: more threads help up to the memory bandwidth (see NOTES).
    return max(1, min(12, usable_cpus() - 2))


class CopyEngine:
    """Pipelined copies from mapped segments into pre-allocated tensors.

    ``device`` is an ordinal or a PCI bus id string.

    CopyEngine(target="cuda", device=0, streams=4, chunk_bytes=64 MiB, mode="auto",
               threads=None, register_threads=None, slot_bytes=2 MiB, slots_per_thread=3,
               file_block_bytes=0, read_depth=1, read_overlap=0)

    ``file_block_bytes``: how much of a file source one stager claims at a time (a multiple of its checksum
    window; 0: ``chunk_bytes``). ``read_depth``: O_DIRECT reads each stager keeps in flight on a file source
    opened O_DIRECT (Linux AIO; 1: one at a time); ``read_overlap``: bytes each of those reads but a window's
    last asks past its 512 KiB step (a multiple of 4096: fastsafetensors' 516 KiB requests, NOTES-cold run
    27). ``threads`` are staging threads (memcpy into the pinned ring; default
    min(12, usable CPUs - 2)); ``register_threads`` pin blocks in place and copy from
    them (default 8; 1 in hybrid). ``mode="auto"`` picks per copy: "register"
    when every segment is hugetlb-backed, else "stage". The engine
    keeps its ring and its in-place registrations between copies; call
    :meth:`release` before unmapping a segment it registered, and :meth:`close`
    (or use ``with``) when done.
    """

    def __init__(
        self,
        target: str = "cuda",
        device: int | str = 0,
        streams: int = 4,
        chunk_bytes: int = 64 * MiB,
        mode: str = "auto",
        threads: int | None = None,
        register_threads: int | None = None,
        slot_bytes: int = 2 * MiB,
        slots_per_thread: int = 3,
        file_block_bytes: int = 0,
        read_depth: int = 1,
        read_overlap: int = 0,
    ) -> None:
        if target not in ("cuda", "host"):
            raise ValueError("target must be 'cuda' or 'host'")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        native_mode = "stage" if mode == "auto" else mode
        self.target = target
        self.mode = mode
        self.threads = threads if threads is not None else _default_threads()
        if register_threads is None:
            register_threads = 1 if mode == "hybrid" else 8
        self.register_threads = register_threads
        cudart, fallback = cuda_runtime() if target == "cuda" else ("", "")
        if isinstance(device, str):
            device = device_by_bus(device) if target == "cuda" else 0
        self.device = device
        self._pinned: dict[int, int] = {}  # base -> end of segments pinned by register()
        try:
            self._engine: Any = lib.Engine(
                target=target,
                device=device,
                mode=native_mode,
                streams=streams,
                threads=self.threads,
                register_threads=register_threads,
                chunk_bytes=chunk_bytes,
                slot_bytes=slot_bytes,
                slots_per_thread=slots_per_thread,
                cudart=cudart,
                cudart_fallback=fallback,
                file_block_bytes=file_block_bytes,
                read_depth=read_depth,
                read_overlap=read_overlap,
            )
        except EngineError as e:
            raise translate(e, CudaUnavailable if target == "cuda" else CudaError) from None

    def copy(
        self,
        segments: Sequence[SegmentLike],
        pieces: Any,
        timeout: float | None = 60.0,
        progress: Callable[[int, int], object] | None = None,
        relay: Relay | None = None,
    ) -> dict[str, Any]:
        """Copy every piece; return stats once all bytes have landed.

        ``pieces`` is an (n, 4) array of uint64 rows (segment index, source
        offset, destination address, nbytes). ``timeout`` bounds how long the
        copy waits with no chunk becoming ready (None: forever). ``progress``
        is called as progress(done_bytes, total_bytes) from this thread; if it
        raises, the copy stops and the exception propagates. ``relay``: peers
        that may carry a share (:mod:`sllmfs.engine.relay`); stats["relays"] says
        what each carried, or why it did not.
        """
        rows = np.ascontiguousarray(pieces, dtype=np.uint64)
        if rows.size == 0:
            rows = rows.reshape(0, 4)
        if rows.ndim != 2 or rows.shape[1] != 4:
            raise BadPieces(f"pieces must have shape (n, 4), got {rows.shape}")
        segs = segment_tuples(segments)
        mode = self._mode_for(segments)
        wait = -1.0 if timeout is None else float(timeout)
        try:
            stats: dict[str, Any] = self._engine.copy(segs, rows, wait, progress, mode,
                                                      relay.native() if relay else None)
        except EngineError as e:
            raise translate(e) from None
        return self._with_mode(stats, mode)

    def _with_mode(self, stats: dict[str, Any], mode: str) -> dict[str, Any]:
        stats["mode"] = mode
        stats["threads"] = self.threads if mode != "register" else 0
        stats["register_threads"] = self.register_threads if mode != "stage" else 0
        return summarize(stats)

    def stop_relays(self) -> None:
        """From another thread: the running copy's relays finish the block they hold and stop."""
        self._engine.stop_relays()

    def _mode_for(self, segments: Sequence[SegmentLike]) -> str:
        if any(isinstance(s, FileSegment) for s in segments):
            _bind_xxh3()
        return self._auto_mode(segments) if self.mode == "auto" else self.mode

    def _auto_mode(self, segments: Sequence[SegmentLike]) -> str:
        if any(isinstance(s, FileSegment) for s in segments):
            return "stage"  # only the stagers read files
        # Segments pinned by register() copy at link speed whatever their page size.
        mapped = [s for s in segments if not isinstance(s, FileSegment)]
        live = [(int(b), int(n)) for b, n, _, _ in segment_tuples(mapped) if int(n) > 0]
        if live and all(self._covered(b, b + n) for b, n in live):
            return "register"
        return choose_mode(segments)

    def _covered(self, start: int, end: int) -> bool:
        """Whether register() calls pinned [start, end) end to end (one call, or pieces that meet)."""
        at = start
        while at < end:
            nxt = self._pinned.get(at, 0)
            if nxt <= at:
                return False
            at = nxt
        return True

    def release(self, segment: MappedSegment, *, idle: bool = False) -> int:
        """Unpin a segment's cached registrations (before it is unmapped). Waits for a copy running on
        this engine, unless ``idle``: memory no copy can be reading (never a copy's source yet)."""
        base, length = (segment.base, segment.length) if isinstance(segment, Segment) else segment[:2]
        for b in [b for b in list(self._pinned) if base <= b < base + length]:  # a copy: register() may add meanwhile
            del self._pinned[b]
        return int(self._engine.release(base, length, idle))

    def register(self, segment: MappedSegment) -> dict[str, Any]:
        """Pin a whole segment now and keep it pinned (cached) until :meth:`release` or :meth:`close`.

        For a long-lived process (the sidecar) right after it fills the segment,
        so no copy pays for pinning. Returns {"bytes": newly pinned, "seconds",
        "cached": already pinned by this engine}. A no-op on the host target.
        """
        base, length = (segment.base, segment.length) if isinstance(segment, Segment) else segment[:2]
        try:
            out: dict[str, Any] = self._engine.register(int(base), int(length))
        except EngineError as e:
            raise translate(e) from None
        if length:
            self._pinned[int(base)] = int(base) + int(length)
        return out

    def open_ipc(self, handle: bytes, device_pci_bus_id: str) -> int:
        """Map another process's device allocation (a 64-byte CUDA IPC handle) here; returns its device address.

        The allocation must be on this engine's GPU (named by PCI bus id, which
        does not depend on CUDA_VISIBLE_DEVICES). Close it with :meth:`close_ipc`.
        """
        if len(handle) != IPC_HANDLE_BYTES:
            raise BadPieces(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        try:
            return int(self._engine.open_ipc(bytes(handle), device_pci_bus_id))
        except EngineError as e:
            raise translate(e) from None

    def close_ipc(self, addr: int) -> None:
        try:
            self._engine.close_ipc(int(addr))
        except EngineError as e:
            raise translate(e) from None

    @property
    def open_ipc_count(self) -> int:
        return int(self._engine.open_ipc_count())

    @property
    def bus_id(self) -> str:
        """PCI bus id of this engine's GPU ("host" for the host target)."""
        return str(self._engine.bus_id())

    def copy_ipc(
        self,
        segments: Sequence[SegmentLike],
        blocks: Sequence[dict[str, Any]],
        pieces: Any,
        timeout: float | None = 60.0,
        keep_open: bool = False,
        relay: Relay | None = None,
    ) -> dict[str, Any]:
        """Server-side copy into another process's tensors: open, copy, close.

        ``blocks`` are :func:`sllmfs.engine.ipc.export_targets` blocks ({"handle",
        "size", "device"}); ``pieces`` is an (n, 5) uint64 array of rows
        (segment, source offset, block index, offset in block, nbytes). The
        handles open on a native thread while the copy runs, in the order the
        copy first needs them (opening 227 serially cost 11 ms before the first
        byte moved). Stats add ipc_opens, ipc_open_s, ipc_close_s. Every handle
        is closed before this returns, also on error, unless ``keep_open``:
        then, after a successful copy, stats["ipc_addrs"] lists them and the
        caller closes them with :meth:`close_ipc` after replying (every byte
        has landed; closing costs ~35 us per handle, 8 ms for 227 in the NOTES).
        """
        rows = np.ascontiguousarray(pieces, dtype=np.uint64).reshape(-1, 5)
        sizes = np.array([int(b["size"]) for b in blocks], dtype=np.uint64)
        if rows.size:
            if int(rows[:, 2].max()) >= len(blocks):
                raise BadPieces(f"a piece names block {int(rows[:, 2].max())} but only {len(blocks)} were sent")
            end = rows[:, 3] + rows[:, 4]
            bad = np.nonzero(end > sizes[rows[:, 2].astype(np.int64)])[0]
            if bad.size:
                i, blk = int(bad[0]), int(rows[int(bad[0]), 2])
                raise BadPieces(f"piece {i} writes past the end of block {blk} ({int(sizes[blk])} bytes)")
        handles = [bytes(b["handle"]) for b in blocks]
        if any(len(h) != IPC_HANDLE_BYTES for h in handles):
            raise BadPieces(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes")
        mode = self._mode_for(segments)
        wait = -1.0 if timeout is None else float(timeout)
        try:  # on error the native side has closed whatever it opened
            stats, addrs = self._engine.copy_ipc(segment_tuples(segments), rows, handles,
                                                 [str(b["device"]) for b in blocks], wait, None, mode,
                                                 relay.native() if relay else None)
        except EngineError as e:
            raise translate(e) from None
        t2 = time.perf_counter()
        stats = self._with_mode(stats, mode)
        stats["ipc_opens"] = len(addrs)
        if keep_open:
            stats.update(ipc_addrs=addrs, ipc_close_s=0.0)
            return stats
        self._close_all(addrs, raise_first=True)
        stats["ipc_close_s"] = time.perf_counter() - t2
        return stats

    def _close_all(self, addrs: list[int], raise_first: bool = False) -> None:
        first: CopyError | None = None
        for a in addrs:
            try:
                self.close_ipc(a)
            except CopyError as e:
                first = first or e
        if first is not None and raise_first:
            raise first

    def prepare_ring(self) -> float:
        """Allocate every pinned staging slot now (threads x slots_per_thread x slot_bytes), off the
        first copy's clock; returns the seconds it took."""
        try:
            return float(self._engine.prepare_ring())
        except EngineError as e:
            raise translate(e) from None

    @property
    def registered_bytes(self) -> int:
        return int(self._engine.registered_bytes())

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
