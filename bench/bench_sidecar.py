"""Sidecar benchmark: fill throughput vs raw parallel pread, acquire latency, sharing.

    python bench/bench_sidecar.py [--size-gb 1] [--threads 4] [--chunk 32MiB] [--repeat 3] [--work DIR]

1. Fill: a ~1 GB store model (random bytes in safetensors). Each round drops
   the page cache (when permitted), fills it through the sidecar (acquire ->
   every readiness byte set, which includes xxh3 verification), then drops the
   cache again and reads the same data_N.bin files with the same thread count
   and piece size into a fresh anonymous mapping (raw parallel pread). Ratio =
   fill GB/s / raw GB/s. Rounds alternate; medians are reported.
2. Acquire latency on a memory-tier hit for a 1,000-tensor model (acquire reply
   with fds mapped; and tensors() building 1,000 torch views), on one connection.
3. Sharing: 4 client processes acquire the 1 GB model and read every page;
   memory-tier growth, the summed proportional set size (PSS) of the segments
   over daemon + clients (robust to other processes), and the host's Shmem
   growth (not robust: anything else on the host moves it), against the model size.

Writes bench/results/sidecar-<host>.json (sidecar-<host>-hugetlb.json when vm.nr_hugepages > 0,
so the sidecar can back segments with 2 MiB pages: `echo 520 > /proc/sys/vm/nr_hugepages` for 1 GB).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from limits import stored_files, timed_threads

import sllmfs.client.client as sc
from sllmfs.core.config import parse_size
from sllmfs.store.save import save_model
from sllmfs.store.store import Store

HERE = Path(__file__).resolve().parent


def build(store: Store, src: Path, name: str, tensors: int, nbytes: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    src.mkdir(parents=True, exist_ok=True)
    arrays = {f"t.{i}": rng.integers(0, 255, size=nbytes, dtype=np.uint8) for i in range(tensors)}
    save_file(arrays, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    save_model(store, name, src, force=True)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_pread(files: list[Path], threads: int, chunk: int) -> float:
    """Seconds to read the files with `threads` preads of `chunk` bytes into fresh memory."""
    sizes = [f.stat().st_size for f in files]
    bufs = [mmap.mmap(-1, max(s, 1)) for s in sizes]
    fds = [os.open(f, os.O_RDONLY) for f in files]
    jobs = [(i, off, min(chunk, s - off)) for i, s in enumerate(sizes) for off in range(0, s, chunk)]
    lock = threading.Lock()
    it = iter(jobs)

    def worker() -> None:
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            i, off, n = job
            view = memoryview(bufs[i])[off:off + n]
            done = 0
            while done < n:
                done += os.preadv(fds[i], [view[done:]], off + done)
            view.release()

    seconds = timed_threads(worker, threads)
    for fd in fds:
        os.close(fd)
    for b in bufs:
        b.close()
    return seconds


def fill_once(sock: str, name: str) -> float:
    with sc.connect(sock) as c:
        c.evict(name)
        t0 = time.perf_counter()
        with c.acquire(name) as lease:
            lease.wait(timeout=600)
            seconds = time.perf_counter() - t0
        c.evict(name)
    return seconds


def pss_shared_kb(pid: int) -> int:
    """A process's proportional share of the shmem it maps (hugetlb counted whole)."""
    roll = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in roll if line.startswith("Pss_Shmem:"))


def shared_bytes() -> int:
    """Host memory in shmem plus hugetlb pages in use (hugetlb segments are not counted as Shmem)."""
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    huge_used = (info.get("HugePages_Total", 0) - info.get("HugePages_Free", 0)) * info.get("Hugepagesize", 0)
    return (info.get("Shmem", 0) + huge_used) * 1024


