"""Copy-engine benchmark: memfd segments -> GPU (or host) through each engine mode.

    python bench/bench_copy_engine.py all --gib 8 --out DIR     # the full table (GPU machine)
    python bench/bench_copy_engine.py all --gib 0.25 --target host --quick   # smoke run anywhere

`all` builds the segments once (a 4 KiB-page memfd; when huge pages can be
reserved, a 2 MiB hugetlb memfd; where shmem gives mappings that ask 2 MiB
transparent huge pages, a shmem memfd made of them: all holding the same bytes)
and runs every
case in a FRESH process that inherits the fd, so mapping, page faults,
registration and ring allocation are all inside the timed region. Each case
poisons the destination first and checks per-64 MiB sums after the copy.
Prints a table last and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from limits import drop_caches

MiB = 1 << 20
GiB = 1 << 30
POISON = 0xAB
SUM_CHUNK = 64 * MiB


def layout(size: int, seed: int = 0) -> np.ndarray:
    """Tensor-like pieces (dst offset = src offset), 4 KiB-aligned starts, odd sizes among them."""
    rng = np.random.default_rng(seed)
    rows, off = [], 0
    while off < size:
        r = rng.random()
        if r < 0.3:
            n = int(rng.integers(1, 64 << 10))
        elif r < 0.6:
            n = int(rng.integers(1, 32)) * MiB + int(rng.integers(0, 4096))
        else:
            n = int(rng.integers(32, 512)) * MiB
        n = min(n, size - off)
        rows.append((0, off, off, n))
        off = (off + n + 4095) // 4096 * 4096
    return np.array(rows, dtype=np.uint64)


def fill_segment(view: memoryview, size: int, rows: np.ndarray) -> None:
    """Random-looking bytes where pieces are, POISON in the gaps (so a correct copy equals the source)."""
    block = np.random.default_rng(1).integers(0, 256, 256 * MiB, dtype=np.uint8)
    arr = np.frombuffer(view, dtype=np.uint8)
    for i, o in enumerate(range(0, size, block.size)):
        n = min(block.size, size - o)
        np.bitwise_xor(block[:n], i & 0xFF, out=arr[o : o + n])
    end = 0
    for _, off, _, n in rows.tolist():
        arr[end:off] = POISON
        end = off + n
    arr[end:] = POISON


def chunk_sums(arr: np.ndarray) -> np.ndarray:
    return np.frombuffer(arr, dtype=np.int64).reshape(-1, SUM_CHUNK // 8).sum(axis=1)


def reserve_hugepages(size: int) -> str:
    need = size // (2 * MiB) + 8
    try:
        path = Path("/proc/sys/vm/nr_hugepages")
        have = int(path.read_text())
        if have < need:
            path.write_text(str(need))
        got = int(path.read_text())
        return "" if got >= need else f"only {got} of {need} huge pages could be reserved"
    except OSError as e:
        return f"cannot reserve huge pages: {e}"


def shmem_thp_mode() -> str:
    """The host's shmem THP setting (the bracketed word), or why it is not known."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError as e:
        return f"unknown ({e.strerror})"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def shmem_huge_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("ShmemHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def make_thp_memfd(size: int, src: Any) -> tuple[int | None, str]:
    """A plain shmem memfd written through a MADV_HUGEPAGE mapping: what a memory tier of sealed files
    the mount can pass through would be (hugetlb memfds are refused as FUSE passthrough backings: ELOOP,
    bench/NOTES-mount.md). Returns the fd (None: no 2 MiB pages here) and what share of it got them."""
    import mmap

    if shmem_thp_mode() not in ("always", "within_size", "advise", "force"):
        return None, f"shmem THP is {shmem_thp_mode()!r}: no case (echo advise > .../shmem_enabled)"
    before = shmem_huge_bytes()
    fd = make_memfd(size, False)
    m = mmap.mmap(fd, size)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, AttributeError) as e:
        m.close()
        os.close(fd)
        return None, f"MADV_HUGEPAGE refused: {e}"
    m[:] = src[:]
    m.close()
    share = (shmem_huge_bytes() - before) / size
    return fd, f"{share:.2f} of it in 2 MiB pages (shmem_enabled {shmem_thp_mode()})"


