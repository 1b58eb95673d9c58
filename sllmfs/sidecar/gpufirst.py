"""GPU first: a tier-empty load is copied from the stored files straight to the GPU, and the memory tier
is filled after that copy, not during it (except what that copy read past the page cache: it lands in the
tier too, see FileCopy, and the fill reads only the rest).

Filling the tier on the load's path moves each byte through host memory three times (page cache read,
tier written, DMA read); the copy engine reading the files into its pinned ring moves it once, and
checks each 4 MiB window against the manifest before its bytes go on (bench/NOTES-cold.md runs 13-15:
0.27 s for 13.48 GB from the page cache on the H200, 1.3x InstantTensor, where the fill-then-copy path
took 0.32-0.39 s; from disk its reads ran at 1.12x the disk's O_DIRECT read, run 18). A client that
will ask for a GPU copy says so at acquire (``gpu_first``); the sidecar reserves the tier as for any
miss (unless its fills read past the page cache, --fill-direct) and holds its fill here until:

- that GPU copy (and any other copy from the files that started meanwhile) ends: the usual case;
- a client reads the segments itself (the ``fill`` op: it copies on its own after all, or wants CPU
  views): at once, or when the copies reading the files end (the fill closes them when it is done);
- the lease ends, or HOLD_LIMIT_S pass with no copy asked: a client that never copies costs the next
  one no more than that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sllmfs.sidecar.fill import Fill
from sllmfs.sidecar.memtier import Resident

log = logging.getLogger("sllmfs.sidecar")

HOLD_LIMIT_S = 2.0


@dataclass
class _Held:
    fill: Fill
    copies: int = 0  # GPU copies reading the stored files now
    teed: bool = False  # a copy was given the tee already


@dataclass(frozen=True)
class FileCopy:
    """A GPU copy from a held fill's files. ``tee``: it also writes what it reads into the tier's segments
    (its O_DIRECT reads leave nothing in the page cache for the fill to find). Only the first copy of a
    fill tees: a second one writing a window the first published could put bytes it has not checked yet
    under a reader, and the fill is held until both end anyway."""

    fill: Fill
    tee: bool


class HeldFills:
    """Fills held until their GPU copies end (the trio thread's: no lock). ``start(fill, why)`` runs one."""

    def __init__(self, start: Callable[[Fill, str], None]):
        self._held: dict[int, _Held] = {}  # id(resident) -> its held fill
        self._start = start

    def hold(self, fill: Fill) -> None:
        self._held[id(fill.res)] = _Held(fill)

    def holds(self, res: Resident) -> bool:
        return id(res) in self._held

    def begin_copy(self, res: Resident) -> FileCopy | None:
        """A GPU copy of ``res`` starts: the held fill whose open files it reads, or None (the fill runs:
        copy from the tier)."""
        held = self._held.get(id(res))
        if held is None:
            return None
        tee = held.fill.copy_direct and not held.teed and held.copies == 0
        held.copies += 1
        held.teed |= tee
        return FileCopy(held.fill, tee)

    def end_copy(self, res: Resident) -> None:
        held = self._held.get(id(res))
        if held is not None:
            held.copies -= 1
            if held.copies == 0:
                self._go(res, "after the GPU copy")

    def release(self, res: Resident, why: str) -> None:
        """Start ``res``'s held fill now, if it has one and no copy reads its files (else that copy's end
        starts it: the fill closes the files when it ends, so it never starts under a copy)."""
        held = self._held.get(id(res))
        if held is not None and held.copies == 0:
            self._go(res, why)

    def drain(self) -> list[Fill]:
        """The sidecar stops: every held fill no copy reads, forgotten (the caller closes them); those a
        copy still reads are told to stop and start (to end at once) when that copy ends."""
        idle = [k for k, h in self._held.items() if h.copies == 0]
        for h in self._held.values():
            h.fill.stop = True
        return [self._held.pop(k).fill for k in idle]

    def _go(self, res: Resident, why: str) -> None:
        held = self._held.pop(id(res))
        log.info("fill released model=%s variant=%s (%s)", res.model, res.variant, why)
        self._start(held.fill, why)
