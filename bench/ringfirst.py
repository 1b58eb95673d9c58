"""The tier-empty page-cache load that puts the GPU first (`bench_cold_stages.py --part ring-first`;
NOTES-cold runs 13-15): before building it into the sidecar, measure its bound.

Filling the tier on the load's path moves each byte through DRAM three times (page cache read, tier
written, DMA read); InstantTensor's reused pinned ring once. Here the copy engine reads the stored
partition files itself (``FileSegment``: its ``threads`` stagers each own ``SLOTS`` pinned slots and a
stream; a stager reads a checksum window from the file into a slot with the fill's hashed read, checks
it against the manifest, and queues the slot's H2D copy into the partition's GPU buffer), once per slot
size in ``SLOT_SIZES``. After the copy, the tier is filled "behind" it from the same page cache into
memory faulted in beforehand (the blanks' state), timed on its own: what the next start's hit costs to
prepare. (Run 14 drove the same loop from Python: 0.35x InstantTensor, the GIL per window.)

Printed per repetition: each slot size's GB/s and seconds, and the tier-behind seconds; with InstantTensor
from the page cache measured in the same run (the goal's peer). Bytes are checked on the GPU against the
files on the last repetition (a figure from wrong bytes is not a figure).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SLOTS = 3  # per stager: one reading, one in flight, one spare
SLOT_SIZES = (4 << 20, 1 << 20)  # one window a slot (checked before its H2D), or a quarter (checked at its end)
STEP = 256 << 10  # the native read's step (sllmfs.sidecar.fill.HASHED_READ)


def run(store: Path, work: Path, src_file: Path, device: str, threads: int, reps: int) -> dict[str, Any]:
    import torch
    from limits import read_files

    from sllmfs.store.format import CHUNK_SIZE, load_manifest
    from sllmfs.store.hashed_read import read as hashed_read

    if hashed_read is None:
        raise SystemExit("bench: the native hashed read is missing (sllmfs._hashread): build the extension")
    vdir = next(store.glob("models/*/variants/hf"))
    manifest = load_manifest(vdir)
    files = [vdir / p.file for p in manifest.partitions]
    total = sum(p.size for p in manifest.partitions)
    found: dict[str, Any] = {"bench": "cold-stages", "part": "ring-first", "device": device, "threads": threads,
                             "slots_per_thread": SLOTS, "bytes": total, "limits": {}, "loads": []}
    read_files(files, threads, 32 << 20, direct=False)
    if device != "cpu":
        import warmload

        ref = work / "reference.json"
        if not ref.exists():
            import json

            import peers

            ref.write_text(json.dumps(peers.reference(src_file)))
        found["limits"]["pinned_h2d_peak_gbps"] = warmload._peers_child("pinned-peak", "-", device).get("gbps")
        it = warmload._peers_child("instanttensor", str(src_file), device, "--placement", "warm", "--ref", str(ref))
        found["limits"]["instanttensor_page_cache"] = {k: it.get(k) for k in ("seconds", "gbps", "ok", "error")}
    from sllmfs.engine.copy_engine import CopyEngine, FileSegment

    dst = [torch.empty(p.size, dtype=torch.uint8, device=device) for p in manifest.partitions]
    fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files]
    sources = [FileSegment.of(fd, p.size, p.chunks, CHUNK_SIZE) for fd, p in zip(fds, manifest.partitions, strict=True)]
    pieces = np.array([[i, 0, d.data_ptr(), d.numel()] for i, d in enumerate(dst) if d.numel()], dtype=np.uint64)
    target = "host" if device == "cpu" else "cuda"
    engines = {size: CopyEngine(target=target, device=0 if target == "host" else torch.device(device).index or 0,
                                mode="stage", threads=threads, slot_bytes=size, slots_per_thread=SLOTS)
               for size in SLOT_SIZES}
    tier = [mmap.mmap(-1, max(p.size, 1)) for p in manifest.partitions]
    for m in tier:  # faulted in once, as the blanks are
        for off in range(0, len(m), 1 << 21):
            m[off] = 0
    try:
        for rep in range(1, reps + 1):
            for size, engine in engines.items():
                read_files(files, threads, 32 << 20, direct=False)  # every stored byte in the page cache
                for d in dst:
                    d.fill_(0xAB)
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                stats = engine.copy(sources, pieces, timeout=120)
                seconds = time.perf_counter() - t0
                got: dict[str, Any] = {"name": f"ring-first #{rep} {size >> 10} KiB slots", "slot_bytes": size,
                                       "seconds": seconds, "gbps": total / seconds / 1e9, "error": None,
                                       "ring_alloc_s": stats.get("ring_alloc_seconds")}
                got["tier_behind_s"] = _tier_behind(manifest, fds, tier, threads, hashed_read)
                got["checked"] = _same(dst, files) if rep == reps else None
                found["loads"].append(got)
                checked = "" if got["checked"] is None else f", bytes checked: {got['checked']}"
                print(f"{got['name']}: {seconds:.3f} s, {got['gbps']:.1f} GB/s, tier behind "
                      f"{got['tier_behind_s']:.3f} s{checked}", flush=True)
    finally:
        for e in engines.values():
            e.close()
        for fd in fds:
            os.close(fd)
        for m in tier:
            m.close()
    it = found["limits"].get("instanttensor_page_cache") or {}
    if it.get("seconds"):
        for x in found["loads"]:
            x["vs_instanttensor"] = it["seconds"] / x["seconds"]
        print(f"InstantTensor from the page cache: {it['seconds']:.3f} s; ring-first / InstantTensor: "
              + ", ".join(f"{x['vs_instanttensor']:.2f}x ({x['slot_bytes'] >> 10} KiB)" for x in found["loads"]),
              flush=True)
    if any(x.get("checked") is False for x in found["loads"]) or any(x.get("error") for x in found["loads"]):
        raise SystemExit("bench: ring-first moved wrong bytes or failed a checksum")
    return found


def _same(dst: list[Any], files: list[Path]) -> bool:
    """Whether every GPU buffer holds its partition file's bytes (the files read through a map)."""
    import torch

    return all(torch.equal(d.cpu(), torch.from_numpy(np.memmap(f, dtype=np.uint8, mode="c")))
               for d, f in zip(dst, files, strict=True))


