"""Is fastsafetensors' cold edge its request shape? (NOTES-cold run 27)

strace of fastsafetensors 0.5.0's no-GDS reader (16 threads, 16 MiB bounce buffers) shows O_DIRECT
`pread`s of 516 KiB at 512 KiB strides from the file's start: each read overlaps the next by 4 KiB. Every
reader of ours read 512 KiB at 512 KiB strides (or larger blocks), and none matched it on the GPU host's
virtual disk (runs 20-26). This compiles `read_shape.cpp` (plain threads, one counter in file order) and
reads the stored files of a model, page cache dropped before each, order rotating per rep:

- 16 threads, 512 KiB at 512 KiB strides (our engine's request);
- 16 threads, 516 KiB at 512 KiB strides (fastsafetensors' request);
- 16 threads, 1 MiB at 1 MiB strides, and buffered 64 MiB with 16 threads (the disk limit's shape);
- fastsafetensors itself on the same files, where installed and the device is a GPU.

    python bench/read_shape.py [--layers 16] [--reps 3] [--device cuda:0] [--out DIR]
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from gpu_first_cold import fastsafetensors_reader  # noqa: E402
from limits import cold_read_args, cold_rounds, write_result  # noqa: E402

MODEL = "bench/read-shape"
KiB, MiB = 1 << 10, 1 << 20
SHAPES = {"512 KiB at 512 KiB strides (ours)": (16, 512 * KiB, 512 * KiB, True),
          "516 KiB at 512 KiB strides (fastsafetensors')": (16, 512 * KiB, 516 * KiB, True),
          "1 MiB at 1 MiB strides": (16, MiB, MiB, True),
          "buffered 64 MiB": (16, 64 * MiB, 64 * MiB, False)}


def build() -> Path:
    exe = Path(tempfile.gettempdir()) / "sllmfs-read-shape-bin"
    subprocess.run(["g++", "-O2", "-std=c++17", "-pthread", "-o", str(exe), str(HERE / "read_shape.cpp")], check=True)
    return exe


def main() -> int:
    ap = cold_read_args(__doc__, "/tmp/sllmfs-read-shape", layers=16, reps=3)
    args = ap.parse_args()
    from llama_shapes import stored_hf

    vdir, manifest = stored_hf(args.workdir, MODEL, args.layers)
    files = [str(vdir / p.file) for p in manifest.partitions]
    total = sum(p.size for p in manifest.partitions)
    exe = build()

    def shape(threads: int, stride: int, length: int, direct: bool) -> float:
        out = subprocess.run([str(exe), str(threads), str(stride), str(length), str(int(direct)), *files],
                             capture_output=True, text=True, check=True).stdout
        return float(out)

    readers: list[tuple[str, Callable[[], float]]] = [(k, lambda s=s: shape(*s)) for k, s in SHAPES.items()]
    peer = fastsafetensors_reader(vdir, args.device, total) if args.device != "cpu" else None
    if peer is not None:
        readers.append(("fastsafetensors", peer))
    runs = cold_rounds(readers, args.reps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ours, theirs = med["512 KiB at 512 KiB strides (ours)"], med["516 KiB at 512 KiB strides (fastsafetensors')"]
    ratios = {"516 KiB / 512 KiB requests": theirs / ours,
              "516 KiB requests / buffered 64 MiB": theirs / med["buffered 64 MiB"]}
    if "fastsafetensors" in med:
        ratios["fastsafetensors / its request shape in plain threads"] = med["fastsafetensors"] / theirs
    write_result(args.out, "read-shape", ratios,
                 {"bench": "read-shape", "host": platform.node(), "device": args.device, "bytes": total,
                  "files": len(files), "gbps": runs, "median_gbps": med,
                  "shapes": {k: list(v) for k, v in SHAPES.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
