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
imports torch unless the caller already has (see :func:`cuda_runtime`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sllmfs.core.errors import SllmfsError

_native: Any = importlib.import_module("sllmfs._native")

MiB = 1 << 20
IPC_HANDLE_BYTES = 64
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
    ``page_size`` is the backing page size when the caller knows it (the cache
    says whether a segment is hugetlb); 0 asks the kernel (/proc/self/smaps,
    ~10 ms in a process with many large mappings).
    """

    base: int
    length: int
    ready: int = 0
    chunk_size: int = 0
    owners: tuple[Any, ...] = ()
    page_size: int = 0

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


_torch_cudart = ""  # found once per process: torch never loads another runtime


def _cuda_runtime_path() -> str:
    """Path of the CUDA runtime torch loaded, so the engine shares its contexts."""
    global _torch_cudart
    if _torch_cudart:
        return _torch_cudart
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return ""  # no torch in this process (a sidecar): see cuda_runtime()
    if not torch.cuda.is_available():
        raise CudaUnavailable("target='cuda' needs a CUDA GPU, but torch sees none (use target='host' to test)")
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()  # one read and a find: an SGLang process maps thousands of files (ms per line loop)
        for at in _find_all(maps, "/libcudart.so"):
            end = maps.find("\n", at)
            line = maps[maps.rfind("\n", 0, at) + 1 : end if end >= 0 else None]
            path = line.rsplit(None, 1)[-1]
            if "libcudart.so" in os.path.basename(path):
                _torch_cudart = path
                return path
    except OSError:
        pass
    return ""


def _find_all(text: str, needle: str) -> Iterator[int]:
    at = text.find(needle)
    while at >= 0:
        yield at
        at = text.find(needle, at + 1)


@functools.cache
def wheel_cudart() -> str:
    """libcudart from an installed nvidia-* wheel (cu13 layout, then cuda_runtime), found without importing torch."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return ""
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13/lib", "cuda_runtime/lib"):
            for so in ("libcudart.so.13", "libcudart.so.12"):
                path = os.path.join(root, sub, so)
                if os.path.exists(path):
                    return path
    return ""


def cuda_runtime() -> tuple[str, str]:
    """(preferred, fallback) runtime paths for the native loader.

    Preferred: $SLLMFS_CUDART, else the runtime torch loaded when torch is
    already imported (torch is never imported here). The native side then tries
    runtimes already loaded (RTLD_NOLOAD), then libcudart.so.13/.12 on the
    loader path, then the fallback: a wheel's copy (:func:`wheel_cudart`).
    """
    env = os.environ.get("SLLMFS_CUDART", "")
    if env and not os.path.exists(env):
        raise CudaUnavailable(f"SLLMFS_CUDART={env} does not exist; point it at a libcudart.so.13 or unset it")
    return env or _cuda_runtime_path(), wheel_cudart()


def runtime_path() -> str:
    """Path of the CUDA runtime the engine uses in this process (loads it); CudaUnavailable if none opens."""
    try:
        return str(_native.runtime_path(*cuda_runtime()))
    except _native.EngineError as e:
        raise _translate(e, CudaUnavailable) from None


def device_by_bus(pci_bus_id: str) -> int:
    """This process's device ordinal for a PCI bus id ("0000:41:00.0"; CUDA_VISIBLE_DEVICES may differ per process)."""
    try:
        return int(_native.device_by_bus(pci_bus_id, *cuda_runtime()))
    except _native.EngineError as e:
        raise _translate(e, CudaUnavailable) from None


def _default_threads() -> int:
    # Staging is memcpy-bound: more threads help up to the memory bandwidth (see NOTES).
    cores = os.cpu_count() or 2
    return max(1, min(12, cores - 2))


def kernel_page_sizes(addrs: Sequence[int]) -> list[int]:
    """Page size backing each address's mapping (4096 unless hugetlb), from one pass over /proc/self/smaps."""
    found: dict[int, int] = {}
    want = sorted(set(addrs))
    try:
        with open("/proc/self/smaps") as f:
            inside: list[int] = []
            for line in f:
                if not inside:
                    head = line.split(" ", 1)[0]
                    if "-" in head and ":" not in head:
                        lo, _, hi = head.partition("-")
                        a, b = int(lo, 16), int(hi, 16)
                        inside = [x for x in want if a <= x < b]
                elif line.startswith("KernelPageSize:"):
                    for x in inside:
                        found[x] = int(line.split()[1]) * 1024
                    inside = []
                    if len(found) == len(want):
                        break
    except (OSError, ValueError):
        pass
    return [found.get(a, 4096) for a in addrs]


def choose_mode(segments: Sequence[Segment | tuple[int, int, int, int]]) -> str:
    """auto: pin huge-page segments in place (cheap, then copies run at link speed),
    stage 4 KiB-page ones (pinning them costs more than the copy; measured in NOTES)."""
    live = [s if isinstance(s, Segment) else Segment(*s) for s in segments]
    live = [s for s in live if s.length > 0]
    if not live:
        return "stage"
    unknown = [s.base for s in live if not s.page_size]
    sizes = iter(kernel_page_sizes(unknown) if unknown else [])
    if all((s.page_size or next(sizes)) >= 2 * MiB for s in live):
        return "register"
    return "stage"


def _segment_tuples(segments: Sequence[Segment | tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    out = []
    for s in segments:
        base, length, ready, chunk = s.as_tuple() if isinstance(s, Segment) else s
        out.append((int(base), int(length), int(ready), int(chunk)))
    return out


class CopyEngine:
    """Pipelined copies from mapped segments into pre-allocated tensors.

    ``device`` is an ordinal or a PCI bus id string.

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
        device: int | str = 0,
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
        cudart, fallback = cuda_runtime() if target == "cuda" else ("", "")
        if isinstance(device, str):
            device = device_by_bus(device) if target == "cuda" else 0
        self.device = device
        self._pinned: dict[int, int] = {}  # base -> end of segments pinned by register()
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
                cudart_fallback=fallback,
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
        segs = _segment_tuples(segments)
        mode = self._auto_mode(segments) if self.mode == "auto" else self.mode
        wait = -1.0 if timeout is None else float(timeout)
        try:
            stats: dict[str, Any] = self._engine.copy(segs, rows, wait, progress, mode)
        except _native.EngineError as e:
            raise _translate(e) from None
        return self._with_mode(stats, mode)

    def _with_mode(self, stats: dict[str, Any], mode: str) -> dict[str, Any]:
        stats["mode"] = mode
        stats["threads"] = self.threads if mode != "register" else 0
        stats["register_threads"] = self.register_threads if mode != "stage" else 0
        return stats

    def _auto_mode(self, segments: Sequence[Segment | tuple[int, int, int, int]]) -> str:
        # Segments pinned by register() copy at link speed whatever their page size.
        live = [(int(b), int(n)) for b, n, _, _ in _segment_tuples(segments) if n > 0]
        if live and all(self._pinned.get(b, 0) >= b + n for b, n in live):
            return "register"
        return choose_mode(segments)

    def release(self, segment: Segment | tuple[int, int, int, int]) -> int:
        """Unpin a segment's cached registrations (before it is unmapped)."""
        base, length = (segment.base, segment.length) if isinstance(segment, Segment) else segment[:2]
        for b in [b for b in self._pinned if base <= b < base + length]:
            del self._pinned[b]
        return int(self._engine.release(base, length))

    def register(self, segment: Segment | tuple[int, int, int, int]) -> dict[str, Any]:
        """Pin a whole segment now and keep it pinned (cached) until :meth:`release` or :meth:`close`.

        For a long-lived process (the sidecar) right after it fills the segment,
        so no copy pays for pinning. Returns {"bytes": newly pinned, "seconds",
        "cached": already pinned by this engine}. A no-op on the host target.
        """
        base, length = (segment.base, segment.length) if isinstance(segment, Segment) else segment[:2]
        try:
            out: dict[str, Any] = self._engine.register(int(base), int(length))
        except _native.EngineError as e:
            raise _translate(e) from None
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
        except _native.EngineError as e:
            raise _translate(e) from None

    def close_ipc(self, addr: int) -> None:
        try:
            self._engine.close_ipc(int(addr))
        except _native.EngineError as e:
            raise _translate(e) from None

    @property
    def open_ipc_count(self) -> int:
        return int(self._engine.open_ipc_count())

    @property
    def bus_id(self) -> str:
        """PCI bus id of this engine's GPU ("host" for the host target)."""
        return str(self._engine.bus_id())

    def copy_ipc(
        self,
        segments: Sequence[Segment | tuple[int, int, int, int]],
        blocks: Sequence[dict[str, Any]],
        pieces: Any,
        timeout: float | None = 60.0,
        keep_open: bool = False,
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
        mode = self._auto_mode(segments) if self.mode == "auto" else self.mode
        wait = -1.0 if timeout is None else float(timeout)
        try:  # on error the native side has closed whatever it opened
            stats, addrs = self._engine.copy_ipc(_segment_tuples(segments), rows, handles,
                                                 [str(b["device"]) for b in blocks], wait, None, mode)
        except _native.EngineError as e:
            raise _translate(e) from None
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

    @property
    def registered_bytes(self) -> int:
        return int(self._engine.registered_bytes())

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
