"""`sllmfs` whose fill reads and checksums the page cache in Python, as it did before the native
hashed reads (csrc/hashread.cpp), for `bench_cold_stages.py --part blanks` to run beside the daemon as
it is: what does one native call per window buy over a GIL trip per 1 MiB read and per hash?

    python bench/fill_python_reads.py start --storage-path ... (any `sllmfs` command line)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllmfs.cli import main  # noqa: E402
from sllmfs.sidecar.fill import Fill  # noqa: E402

if __name__ == "__main__":
    # a renamed switch would leave this patch unused and run the native reads under this one's name
    if not isinstance(getattr(Fill, "native_reads", None), bool):
        sys.exit("bench/fill_python_reads.py: Fill has no native_reads switch; update this script")
    Fill.native_reads = False
    main()
