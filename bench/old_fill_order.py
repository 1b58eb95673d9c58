"""`sllmfs` whose fill reads each piece whole and then hashes its 4 MiB windows: the order before
NOTES-cold run 7, for `bench_cold_stages.py --part blanks` to run beside the new one (the same code
otherwise: only the page-cache path is left out, so every piece takes the disk path).

    python bench/old_fill_order.py start --storage-path ... (any `sllmfs` command line)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllmfs.cli import main  # noqa: E402
from sllmfs.sidecar.fill import Fill  # noqa: E402


def _whole_pieces(self: Fill, part: int, view: memoryview, off: int, end: int) -> tuple[int, None]:
    return off, None  # nothing copied from the page cache here: the caller reads the piece, then hashes it


if __name__ == "__main__":
    # a renamed page-cache path would leave this patch unused and run the new order as the old one
    if not callable(getattr(Fill, "_from_cache", None)):
        sys.exit("bench/old_fill_order.py: sllmfs.sidecar.fill.Fill has no _from_cache to leave out; "
                 "update this script to the fill's page-cache path")
    Fill._from_cache = _whole_pieces  # type: ignore[method-assign,assignment]
    main()
