"""Issue 20: why O_DIRECT and io_uring readers are slow through the passthrough mount, as ratios to tmpfs.

    python -m bench.bench_mount_direct [--size-gb 2] [--repeat 3] [--depth 128] [--threads 16]
        [--peers instanttensor,fastsafetensors --device cuda:0] [--work /var/tmp/sllmfs-direct] [--tag T]

Builds bench_fuse's stored model (random bf16, --size-gb), serves it with bench_fuse's server ("passthrough":
our driver, the variant resident in a simulated memory tier, the file opened in FUSE passthrough on a
backing memfd built at the first open) and copies the file to /dev/shm (the same bytes on tmpfs). The
backing is built and held open before any timer (its copy at first open is bench_fuse's figure, not this
one's): every mount figure here is the kernel reading a resident file, no request reaching the daemon.

Each pattern is one peer's reads, run on three targets in turn, --repeat times (ratios: median over the
rounds): the mount; the backing memfd itself, opened through /proc/<server>/fd (the same pages, no
FUSE: mount/backing is what FUSE costs, backing/tmpfs is where the pages lie); the tmpfs copy.

  io_uring          InstantTensor's URING backend: O_DIRECT READs of 8 MiB chunks, --depth in flight,
                    one submitting thread (tests/support/uring.py: raw syscalls)
  io_uring, async   the same with IOSQE_ASYNC on each read (every read to an io-wq worker)
  pread O_DIRECT    fastsafetensors' nogds reader on the mount: --threads threads, 16 MiB preads, O_DIRECT
  pread buffered    the same without O_DIRECT (what fastsafetensors does on tmpfs)
  mmap              InstantTensor's MMAP backend (its choice on tmpfs): --threads threads copy 8 MiB
                    pieces out of a shared mapping
  read 16 MiB       one thread (cat): the one-core copy rate

For io_uring it also prints where the reads ran: the share of the reading CPU spent by the submitting
thread (~1: inline, one read at a time; ~0: io-wq workers, in parallel). --peers runs bench/peers.py's
children (fresh process per load, tensors checksummed) on tmpfs and through the mount, with each peer's
default and with the setting that picks its in-memory path (INSTANTTENSOR_BACKEND=MMAP,
FASTSAFETENSORS_ODIRECT=0). Writes bench/results/mount-direct-<host>[-<tag>].json with its command.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from bench.bench_fuse import Server, build, kernel_fuse_config, py_read  # py_read: 16 MiB reads, one thread
from tests.support import uring

HERE = Path(__file__).resolve().parent
PREAD_CHUNK, MMAP_CHUNK, URING_CHUNK = 16 << 20, 8 << 20, 8 << 20


def _timed(work: Callable[[int], None], threads: int) -> float:
    """Seconds for ``threads`` threads, ``work(i)`` each, to all finish."""
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - t0


def pread_threads(path: Path, threads: int, direct: bool) -> tuple[int, float]:
    """``threads`` threads, each its own page-aligned 16 MiB buffer, reading the chunks i, i + threads, ..."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    bufs = [mmap.mmap(-1, PREAD_CHUNK, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
            for _ in range(threads)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for at in range(i * PREAD_CHUNK, size, threads * PREAD_CHUNK):
                want = min(PREAD_CHUNK, size - at)
                n = os.preadv(fd, [bufs[i]], at)  # O_DIRECT: whole 16 MiB asked, the tail comes short
                if n < want:
                    raise OSError(0, f"short read at {at}: {n} of {want}")
        except BaseException as e:  # reported by the caller: a failed pattern fails the run
            errors.append(e)

    try:
        secs = _timed(work, threads)
    finally:
        os.close(fd)
        for b in bufs:
            b.close()
    if errors:
        raise errors[0]
    return size, secs


def mmap_threads(path: Path, threads: int) -> tuple[int, float]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    src = np.frombuffer(m, dtype=np.uint8)
    bufs = [np.empty(MMAP_CHUNK, dtype=np.uint8) for _ in range(threads)]
    for b in bufs:
        b.fill(0)  # the destinations' pages exist before the timer (a loader's pinned buffer does)

    def work(i: int, src: np.ndarray) -> None:
        for at in range(i * MMAP_CHUNK, size, threads * MMAP_CHUNK):
            piece = src[at:at + MMAP_CHUNK]
            np.copyto(bufs[i][:len(piece)], piece)  # numpy copies without the GIL

    secs = _timed(partial(work, src=src), threads)  # the partial goes with the call: no view left after
    del src  # no view of the map left: it can close
    m.close()
    return size, secs


