"""Write-back's copy of a rank's state off the GPU (sllmfs/integrations/common/snapshot.py): a first start's
load phase waits for it. A Llama-2-7B-shaped state (291 bf16 tensors, 13.48 GB) on the GPU, copied to host
memory each way in turn, order rotating per rep, every copy checked on a sample of tensors:

- per tensor ``.to("cpu")`` (what write-back did until 2026-12-03: ~10 s on the H200 in a sync write-back's log);
- ``snapshot``: one buffer, 2 MiB pages faulted in by 16 threads, registered with CUDA for the copies;
- ``snapshot`` without the registration (pageable copies into the faulted buffer).

The limit, measured in the same run: the pinned D2H peak (a cudaHostAlloc buffer). Needs a GPU.

    python bench/snapshot_d2h.py [--layers 32] [--reps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from limits import measured, pinned_peak, write_result  # noqa: E402
from llama_shapes import LLAMA2_7B, tensor_shapes  # noqa: E402

from sllmfs.integrations.common.snapshot import snapshot  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    state = {name: torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16)
             for name, shape in tensor_shapes(**{**LLAMA2_7B, "layers": args.layers})}
    total = sum(t.numel() * t.element_size() for t in state.values())
    names = list(state)
    sample = [names[0], names[len(names) // 2], names[-1]]
    peak = pinned_peak(4, d2h=True)

    def timed(fn: Callable[[], dict[str, torch.Tensor]]) -> float:
        gc.collect()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        snap = fn()
        seconds = time.perf_counter() - t0
        for name in sample:
            if not torch.equal(snap[name], state[name].cpu()):
                raise SystemExit(f"snapshot_d2h: {name} differs from the GPU's copy")
        del snap
        return measured("a snapshot's rate", total / seconds / 1e9)

    ways: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "per tensor .to('cpu') (before)": lambda: {n: t.detach().to("cpu", copy=True) for n, t in state.items()},
        "snapshot, registered": lambda: snapshot(state),
        "snapshot, pageable": lambda: snapshot(state, pin=False)}
    runs: dict[str, list[float]] = {k: [] for k in ways}
    order = list(ways)
    for rep in range(args.reps):
        for k in order[rep % len(order):] + order[:rep % len(order)]:
            runs[k].append(timed(ways[k]))
            print(f"#{rep} {k:<34} {runs[k][-1]:6.2f} GB/s ({total / runs[k][-1] / 1e9:.2f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {f"{k} / the pinned D2H peak ({peak:.1f} GB/s)": v / peak for k, v in med.items()}
    ratios["snapshot, registered / per tensor .to('cpu')"] = med["snapshot, registered"] / med[order[0]]
    write_result(args.out, "snapshot-d2h", ratios, {"bench": "snapshot-d2h", "bytes": total, "tensors": len(state),
                                                    "pinned_d2h_peak_gbps": peak, "gbps": runs, "median_gbps": med})
    return 0


if __name__ == "__main__":
    sys.exit(main())
