"""`sllmfs` that unpins a pinned blank's pieces past a partition's end at reserve, on the load's path, as
before NOTES-cold run 13 (the unpins were all of the reserve's 36-43 ms on the H200), for
`bench_cold_stages.py --part warm-load` to run beside the daemon as it is (which unpins them after the
load). Only that moves: the piece crossing the end stays pinned in both.

    python bench/eager_cut.py start --storage-path ... (any `sllmfs` command line)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllmfs.cli import main  # noqa: E402
from sllmfs.sidecar import memtier  # noqa: E402

_deferred = memtier.Segment._from_blank


def _eager(self: memtier.Segment, length: int, blank: memtier.Blank) -> None:
    t0 = time.monotonic()
    if length < blank.length and blank.unpin is not None:
        blank.unpin_from(memtier._round_up(length, memtier.PIN_PIECE))  # before the shrink, as it was
    unpin_s = time.monotonic() - t0
    _deferred(self, length, blank)
    self.cut_s += unpin_s


if __name__ == "__main__":
    # a renamed method would leave this patch unused and run the deferred cut under this one's name
    if not callable(getattr(memtier.Segment, "_from_blank", None)) or not hasattr(memtier.Segment, "drop_past_end"):
        sys.exit("bench/eager_cut.py: memtier.Segment has no _from_blank / drop_past_end; update this script")
    memtier.Segment._from_blank = _eager  # type: ignore[method-assign]
    main()
