"""GPU first from disk (NOTES-cold run 17): does the copy engine's read of the stored files keep up with
the disk when the page cache holds none of them? The sidecar uses GPU first only from the page cache
until this says yes on the GPU machine (sllmfs/sidecar/gpufirst.py, CACHED_ENOUGH).

Each load in turn, the page cache dropped before each, every stored partition of the model:

- ring O_DIRECT: the copy engine with the files opened O_DIRECT as sources (``FileSegment``: aligned 512 KiB
  reads straight into the pinned slot, each 4 MiB window checked), into a buffer on ``--device``
  (``cpu``: the host target on a machine without a GPU): what the sidecar does for a cold model (run 20);
- ring O_DIRECT, window blocks: the same with the file dealt to the stagers one 4 MiB checksum window at a
  time (a front 64 MiB wide, as fastsafetensors' threads read; the engine's default is 64 MiB blocks, 16
  stagers over 1 GiB of the file: run 24 found the narrow front 0.91x of it);
- ring buffered: the same files opened plainly (the page cache's share in 256 KiB reads, the rest in one
  read per window), as before run 20;
- the disk's read, O_DIRECT in 512 KiB blocks (fastsafetensors' no-GDS block) and 16 MiB ones, and
  buffered 64 MiB, the same threads; the best of them is the goal's limit (>= 0.9x).

    python bench/gpu_first_cold.py [--layers 8] [--threads 16] [--reps 2] [--device cuda:0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from limits import drop_caches, measured, read_files  # noqa: E402

MODEL = "bench/gpu-first-cold"


NARROW = 4 << 20  # one checksum window per block (run 24's A/B; the engine's default: its 64 MiB chunk_bytes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sllmfs-gpu-first-cold"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 4))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from llama_shapes import saved_checkpoint

    from sllmfs.engine.copy_engine import CopyEngine, FileSegment
    from sllmfs.store.format import CHUNK_SIZE, load_manifest

    _, store = saved_checkpoint(args.workdir, MODEL, args.layers)
    vdir = next(store.glob("models/*/variants/hf"))
    manifest = load_manifest(vdir)
    files = [vdir / p.file for p in manifest.partitions]
    total = sum(p.size for p in manifest.partitions)
    if not drop_caches():
        raise SystemExit("bench: cannot drop the page cache (need root): a cold read cannot be measured")

    cuda = args.device != "cpu"
    if cuda:
        import torch

        dst = [torch.empty(p.size, dtype=torch.uint8, device=args.device) for p in manifest.partitions]
        addrs = [d.data_ptr() for d in dst]
    else:
        host = [np.empty(p.size, dtype=np.uint8) for p in manifest.partitions]
        addrs = [h.ctypes.data for h in host]
    pieces = np.array([[i, 0, a, p.size] for i, (a, p) in enumerate(zip(addrs, manifest.partitions, strict=True))
                       if p.size], dtype=np.uint64)
    def make(file_block: int) -> CopyEngine:
        e = CopyEngine(target="cuda" if cuda else "host", device=0 if not cuda else (int(args.device[5:] or 0)),
                       mode="stage", threads=args.threads, slot_bytes=CHUNK_SIZE, file_block_bytes=file_block)
        e.prepare_ring()
        return e

    engine = make(0)  # the sidecar's: 64 MiB file blocks, 16 stagers spread over 1 GiB of the file
    narrow = make(NARROW)  # one checksum window each: a front 64 MiB wide
    fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files]
    dfds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT) for f in files]  # as the sidecar opens cold files
    sources, direct = ([FileSegment.of(fd, p.size, p.chunks, CHUNK_SIZE) for fd, p in zip(opened, manifest.partitions,
                                                                                          strict=True)]
                       for opened in (fds, dfds))

    def ring(segs: list[FileSegment], eng: CopyEngine = engine) -> float:
        t0 = time.perf_counter()
        stats = eng.copy(segs, pieces, timeout=600)
        seconds = time.perf_counter() - t0
        print(f"  ring: stage fill {stats.get('stage_fill_seconds', 0):.2f} s, waits "
              f"{stats.get('stage_wait_seconds', 0):.2f} s (summed over {args.threads} stagers)", flush=True)
        return total / seconds / 1e9

    readers = (("ring O_DIRECT (GPU first, cold)", lambda: ring(direct)),
               ("ring O_DIRECT, window blocks", lambda: ring(direct, narrow)),
               ("ring buffered", lambda: ring(sources)),
               ("disk O_DIRECT 512 KiB", lambda: read_files(files, args.threads, 512 << 10, direct=True)),
               ("disk O_DIRECT 16 MiB", lambda: read_files(files, args.threads, 16 << 20, direct=True)),
               ("buffered 64 MiB", lambda: read_files(files, args.threads, 64 << 20, direct=False)))
    runs: dict[str, list[float]] = {name: [] for name, _ in readers}
    try:
        ring(sources)  # uncounted: the first copy of a process pays first touches (a host target's pages)
        ring(sources, narrow)
        for rep in range(1, args.reps + 1):
            for name, fn in readers:
                if not drop_caches():
                    raise SystemExit("bench: cannot drop the page cache")
                runs[name].append(measured(name, fn()))
                print(f"#{rep} {name:<24}{runs[name][-1]:>8.2f} GB/s", flush=True)
    finally:
        engine.close()
        narrow.close()
        for fd in (*fds, *dfds):
            os.close(fd)
    med = {k: statistics.median(v) for k, v in runs.items()}
    disk = max(v for k, v in med.items() if k.startswith(("disk", "buffered")))  # the best any plain read got
    ratio = med["ring O_DIRECT (GPU first, cold)"] / disk
    before = med["ring O_DIRECT (GPU first, cold)"] / med["ring buffered"]
    front = med["ring O_DIRECT, window blocks"] / med["ring O_DIRECT (GPU first, cold)"]
    print(f"ring O_DIRECT / the disk's best read: {ratio:.2f}x (goal >= 0.9); / the buffered ring: {before:.2f}x; "
          f"window blocks / 64 MiB ones: {front:.2f}x", flush=True)
    out: dict[str, Any] = {"bench": "gpu-first-cold", "host": platform.node(), "device": args.device,
                           "threads": args.threads, "bytes": total, "gbps": runs, "median_gbps": med,
                           "disk_best_gbps": disk, "ring_vs_disk": ratio, "direct_vs_buffered_ring": before,
                           "window_vs_64mib_blocks": front,
                           "command": "python bench/gpu_first_cold.py " + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"gpu-first-cold-{time.strftime('%Y%m%d-%H%M')}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {dest}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
