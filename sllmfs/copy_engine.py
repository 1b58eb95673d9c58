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
"""

from __future__ import annotations

import importlib
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sllmfs.errors import SllmfsError

_native: Any = importlib.import_module("sllmfs._native")

MiB = 1 << 20
MODES = ("auto", "register", "stage", "hybrid")
# Readiness byte values written by the sidecar, one per fill chunk.
PENDING, READY, FAILED = 0, 1, 2


class CopyError(SllmfsError):
    """A copy did not complete; nothing it touched may be treated as loaded."""


class CudaUnavailable(CopyError):
    """target='cuda' on a machine (or build of torch) without a usable GPU."""


class CudaError(CopyError):
    """A CUDA call failed; the message names the call and the error code."""


class ChunkFailed(CopyError):
    """The cache marked a chunk the copy needs as failed (read or checksum error)."""


class ReadinessTimeout(CopyError, TimeoutError):
    """No chunk became ready for longer than the timeout."""


class BadPieces(CopyError, ValueError):
    """A piece reads outside its segment or names a segment that was not given."""


class ShortSegment(CopyError):
    """A segment's file holds fewer bytes than the manifest says."""


_KINDS: dict[str, type[CopyError]] = {
    "cuda": CudaError,
    "chunk_failed": ChunkFailed,
    "timeout": ReadinessTimeout,
    "bad_plan": BadPieces,
    "aborted": CopyError,
    "runtime": CopyError,
}


def _translate(exc: Exception, on_cuda: type[CopyError] = CudaError) -> CopyError:
    kind, message = exc.args if len(exc.args) == 2 else ("runtime", str(exc))
    cls = on_cuda if kind == "cuda" else _KINDS.get(kind, CopyError)
    return cls(message)


