"""The memory tier's own file, lent to the mount as a passthrough backing (no copy).

A variant stored as its safetensors files sits in the tier as sealed memfds that are those files
byte for byte (memtier.Segment(exact=True)). The mount backs a file with one instead of copying it.
While the mount holds it, the resident's pages stay, so they count in the tier's budget until the
file comes back (``close``); an evicted resident is freed then. The mount says whether a reader has
the file open (``opened``) and lets go of an unopened one when asked (``let_go``): the tier evicts a
resident only when none of its lent files is open.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field


def _open() -> bool:
    return True  # until the mount adopts the file it counts as open: a resident lending it is in use


def _nothing() -> None:
    return None


@dataclass(eq=False)
class TierFile:
    fd: int  # read-only, ours to close (through close())
    nbytes: int
    returned: Callable[[], None]  # the tier's side of close(): its pages may go now
    opened: Callable[[], bool] = _open  # set by the mount: a reader has it open
    let_go: Callable[[], None] = _nothing  # set by the mount: drop the backing if no reader has it open
    evicted: bool = False  # set by the tier: its resident left; the mount drops the backing at its last close
    closed: bool = field(default=False, init=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
            self.returned()
