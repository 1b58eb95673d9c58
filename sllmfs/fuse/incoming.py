"""A variant on its way into the memory tier, as the mount's cold reads see it.

Read window by window as the kernel asks (1 MiB requests, a few in flight), the store gave a cold
reader of the mount 0.43-0.57x the disk on the H200 (bench/NOTES-mount.md). The sidecar's fill reads
the same files at 0.9-1.1x the disk (many threads, large pieces, each window checked as it lands). So
the first read of a weight file's tensor bytes asks the sidecar to fill its variant (``Warm``); reads
then wait for the windows they need and are served from the tier's memory, as a hit is, and the next
open finds the model resident (passthrough). Where the sidecar cannot (no room in the pool, a failed
fill, the copy evicted or replaced meanwhile) reads go to the store as before: nothing waits forever
and no byte is served that its window's checksum did not pass (READY is set only after it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from sllmfs.fuse.synth import Piece
from sllmfs.protocol.messages import Readiness
from sllmfs.store.store import Identity

POLL_FIRST, POLL_MAX = 0.0002, 0.005  # a 4 MiB window lands every ~2 ms at disk speed


class Incoming(Protocol):
    def state(self, part: int, lo: int, hi: int) -> Readiness | None:
        """Of the windows holding bytes [lo, hi) of partition ``part``: READY when all are, FAILED when
        one is, else PENDING; None when the copy is gone (freed, failed, replaced)."""

    def views(self) -> list[memoryview] | None:
        """One view per partition of the copy's memory; None when gone."""


# Asked at a handle's first tensor read: start (or join) the fill of exactly this version of a variant
# (model, variant key, identity) into the memory tier; None when the sidecar will not (reads: the store).
Warm = Callable[[str, str, Identity], Awaitable["Incoming | None"]]


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
