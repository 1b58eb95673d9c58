"""Where a cold first load loses: each stage of disk -> memory tier -> GPU measured alone, in one run.

    python bench/bench_cold_stages.py --workdir /tmp/sllmfs-bench [--layers 32] [--out bench/results]

Builds (or reuses) the Llama-2-7B-shaped bf16 checkpoint and its stored partitions, then measures,
over the same stored bytes, each stage the fill and the GPU copy go through (issue 18, deliverable 1):

- disk: O_DIRECT reads of the partition files (page cache dropped) with 1 thread and large blocks
  (the disk's sequential bandwidth: the goal's limit), and with 4/16/32 threads (queue depth);
  buffered reads with 4 and 16 threads (what the fill does today);
- page cache -> memory: buffered reads of files already cached, into anonymous memory;
- memory tier pages: first touch of fresh 4 KiB shmem and 2 MiB hugetlb memfds (fault-in);
- checksums: xxh3_64 over the bytes, 1 and 16 threads;
- pinning: cudaHostRegister of a fresh hugetlb / 4 KiB mapping; pinned H2D peak;
- the sidecar's whole fill from disk (`load --warm`, page cache dropped) at --num-thread 4 and 16.

Every limit must measure (a stage that cannot fails the run with one line). Prints a table of
GB/s; writes JSON with the command to --out.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
MODEL = "bench/llama-2-7b-shaped"
POOL = "48GB"  # the fills' memory budget (blanks are made up to it, as far as the hugetlb pool goes)

import warmload  # noqa: E402
from limits import drop_caches, measured, pinned_peak, read_files, sh, start_sidecar, stop, stored_files, timed_threads  # noqa: E402

from sllmfs.sidecar import prefault  # noqa: E402

ALIGN = 4096
# the fill's page-cache read sizes tried beside its 1 MiB (the first also as a whole daemon, --part blanks)
SMALL_READS_KIB = (256, 64)


def _run_all(work: list[Callable[[], object]]) -> float:
    """Seconds for one thread per callable to all finish."""
    t0 = time.perf_counter()
    ts = [threading.Thread(target=w) for w in work]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def fault_in(nbytes: int, huge: bool, threads: int) -> float:
    """GB/s of first-touch page faults on a fresh memfd map, as the fill causes them: ``threads``
    workers read /dev/zero into their share of the map (preadv drops the GIL; the kernel faults and
    zeroes each page, then copies zeroes: an upper bound on what a fill's reads can fault in)."""
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if huge else 0)
    fd = os.memfd_create("bench", flags)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(fd)
        raise SystemExit(f"cannot map {nbytes} bytes of {'hugetlb' if huge else 'shmem'}: {e}") from None
    step = nbytes // threads
    view = memoryview(mm)
    zero = os.open("/dev/zero", os.O_RDONLY)

    def worker(i: int) -> Callable[[], None]:
        def run() -> None:
            for off in range(i * step, (i + 1) * step, 32 << 20):
                os.preadv(zero, [view[off:min(off + (32 << 20), (i + 1) * step)]], 0)
        return run

    seconds = _run_all([worker(i) for i in range(threads)])
    os.close(zero)
    view.release()
    mm.close()
    os.close(fd)
    return step * threads / seconds / 1e9


