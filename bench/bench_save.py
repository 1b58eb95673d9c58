"""`sllmfs save` throughput next to `cp -r` of the same files, in the same run.

Usage: python bench/bench_save.py [--gb 1.0] [--workdir DIR]
Both copies read a warm page cache (each source is read once first) and both
end with the data on disk (`cp -r` is followed by `sync`, since save fsyncs).
Prints the ratio save/cp (goal >= 0.8) and writes bench/results/save-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sllmfs.store.save import save_model  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402


def build_checkpoint(out: Path, gb: float) -> int:
    """A safetensors file of random bf16 tensors (16 MiB each), without torch."""
    out.mkdir(parents=True)
    n = max(1, int(gb * 1e9) // (16 << 20))
    header, offset = {}, 0
    for i in range(n):
        header[f"layer.{i}.weight"] = {"dtype": "BF16", "shape": [4096, 2048],
                                       "data_offsets": [offset, offset + (16 << 20)]}
        offset += 16 << 20
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(out / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        block = rng.integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
        for i in range(n):
            f.write(block[i % 7:] + block[: i % 7])  # distinct tensors, cheap to make
    (out / "config.json").write_text("{}")
    return offset


def warm(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="sllmfs-bench-save-"))
    try:
        src = work / "src"
        nbytes = build_checkpoint(src, args.gb)
        results = {}
        for run in range(3):
            warm(src)
            t0 = time.perf_counter()
            subprocess.run(["cp", "-r", str(src), str(work / f"cp{run}")], check=True)
            os.sync()
            t_cp = time.perf_counter() - t0
            warm(src)
            t0 = time.perf_counter()
            save_model(Store(work / "store"), f"bench/model{run}", src)  # a new name, as cp makes a new dir
            t_save = time.perf_counter() - t0
            shutil.rmtree(work / f"cp{run}")
            shutil.rmtree(work / "store")
            os.sync()
            results[f"run{run}"] = {"cp_s": t_cp, "save_s": t_save}
        best_cp = sorted(r["cp_s"] for r in results.values())[1]  # medians of 3
        best_save = sorted(r["save_s"] for r in results.values())[1]
        out = {
            "bench": "save", "host": platform.node(), "bytes": nbytes, "runs": results,
            "cp_gbps": nbytes / best_cp / 1e9, "save_gbps": nbytes / best_save / 1e9,
            "ratio_save_to_cp": best_cp / best_save, "goal": 0.8,
            "command": "python bench/bench_save.py " + " ".join(sys.argv[1:]),
        }
        dest = Path(__file__).parent / "results" / f"save-{platform.node()}.json"
        dest.write_text(json.dumps(out, indent=1))
        print(f"{'copy':<14}{'GB/s':>8}")
        print(f"{'cp -r + sync':<14}{out['cp_gbps']:>8.2f}")
        print(f"{'sllmfs save':<14}{out['save_gbps']:>8.2f}")
        print(f"ratio save/cp = {out['ratio_save_to_cp']:.2f} (goal >= 0.8)  -> {dest}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
