"""Sidecar-side GPU copies: the sidecar keeps its segments pinned and copies into clients' tensors.

A fresh client would pay 26-93 ms/GiB to pin the shared segments before it
could copy at link speed (bench/NOTES-copy-engine.md). The sidecar lives
long: it pins each segment once (cached per mapping, released before the
segment is freed) and writes into the client's GPU allocations, which the
client exports as CUDA IPC handles (sllmfs.engine.ipc). One engine per GPU,
made on first use; one copy at a time per engine.

Relays (issue 26): a load into one GPU also goes through the PCIe links of the
node's idle GPUs (host -> peer -> target over NVLink, sllmfs.engine.relay). They
live here, not in the client, because only the sidecar sees every load on the
node: it relays through a GPU only while no load it serves is bound for that GPU
and no other load relays through it, and a load that arrives for a relaying GPU
stops that relay (it finishes the 64 MiB block it holds). It also holds the
pinned segments relays read and an engine (a context) on every GPU. Which GPUs
may relay: $SLLMFS_RELAY, "auto" (default: every idle GPU this sidecar sees),
"off", or a comma list of PCI bus ids. What relays cost each peer (staging
memory, seconds its link was busy, bytes carried) is in ``relay_status()``. Loads by
other processes (not through this sidecar) are seen through NVML where there is
one (sllmfs.engine.links): a GPU whose link is receiving is not relayed through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sllmfs.core.config import env_str
from sllmfs.core.errors import BadInput, Corrupt, SidecarCannotCopy
from sllmfs.engine.errors import SourceCorrupt, SourceReadFailed
from sllmfs.engine.relay import Relay
from sllmfs.sidecar.fill import refusal
from sllmfs.sidecar.memtier import Resident
from sllmfs.sidecar.prefault import PIN_PIECE, Blank
from sllmfs.store.format import ALIGNMENT, CHUNK_SIZE, HUGE_PAGE

log = logging.getLogger("sllmfs.sidecar")


def relay_setting(raw: str) -> frozenset[str] | None:
    """$SLLMFS_RELAY: None = every GPU may relay ("auto", unset), empty = none ("off"), else these bus ids."""
    text = raw.strip().lower()
    if text in ("", "auto", "on", "1", "true", "yes"):
        return None
    if text in ("off", "0", "false", "no", "none"):
        return frozenset()
    return frozenset(b.strip() for b in text.split(",") if b.strip())


class RelayCost:
    """What relaying has cost one peer GPU since the sidecar started (status and metrics)."""

    def __init__(self) -> None:
        self.loads = 0           # copies it carried a share of
        self.bytes = 0           # bytes it carried
        self.busy_seconds = 0.0  # its PCIe link busy with others' loads
        self.staging_bytes = 0   # device memory a relay holds on it while the copy runs
        self.last_skipped = ""   # why it last carried nothing or stopped early
        self.relaying_for = ""   # the GPU it carries a share into now ("" = none)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class GpuCopier:
    def __init__(self, stage_threads: int | None = None, read_depth: int = 1, read_overlap: int = 0) -> None:
        # the stagers read stored files for GPU-first copies (gpufirst.py): the fill's kind of work, so
        # the fill's thread count, each slot one checksum window (checked before its H2D; 4 MiB slots ran
        # 1.3x InstantTensor where 1 MiB ones ran 0.8-0.9x: NOTES-cold run 15)
        self._stage_threads = stage_threads
        self._read_depth = read_depth  # O_DIRECT reads each stager keeps in flight (--copy-read-depth)
        self._read_overlap = read_overlap  # and how far past its step each asks (--copy-read-overlap)
        self._engines: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._make = threading.Lock()
        self.unavailable: str | None = None  # why this sidecar cannot copy to GPUs (then clients copy)
        self.relay_allowed = relay_setting(env_str("SLLMFS_RELAY"))
        self._loading: dict[str, int] = {}  # bus -> loads bound for it now (copying or waiting to)
        self._copying: dict[str, Any] = {}  # bus -> engine of the load copying into it now
        self._relay_for: dict[str, str] = {}  # peer bus -> the bus it relays into now
        self.relay_costs: dict[str, RelayCost] = {}
        self._own_until: dict[str, float] = {}  # bus -> when a copy of ours last used its link
        self._links: Any = None  # a LinkWatch once warm_up found two GPUs: loads by other processes

    def _engine(self, bus: str) -> tuple[Any, threading.Lock]:
        from sllmfs.engine.copy_engine import CopyError

        with self._make:
            if bus in self._engines:
                return self._engines[bus], self._locks[bus]
            if self.unavailable:
                raise SidecarCannotCopy(self.unavailable)
            try:
                engine = self._new_engine(bus)
            except CopyError as e:
                self.unavailable = f"this sidecar cannot copy to GPUs ({e}); the client copies itself"
                raise SidecarCannotCopy(self.unavailable) from None
            self._add(bus, engine)
            log.info("gpu copy engine ready device=%s", bus)
            return engine, self._locks[bus]

    def _new_engine(self, device: int | str) -> Any:
        """An engine for one GPU with its staging ring allocated (192 MiB pinned with 16 threads): the first
        GPU-first copy would otherwise grow it slot by slot (~90 ms of a 0.27 s load, NOTES-cold run 15)."""
        from sllmfs.engine.copy_engine import CopyEngine, CopyError

        engine = CopyEngine(target="cuda", device=device, mode="auto", threads=self._stage_threads,
                            slot_bytes=CHUNK_SIZE, read_depth=self._read_depth,
                            read_overlap=self._read_overlap)
        try:
            ring_s = engine.prepare_ring()
        except CopyError as e:  # pinned memory refused: copies grow the ring as they go (and may fail then)
            log.warning("could not allocate the staging ring for GPU %s now: %s", device, e)
        else:
            log.info("staging ring ready device=%s threads=%d seconds=%.3f", device, engine.threads, ring_s)
        return engine

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
             timeout: float, files: list[int] | None = None, tee: bool = False
             ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Worker thread: copy ``pieces`` (partition, offset, block, block offset, nbytes).

        From the resident's segments, or with ``files`` (its open partition files, the tier not filled:
        gpufirst.py) from those, each window checked against the manifest on its way through the ring;
        ``tee``: each window read also lands in the resident's segments, and ``stats["teed"]`` lists per
        partition which windows did, verified (the caller publishes them: Fill.adopt).
        Returns the stats and a closer for the opened handles: every byte has
        landed, so the caller replies first and closes after (~36 us a handle).
        """
        if not blocks:
            return {"bytes": 0, "seconds": 0.0, "gbps": 0.0}, lambda: None
        buses = {str(b.get("device", "")) for b in blocks}
        if len(buses) != 1:
            raise BadInput(f"one load_ipc request per GPU, got devices {sorted(buses)}")
        bus = buses.pop()
        asked = time.monotonic()
        engine, lock = self._engine(bus)
        segs = self._segments(res) if files is None else self._files(res, files, tee)
        self._want(bus, +1)
        try:
            with lock:
                started = time.monotonic()  # the engine's clock starts here (its *_seconds count from it)
                if res.unpin is None and files is None:  # the engine pins mappings as it copies: unpin before unmapping
                    res.unpin = lambda: self.release(res)
                rows = np.array(pieces, dtype=np.uint64).reshape(-1, 5)
                # relays read pinned memory; a copy from the files has none (the direct path takes it all)
                peers, busy = self._take_peers(bus, engine) if files is None else ([], {})
                try:
                    relay = Relay(peers=tuple(self._engines[p].device for p in peers)) if peers else None
                    stats: dict[str, Any] = engine.copy_ipc(segs, blocks, rows, timeout=timeout, keep_open=True,
                                                            relay=relay)
                except SourceCorrupt as e:  # names the partition file and the window
                    raise Corrupt(refusal(res.model, res.variant, f"copying its stored files: {e}")) from None
                except SourceReadFailed as e:  # the disk, not the bytes: the fill that follows says more
                    raise Corrupt(f"model {res.model!r} [{res.variant}]: reading its stored files failed ({e}); "
                                  f"check the disk, then run `sllmfs verify --model {res.model}`") from None
                finally:
                    self._free_peers(bus, peers)
                self._account(stats, peers, busy)
            stats.update(copy_asked_at=asked, copy_started_at=started, copy_ended_at=time.monotonic(),
                         source="tier" if files is None else "files")
            if files is not None and tee:
                stats["teed"] = [s.teed for s in segs]
            stats.update({f"tier_{k}": v for k, v in res.timeline.as_dict().items()})  # the fill it streamed behind
            if stats["relay_peers"]:
                log.info("relay into=%s direct=%d relayed=%d peers=%s", bus, stats["direct_bytes"],
                         stats["relay_bytes"], stats["relay_peers"])
        finally:
            self._want(bus, -1)
        addrs = stats.pop("ipc_addrs", [])

        def close() -> None:
            for a in addrs:
                engine.close_ipc(a)

        return stats, close

    @staticmethod
    def _files(res: Resident, fds: list[int], tee: bool) -> list[Any]:
        from sllmfs.engine.copy_engine import FileSegment

        # the tier's readiness windows are the manifest's checksum windows (CHUNK_SIZE): teed[k] is window k
        return [FileSegment.of(fd, p.size, p.chunks, CHUNK_SIZE, p.file,
                               tee=np.frombuffer(seg.mm, np.uint8, p.size) if tee and p.size else None)
                for fd, p, seg in zip(fds, res.manifest.partitions, res.segments, strict=True)]

    def busy(self) -> bool:
        """Whether a load is bound for any GPU now (copying or waiting to). Read without the lock (the
        trio thread asks; engines are built under it): a moment stale at worst, which only delays a blank."""
        return bool(self._loading)

    def _want(self, bus: str, delta: int) -> None:
        """A load bound for ``bus`` arrives (+1) or ends (-1). On arrival a relay through ``bus`` stops:
        it finishes the block it holds (64 MiB, ~1 ms) and the rest of that load goes direct."""
        with self._make:
            self._loading[bus] = self._loading.get(bus, 0) + delta
            if not self._loading[bus]:
                del self._loading[bus]
                self._own_until[bus] = time.monotonic()
            target = self._relay_for.get(bus)
            if delta > 0 and target is not None and target in self._copying:
                self._copying[target].stop_relays()

    def _take_peers(self, bus: str, engine: Any) -> tuple[list[str], dict[str, str]]:
        """The idle GPUs that may carry a share of this copy, marked as relaying until _free_peers,
        and those skipped because another process is loading into them (NVML), with why."""
        with self._make:
            self._copying[bus] = engine
            idle = [p for p in sorted(self._engines)
                    if p != bus and p not in self._loading and p not in self._relay_for
                    and (self.relay_allowed is None or p.lower() in self.relay_allowed)]
            busy = {p: why for p in idle
                    if self._links and (why := self._links.busy(p, self._own_until.get(p, 0.0)))}
            peers = [p for p in idle if p not in busy]
            for p, why in busy.items():
                self.relay_costs.setdefault(p, RelayCost()).last_skipped = why
            for p in peers:
                self._relay_for[p] = bus
                self.relay_costs.setdefault(p, RelayCost()).relaying_for = bus
            return peers, busy

    def _free_peers(self, bus: str, peers: list[str]) -> None:
        with self._make:
            self._copying.pop(bus, None)
            now = time.monotonic()
            for p in peers:
                self._relay_for.pop(p, None)
                self._own_until[p] = now
                self.relay_costs[p].relaying_for = ""

    def _account(self, stats: dict[str, Any], peers: list[str], busy: dict[str, str]) -> None:
        """Each peer's cost into relay_costs; the reply's stats flattened (the op answers scalars only)."""
        carried = [f"{p}:0:0:0:{why}" for p, why in busy.items()]
        with self._make:
            by_device = {self._engines[p].device: p for p in peers}
            for r in stats.get("relays", []):
                peer = by_device.get(r["peer"], str(r["peer"]))
                cost = self.relay_costs.setdefault(peer, RelayCost())
                cost.loads += 1 if r["bytes"] else 0
                cost.bytes += r["bytes"]
                cost.busy_seconds += r["busy_seconds"]
                cost.staging_bytes = max(cost.staging_bytes, r["staging_bytes"])
                cost.last_skipped = r["skipped"]
                carried.append(f"{peer}:{r['bytes']}:{r['busy_seconds']:.4f}:{r['staging_bytes']}"
                               + (f":{r['skipped']}" if r["skipped"] else ""))
        stats["relay_bytes"] = sum(r["bytes"] for r in stats.get("relays", []))
        stats["relay_peers"] = ";".join(carried)  # bus:bytes:busy_s:staging_bytes[:why not]
        stats.pop("relays", None)

    def relay_status(self) -> dict[str, Any]:
        """The setting and what relays cost each peer GPU (status op, metrics)."""
        with self._make:
            allowed = "auto" if self.relay_allowed is None else sorted(self.relay_allowed) or "off"
            return {"allowed": allowed, "peers": {b: c.as_dict() for b, c in sorted(self.relay_costs.items())}}

    def warm_up(self, max_gpus: int = 64) -> list[str]:
        """Worker thread, at start: an engine for every GPU this process sees, so the first load on a
        node pays neither the CUDA start (0.1-3.7 s seen on the H100 machine) nor pinning: fills made
        once an engine exists are pinned as soon as they are ready. Returns the bus ids; no GPU: []."""
        from sllmfs.engine.copy_engine import CopyError

        for ordinal in range(max_gpus):
            try:
                engine = self._new_engine(ordinal)
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
        if len(self.buses) > 1 and self.relay_allowed != frozenset():
            from sllmfs.engine.links import LinkWatch

            self._links = LinkWatch(self.buses)
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
        if res.gpu_pinned or res.state != "ready" or res.closed or not pairs:
            return
        # a segment made of a pinned blank is pinned whole already (its pieces), a partition not in
        # hugetlb pages holds no pins (pinned whole here, or one such partition stages the whole model:
        # the copy engine's _auto_mode)
        res.gpu_pinned = True
        if res.unpin is None:
            res.unpin = lambda: self.release(res)
        t0 = time.perf_counter()
        pinned, pin_s = 0, 0.0  # newly pinned bytes and the driver's seconds for them (a copy pinned the rest)
        try:
            segs = self._segments(res)
            for engine, lock in pairs:
                with lock:
                    if res.closed:
                        return
                    for seg, s in zip(res.segments, segs, strict=True):
                        if not s.length:
                            continue
                        if seg.pinned:  # its blank's pieces cover it
                            continue
                        got = engine.register(s)
                        pinned += int(got.get("bytes", 0))
                        pin_s += float(got.get("seconds", 0.0))
        except (CopyError, ValueError) as e:
            log.warning("could not pin model=%s variant=%s for GPU copies: %s", res.model, res.variant, e)
            return
        finally:
            # the pieces its blanks held past the partitions' ends: no copy reads them (no lock needed), but
            # an unpin holds the driver ~3 ms a piece, so they go here, once the locks above found the copies
            # that streamed behind the fill done (memtier.Segment)
            t1 = time.perf_counter()
            unpinned = sum(seg.drop_past_end() for seg in res.segments)
            unpin_s = time.perf_counter() - t1
        log.info("pinned model=%s variant=%s for GPU copies newly_pinned=%d register_s=%.3f seconds=%.3f "
                 "unpinned_past_end=%d unpin_s=%.3f", res.model, res.variant, pinned, pin_s,
                 time.perf_counter() - t0, unpinned, unpin_s)

    def pin_blank(self, blank: Blank) -> None:
        """Worker thread: pin a blank for GPU copies, in PIN_PIECE pieces, with every engine (the
        first pins, the others share: csrc/pins.h), so a segment made of it needs no pin when a load
        copies it. No bus lock: a blank is no copy's source yet. A refused pin leaves it unpinned
        (loads then pin as they copy, as without)."""

        pairs = self._pairs()
        if not pairs:
            return
        base = blank.address
        tried = []
        try:
            for engine, _lock in pairs:
                tried.append(engine)
                for off in range(0, blank.length, PIN_PIECE):
                    engine.register((base + off, min(PIN_PIECE, blank.length - off), 0, 0))
        except Exception as e:  # whatever it was: every engine tried gives its pieces back, the blank stays unpinned
            for engine in tried:
                engine.release((base, blank.length, 0, 0), idle=True)
            log.warning("could not pin a blank segment for GPU copies (%s); loads pin as they copy", e)
            return
        blank.unpin = self._unpin_idle

    def _unpin_idle(self, address: int, length: int) -> None:
        """Unpin what a blank (or a segment made of one that no copy has read) holds in [address, +length)."""
        for engine, _lock in self._pairs():
            engine.release((address, length, 0, 0), idle=True)

    def release(self, res: Resident) -> None:
        """Unpin a resident's segments in every engine (before they are unmapped)."""
        segs = self._segments(res)
        for engine, lock in self._pairs():
            with lock:
                for s in segs:
                    if s.length:
                        engine.release(s)
