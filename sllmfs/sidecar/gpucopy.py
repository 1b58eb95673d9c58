"""Sidecar-side GPU copies: the sidecar keeps its segments pinned and copies into clients' tensors.

A fresh client would pay 26-93 ms/GiB to pin the shared segments before it
could copy at link speed (bench/NOTES-copy-engine.md). The sidecar lives
long: it pins each segment once (cached per mapping, released before the
segment is freed) and writes into the client's GPU allocations, which the
client exports as CUDA IPC handles (sllmfs.engine.ipc). One engine per GPU,
made on first use; one copy at a time per engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from sllmfs.core.errors import BadInput, SidecarCannotCopy
from sllmfs.sidecar.memtier import Resident
from sllmfs.store.format import ALIGNMENT, CHUNK_SIZE, HUGE_PAGE

log = logging.getLogger("sllmfs.sidecar")


class GpuCopier:
    def __init__(self) -> None:
        self._engines: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._make = threading.Lock()
        self.unavailable: str | None = None  # why this sidecar cannot copy to GPUs (then clients copy)

    def _engine(self, bus: str) -> tuple[Any, threading.Lock]:
        from sllmfs.engine.copy_engine import CopyEngine, CopyError

        with self._make:
            if bus in self._engines:
                return self._engines[bus], self._locks[bus]
            if self.unavailable:
                raise SidecarCannotCopy(self.unavailable)
            try:
                engine = CopyEngine(target="cuda", device=bus, mode="auto")
            except CopyError as e:
                self.unavailable = f"this sidecar cannot copy to GPUs ({e}); the client copies itself"
                raise SidecarCannotCopy(self.unavailable) from None
            self._add(bus, engine)
            log.info("gpu copy engine ready device=%s", bus)
            return engine, self._locks[bus]

    def _add(self, bus: str, engine: Any) -> None:
        self._locks[bus] = threading.Lock()  # the lock first: readers take (engine, lock) pairs
        self._engines[bus] = engine

    def _pairs(self) -> list[tuple[Any, threading.Lock]]:
        with self._make:
            return [(e, self._locks[b]) for b, e in self._engines.items()]

    @staticmethod
    def _segments(res: Resident) -> list[Any]:
        from sllmfs.engine.copy_engine import Segment, address_of

        ready = address_of(res.ready.mm)
        return [Segment(address_of(s.mm) if s.size else 0, s.size, ready + res.chunk_base[i], CHUNK_SIZE, (s.mm,),
                        page_size=HUGE_PAGE if s.huge else ALIGNMENT)
                for i, s in enumerate(res.segments)]

    def copy(self, res: Resident, blocks: list[dict[str, Any]], pieces: list[list[int]],
             timeout: float) -> tuple[dict[str, Any], Callable[[], None]]:
        """Worker thread: copy ``pieces`` (partition, offset, block, block offset, nbytes).

        Returns the stats and a closer for the opened handles: every byte has
        landed, so the caller replies first and closes after (~36 us a handle).
        """
        if not blocks:
            return {"bytes": 0, "seconds": 0.0, "gbps": 0.0}, lambda: None
        buses = {str(b.get("device", "")) for b in blocks}
        if len(buses) != 1:
            raise BadInput(f"one load_ipc request per GPU, got devices {sorted(buses)}")
        engine, lock = self._engine(buses.pop())
        segs = self._segments(res)
        with lock:
            if res.unpin is None:  # the engine pins these mappings as it copies (cached): unpin before unmapping
                res.unpin = lambda: self.release(res)
            rows = np.array(pieces, dtype=np.uint64).reshape(-1, 5)
            stats: dict[str, Any] = engine.copy_ipc(segs, blocks, rows, timeout=timeout, keep_open=True)
        addrs = stats.pop("ipc_addrs", [])

        def close() -> None:
            for a in addrs:
                engine.close_ipc(a)

        return stats, close

    def warm_up(self, max_gpus: int = 64) -> list[str]:
        """Worker thread, at start: an engine for every GPU this process sees, so the first load on a
        node pays neither the CUDA start (0.1-3.7 s seen on the H100 machine) nor pinning: fills made
        once an engine exists are pinned as soon as they are ready. Returns the bus ids; no GPU: []."""
        from sllmfs.engine.copy_engine import CopyEngine, CopyError

        for ordinal in range(max_gpus):
            try:
                engine = CopyEngine(target="cuda", device=ordinal, mode="auto")
                bus = engine.bus_id
            except CopyError as e:
                if ordinal == 0:  # a load still tries (and then remembers why not): only log here
                    log.info("no GPU copies from this sidecar at start: %s", e)
                break  # past the last GPU
            with self._make:
                if bus in self._engines:  # a load made it meanwhile
                    engine.close()
                    continue
                self._add(bus, engine)
            log.info("gpu copy engine ready device=%s (at start)", bus)
        return self.buses

    @property
    def buses(self) -> list[str]:
        with self._make:
            return sorted(self._engines)

    @property
    def active(self) -> bool:
        return bool(self._engines)

    def pin(self, res: Resident) -> None:
        """Worker thread, right after a fill no copy has touched: pin it now so the first load needs not.

        Never raises: a pin that fails (limits, the resident dropped meanwhile) leaves the first
        copy to pin what it reads, as without warm-up."""
        from sllmfs.engine.copy_engine import CopyError

        pairs = self._pairs()
        if res.unpin is not None or res.state != "ready" or res.closed or not pairs:
            return
        res.unpin = lambda: self.release(res)
        try:
            segs = self._segments(res)
            for engine, lock in pairs:
                with lock:
                    if res.closed:
                        return
                    for s in segs:
                        if s.length:
                            engine.register(s)
        except (CopyError, ValueError) as e:
            log.warning("could not pin model=%s variant=%s for GPU copies: %s", res.model, res.variant, e)
            return
        log.info("pinned model=%s variant=%s for GPU copies", res.model, res.variant)

    def release(self, res: Resident) -> None:
        """Unpin a resident's segments in every engine (before they are unmapped)."""
        segs = self._segments(res)
        for engine, lock in self._pairs():
            with lock:
                for s in segs:
                    if s.length:
                        engine.release(s)