def _windows(manifest: Any) -> list[tuple[int, int, int, int]]:
    """(partition, window, offset, size) of every checksum window, in order."""
    from sllmfs.store.format import CHUNK_SIZE

    return [(i, k, k * CHUNK_SIZE, min(CHUNK_SIZE, p.size - k * CHUNK_SIZE))
            for i, p in enumerate(manifest.partitions) for k in range(-(-p.size // CHUNK_SIZE))]


def _read_checked(hashed_read: Any, manifest: Any, fds: list[int], window: tuple[int, int, int, int],
                  dst: memoryview) -> str | None:
    """Read one window into ``dst`` with the fill's native hashed read; why it is not the stored bytes, or None."""
    from sllmfs.store.reader import window_matches

    i, k, off, size = window
    got = hashed_read(fds[i], dst[:size], off, STEP, 0)
    if got.done != size or not window_matches(manifest.partitions[i], k, got.digest):
        return f"partition {i} window {k}: {got}"
    return None


def _tier_behind(manifest: Any, fds: list[int], tier: list[mmap.mmap], threads: int, hashed_read: Any) -> float:
    """The tier filled from the page cache after the copy: the fill's read + checksum into faulted memory."""
    from limits import timed_threads

    jobs = _windows(manifest)
    lock = threading.Lock()
    bad: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                window = jobs.pop()
            error = _read_checked(hashed_read, manifest, fds, window, memoryview(tier[window[0]])[window[2]:])
            if error:
                bad.append(error)

    seconds = timed_threads(worker, threads)
    if bad:
        raise SystemExit(f"bench: the tier-behind fill found bad windows {bad[:3]}")
    return seconds