def copy_into_map(files: list[Path], threads: int, piece: int, *, read: int = 0, verify: str = "none") -> float:
    """GB/s of page cache -> one hugetlb map of the files' size, faulted in first (as the blanks are),
    ``threads`` workers taking ``piece``-byte pieces in file order, each read (``read`` bytes at a
    time, 0: at once) to its own place: the fill's shape, where the 32 MiB buffer the plain limit
    reuses stays in the caches. ``verify``: none; after (xxh3 over each 4 MiB window once the whole
    piece is read, the fill's old order); each (xxh3 over each read right after it)."""
    import xxhash

    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    fd = os.memfd_create("bench", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    mapped = -(-total // (2 << 20)) * (2 << 20)
    try:
        os.ftruncate(fd, mapped)
        mm = mmap.mmap(fd, mapped, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.posix_fallocate(fd, 0, mapped)  # faulted in before the clock starts, as blanks are
    except OSError as e:
        os.close(fd)
        raise SystemExit(f"cannot map {mapped} bytes of hugetlb (reserve more pages): {e}") from None
    view = memoryview(mm)
    jobs, base = [], 0
    fds = [os.open(f, os.O_RDONLY) for f in files]
    for i, size in enumerate(sizes):
        jobs += [(fds[i], off, base + off, min(piece, size - off)) for off in range(0, size, piece)]
        base += size
    lock = threading.Lock()
    done = [0]

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                fd_, off, at, n = jobs.pop(0)
            got = 0
            step = read or n
            while got < n:
                k = min(step, n - got)
                got += os.preadv(fd_, [view[at + got:at + got + k]], off + got)
                if verify == "each":
                    xxhash.xxh3_64_intdigest(view[at + got - k:at + got])
            if verify == "after":
                for w in range(at, at + n, 4 << 20):
                    xxhash.xxh3_64_intdigest(view[w:min(w + (4 << 20), at + n)])
            with lock:
                done[0] += got

    seconds = timed_threads(worker, threads)
    for f in fds:
        os.close(f)
    view.release()
    mm.close()
    os.close(fd)
    if done[0] != total:
        raise SystemExit(f"bench: copied {done[0]} of {total} bytes into the map")
    return total / seconds / 1e9


def prefault_rate(nbytes: int, threads: int) -> float:
    """GB/s of fallocate() on a fresh hugetlb memfd, ``threads`` ranges at once: the kernel allocates
    and zeroes the pages without a user page fault each (what a pre-faulting tier would pay)."""
    fd = os.memfd_create("bench", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    os.ftruncate(fd, nbytes)
    step = nbytes // threads // (2 << 20) * (2 << 20)

    seconds = _run_all([lambda i=i: os.posix_fallocate(fd, i * step, step) for i in range(threads)])
    os.close(fd)
    return step * threads / seconds / 1e9


def checksum_rate(nbytes: int, threads: int) -> float:
    import xxhash

    buf = bytearray(os.urandom(64 << 20))
    per = nbytes // threads

    def worker() -> None:
        left = per
        while left > 0:
            xxhash.xxh3_64_intdigest(buf)
            left -= len(buf)

    return per * threads / timed_threads(worker, threads) / 1e9


def register_rate(nbytes: int, huge: bool) -> float:
    """GB/s of cudaHostRegister on a fresh, faulted-in memfd map (what pinning a segment costs)."""
    import ctypes

    import torch

    torch.cuda.init()
    fd = os.memfd_create("bench", os.MFD_CLOEXEC | (os.MFD_HUGETLB if huge else 0))
    os.ftruncate(fd, nbytes)
    mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    for off in range(0, nbytes, 1 << 21):
        mm[off] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    cudart = torch.cuda.cudart()
    t0 = time.perf_counter()
    rc = cudart.cudaHostRegister(addr, nbytes, 0)
    seconds = time.perf_counter() - t0
    if int(rc) != 0:
        raise SystemExit(f"cudaHostRegister failed: {rc}")
    cudart.cudaHostUnregister(addr)
    os.close(fd)
    return nbytes / seconds / 1e9


def sidecar_fill(store: Path, work: Path, threads: int, chunk: str, *, cold: bool,
                 extra: list[str] | None = None, own: dict[str, float] | None = None,
                 program: tuple[str, ...] = ("-m", "sllmfs")) -> float:
    """GB/s of the sidecar filling its memory tier (`load --warm`, the CLI's start included), from disk
    or from the page cache; ``extra``: more sidecar flags (the read shape); ``own``: gets the rate the
    sidecar logged (the fill's threads alone, "gbps") and the seconds of the same `load --warm` once
    the model is resident ("cli_s": the CLI's start and round trip, in the first figure too);
    ``program``: the daemon python runs (bench/old_fill_order.py: the fill's order before run 7)."""
    sock = work / f"fill-{threads}.sock"
    log = work / f"fill-{threads}.log"
    proc = start_sidecar(store, sock, log, ["--mem-pool-size", POOL, "--num-thread", str(threads), "--chunk-size",
                                            chunk, "--no-gpu-warmup", *(extra or [])], program=program)
    try:
        if "--no-prefault" not in (extra or []):  # the start-time blanks first: the fill should find them made
            deadline = time.monotonic() + 300
            while "as blank segments" not in log.read_text() and time.monotonic() < deadline:
                if not prefault.hugepages_free()[0]:
                    break  # no hugetlb pool: no blanks will come
                time.sleep(0.1)
        if cold and not drop_caches():
            raise SystemExit("cannot drop the page cache (need root): a cold fill cannot be measured")
        if not cold:
            read_files(stored_files(store), 16, 32 << 20, direct=False)  # all in the page cache
        load = [sys.executable, "-m", "sllmfs", "load", "--model", MODEL, "--warm", "--socket", str(sock)]
        t0 = time.perf_counter()
        sh(*load)
        seconds = time.perf_counter() - t0
        if own is not None:  # the same command once resident: what the CLI costs without a fill
            t0 = time.perf_counter()
            sh(*load)
            own["cli_s"] = time.perf_counter() - t0
    finally:
        stop(proc)
    files = stored_files(store)
    if own is not None:  # the sidecar's own figure: its worker threads only, without the CLI's start
        rates = re.findall(r"filled model=.* rate=([0-9.]+)GB/s", log.read_text())
        if not rates:
            raise SystemExit(f"bench: the sidecar logged no fill rate:\n{log.read_text()[-2000:]}")
        own["gbps"] = float(rates[-1])
        native = re.findall(r"filled model=.* native_reads=(True|False)", log.read_text())
        own["native_reads"] = float(native[-1] == "True") if native else -1.0  # -1: a daemon before the switch
    return sum(f.stat().st_size for f in files) / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/sllmfs-bench")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--part", choices=["all", "faults", "disk", "blanks", "cold-fill", "warm-load", "ring-first"],
                    default="all",
                    help="faults: is a page's first touch in this VM the cost, or every fault? (repeated "
                         "fault-in of the same reservation, fallocate, fills in a row); blanks: a fill from the "
                         "page cache into the start-time blanks vs into fresh memory; cold-fill: the fill from "
                         "disk next to the disk's buffered read in its shape; warm-load: the tier-empty "
                         "page-cache load_dict, phase by phase (bench/warmload.py); ring-first: a prototype "
                         "of that load through a pinned ring, the tier filled behind (bench/ringfirst.py)")
    ap.add_argument("--threads", type=int, default=16, help="fill threads (--part blanks, cold-fill, warm-load)")
    ap.add_argument("--small-reads", action="store_true", help="--part blanks: also the page-cache reads in "
                    f"{'/'.join(map(str, SMALL_READS_KIB))} KiB (NOTES-cold run 11)")
    ap.add_argument("--device", default="cuda:0", help="--part warm-load: where load_dict puts the tensors "
                                                        "('cpu' on a machine without a GPU: the client copies)")
    ap.add_argument("--pool", default=warmload.POOL, help="--part warm-load: the sidecar's --mem-pool-size")
    ap.add_argument("--reps", type=int, default=2, help="--part warm-load: tier-empty loads (each a fresh process)")
    ap.add_argument("--current-only", action="store_true",
                    help="--part warm-load: only the daemon as it is (not the A/B of warmload.DAEMONS)")
    ap.add_argument("--child-load", nargs=4, metavar=("SOCKET", "MODEL", "DEVICE", "REF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_load:
        print("RESULT " + json.dumps(warmload.child(*args.child_load), default=str), flush=True)
        return
    from llama_shapes import saved_checkpoint

    work = Path(args.workdir)
    src, store = saved_checkpoint(work, MODEL, args.layers)
    files = stored_files(store)
    nbytes = sum(f.stat().st_size for f in files)
    r: dict[str, float] = {}

    def cold(label: str, fn: Callable[[], float]) -> None:
        if not drop_caches():
            raise SystemExit("cannot drop the page cache (need root): cold stages cannot be measured")
        r[label] = measured(label, fn())
        print(f"{label:<50}{r[label]:>8.2f} GB/s", flush=True)

    def warm(label: str, fn: Callable[[], float]) -> None:
        r[label] = measured(label, fn())
        print(f"{label:<50}{r[label]:>8.2f} GB/s", flush=True)

    if args.part == "disk":
        _disk(store, work, files, cold)
        return _write(args, r, nbytes, True)
    if args.part == "blanks":
        secs = _blanks(store, work, files, warm, args.threads, args.small_reads)
        return _write(args, r, nbytes, False, secs)
    if args.part == "cold-fill":
        secs = _cold_fill(store, work, files, cold, warm, args.threads)
        return _write(args, r, nbytes, False, secs)
    if args.part == "ring-first":  # a prototype's bound, before building it in (NOTES-cold run 13)
        import ringfirst

        return _write_found(args, ringfirst.run(store, work, src / "model.safetensors", args.device, args.threads,
                                                args.reps), nbytes)
    if args.part == "warm-load":
        return _write_found(args, warmload.run(store, work, src / "model.safetensors", MODEL, args.device,
                                               args.threads, args.reps, args.pool,
                                               1 if args.current_only else len(warmload.DAEMONS)), nbytes)
    if args.part == "faults":
        _faults(store, work, files, warm)
        return _write(args, r, nbytes, "disk O_DIRECT 1 thread 64MiB" in r)
    cold("disk O_DIRECT 1 thread 64MiB", lambda: read_files(files, 1, 64 << 20, direct=True))
    for t in (4, 16, 32):
        cold(f"disk O_DIRECT {t} threads 16MiB", lambda t=t: read_files(files, t, 16 << 20, direct=True))
    for t in (4, 16):
        cold(f"disk buffered {t} threads 32MiB", lambda t=t: read_files(files, t, 32 << 20, direct=False))
    read_files(files, 16, 32 << 20, direct=False)  # now cached
    for t in (1, 4, 16):
        warm(f"page cache -> memory {t} threads", lambda t=t: read_files(files, t, 32 << 20, direct=False))
    gib8 = 8 << 30
    for huge in (False, True):
        for t in (1, 4, 16):
            kind = "hugetlb" if huge else "4KiB shmem"
            warm(f"fault-in {kind} {t} threads", lambda h=huge, t=t: fault_in(gib8, h, t))
    for t in (1, 16):
        warm(f"xxh3 {t} threads", lambda t=t: checksum_rate(gib8, t))
    for huge in (False, True):
        warm(f"cudaHostRegister {'hugetlb' if huge else '4KiB'}", lambda h=huge: register_rate(4 << 30, h))
    warm("pinned H2D peak", pinned_peak)
    for t in (4, 16):
        warm(f"sidecar fill page cache {t} threads", lambda t=t: sidecar_fill(store, work, t, "32MiB", cold=False))
    for t, chunk in ((4, "32MiB"), (16, "32MiB")):
        cold(f"sidecar fill cold {t} threads {chunk}", lambda t=t, c=chunk: sidecar_fill(store, work, t, c, cold=True))
    _write(args, r, nbytes, True)


def _faults(store: Path, work: Path, files: list[Path], warm: Callable[[str, Callable[[], float]], None]) -> None:
    """Repeated measurements of the same kind: if the second touch of a hugetlb reservation is much
    faster than the first, the VM's first touch (the host backing the page) is the cost, not the fault."""
    big = 14 << 30  # most of the 16 GiB reservation gpu_setup.sh makes
    for rep in (1, 2, 3):
        warm(f"fault-in hugetlb 16 threads #{rep}", lambda: fault_in(big, True, 16))
    for rep in (1, 2):
        warm(f"fallocate hugetlb 16 threads #{rep}", lambda: prefault_rate(big, 16))
    for rep in (1, 2):
        warm(f"fault-in 4KiB shmem 16 threads #{rep}", lambda: fault_in(8 << 30, False, 16))
    read_files(files, 16, 32 << 20, direct=False)
    warm("page cache -> memory 16 threads", lambda: read_files(files, 16, 32 << 20, direct=False))
    for rep in (1, 2):
        warm(f"sidecar fill page cache 16 threads #{rep}",
             lambda: sidecar_fill(store, work, 16, "32MiB", cold=False))
    warm("pinned H2D peak", pinned_peak)


def _blanks(store: Path, work: Path, files: list[Path], warm: Callable[[str, Callable[[], float]], None],
            t: int, small_reads: bool = False) -> dict[str, float]:
    """The fill from the page cache into segments made of start-time blanks (memory already faulted in)
    with its page-cache reads as they are (native: a window read and checksummed per call) and in Python
    (bench/fill_python_reads.py: a GIL trip per 1 MiB read and per hash), and into fresh memory,
    alternating, with the copy into memory already faulted in as the limit; the fill's copy + checksum
    modelled in this process in Python (one map, no sidecar), hashing after each piece and after each
    1 MiB read; and the rate the sidecar logs (its threads alone) next to the CLI's end to end figure
    (and the CLI's own seconds). Smaller Python reads (NOTES-cold run 11): ``--small-reads``."""
    if not prefault.hugepages_free()[0]:
        raise SystemExit("no free hugetlb pages: reserve some (echo N > /proc/sys/vm/nr_hugepages) to compare")
    read_files(files, t, 32 << 20, direct=False)
    warm(f"page cache -> memory {t} threads (limit)", lambda: read_files(files, t, 32 << 20, direct=False))
    piece, read = 32 << 20, 1 << 20
    warm(f"page cache -> map {t} threads (limit, the fill's places)", lambda: copy_into_map(files, t, piece))
    warm(f"map + xxh3 after each piece {t} threads", lambda: copy_into_map(files, t, piece, verify="after"))
    # does a smaller read stay in L2 until its checksum? (NOTES-cold run 11) Each size three times, the
    # order turned each round, so one slow moment of the machine does not decide between them
    sizes = [read >> 10, *(SMALL_READS_KIB if small_reads else ())]
    for rnd in (1, 2, 3) if small_reads else (1,):
        for kib in sizes if rnd % 2 else sizes[::-1]:
            warm(f"map + xxh3 each {kib}KiB read {t} threads #{rnd}",
                 lambda k=kib: copy_into_map(files, t, piece, read=k << 10, verify="each"))
    secs: dict[str, float] = {}
    python = (str(HERE / "fill_python_reads.py"),)  # the daemon, its page-cache reads and hashes in Python
    daemon = ("-m", "sllmfs")
    for rep in (1, 2):
        kinds = [("blanks, python reads", [], python, 0.0), ("blanks", [], daemon, 1.0)]
        if small_reads:
            kinds.append((f"blanks, {SMALL_READS_KIB[0]} KiB reads", [],  # native or not, as the daemon binds
                          (str(HERE / "fill_read_size.py"), str(SMALL_READS_KIB[0])), -1.0))
        for kind, extra, program, native in [*kinds[::1 if rep == 1 else -1],
                                             ("fresh", ["--no-prefault"], daemon, 1.0)]:
            own: dict[str, float] = {}
            warm(f"sidecar fill page cache {t} threads, {kind} #{rep}",
                 lambda e=extra, o=own, p=program: sidecar_fill(store, work, t, "32MiB", cold=False, extra=e, own=o,
                                                                program=p))
            if native >= 0 and own["native_reads"] != native:  # a label must say what ran
                raise SystemExit(f"bench: '{kind}' ran with native_reads={own['native_reads']:.0f}: the native "
                                 "module did not bind here (see the sidecar log) or the switch was not applied")
            warm(f"  its own rate (sidecar log), {kind} #{rep}", lambda o=own: o["gbps"])
            secs[f"`load --warm` once resident (the CLI alone), {kind} #{rep}"] = own["cli_s"]
            print(f"  `load --warm` once resident (the CLI alone)      {own['cli_s']:>8.3f} s", flush=True)
    return secs


def _cold_fill(store: Path, work: Path, files: list[Path], cold: Callable[[str, Callable[[], float]], None],
               warm: Callable[[str, Callable[[], float]], None], t: int) -> dict[str, float]:
    """The fill from disk (page cache dropped) in its old order and its own, alternating with the disk's
    buffered read in the fill's shape (``t`` threads x 32 MiB): the page-cache path must leave this
    one as it was."""
    secs: dict[str, float] = {}
    old_order = (str(HERE / "old_fill_order.py"),)
    for rep in (1, 2):
        cold(f"disk buffered {t} threads 32MiB #{rep}", lambda: read_files(files, t, 32 << 20, direct=False))
        # each order first once: the first fill after the disk's read ran slower here, whichever it was
        for kind, program in (("old order", old_order), ("", ("-m", "sllmfs")))[::1 if rep == 1 else -1]:
            own: dict[str, float] = {}
            name = f"sidecar fill cold {t} threads 32MiB{', ' + kind if kind else ''} #{rep}"
            warm(name,  # it drops the page cache itself, after the blanks
                 lambda o=own, p=program: sidecar_fill(store, work, t, "32MiB", cold=True, own=o, program=p))
            warm(f"  its own rate (sidecar log){', ' + kind if kind else ''} #{rep}", lambda o=own: o["gbps"])
            secs[f"`load --warm` once resident (the CLI alone), {kind or 'new order'} #{rep}"] = own["cli_s"]
    return secs


def _disk(store: Path, work: Path, files: list[Path], cold: Callable[[str, Callable[[], float]], None]) -> None:
    """How this disk wants to be read: queue depth (threads) and request size, O_DIRECT or buffered,
    next to the fill's own shape (a peer read it faster than our 16 x 32 MiB buffered limit)."""
    for dev in Path("/sys/block").glob("*/queue/read_ahead_kb"):
        nr = dev.parent / "nr_requests"  # zram and loop devices lack some queue files
        mx = dev.parent / "max_sectors_kb"
        print(f"{dev.parent.parent.name}: read_ahead_kb={dev.read_text().strip()} "
              f"nr_requests={nr.read_text().strip() if nr.exists() else '-'} "
              f"max_sectors_kb={mx.read_text().strip() if mx.exists() else '-'}", flush=True)
    cold("disk O_DIRECT 1 thread 64MiB", lambda: read_files(files, 1, 64 << 20, direct=True))
    for t, mib in ((16, 32), (32, 8), (64, 4), (64, 1)):
        cold(f"disk O_DIRECT {t} threads {mib}MiB", lambda t=t, m=mib: read_files(files, t, m << 20, direct=True))
    for t, mib in ((16, 32), (32, 8), (64, 4)):
        cold(f"disk buffered {t} threads {mib}MiB", lambda t=t, m=mib: read_files(files, t, m << 20, direct=False))
    for t, chunk in ((16, "32MiB"), (32, "8MiB")):
        cold(f"sidecar fill cold {t} threads {chunk}", lambda t=t, c=chunk: sidecar_fill(store, work, t, c, cold=True))
    # fastsafetensors' cold shape (its nogds reader: O_DIRECT, 16 threads x 512 KiB from one cursor,
    # 8 MiB in flight) beat us on the H200 (NOTES-cold.md): the raw shapes around it, then the fill in it
    for t, kib in ((16, 512), (8, 512), (32, 256), (16, 1024)):
        cold(f"disk O_DIRECT {t} threads {kib}KiB", lambda t=t, k=kib: read_files(files, t, k << 10, direct=True))
    cold("disk buffered 16 threads 512KiB", lambda: read_files(files, 16, 512 << 10, direct=False))
    for t, read in ((16, "512KiB"), (8, "1MiB")):  # 512KiB: the native queued reads (4 in flight) since c4d572c
        cold(f"sidecar fill cold {t} threads direct {read} reads{' (native, depth 4)' if read == '512KiB' else ''}",
             lambda t=t, r=read: sidecar_fill(store, work, t, "4MiB", cold=True,
                                              extra=["--fill-direct", "--fill-read-size", r]))


def _write_found(args: argparse.Namespace, found: dict[str, Any], nbytes: int) -> None:
    """A part that measured whole loads (warm-load, ring-first): its result, with the command, to --out."""
    found.update(command="python bench/bench_cold_stages.py " + " ".join(sys.argv[1:]), host=platform.node(),
                 stored_bytes=nbytes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"cold-stages-{time.strftime('%Y%m%d-%H%M')}-{args.part}.json"
    dest.write_text(json.dumps(found, indent=1, default=str) + "\n")
    print(f"-> {dest}", flush=True)


def _write(args: argparse.Namespace, r: dict[str, float], nbytes: int, with_disk: bool,
           seconds: dict[str, float] | None = None) -> None:
    result = {"bench": "cold-stages", "host": platform.node(), "stored_bytes": nbytes, "gbps": r,
              "command": "python bench/bench_cold_stages.py " + " ".join(sys.argv[1:])}
    if seconds:
        result["seconds"] = seconds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"cold-stages-{time.strftime('%Y%m%d-%H%M')}-{args.part}.json"  # two parts in one minute: two files
    dest.write_text(json.dumps(result, indent=1))
    if with_disk:
        seq = r["disk O_DIRECT 1 thread 64MiB"]
        print(f"\n{nbytes / 1e9:.2f} GB stored; ratio to the disk's sequential O_DIRECT read ({seq:.2f} GB/s):")
        for k, v in r.items():
            print(f"{k:<34}{v:>8.2f}{v / seq:>8.2f}")
    limit = next((v for k, v in r.items() if "(limit, the fill's places)" in k), None)
    if limit is not None:
        print(f"\nratio to the copy into the fill's places ({limit:.2f} GB/s):")
        for k, v in r.items():
            print(f"{k:<50}{v:>8.2f}{v / limit:>8.2f}")
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
