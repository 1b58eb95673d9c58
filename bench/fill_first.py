"""`sllmfs` that fills the memory tier on a tier-empty load's path, as before NOTES-cold run 15: it ignores
acquire's ``gpu_first``, so the fill starts at acquire and the GPU copy streams behind its windows from the
tier, for `bench_cold_stages.py --part warm-load` to run beside the daemon as it is (copies from the stored
files first, fills after). Only that moves.

    python bench/fill_first.py start --storage-path ... (any `sllmfs` command line)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllmfs.cli import main  # noqa: E402
from sllmfs.sidecar.cache import Cache  # noqa: E402

_resident = Cache.resident


async def _fill_first(self: Cache, model: str, variant: str, *, gpu_first: bool = False) -> Any:
    return await _resident(self, model, variant, gpu_first=False)


if __name__ == "__main__":
    # a renamed parameter would leave this patch unused and run GPU first under this one's name
    if "gpu_first" not in inspect.signature(Cache.resident).parameters:
        sys.exit("bench/fill_first.py: Cache.resident takes no gpu_first; update this script")
    Cache.resident = _fill_first  # type: ignore[method-assign]
    main()
