"""A rank's state copied off the GPU for write-back: the first start's load phase waits for it.

A ``.to("cpu")`` per tensor faults in fresh 4 KiB pages, one thread, while the driver stages each copy
through its own buffer: on the H200 the sync write-back's log put ~10 s between the end of the hf reads
and the first byte written for 13.48 GB (bench/results/coldstart-logs-h200-20261203-1403), five times the
default loader's whole load. Instead: one host buffer for the whole state, 2 MiB pages asked for, faulted
in by several threads at once (the kernel zeroes each page in the thread that touches it), registered with
CUDA so that each tensor's copy runs at the link's speed, and unregistered once the copies are done (the
writer needs ordinary memory only). The buffer goes when the last of its tensors does (after the write; the
per-tensor copies went one by one, the peak is the same). bench/snapshot_d2h.py measures it against the
per-tensor copy (H200: 1.21 s against 10.8 s for 13.48 GB).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from sllmfs.core.config import usable_cpus

log = logging.getLogger("sllmfs.integrations.snapshot")

ALIGN = 256  # each tensor's bytes start here: every dtype's view of its slice is aligned
PAGE = 4096
FAULT_THREADS = 16


def _host_buffer(size: int, threads: int) -> np.ndarray:
    """``size`` bytes of private anonymous memory, every page faulted in (by ``threads`` threads)."""
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)  # where THP is `madvise`: 512x fewer faults
        except OSError:
            pass
    buf = np.frombuffer(mm, dtype=np.uint8)  # holds the mapping for as long as a view of it lives
    parts = max(1, min(threads, size // (64 << 20)))
    step = -(-size // parts)

    def touch(k: int) -> None:
        buf[k * step:(k + 1) * step:PAGE] = 0  # numpy lets go of the GIL here: the faults run in parallel

    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(touch, range(parts)))
    return buf


class _Pin:
    """The buffer registered with CUDA through the driver API (cuMemHostRegister): a refusal there leaves no
    error behind in the runtime's state, which torch's next kernel-launch check would report as its own."""

    PORTABLE = 1  # CU_MEMHOSTREGISTER_PORTABLE: pinned for every context, whichever GPU holds the state

    def __init__(self, buf: np.ndarray):
        self.ptr, self.size, self.done = buf.ctypes.data, buf.nbytes, False
        try:
            self.cuda = ctypes.CDLL("libcuda.so.1")
            self.cuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            self.cuda.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
            rc = self.cuda.cuMemHostRegister_v2(self.ptr, self.size, self.PORTABLE)
        except (OSError, AttributeError) as e:
            rc = f"no driver API here ({e})"
        self.done = rc == 0
        if not self.done:
            log.info("sllmfs: CUDA would not pin the write-back buffer (%s): pageable copies", rc)

    def release(self) -> None:
        if self.done:
            self.done = False
            rc = self.cuda.cuMemHostUnregister(self.ptr)
            if rc:
                log.warning("sllmfs: unpinning the write-back buffer failed (CUresult %s)", rc)


def snapshot(state: dict[str, Any], *, pin: bool = True, threads: int = FAULT_THREADS) -> dict[str, Any]:
    """CPU copies of a (filtered) state dict, in one buffer: the only GPU work write-back does.
    ``pin``: register the buffer for the copies (they fall back to pageable copies where that fails)."""
    import torch

    places, total = [], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        places.append((name, t, total, n))
        total += -(-n // ALIGN) * ALIGN
    if not total:
        return {name: torch.empty(t.shape, dtype=t.dtype) for name, t in state.items()}
    t0 = time.perf_counter()
    buf = _host_buffer(total, min(threads, usable_cpus()))
    t_faulted = time.perf_counter()
    whole = torch.from_numpy(buf)
    devices = {t.device for t in state.values() if t.is_cuda}
    if devices:
        torch.cuda.synchronize(next(iter(devices)))  # this thread's context is current for the driver call
    held = _Pin(buf) if pin and devices else None
    pinned = held is not None and held.done
    out: dict[str, Any] = {}
    try:
        for name, t, off, n in places:
            dst = whole[off:off + n].view(t.dtype).view(t.shape)
            dst.copy_(t.detach(), non_blocking=pinned)  # pageable: each copy waits for itself
            out[name] = dst
    finally:
        try:
            if pinned:
                for d in devices:  # every copy landed (or failed) before the pages are let go
                    torch.cuda.synchronize(d)
        finally:
            if held is not None:
                held.release()
    done = time.perf_counter()
    log.info("sllmfs: copied the rank state off the GPU for write-back: %.2f GB in %.2f s (pages %.2f, copies %.2f, "
             "%s)", total / 1e9, done - t0, t_faulted - t0, done - t_faulted, "pinned" if pinned else "pageable")
    return out