SHARER = r"""
import sys, numpy as np, sllmfs.client.client as sc
c = sc.connect(sys.argv[1]); lease = c.acquire(sys.argv[2]); lease.wait(timeout=600)
total = 0
for b in lease.buffers():
    total += int(np.frombuffer(b, dtype=np.uint8)[::4096].sum())  # touch every page
status = open("/proc/self/status").read()
anon = [int(l.split()[1]) for l in status.splitlines() if l.startswith("RssAnon:")][0]
shm = [int(l.split()[1]) for l in status.splitlines() if l.startswith("RssShmem:")][0]
print(anon, shm, flush=True)
sys.stdin.readline()  # measured once every client maps every page, so the shares below are final
roll = open("/proc/self/smaps_rollup").read().splitlines()
pss = sum(int(l.split()[1]) for l in roll if l.startswith("Pss_Shmem:"))  # hugetlb has no PSS: see host growth
print(pss, flush=True)
sys.stdin.read()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--chunk", default="32MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=None, help="Scratch directory (default: a temp dir on the store's disk).")
    args = ap.parse_args()
    chunk = parse_size(args.chunk)
    work = Path(args.work or tempfile.mkdtemp(prefix="sllmfs-bench-", dir="/var/tmp"))
    store = Store(work / "store")
    per = 16 << 20
    n_big = max(1, int(args.size_gb * 1e9) // per)
    print(f"building {n_big * per / 1e9:.2f} GB model and a 1,000-tensor model in {work}", file=sys.stderr)
    build(store, work / "src-big", "big", n_big, per)
    build(store, work / "src-many", "many", 1000, 16 << 10)
    sock = str(work / "run" / "s.sock")
    log = open(work / "sidecar.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(store.root),
                             "--socket", sock, "--num-thread", str(args.threads), "--chunk-size", args.chunk,
                             "--mem-pool-size", f"{int(args.size_gb * 3) + 1}GB"], stderr=log)
    meminfo = Path("/proc/meminfo").read_text()
    result: dict = {"command": "python bench/bench_sidecar.py " + " ".join(sys.argv[1:]),
                    "host": platform.node(), "cpus": os.cpu_count(), "threads": args.threads, "chunk": chunk,
                    "hugepages_total": int(meminfo.split("HugePages_Total:")[1].split()[0])}
    try:
        for _ in range(300):
            try:
                sc.connect(sock).close()
                break
            except sc.SidecarError:
                time.sleep(0.05)
        files = stored_files(store.model_path("big") / "variants" / "hf")
        size = sum(f.stat().st_size for f in files)
        result["model_bytes"] = size
        for mode in ("cold", "warm"):
            fills, raws = [], []
            cold = mode == "cold"
            if cold and not drop_caches():
                result["cold"] = "not permitted (cannot write /proc/sys/vm/drop_caches)"
                continue
            raw_pread(files, args.threads, chunk)  # warm the page cache for the warm rounds
            for _ in range(args.repeat):
                if cold:
                    drop_caches()
                fills.append(fill_once(sock, "big"))
                if cold:
                    drop_caches()
                raws.append(raw_pread(files, args.threads, chunk))
            fill_gbs = size / statistics.median(fills) / 1e9
            raw_gbs = size / statistics.median(raws) / 1e9
            result[mode] = {"fill_GBps": round(fill_gbs, 3), "raw_pread_GBps": round(raw_gbs, 3),
                            "ratio": round(fill_gbs / raw_gbs, 3), "ratio_best": round(min(raws) / min(fills), 3),
                            "fill_s": [round(x, 3) for x in fills], "raw_s": [round(x, 3) for x in raws]}
            print(f"{mode}: fill {fill_gbs:.2f} GB/s, raw pread {raw_gbs:.2f} GB/s, "
                  f"ratio {fill_gbs / raw_gbs:.2f}", file=sys.stderr)

        with sc.connect(sock) as c:
            sc.warm("many", socket=sock)
            lat, views = [], []
            for i in range(200):
                t0 = time.perf_counter()
                lease = c.acquire("many")
                t1 = time.perf_counter()
                if i % 10 == 0:
                    lease.tensors()
                    views.append(time.perf_counter() - t1)
                lease.release()
                lat.append(t1 - t0)
        lat.sort()
        result["acquire_1000_tensors_ms"] = {"median": round(statistics.median(lat) * 1e3, 3),
                                             "p99": round(lat[int(len(lat) * 0.99) - 1] * 1e3, 3),
                                             "tensors_views_median": round(statistics.median(views) * 1e3, 3)}
        print(f"acquire hit, 1,000 tensors: median {result['acquire_1000_tensors_ms']['median']} ms, "
              f"p99 {result['acquire_1000_tensors_ms']['p99']} ms; tensors() "
              f"{result['acquire_1000_tensors_ms']['tensors_views_median']} ms", file=sys.stderr)

        with sc.connect(sock) as c:
            c.evict("big")
            c.evict("many")
            before_tier, before_shm = c.status()["memory"]["used"], shared_bytes()
            procs = [subprocess.Popen([sys.executable, "-c", SHARER, sock, "big"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True) for _ in range(4)]
            rss = [p.stdout.readline().split() for p in procs if p.stdout]
            after_tier, after_shm = c.status()["memory"]["used"], shared_bytes()
            for p in procs:
                if p.stdin:
                    p.stdin.write("\n")
                    p.stdin.flush()
            pss_clients = [int(p.stdout.readline()) for p in procs if p.stdout]
            pss_daemon = pss_shared_kb(c.server_pid)
            huge = [v["huge_pages"] for m in c.status()["models"] for v in m["variants"]]
            for p in procs:
                p.kill()
                p.wait()
        tier_growth = after_tier - before_tier
        shm_growth = after_shm - before_shm
        result["sharing_4_clients"] = {
            "tier_growth_bytes": tier_growth, "tier_over_model": round(tier_growth / size, 3),
            "huge_pages": huge, "host_shmem_growth_bytes": shm_growth, "shmem_over_model": round(shm_growth / size, 3),
            "client_rss_anon_kb": [int(a) for a, _ in rss], "client_rss_shmem_kb": [int(s) for _, s in rss],
            # proportional shares of the segments, daemon + 4 clients: sums to 1x when there is one copy
            "pss_shared_kb": {"daemon": pss_daemon, "clients": pss_clients},
            # hugetlb pages have no proportional share in smaps; the host's hugetlb growth above counts them
            "pss_sum_over_model": None if any(huge) else round((pss_daemon + sum(pss_clients)) * 1024 / size, 3)}
        sharing = result["sharing_4_clients"]
        print(f"4 clients: memory tier grew {tier_growth / size:.3f}x the model; summed PSS of daemon+clients "
              f"{sharing['pss_sum_over_model']}x; host shmem+hugetlb {shm_growth / size:.3f}x (other processes too)",
              file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    tag = "-hugetlb" if result["hugepages_total"] else ""  # vm.nr_hugepages > 0: segments can be hugetlb
    out = HERE / "results" / f"sidecar-{socket.gethostname()}{tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
