"""`sllmfs` whose blanks are never pinned for GPU copies: the state before NOTES-cold run 9, for
`bench_cold_stages.py --part warm-load` to run beside the new one in the same call (the same code
otherwise: a load into a segment made of a blank pins every block on its path, as before).

    python bench/unpinned_blanks.py start --storage-path ... (any `sllmfs` command line)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllmfs.cli import main  # noqa: E402
from sllmfs.sidecar.gpucopy import GpuCopier  # noqa: E402
from sllmfs.sidecar.prefault import Blank  # noqa: E402


def _leave_unpinned(self: GpuCopier, blank: Blank) -> None:
    return None  # blank.unpin stays None: segments made of it are pinned by the copies that read them


if __name__ == "__main__":
    # a renamed hook would leave this patch unused and run the new code as the old
    if not callable(getattr(GpuCopier, "pin_blank", None)):
        sys.exit("bench/unpinned_blanks.py: sllmfs.sidecar.gpucopy.GpuCopier has no pin_blank to leave out; "
                 "update this script")
    GpuCopier.pin_blank = _leave_unpinned  # type: ignore[method-assign]
    main()