def backing_path(server_pid: int, name: str) -> Path:
    """The server's backing memfd of ``name``, opened through /proc: the same pages, no FUSE in the way
    (a mount figure below this one is FUSE's; a backing figure below tmpfs is where the pages lie)."""
    fds = Path(f"/proc/{server_pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).startswith(f"/memfd:sllmfs:{name} "):
                return fd
        except OSError:
            continue
    raise SystemExit(f"bench: no backing memfd for {name} in the server (pid {server_pid}): not in passthrough?")


def peer_load(peer: str, path: Path, device: str, ref: Path, env: dict[str, str]) -> dict[str, object]:
    """One load by a peer in a fresh process (peers.py's child), its tensors checksummed against ``ref``."""
    cmd = [sys.executable, str(HERE / "peers.py"), "--child", peer, str(path), "--device", device,
           "--placement", "tmpfs", "--ref", str(ref)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    return {"error": (proc.stdout + proc.stderr).splitlines()[-5:]}


def why_not(got: dict[str, object]) -> str:
    """A peer load without a figure: its skip reason, or the last line of its error."""
    err = got.get("error")
    return str(got.get("skipped") or (err[-1] if isinstance(err, list) and err else err))


# the setting that makes each peer read the mount as it reads tmpfs
PEER_SETTINGS = {"instanttensor": {"INSTANTTENSOR_BACKEND": "MMAP"},
                 "fastsafetensors": {"FASTSAFETENSORS_ODIRECT": "0"}}


def main() -> None:
    from bench.limits import measured

    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/sllmfs-direct"))
    ap.add_argument("--repeat", type=int, default=3, help="rounds per pattern (mount, backing, tmpfs in turn)")
    ap.add_argument("--depth", type=int, default=128, help="io_uring reads in flight (InstantTensor: up to 512)")
    ap.add_argument("--threads", type=int, default=16, help="pread and mmap threads (fastsafetensors: 16)")
    ap.add_argument("--peers", default="", help="comma-separated peers.py loaders (instanttensor, fastsafetensors)")
    ap.add_argument("--device", default="cuda:0", help="where the peers load to")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    store_root, name = build(args.work, args.size_gb)
    mnt = args.work / "mnt"
    shm = Path("/dev/shm/sllmfs-direct")
    shm.mkdir(exist_ok=True)
    tmpfs_file = shm / "model.safetensors"
    server = Server(store_root, mnt, name, True, "passthrough")
    results: dict[str, object] = {}
    try:
        fuse_file = mnt / name / "model.safetensors"
        held = os.open(fuse_file, os.O_RDONLY)  # builds the backing and keeps it (every later open shares it)
        shutil.copyfile(fuse_file, tmpfs_file)
        size = tmpfs_file.stat().st_size
        print(f"kernel {platform.release()}, {os.cpu_count()} CPUs; {kernel_fuse_config()}", flush=True)
        print(f"file {size / 1e9:.2f} GB, resident, backing held open; tmpfs copy {tmpfs_file}", flush=True)

        backing = backing_path(server.proc.pid, "model.safetensors")
        print(f"the backing itself, read without FUSE: {backing}", flush=True)
        targets = {"mount": fuse_file, "backing": backing, "tmpfs": tmpfs_file}

        def where(path: Path) -> str:
            return next(k for k, v in targets.items() if v == path)

        uring_share: dict[str, list[float]] = {}

        def uring_run(punt: bool) -> Callable[[Path], tuple[int, float]]:
            def run(path: Path) -> tuple[int, float]:
                r = uring.read_file(str(path), chunk=URING_CHUNK, depth=args.depth, direct=True, punt=punt)
                uring_share.setdefault(f"{'IOSQE_ASYNC' if punt else 'default'}, {where(path)}", []).append(
                    round(r.inline_share, 2))
                return r.nbytes, r.seconds
            return run

        patterns: dict[str, Callable[[Path], tuple[int, float]]] = {
            f"io_uring O_DIRECT 8 MiB x{args.depth}": uring_run(False),
            f"io_uring O_DIRECT 8 MiB x{args.depth}, IOSQE_ASYNC": uring_run(True),
            f"pread O_DIRECT 16 MiB x{args.threads} threads": lambda p: pread_threads(p, args.threads, True),
            f"pread buffered 16 MiB x{args.threads} threads": lambda p: pread_threads(p, args.threads, False),
            f"mmap copy 8 MiB x{args.threads} threads": lambda p: mmap_threads(p, args.threads),
            "read 16 MiB, one thread": py_read,
        }
        for key, fn in patterns.items():
            runs: dict[str, list[float]] = {t: [] for t in targets}
            for _ in range(args.repeat):  # mount, backing, tmpfs in turn: neighbours in time are compared
                for t, path in targets.items():
                    n, secs = fn(path)
                    runs[t].append(round(measured(f"{key} on {t}", n / secs / 1e9), 2))
            row: dict[str, object] = {f"{t} GB/s": v for t, v in runs.items()}
            for num, den in (("mount", "tmpfs"), ("mount", "backing"), ("backing", "tmpfs")):
                pairs = zip(runs[num], runs[den], strict=True)
                row[f"{num}/{den}"] = round(statistics.median(a / b for a, b in pairs), 2)
            results[key] = row
            print(f"{key:46s} " + "  ".join(f"{t} {max(v):6.2f}" for t, v in runs.items())
                  + f" GB/s  mount/tmpfs {row['mount/tmpfs']:4.2f}  mount/backing {row['mount/backing']:4.2f}"
                  f"  backing/tmpfs {row['backing/tmpfs']:4.2f}", flush=True)
        results["io_uring: share of the reading CPU in the submitting thread (1 inline, 0 io-wq)"] = uring_share
        for k, v in uring_share.items():
            print(f"  io_uring reads in the submitting thread, {k}: {v}", flush=True)
        # peers.py's fastsafetensors row compares its O_DIRECT reads of the mount with its buffered reads of tmpfs
        d = results[f"pread O_DIRECT 16 MiB x{args.threads} threads"]
        b = results[f"pread buffered 16 MiB x{args.threads} threads"]
        assert isinstance(d, dict) and isinstance(b, dict)
        results["pread: O_DIRECT on the mount / buffered on tmpfs (fastsafetensors' own choice)"] = round(
            statistics.median(m / t for m, t in zip(d["mount GB/s"], b["tmpfs GB/s"], strict=True)), 2)

        peers: dict[str, object] = {}
        wanted = list(filter(None, args.peers.split(",")))
        if wanted:
            from bench.peers import reference

            ref = args.work / "reference.json"
            ref.write_text(json.dumps(reference(tmpfs_file)))
        for peer in wanted:
            for setting, env in (("default", {}), ("in-memory setting", PEER_SETTINGS.get(peer, {}))):
                got_t = peer_load(peer, tmpfs_file, args.device, ref, env)
                got_m = peer_load(peer, fuse_file, args.device, ref, env)
                key = f"{peer} ({setting}: {env or 'none'})"
                peer_row: dict[str, object] = {"tmpfs": got_t, "mount": got_m}
                if "gbps" in got_t and "gbps" in got_m:
                    on_tmpfs, on_mount = float(str(got_t["gbps"])), float(str(got_m["gbps"]))
                    peer_row["ratio"] = round(on_mount / measured(f"tmpfs for {key}", on_tmpfs), 2)
                    settings = got_m.get("settings")
                    chosen = settings.get("chosen", "") if isinstance(settings, dict) else ""
                    print(f"{key:60s} mount {on_mount:6.2f}  tmpfs {on_tmpfs:6.2f} GB/s  ratio "
                          f"{on_mount / on_tmpfs:4.2f}  checked {got_m.get('ok')}/{got_t.get('ok')}  chosen {chosen}",
                          flush=True)
                else:
                    print(f"{key}: tmpfs {why_not(got_t)} / mount {why_not(got_m)}", flush=True)
                peers[key] = peer_row
        results["peers (backing held: no copy inside these timers)"] = peers
        os.close(held)
    finally:
        server.stop()
        tmpfs_file.unlink(missing_ok=True)

    from sllmfs.core.pages import shmem_thp_modes

    out = HERE / "results" / f"mount-direct-{platform.node()}{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({
        "command": " ".join(["python", "-m", "bench.bench_mount_direct", *sys.argv[1:]]),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "kernel_fuse_config": kernel_fuse_config(), "shmem_thp": shmem_thp_modes(), "file_bytes": size,
        "load_average_at_end": os.getloadavg(), "unit": "GB/s (1e9 B/s)", "results": results,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
