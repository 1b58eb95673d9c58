"""Shrinking a hugetlb memfd under its CUDA pins, with the real driver (the memory tier's deferred cut:
memtier.Segment._from_blank, NOTES-cold run 13).

A segment made of a pinned blank shrinks at reserve and unpins the pieces past its end only after the
load. That is safe if (1) the shrink succeeds with the pages still registered, (2) the kernel keeps the
pinned pages allocated (HugePages_Free does not rise at the shrink) and frees them at their unpin (it
rises then by exactly those pages), (3) copies from the pinned pages below the end still carry the right
bytes, before and after the pieces past the end are unpinned, and (4) at the end every page is back.
This checks each on one GPU and prints one JSON object (``ok`` false names what failed); it also times
the shrink with the pins held against the old cut (unpin the pieces past the end, then shrink).

    python3 bench/truncate_pinned.py [--out DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllmfs.sidecar.prefault import hugepages_free  # noqa: E402

MiB = 1 << 20
PIECE = 256 * MiB  # prefault.PIN_PIECE
BLANK = 1024 * MiB
END = 600 * MiB  # the partition's end: pieces 0, 256 kept, 512 crosses it, 768 past it


def _free_pages() -> int:
    free, size = hugepages_free()
    if size != 2 * MiB:
        raise SystemExit(f"truncate_pinned: no 2 MiB hugetlb pool here (page size {size}); reserve some: "
                         "echo 1024 > /proc/sys/vm/nr_hugepages")
    return free


def _blank(engine: object) -> tuple[int, mmap.mmap, int]:
    fd = os.memfd_create("truncate-pinned", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    os.ftruncate(fd, BLANK)
    mm = mmap.mmap(fd, BLANK, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    pattern = (bytes(range(256)) * (MiB // 256))
    for off in range(0, BLANK, MiB):
        mm[off:off + MiB] = pattern[(off // MiB) % 256:] + pattern[:(off // MiB) % 256]
    from sllmfs.engine.segments import address_of

    base = address_of(mm)
    for off in range(0, BLANK, PIECE):
        engine.register((base + off, PIECE, 0, 0))  # type: ignore[attr-defined]
    return fd, mm, base


def _same_on_gpu(mm: mmap.mmap, length: int) -> bool:
    """Copy [0, length) to the GPU one pin piece at a time (the driver refuses a copy whose source spans
    two registrations) and compare what lands with the map."""
    import numpy as np
    import torch

    host = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8, count=length))
    dev = torch.empty(length, dtype=torch.uint8, device="cuda")
    for off in range(0, length, PIECE):
        dev[off:off + PIECE].copy_(host[off:off + PIECE], non_blocking=True)
    torch.cuda.synchronize()
    return bool(torch.equal(dev.cpu(), host))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from sllmfs.engine.copy_engine import CopyEngine

    torch.cuda.init()
    engine = CopyEngine(target="cuda", device=0, mode="register")
    start = _free_pages()
    out: dict[str, object] = {"command": " ".join(["python3", *sys.argv]),
                              "gpu": torch.cuda.get_device_name(0), "blank_mib": BLANK // MiB, "end_mib": END // MiB,
                              "piece_mib": PIECE // MiB, "free_pages_start": start}
    failed: list[str] = []

    # the deferred cut: shrink and seal with every piece pinned
    fd, mm, base = _blank(engine)
    faulted = _free_pages()
    t0 = time.perf_counter()
    os.ftruncate(fd, END)
    out["shrink_pinned_s"] = time.perf_counter() - t0
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    after_shrink = _free_pages()
    out["pages_freed_at_shrink"] = after_shrink - faulted
    if after_shrink != faulted:
        failed.append("the shrink freed pinned pages")
    if not _same_on_gpu(mm, END):
        failed.append("a copy below the end after the shrink")
    t0 = time.perf_counter()
    dead = (768 * MiB, BLANK - 768 * MiB)
    engine.release((base + dead[0], dead[1], 0, 0), idle=True)
    out["unpin_past_end_s"] = time.perf_counter() - t0
    out["pages_freed_at_unpin"] = _free_pages() - after_shrink
    if _free_pages() - after_shrink != dead[1] // (2 * MiB):
        failed.append("the unpin past the end freed other than its pages")
    if not _same_on_gpu(mm, END):
        failed.append("a copy below the end after the unpin")
    engine.release((base, BLANK, 0, 0), idle=True)
    mm.close()
    os.close(fd)
    if _free_pages() != start:
        failed.append(f"pages not all back ({_free_pages()} free, {start} at start)")

    # the old cut, timed: unpin from the crossing piece on, then shrink
    fd, mm, base = _blank(engine)
    t0 = time.perf_counter()
    engine.release((base + 512 * MiB, BLANK - 512 * MiB, 0, 0), idle=True)
    os.ftruncate(fd, END)
    out["old_cut_s"] = time.perf_counter() - t0
    engine.release((base, BLANK, 0, 0), idle=True)
    mm.close()
    os.close(fd)
    engine.close()
    out["free_pages_end"] = _free_pages()
    if out["free_pages_end"] != start:
        failed.append("pages not all back after the old cut")
    try:
        tail = [ln for ln in os.popen("dmesg 2>/dev/null | tail -n 50").read().splitlines()
                if any(k in ln for k in ("BUG", "WARNING", "nvidia", "NVRM", "hugetlb"))]
    except OSError:
        tail = []
    out["dmesg"] = tail[-10:]
    out["failed"] = failed
    out["ok"] = not failed
    line = json.dumps(out)
    print(line)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"truncate-pinned-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json").write_text(line + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
