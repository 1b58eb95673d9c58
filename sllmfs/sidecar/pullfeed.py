"""A pull from the origin streamed into the memory tier: each verified range lands in the
resident's segment as it arrives, so clients copy to the GPU while the download goes on.

The pull checks every 4 MiB window against the manifest before it hands a range over
(origin/pull.py), the same digest a store fill checks; ranges start on window boundaries.
Runs in the pull's worker threads: it writes bytes and readiness, never the tier's tables.
"""

from __future__ import annotations

import threading

import numpy as np

from sllmfs.protocol.messages import Readiness
from sllmfs.sidecar.memtier import Resident
from sllmfs.store.format import CHUNK_SIZE


class PullFeed:
    def __init__(self, res: Resident):
        self.res = res
        self.fed = 0  # bytes landed
        self.broken: str | None = None  # why the feed stopped: the download goes on to disk regardless
        self._lock = threading.Lock()
        self._index = {p.file: i for i, p in enumerate(res.manifest.partitions)}
        self._prefix = f"variants/{res.variant}/"

    @property
    def complete(self) -> bool:
        return self.fed == self.res.manifest.total_bytes

    def __call__(self, rel: str, off: int, data: bytes) -> None:
        """One verified range of an origin object (other variants' objects are not ours). Never raises:
        a problem here stops the feed (the resident then fails) but not the pull storing the model."""
        if self.broken is not None or not rel.startswith(self._prefix):
            return
        try:
            self._land(rel, off, data)
        except Exception as e:  # noqa: BLE001  # a bug or a closed map: this copy in memory only
            self.broken = f"{rel} at {off}: {type(e).__name__}: {e}"

    def _land(self, rel: str, off: int, data: bytes) -> None:
        part = self._index.get(rel[len(self._prefix):])
        res = self.res
        if part is None or res.closed:
            return
        seg, n = res.segments[part], len(data)
        p = res.manifest.partitions[part]
        if off % CHUNK_SIZE or off + n > p.size:
            raise ValueError(f"range {off}+{n} of {rel} is not window-aligned inside its {p.size} bytes")
        dest = np.frombuffer(seg.mm, dtype=np.uint8, count=n, offset=off)
        dest[:] = np.frombuffer(data, dtype=np.uint8)  # numpy copies without the GIL
        del dest
        ready, base = res.ready.mm, res.chunk_base[part]
        for w in range(off, off + n, CHUNK_SIZE):
            with self._lock:  # count before publishing: whoever sees the byte sees the count
                res.filled += min(CHUNK_SIZE, p.size - w)
                self.fed += min(CHUNK_SIZE, p.size - w)
            ready[base + w // CHUNK_SIZE] = Readiness.READY