def address_of(buffer: Any) -> int:
    """Address of a buffer's first byte (read-only buffers such as PROT_READ mmaps too)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


@dataclass(frozen=True)
class Segment:
    """One mapped cache segment and, if it is still being filled, its readiness bytes.

    ``ready`` is the address of one byte per ``chunk_size`` bytes of the
    segment (0 pending, 1 ready, 2 failed); 0 means every chunk is ready.
    ``owners`` keeps the mappings alive while the segment is in use.
    """

    base: int
    length: int
    ready: int = 0
    chunk_size: int = 0
    owners: tuple[Any, ...] = ()

    @classmethod
    def from_buffer(cls, data: Any, ready: Any = None, chunk_size: int = 0) -> Segment:
        length = memoryview(data).nbytes
        ready_addr = 0
        if ready is not None:
            need = -(-length // chunk_size) if chunk_size else 0
            if chunk_size <= 0 or memoryview(ready).nbytes < need:
                raise BadPieces(f"readiness needs chunk_size > 0 and {need} bytes for a {length}-byte segment")
            ready_addr = address_of(ready)
        return cls(address_of(data) if length else 0, length, ready_addr, chunk_size, (data, ready))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.base, self.length, self.ready, self.chunk_size)


def map_segment(fd: int, length: int) -> mmap.mmap:
    """Map a segment fd read-only, refusing one shorter than expected (touching past its end would SIGBUS)."""
    size = os.fstat(fd).st_size
    if size < length:
        raise ShortSegment(f"segment fd {fd} holds {size} bytes but {length} are expected")
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


def _cuda_runtime_path() -> str:
    """Path of the CUDA runtime torch loaded, so the engine shares its contexts."""
    try:
        import torch
    except ImportError:
        return ""  # the native side then looks for an already-loaded or installed libcudart
    if not torch.cuda.is_available():
        raise CudaUnavailable("target='cuda' needs a CUDA GPU, but torch sees none (use target='host' to test)")
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "libcudart.so" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return ""


def _default_threads() -> int:
    # Staging is memcpy-bound: more threads help up to the memory bandwidth (see NOTES).
    cores = os.cpu_count() or 2
    return max(1, min(12, cores - 2))


def kernel_page_size(addr: int) -> int:
    """Page size backing the mapping that holds ``addr`` (4096 unless hugetlb), from /proc/self/smaps."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                if not inside:
                    head = line.split(" ", 1)[0]
                    if "-" in head and ":" not in head:
                        lo, _, hi = head.partition("-")
                        inside = int(lo, 16) <= addr < int(hi, 16)
                elif line.startswith("KernelPageSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 4096


def choose_mode(segments: Sequence[tuple[int, int, int, int]]) -> str:
    """auto: pin huge-page segments in place (cheap, then copies run at link speed),
    stage 4 KiB-page ones (pinning them costs more than the copy; measured in NOTES)."""
    live = [s for s in segments if s[1] > 0]
    if live and all(kernel_page_size(s[0]) >= 2 * MiB for s in live):
        return "register"
    return "stage"


class CopyEngine:
    """Pipelined copies from mapped segments into pre-allocated tensors.

    CopyEngine(target="cuda", device=0, streams=4, chunk_bytes=64 MiB, mode="auto",
               threads=None, register_threads=None, slot_bytes=2 MiB, slots_per_thread=3)

    ``threads`` are staging threads (memcpy into the pinned ring; default
    min(12, cores - 2)); ``register_threads`` pin blocks in place and copy from
    them (default 8; 1 in hybrid). ``mode="auto"`` picks per copy: "register"
    when every segment is hugetlb-backed, else "stage". The engine
    keeps its ring and its in-place registrations between copies; call
    :meth:`release` before unmapping a segment it registered, and :meth:`close`
    (or use ``with``) when done.
    """

    def __init__(
        self,
        target: str = "cuda",
        device: int = 0,
        streams: int = 4,
        chunk_bytes: int = 64 * MiB,
        mode: str = "auto",
        threads: int | None = None,
        register_threads: int | None = None,
        slot_bytes: int = 2 * MiB,
        slots_per_thread: int = 3,
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
        cudart = _cuda_runtime_path() if target == "cuda" else ""
        try:
            self._engine: Any = _native.Engine(
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
            )
        except _native.EngineError as e:
            raise _translate(e, CudaUnavailable if target == "cuda" else CudaError) from None

    def copy(
        self,
        segments: Sequence[Segment | tuple[int, int, int, int]],
        pieces: Any,
        timeout: float | None = 60.0,
        progress: Callable[[int, int], object] | None = None,
    ) -> dict[str, Any]:
        """Copy every piece; return stats once all bytes have landed.

        ``pieces`` is an (n, 4) array of uint64 rows (segment index, source
        offset, destination address, nbytes). ``timeout`` bounds how long the
        copy waits with no chunk becoming ready (None: forever). ``progress``
        is called as progress(done_bytes, total_bytes) from this thread; if it
        raises, the copy stops and the exception propagates.
        """
        rows = np.ascontiguousarray(pieces, dtype=np.uint64)
        if rows.size == 0:
            rows = rows.reshape(0, 4)
        if rows.ndim != 2 or rows.shape[1] != 4:
            raise BadPieces(f"pieces must have shape (n, 4), got {rows.shape}")
        segs: list[tuple[int, int, int, int]] = []
        for s in segments:
            base, length, ready, chunk = s.as_tuple() if isinstance(s, Segment) else s
            segs.append((int(base), int(length), int(ready), int(chunk)))
        mode = choose_mode(segs) if self.mode == "auto" else self.mode
        wait = -1.0 if timeout is None else float(timeout)
        try:
            stats: dict[str, Any] = self._engine.copy(segs, rows, wait, progress, mode)
        except _native.EngineError as e:
            raise _translate(e) from None
        stats["mode"] = mode
        stats["threads"] = self.threads if mode != "register" else 0
        stats["register_threads"] = self.register_threads if mode != "stage" else 0
        return stats

    def release(self, segment: Segment | tuple[int, int, int, int]) -> int:
        """Unpin a segment's cached registrations (before it is unmapped)."""
        base, length = (segment.base, segment.length) if isinstance(segment, Segment) else segment[:2]
        return int(self._engine.release(base, length))

    @property
    def registered_bytes(self) -> int:
        return int(self._engine.registered_bytes())

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
