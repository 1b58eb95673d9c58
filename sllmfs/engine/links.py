"""How much each GPU's PCIe link is receiving, from NVML, so relays skip a GPU someone else loads into.

The sidecar knows the loads it serves; a process loading a GPU by itself (a default
loader, a client copying without IPC handles) it does not. NVML samples a link's
receive rate over 20 ms (``nvmlDeviceGetPcieThroughput``); a thread samples every GPU
a few times a second. A peer whose link received more than ``busy_gbps`` in a sample
taken while this process had no copy on it is busy for ``memory_s``. Without NVML
(no driver library, a stand-in runtime) nothing is known and nothing is skipped:
the sidecar's own bookkeeping still holds. ``$SLLMFS_NVML`` names the library
(default libnvidia-ml.so.1; tests point it at a stand-in).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable

from sllmfs.core.config import env_str

log = logging.getLogger("sllmfs.engine")

NVML_PCIE_UTIL_RX_BYTES = 1  # nvmlPcieUtilCounter_t: into the GPU


class LinkWatch:
    """Samples each bus's PCIe receive rate; :meth:`busy` says whether another process is loading into it."""

    def __init__(self, buses: list[str], *, busy_gbps: float = 1.0, period_s: float = 0.2, memory_s: float = 1.0,
                 library: str | None = None) -> None:
        self.busy_gbps, self.period_s, self.memory_s = busy_gbps, period_s, memory_s
        self._lock = threading.Lock()
        self._samples: dict[str, tuple[float, float, float]] = {}  # bus -> (start, end, GB/s)
        self._handles: dict[str, ctypes.c_void_p] = {}
        self._stop = threading.Event()
        self._read: Callable[[ctypes.c_void_p], float] | None = None
        self.unavailable = ""
        try:
            self._open(library or env_str("SLLMFS_NVML", "libnvidia-ml.so.1"), buses)
        except (OSError, AttributeError, RuntimeError) as e:
            self.unavailable = f"no NVML, so loads by other processes are not seen ({e})"
            log.info("relays: %s", self.unavailable)
            return
        threading.Thread(target=self._loop, name="sllmfs-linkwatch", daemon=True).start()

    def _open(self, path: str, buses: list[str]) -> None:
        lib = ctypes.CDLL(path)
        if lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        for bus in buses:
            h = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByPciBusId_v2(bus.encode(), ctypes.byref(h)) == 0:
                self._handles[bus] = h
        get = lib.nvmlDeviceGetPcieThroughput

        def read(h: ctypes.c_void_p) -> float:
            kbps = ctypes.c_uint()
            if get(h, NVML_PCIE_UTIL_RX_BYTES, ctypes.byref(kbps)) != 0:
                return -1.0
            return kbps.value * 1e3 / 1e9

        self._read = read

    def _loop(self) -> None:
        assert self._read is not None
        while not self._stop.wait(self.period_s):
            for bus, h in self._handles.items():
                t0 = time.monotonic()
                gbps = self._read(h)  # blocks ~20 ms: the sampling window
                if gbps >= 0:
                    with self._lock:
                        self._samples[bus] = (t0, time.monotonic(), gbps)

    def busy(self, bus: str, own_since: float) -> str:
        """Why ``bus`` looks busy with another process's load ("" = not seen busy). ``own_since``: when this
        process last had a copy on that link (a sample overlapping it would count our own bytes)."""
        with self._lock:
            s = self._samples.get(bus)
        if s is None:
            return ""
        start, end, gbps = s
        if start <= own_since or time.monotonic() - end > self.memory_s or gbps < self.busy_gbps:
            return ""
        return f"its link received {gbps:.1f} GB/s from another process"

    def close(self) -> None:
        self._stop.set()
