"""A variant on its way into the memory tier, as the mount's cold reads see it.

Read window by window as the kernel asks (1 MiB requests, a few in flight), the store gave a cold
reader of the mount 0.43-0.57x the disk on the H200 (bench/NOTES-mount.md). The sidecar's fill reads
the same files at 0.9-1.1x the disk (many threads, large pieces, each window checked as it lands).
So once a handle has asked for ``START_AFTER`` bytes of tensors, the sidecar is asked to fill its
variant (``Warm``; a copy already resident or filling is joined from the first read); reads then
wait for the windows they need and are served from the tier's memory, as a hit is, and the next open
finds the model resident (passthrough). A reader of a header or of one small tensor starts no fill.
Where the sidecar cannot (no room in the pool, a failed fill, the copy evicted or replaced
meanwhile) reads go to the store as before: nothing waits forever and no byte is served that its
window's checksum did not pass (READY is set only after it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from sllmfs.fuse.synth import Piece
from sllmfs.protocol.messages import Readiness
from sllmfs.store.store import Identity

POLL_FIRST, POLL_MAX = 0.0002, 0.005  # a 4 MiB window lands every ~2 ms at disk speed
# tensor bytes a handle reads from the store before a fill of the whole variant is started for it: a
# probe (one small tensor, a checksum of the first MiB) must not pull gigabytes into memory and evict
# what others use; a loader passes it in ~30 ms at disk speed. More than the kernel's read-ahead (16 MiB).
START_AFTER = 32 << 20


class Incoming(Protocol):
    def state(self, part: int, lo: int, hi: int) -> Readiness | None:
        """Of the windows holding bytes [lo, hi) of partition ``part``: READY when all are, FAILED when
        one is, else PENDING; None when the copy is gone (freed, failed, replaced)."""

    def views(self) -> list[memoryview] | None:
        """One view per partition of the copy's memory; None when gone."""


# The resident copy of exactly this version of a variant (model, variant key, identity), when there is
# one (filling or ready); with ``start`` a fill of it is started when there is not. None: the sidecar will
# not (no room, refused, replaced): reads go to the store.
Warm = Callable[[str, str, Identity, bool], Awaitable["Incoming | None"]]


async def wait_for(incoming: Incoming, pieces: Sequence[Piece]) -> list[memoryview] | None:
    """The copy's views once every window ``pieces`` touch is READY; None when one FAILED or the copy
    went (the caller reads the store, which checks and reports a bad window itself)."""
    delay = POLL_FIRST
    while True:
        pending = False
        for p in pieces:
            if p.partition < 0:
                continue
            s = incoming.state(p.partition, p.source_offset, p.source_offset + p.length)
            if s is None or s == Readiness.FAILED:
                return None
            pending = pending or s != Readiness.READY
        if not pending:
            return incoming.views()  # no await since the check: the copy cannot have gone meanwhile
        await trio.sleep(delay)
        delay = min(delay * 2, POLL_MAX)