def make_memfd(size: int, huge: bool) -> int:
    fd = os.memfd_create("sllm-bench-huge" if huge else "sllm-bench", os.MFD_HUGETLB if huge else 0)
    os.ftruncate(fd, size)
    return fd


# ---------------------------------------------------------------- child side


def _gpu_setup(size: int) -> tuple[Any, Any]:
    import torch

    torch.cuda.init()
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    return torch, dst


def _check(torch: Any, dst: Any, sums_path: str) -> bool:
    want = np.load(sums_path)
    if torch is None:
        return bool((chunk_sums(dst) == want).all())
    got = dst.view(torch.int64).view(-1, SUM_CHUNK // 8).sum(dim=1).cpu().numpy()
    return bool((got == want).all())


def _poison(torch: Any, dst: Any) -> None:
    if torch is None:
        dst[:] = POISON
    else:
        dst.fill_(POISON)
        torch.cuda.synchronize()


def run_case(a: argparse.Namespace) -> dict[str, Any]:
    import mmap

    from sllmfs.engine.copy_engine import CopyEngine, Segment

    size = a.size
    torch, dst = (None, np.empty(size, np.uint8)) if a.target == "host" else _gpu_setup(size)
    dst_ptr = dst.ctypes.data if torch is None else dst.data_ptr()
    rows = layout(size)
    rows[:, 2] += np.uint64(dst_ptr)
    _poison(torch, dst)
    res: dict[str, Any] = {"case": a.name, "mode": a.mode, "pages": a.pages, "bytes": size}
    t0 = time.perf_counter()
    mm = mmap.mmap(a.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    if a.prefault:  # fill the page tables up front (timed): tells page-fault stalls from driver-lock stalls
        mm.madvise(22)  # MADV_POPULATE_READ
    res["prefault_s"] = time.perf_counter() - t0
    seg = Segment.from_buffer(mm)
    eng = CopyEngine(
        target=a.target,
        mode=a.mode,
        threads=a.threads or None,
        register_threads=a.reg_threads or None,
        chunk_bytes=a.chunk_mib * MiB,
        slot_bytes=a.slot_mib * MiB,
        streams=a.streams,
    )
    t1 = time.perf_counter()
    st = eng.copy([seg], rows)
    t2 = time.perf_counter()
    res.update(
        e2e_gbps=size / (t2 - t0) / 1e9,
        engine_init_s=t1 - t0,
        copy_s=t2 - t1,
        stats=st,
        correct=_check(torch, dst, a.sums),
    )
    _poison(torch, dst)
    t3 = time.perf_counter()
    st2 = eng.copy([seg], rows)
    res.update(
        warm_gbps=size / (time.perf_counter() - t3) / 1e9, warm_stats=st2, warm_correct=_check(torch, dst, a.sums)
    )
    t4 = time.perf_counter()
    eng.close()
    res["close_s"] = time.perf_counter() - t4
    return res


def run_peak(a: argparse.Namespace) -> dict[str, Any]:
    """Pinned (cudaHostAlloc) -> GPU with torch on several streams, then the engine on the same buffer."""
    from sllmfs.engine.copy_engine import CopyEngine, Segment

    torch, dst = _gpu_setup(a.size)
    n = min(a.size, 4 * GiB)
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.fill_(7)
    streams = [torch.cuda.Stream() for _ in range(4)]
    step = 64 * MiB
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i, o in enumerate(range(0, n, step)):
            with torch.cuda.stream(streams[i % 4]):
                dst[o : o + step].copy_(src[o : o + step], non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = n / min(times) / 1e9
    med = n / sorted(times)[len(times) // 2] / 1e9
    rows = np.array([[0, o, dst.data_ptr() + o, min(step, n - o)] for o in range(0, n, step)], dtype=np.uint64)
    eng_runs = []
    with CopyEngine(target="cuda", mode="register", register_threads=1) as eng:
        for _ in range(3):
            eng_runs.append(eng.copy([Segment(src.data_ptr(), n)], rows)["gbps"])
    return {"case": "pinned-peak", "bytes": n, "peak_gbps": peak, "median_gbps": med, "engine_on_pinned_gbps": eng_runs}


def run_check(a: argparse.Namespace) -> dict[str, Any]:
    """Exact comparison on shuffled, odd, overlapping pieces, plus readiness arriving mid-copy and faults."""
    from sllmfs.engine import copy_engine as ce
    from sllmfs.protocol.messages import Readiness

    size = 1 * GiB
    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, size, dtype=np.uint8)
    fd = make_memfd(size, False)
    os.pwrite(fd, src.tobytes(), 0)
    mm = ce.map_segment(fd, size)
    # pieces: random lengths (0..40 MiB, some 0, odd), random source offsets, packed shuffled destinations
    lens = rng.integers(0, 40 * MiB, 80)
    lens[::7] = 0
    lens[1::5] = rng.integers(1, 5000, lens[1::5].size)
    offs = np.array([int(rng.integers(0, size - n + 1)) for n in lens], dtype=np.uint64)
    order = rng.permutation(len(lens))
    dpos = np.zeros(len(lens), np.uint64)
    cur = 0
    for i in order:
        dpos[i] = cur
        cur += int(lens[i]) + int(rng.integers(0, 300))
    total = cur
    expect = np.full(total, POISON, np.uint8)
    for o, d, n in zip(offs.tolist(), dpos.tolist(), lens.tolist(), strict=True):
        expect[d : d + n] = src[o : o + n]
    out: dict[str, Any] = {"case": "check"}
    torch = None
    if a.target == "cuda":
        import torch

        dst = torch.empty(total, dtype=torch.uint8, device="cuda")
        ref = torch.from_numpy(expect).cuda()
        base = dst.data_ptr()
    else:
        dst = np.empty(total, np.uint8)
        base = dst.ctypes.data
    rows = np.stack([np.zeros_like(offs), offs, dpos + np.uint64(base), lens.astype(np.uint64)], axis=1)

    def same() -> bool:
        if torch is None:
            return bool((dst == expect).all())
        return bool(torch.equal(dst, ref))

    for mode in ("register", "stage", "hybrid"):
        for chunk in (2, 64):
            _poison(torch, dst)
            with ce.CopyEngine(target=a.target, mode=mode, threads=4, chunk_bytes=chunk * MiB, slot_bytes=3 * MiB) as e:
                st = e.copy([ce.Segment.from_buffer(mm)], rows)
            out[f"{mode}-{chunk}MiB"] = same() and st["bytes"] == int(lens.sum())
    # readiness flipped from another thread, in reverse order, while the copy waits
    cs = 4 * MiB
    ready = np.zeros(size // cs, np.uint8)

    def flip() -> None:
        for i in reversed(range(ready.size)):
            ready[i] = 1
            time.sleep(0.001)

    _poison(torch, dst)
    th = threading.Thread(target=flip)
    with ce.CopyEngine(target=a.target, mode="hybrid", threads=4) as e:
        th.start()
        st = e.copy([ce.Segment.from_buffer(mm, ready, cs)], rows, timeout=10)
    th.join()
    out["readiness"] = same()
    out["readiness_first_ready_s"] = st["first_ready_seconds"]
    ready[:] = 1
    ready[100] = Readiness.FAILED
    errs = {}
    with ce.CopyEngine(target=a.target, mode="hybrid", threads=4) as e:
        try:
            e.copy([ce.Segment.from_buffer(mm, ready, cs)], rows, timeout=5)
        except ce.ChunkFailed as x:
            errs["chunk_failed"] = str(x)
        if a.target == "cuda":
            bad = rows.copy()
            bad[:, 2] = np.uint64(16)  # not a device address
            try:
                e.copy([ce.Segment.from_buffer(mm)], bad[lens > 0][:1])
            except ce.CudaError as x:
                errs["cuda_error"] = str(x)
            _poison(torch, dst)
            e.copy([ce.Segment.from_buffer(mm)], rows)  # the engine still works after an error
            out["after_error"] = same()
    out["errors"] = errs
    return out


def run_disk(a: argparse.Namespace) -> dict[str, Any]:
    """Cold memory tier: reader threads fill a memfd from a cold file, the engine copies behind them."""
    from sllmfs.engine.copy_engine import CopyEngine, Segment

    size, cs = a.size, 16 * MiB
    path = Path(a.disk_dir) / "bench-cold.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size != size:
        block = np.random.default_rng(3).integers(0, 256, 64 * MiB, dtype=np.uint8).tobytes()
        with open(path, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            os.fsync(f.fileno())
    torch, dst = (None, np.empty(size, np.uint8)) if a.target == "host" else _gpu_setup(size)
    dst_ptr = dst.ctypes.data if torch is None else dst.data_ptr()
    import mmap


    def fill(fd: int, mm: mmap.mmap, ready: np.ndarray, threads: int = 8) -> float:
        src = os.open(path, os.O_RDONLY)
        nxt = iter(range(ready.size))
        lock = threading.Lock()
        view = memoryview(mm)

        def work() -> None:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                os.preadv(src, [view[i * cs : (i + 1) * cs]], i * cs)
                ready[i] = 1

        t = time.perf_counter()
        ts = [threading.Thread(target=work) for _ in range(threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        os.close(src)
        return time.perf_counter() - t

    res: dict[str, Any] = {"case": "cold-disk", "bytes": size, "dropped_caches": drop_caches()}
    fd = make_memfd(size, False)
    mm = mmap.mmap(fd, size)
    ready = np.zeros(size // cs, np.uint8)
    res["disk_only_gbps"] = size / fill(fd, mm, ready) / 1e9
    res["dropped_caches"] = res["dropped_caches"] and drop_caches()
    os.close(fd)
    fd = make_memfd(size, False)
    mm = mmap.mmap(fd, size)
    ready = np.zeros(size // cs, np.uint8)
    rows = np.array([[0, o, dst_ptr + o, min(cs, size - o)] for o in range(0, size, cs)], dtype=np.uint64)
    _poison(torch, dst)
    eng = CopyEngine(target=a.target, mode=a.mode, threads=a.threads or None)
    t = time.perf_counter()
    fill_s: list[float] = []
    filler = threading.Thread(target=lambda: fill_s.append(fill(fd, mm, ready)))
    filler.start()
    st = eng.copy([Segment.from_buffer(mm, ready, cs)], rows, timeout=60)
    total = time.perf_counter() - t
    filler.join()
    eng.close()
    # fill_during_copy: the reads alone while the engine runs; total - fill: the copy's tail after the last read
    res.update(with_copy_gbps=size / total / 1e9, fill_during_copy_gbps=size / fill_s[0] / 1e9, stats=st)
    res["ratio"] = res["with_copy_gbps"] / res["disk_only_gbps"]
    want = chunk_sums(np.frombuffer(mm, np.uint8))
    got = chunk_sums(dst) if torch is None else dst.view(torch.int64).view(-1, SUM_CHUNK // 8).sum(dim=1).cpu().numpy()
    res["correct"] = bool((got == want).all())
    return res


# ---------------------------------------------------------------- VMM experiment


def _cu() -> Any:
    """Driver API (libcuda) pieces for host VMM allocations shared as fds."""
    import ctypes as C

    class Loc(C.Structure):
        _fields_ = [("type", C.c_int), ("id", C.c_int)]

    class Flags(C.Structure):
        _fields_ = [("compression", C.c_ubyte), ("rdma", C.c_ubyte), ("usage", C.c_ushort), ("res", C.c_ubyte * 4)]

    class Prop(C.Structure):
        _fields_ = [("type", C.c_int), ("handles", C.c_int), ("loc", Loc), ("win32", C.c_void_p), ("flags", Flags)]

    class Access(C.Structure):
        _fields_ = [("loc", Loc), ("flags", C.c_int)]

    lib = C.CDLL("libcuda.so.1")

    def ok(rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    ok(lib.cuInit(0), "cuInit")
    dev, ctx = C.c_int(), C.c_void_p()
    ok(lib.cuDeviceGet(C.byref(dev), 0), "cuDeviceGet")
    ok(lib.cuDevicePrimaryCtxRetain(C.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    ok(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    prop = Prop(type=1, handles=1, loc=Loc(type=3, id=0))  # PINNED, POSIX fd, HOST_NUMA node 0
    acc = (Access * 2)(Access(Loc(1, 0), 3), Access(Loc(3, 0), 3))  # device 0 and host node 0: read-write

    def map_handle(h: Any, size: int) -> int:
        ptr = C.c_uint64()
        ok(lib.cuMemAddressReserve(C.byref(ptr), C.c_size_t(size), C.c_size_t(2 * MiB), C.c_uint64(0), 0), "reserve")
        ok(lib.cuMemMap(ptr, C.c_size_t(size), C.c_size_t(0), h, C.c_uint64(0)), "cuMemMap")
        ok(lib.cuMemSetAccess(ptr, C.c_size_t(size), acc, C.c_size_t(2)), "cuMemSetAccess")
        return int(ptr.value)

    def create(size: int) -> tuple[int, int]:
        h, fd = C.c_uint64(), C.c_int()
        ok(lib.cuMemCreate(C.byref(h), C.c_size_t(size), C.byref(prop), C.c_uint64(0)), "cuMemCreate(host numa)")
        ok(lib.cuMemExportToShareableHandle(C.byref(fd), h, 1, C.c_uint64(0)), "export")
        return map_handle(h, size), fd.value

    def import_fd(fd: int, size: int) -> int:
        h = C.c_uint64()
        ok(lib.cuMemImportFromShareableHandle(C.byref(h), C.c_void_p(fd), 1), "import")
        return map_handle(h, size)

    return create, import_fd


def run_vmm_sidecar(a: argparse.Namespace) -> dict[str, Any]:
    """Plays the sidecar: a pinned host VMM allocation holding the segment, exported as an fd."""
    import ctypes
    import mmap

    size = a.size
    create, _ = _cu()
    t = time.perf_counter()
    ptr, fd = create(size)
    alloc_s = time.perf_counter() - t
    src = mmap.mmap(a.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    t = time.perf_counter()
    ctypes.memmove(ptr, address_of_buf(src), size)
    fill_s = time.perf_counter() - t
    args = ["vmm-client", "vmm", "--target", "cuda", "--size", str(size), "--fd", str(fd), "--sums", a.sums]
    r = child(args, (fd,))
    r.update(sidecar_alloc_s=alloc_s, sidecar_fill_s=fill_s)
    return r


def address_of_buf(buf: Any) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def run_vmm_client(a: argparse.Namespace) -> dict[str, Any]:
    """Fresh client: import the fd, map it, copy from it (already pinned: no registration)."""
    from sllmfs.engine.copy_engine import CopyEngine, Segment

    size = a.size
    torch, dst = _gpu_setup(size)
    rows = layout(size)
    rows[:, 2] += np.uint64(dst.data_ptr())
    _poison(torch, dst)
    _, import_fd = _cu()
    res: dict[str, Any] = {"case": "vmm host-numa fd", "bytes": size}
    t0 = time.perf_counter()
    ptr = import_fd(a.fd, size)
    t1 = time.perf_counter()
    with CopyEngine(target="cuda", mode="register", register_threads=4) as eng:
        st = eng.copy([Segment(ptr, size)], rows)
        t2 = time.perf_counter()
        res.update(e2e_gbps=size / (t2 - t0) / 1e9, import_map_s=t1 - t0, stats=st, correct=_check(torch, dst, a.sums))
        _poison(torch, dst)
        t3 = time.perf_counter()
        st2 = eng.copy([Segment(ptr, size)], rows)
        res.update(warm_gbps=size / (time.perf_counter() - t3) / 1e9, warm_stats=st2)
        res["warm_correct"] = _check(torch, dst, a.sums)
    return res


# ---------------------------------------------------------------- parent side


def cases(quick: bool, huge: bool, thp: bool = False) -> list[dict[str, Any]]:
    """Run 3 (see NOTES): lazy ring on 4 KiB pages, registration threads on huge pages, auto on both."""
    reg = dict(mode="register", threads=1)
    auto = dict(mode="auto", threads=0, reg_threads=0)
    c: list[dict[str, Any]] = [dict(name="4k auto", pages="4k", **auto)]
    if not quick:
        c += [
            dict(name="4k auto (again)", pages="4k", **auto),
            dict(name="4k stage t12 slot4M", pages="4k", mode="stage", threads=12, slot_mib=4),
            dict(name="4k stage t12 slot8M", pages="4k", mode="stage", threads=12, slot_mib=8),
            dict(name="4k stage t12 slot4M streams12", pages="4k", mode="stage", threads=12, slot_mib=4, streams=12),
            dict(name="4k stage t14 slot4M", pages="4k", mode="stage", threads=14, slot_mib=4),
        ]
    if huge:
        c += [dict(name="2m auto", pages="2m", **auto)]
        if not quick:
            c += [
                dict(name="2m auto (again)", pages="2m", **auto),
                dict(name="2m register-pipelined r12", pages="2m", reg_threads=12, **reg),
                dict(name="2m register-pipelined r16", pages="2m", reg_threads=16, **reg),
                dict(name="2m stage t12 slot4M", pages="2m", mode="stage", threads=12, slot_mib=4),
            ]
    if thp:  # could the memory tier be shmem files (passthrough-able) and keep the hit and fill rates?
        c += [dict(name="thp register r1", pages="thp", **reg),
              dict(name="thp register-pipelined r8", pages="thp", reg_threads=8, **reg)]
        if not quick:
            c += [dict(name="thp auto", pages="thp", **auto),
                  dict(name="thp register-pipelined r12", pages="thp", reg_threads=12, **reg)]
    return c


def child(args: list[str], fds: tuple[int, ...] = ()) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *args]
    p = subprocess.run(cmd, pass_fds=fds, capture_output=True, text=True, timeout=150)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return {"case": " ".join(args[:2]), "error": (p.stderr or p.stdout)[-2000:]}


def run_all(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    size = int(a.gib * GiB) // SUM_CHUNK * SUM_CHUNK
    rows = layout(size)
    results: list[dict[str, Any]] = []
    common = ["--target", a.target, "--size", str(size)]
    t = time.perf_counter()
    if a.target == "cuda":
        results.append(child(["check", "check", *common]))
        results.append(child(["peak", "peak", *common]))
    else:
        results.append(child(["check", "check", *common]))
    print(json.dumps(results, default=str)[:3000], flush=True)
    huge_note = reserve_hugepages(size) if not a.no_huge else "skipped"
    fds = {"4k": make_memfd(size, False)}
    import mmap

    mm = mmap.mmap(fds["4k"], size)
    fill_segment(memoryview(mm), size, rows)
    sums_path = str(out / "sums.npy")
    np.save(sums_path, chunk_sums(np.frombuffer(mm, np.uint8)))
    if not huge_note:
        try:
            fds["2m"] = make_memfd(size, True)
            hm = mmap.mmap(fds["2m"], size)
            hm[:] = mm[:]
            hm.close()
        except OSError as e:
            huge_note = f"hugetlb memfd failed: {e}"
            fds.pop("2m", None)
    thp_fd, thp_note = make_thp_memfd(size, mm)
    if thp_fd is not None:
        fds["thp"] = thp_fd
    mm.close()
    print(f"setup {time.perf_counter() - t:.1f}s huge={huge_note or 'ok'} thp={thp_note}", flush=True)
    for c in cases(a.quick, "2m" in fds, "thp" in fds):
        fd = fds[c["pages"]]
        chunk = size if c.get("chunk_mib") == -1 else c.get("chunk_mib", 64)
        chunk_mib = chunk // MiB if c.get("chunk_mib") == -1 else chunk
        args = ["case", c["name"], *common, "--fd", str(fd), "--sums", sums_path, "--pages", c["pages"]]
        args += [
            "--mode",
            c["mode"],
            "--threads",
            str(c.get("threads", 8)),
            "--reg-threads",
            str(c.get("reg_threads", 1)),
        ]
        args += ["--chunk-mib", str(chunk_mib), "--slot-mib", str(c.get("slot_mib", 2))]
        args += ["--prefault"] if c.get("pf") else []
        args += ["--streams", str(c.get("streams", 4))]
        r = child(args, (fd,))
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("stats", "warm_stats")}, default=str), flush=True)
    if a.vmm and a.target == "cuda":
        args = ["vmm-sidecar", "vmm", *common, "--fd", str(fds["4k"]), "--sums", sums_path]
        results.append(child(args, (fds["4k"],)))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("stats", "warm_stats")}, default=str))
    if a.disk:
        disk_gib = min(a.gib, 2.0)
        results.append(
            child(
                [
                    "disk",
                    "cold-disk",
                    "--target",
                    a.target,
                    "--size",
                    str(int(disk_gib * GiB)),
                    "--disk-dir",
                    a.disk_dir,
                ]
            )
        )
    meta = {
        "huge_pages": huge_note or "ok",
        "shmem_thp": thp_note,
        "size": size,
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    table(results)


def table(results: list[dict[str, Any]]) -> None:
    peak = next((r.get("peak_gbps") for r in results if r.get("case") == "pinned-peak"), None)
    print("\n| case | e2e GB/s | x peak | warm GB/s | reg s | ring s | staged/registered GiB | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | ERROR {r['error'][-300:]!r} |")
        elif r.get("case") == "pinned-peak":
            print(
                f"| pinned peak (torch, 4 streams) | {r['peak_gbps']:.1f} (median {r['median_gbps']:.1f}) | 1.00 | "
                f"engine on pinned {max(r['engine_on_pinned_gbps']):.1f} | | | | |"
            )
        elif r.get("case") == "check":
            print(f"| correctness | {json.dumps(r, default=str)[:600]} |")
        elif r.get("case") == "cold-disk":
            print(
                f"| cold disk {r['bytes'] / GiB:.1f} GiB | disk only {r['disk_only_gbps']:.2f}, with copy "
                f"{r['with_copy_gbps']:.2f} | ratio {r['ratio']:.2f} | | | | | {r['correct']} |"
            )
        else:
            s = r["stats"]
            ratio = f"{r['e2e_gbps'] / peak:.2f}" if peak else "-"
            print(
                f"| {r['case']} | {r['e2e_gbps']:.1f} | {ratio} | {r['warm_gbps']:.1f} | {s['register_seconds']:.3f} | "
                f"{s['ring_alloc_seconds']:.3f} | {s['staged_bytes'] / GiB:.2f}/{s['registered_bytes'] / GiB:.2f} | "
                f"{r['correct'] and r['warm_correct']} |"
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["all", "case", "peak", "check", "disk", "vmm-sidecar", "vmm-client"])
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--target", default="cuda")
    p.add_argument("--gib", type=float, default=8.0)
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--fd", type=int, default=-1)
    p.add_argument("--sums", default="")
    p.add_argument("--pages", default="4k")
    p.add_argument("--mode", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reg-threads", type=int, default=1)
    p.add_argument("--chunk-mib", type=int, default=64)
    p.add_argument("--slot-mib", type=int, default=2)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-huge", action="store_true")
    p.add_argument("--disk", action="store_true")
    p.add_argument("--vmm", action="store_true")
    p.add_argument("--prefault", action="store_true")
    p.add_argument("--disk-dir", default="/var/tmp/sllm-bench")
    a = p.parse_args()
    if a.cmd == "all":
        run_all(a)
        return
    fn = {
        "case": run_case,
        "peak": run_peak,
        "check": run_check,
        "disk": run_disk,
        "vmm-sidecar": run_vmm_sidecar,
        "vmm-client": run_vmm_client,
    }[a.cmd]
    print("RESULT " + json.dumps(fn(a), default=str), flush=True)


if __name__ == "__main__":
    main()
