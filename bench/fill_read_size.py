"""`sllmfs` whose fill copies what the page cache holds in reads of KIB KiB (the daemon's own:
``sllmfs.sidecar.fill.CACHED_READ`` and ``HASHED_READ``), for `bench_cold_stages.py --part blanks` to run beside
the daemon as it is: does a smaller read keep the bytes in L2 for their checksum (NOTES-cold run 11)?

    python bench/fill_read_size.py KIB start --storage-path ... (any `sllmfs` command line after KIB)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sllmfs.sidecar.fill as fill  # noqa: E402
from sllmfs.cli import main  # noqa: E402
from sllmfs.store.format import CHUNK_SIZE  # noqa: E402


def set_read_size(kib: int) -> None:
    """The fill's page-cache reads become ``kib`` KiB (a divisor of the 4 MiB window, >= 4 KiB)."""
    size = kib << 10
    if size < 4096 or CHUNK_SIZE % size:
        raise SystemExit(f"bench/fill_read_size.py: {kib} KiB does not divide the {CHUNK_SIZE >> 10} KiB window; "
                         "give a power of two from 4 to 4096")
    # a renamed constant would leave this patch unused and run the daemon's size as this one
    if not isinstance(getattr(fill, "CACHED_READ", None), int):
        raise SystemExit("bench/fill_read_size.py: sllmfs.sidecar.fill has no CACHED_READ; update this script")
    fill.CACHED_READ = size
    if isinstance(getattr(fill, "HASHED_READ", None), int):  # the native reads' size (NOTES-cold run 12)
        fill.HASHED_READ = size


if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python bench/fill_read_size.py KIB <sllmfs arguments>")
    set_read_size(int(sys.argv.pop(1)))
    main()
