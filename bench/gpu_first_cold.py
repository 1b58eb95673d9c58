"""GPU first from disk (NOTES-cold run 17): does the copy engine's read of the stored files keep up with
the disk when the page cache holds none of them? The sidecar uses GPU first only from the page cache
until this says yes on the GPU machine (sllmfs/sidecar/gpufirst.py, CACHED_ENOUGH).

Each load in turn, the page cache dropped before each and the order rotating per rep (drift favours no
row), every stored partition of the model:

- ring O_DIRECT depth 1: the copy engine with the files opened O_DIRECT as sources (``FileSegment``:
  aligned 512 KiB reads straight into the pinned slot, each 4 MiB window checked), into a buffer on
  ``--device`` (``cpu``: the host target on a machine without a GPU), one read in flight per stager: what
  the sidecar does for a cold model (runs 20-25);
- ring O_DIRECT depth 4: each stager keeps that many reads in flight (Linux AIO, run 26);
- ring O_DIRECT 2 stagers x depth 8, window blocks: 16 reads in flight within an 8 MiB front (the shape of
  fastsafetensors' queue: 16 threads taking 512 KiB blocks in file order);
- ring O_DIRECT depth 1, 516 KiB requests: each read asks 4 KiB past its 512 KiB step (fastsafetensors'
  requests, strace; run 27);
- fastsafetensors (no GDS, 16 threads, 16 MiB bounce buffers) on the same files, where it is installed and
  the device is a GPU: the peer in the same run;
- the disk's read, O_DIRECT in 512 KiB blocks and buffered 64 MiB, the same threads; the best of them is
  the goal's limit (>= 0.9x).

    python bench/gpu_first_cold.py [--layers 8] [--threads 16] [--reps 2] [--device cuda:0] [--out DIR]
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from limits import cold_read_args, cold_rounds, drop_caches, read_files, write_result  # noqa: E402

MODEL = "bench/gpu-first-cold"


NARROW = 4 << 20  # one checksum window per block (run 24's A/B; the engine's default: its 64 MiB chunk_bytes)


def fastsafetensors_reader(folder: Path, device: str, total: int) -> Callable[[], float] | None:
    """GB/s of fastsafetensors loading ``folder``'s safetensors files to ``device`` (its tensors dropped
    after), or None where it is not installed."""
    try:
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup
    except ImportError:
        print("fastsafetensors is not installed: its row is left out", file=sys.stderr, flush=True)
        return None
    import torch

    names = sorted(str(f) for f in folder.glob("*.safetensors"))

    def load() -> float:
        t0 = time.perf_counter()
        loader = SafeTensorsFileLoader(SingleGroup(), device, nogds=True, max_threads=16, bbuf_size_kb=16 << 10)
        try:
            loader.add_filenames({0: names})
            fb = loader.copy_files_to_device()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            fb.close()
        finally:
            loader.close()
        torch.cuda.empty_cache()
        return total / seconds / 1e9

    return load


def main() -> int:
    ap = cold_read_args(__doc__, "/tmp/sllmfs-gpu-first-cold", layers=8, reps=2)
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 4))
    args = ap.parse_args()
    from llama_shapes import stored_hf

    from sllmfs.engine.copy_engine import CopyEngine, FileSegment
    from sllmfs.store.format import CHUNK_SIZE

    vdir, manifest = stored_hf(args.workdir, MODEL, args.layers)
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
    def make(threads: int, depth: int, file_block: int = 0, overlap: int = 0) -> CopyEngine:
        e = CopyEngine(target="cuda" if cuda else "host", device=0 if not cuda else (int(args.device[5:] or 0)),
                       mode="stage", threads=threads, slot_bytes=CHUNK_SIZE, file_block_bytes=file_block,
                       read_depth=depth, read_overlap=overlap)
        e.prepare_ring()
        return e

    # (threads, read depth, file block, overlap): the sidecar's today (64 MiB blocks, 16 stagers over 1 GiB of
    # the file, one 512 KiB read each), more in flight per stager (run 26), fastsafetensors' queue shape (16
    # reads in an 8 MiB front) and its requests (516 KiB at 512 KiB strides, run 27)
    shapes = {"ring O_DIRECT depth 1": (args.threads, 1, 0, 0), "ring O_DIRECT depth 4": (args.threads, 4, 0, 0),
              "ring O_DIRECT 2 stagers x depth 8, window blocks": (2, 8, NARROW, 0),
              "ring O_DIRECT depth 1, 516 KiB requests": (args.threads, 1, 0, 4096)}
    engines = {name: make(*shape) for name, shape in shapes.items()}
    dfds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT) for f in files]  # as the sidecar opens cold files
    direct = [FileSegment.of(fd, p.size, p.chunks, CHUNK_SIZE) for fd, p in zip(dfds, manifest.partitions,
                                                                                strict=True)]

    def ring(eng: CopyEngine) -> float:
        t0 = time.perf_counter()
        stats = eng.copy(direct, pieces, timeout=600)
        seconds = time.perf_counter() - t0
        print(f"  ring: stage fill {stats.get('stage_fill_seconds', 0):.2f} s, waits "
              f"{stats.get('stage_wait_seconds', 0):.2f} s (summed over {eng.threads} stagers)", flush=True)
        return total / seconds / 1e9

    readers: list[tuple[str, Callable[[], float]]] = [(name, partial(ring, eng)) for name, eng in engines.items()]
    peer = fastsafetensors_reader(vdir, args.device, total) if cuda else None
    if peer is not None:
        readers.append(("fastsafetensors", peer))
    readers += [("disk O_DIRECT 512 KiB", lambda: read_files(files, args.threads, 512 << 10, direct=True)),
                ("buffered 64 MiB", lambda: read_files(files, args.threads, 64 << 20, direct=False))]
    try:
        for eng in engines.values():
            ring(eng)  # uncounted: the first copy of a process pays first touches (a host target's pages)
        runs = cold_rounds(readers, args.reps)
    finally:
        for eng in engines.values():
            eng.close()
        for fd in dfds:
            os.close(fd)
    med = {k: statistics.median(v) for k, v in runs.items()}
    disk = max(v for k, v in med.items() if k.startswith(("disk", "buffered")))  # the best any plain read got
    today = med["ring O_DIRECT depth 1"]
    ratios = {f"{k} / depth 1": v / today for k, v in med.items() if k.startswith("ring") and v != today}
    ratios["ring O_DIRECT depth 1 / the disk's best read"] = today / disk
    if "fastsafetensors" in med:
        ratios.update({f"{k} / fastsafetensors": v / med["fastsafetensors"] for k, v in med.items()
                       if k.startswith("ring")})
    write_result(args.out, "gpu-first-cold", ratios,
                 {"bench": "gpu-first-cold", "host": platform.node(), "device": args.device, "threads": args.threads,
                  "bytes": total, "gbps": runs, "median_gbps": med, "disk_best_gbps": disk, "shapes": shapes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
