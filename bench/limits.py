"""What the benchmarks measure themselves against, and the sidecar they start.

Shared by the GPU benchmarks: the pinned host-to-device peak, the disk's parallel read
bandwidth, dropping the page cache, running a command, and starting/stopping `sllmfs start`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sh(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def stored_files(root: Path) -> list[Path]:
    """Every stored data file under ``root`` (a store, a model's directory, a variant's), whatever the
    layout: the files each variant's manifest names (data_N.bin, or a checkpoint's .safetensors)."""
    import json

    out = []
    for manifest in Path(root).rglob("manifest.json"):
        parts = json.loads(manifest.read_text()).get("partitions", [])
        out += [manifest.parent / p["file"] for p in parts]
    return sorted(out)


def measured(what: str, gbps: float) -> float:
    """A limit or a rate that failed to measure ends the run with one line: never a 0.00 GB/s limit."""
    import math

    if not math.isfinite(gbps) or gbps <= 0:
        raise SystemExit(f"bench: could not measure {what} (got {gbps!r}); not reporting ratios against it")
    return gbps


def cold_read_args(doc: str, workdir: str, layers: int, reps: int) -> argparse.ArgumentParser:
    """The options every cold-read bench of one stored model shares (its own added after)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(workdir))
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return ap

def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cold_rounds(readers: list[tuple[str, Callable[[], float]]], reps: int, width: int = 48) -> dict[str, list[float]]:
    """Each reader's GB/s in each of ``reps`` rounds, the page cache dropped before every read and the
    order rotating per round (drift between reads favours no reader)."""
    runs: dict[str, list[float]] = {name: [] for name, _ in readers}
    for rep in range(reps):
        turn = rep % len(readers)
        for name, fn in readers[turn:] + readers[:turn]:
            if not drop_caches():
                raise SystemExit("bench: cannot drop the page cache (need root): a cold read cannot be measured")
            runs[name].append(measured(name, fn()))
            print(f"#{rep + 1} {name:<{width}}{runs[name][-1]:>8.2f} GB/s", flush=True)
    return runs


def write_result(out_dir: Path, name: str, ratios: dict[str, float], record: dict[str, Any]) -> Path:
    """Prints ``ratios`` and writes ``record`` (with them, and the command that ran) as
    ``out_dir``/``name``-YYYYmmdd-HHMM.json."""
    width = max(map(len, ratios), default=0) + 2
    for k, v in ratios.items():
        print(f"{k:<{width}}{v:>6.2f}x", flush=True)
    record = {**record, "ratios": ratios, "command": "python bench/" + " ".join([Path(sys.argv[0]).name,
                                                                                *sys.argv[1:]])}
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M')}.json"
    dest.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {dest}", flush=True)
    return dest


def pinned_peak(gib: int = 4, reps: int = 5, *, d2h: bool = False) -> float:
    """Best-case H2D (``d2h``: the other way): a cudaHostAlloc buffer copied to the GPU, median of reps."""
    import torch

    n = gib << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
    src, dst = (gpu, host) if d2h else (host, gpu)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return measured(f"the pinned {'D2H' if d2h else 'H2D'} peak", n / sorted(times)[len(times) // 2] / 1e9)


# the buffered one last: callers expect the file in the page cache afterwards. 512 KiB is fastsafetensors'
# no-GDS block (16 MiB of bounce buffers over 16 threads x 2); 16 MiB the large-request shape
DISK_READS = (("O_DIRECT 512 KiB", 512 << 10, True), ("O_DIRECT 16 MiB", 16 << 20, True),
              ("buffered 64 MiB", 64 << 20, False))


def disk_read_bw(files: list[Path], threads: int = 16, shapes: dict[str, float] | None = None) -> float:
    """The disk's read bandwidth: the best of parallel O_DIRECT reads (512 KiB, fastsafetensors' block, and
    16 MiB) and a parallel buffered read of ``files``, the page cache dropped before each (NOTES-cold runs
    19-22: which one is best differs by disk). ``shapes`` gets each one's GB/s."""
    if not files:
        raise SystemExit("bench: no stored partition files to measure the disk with")
    got = {}
    for name, block, direct in DISK_READS:
        if not drop_caches():
            raise SystemExit("bench: cannot drop the page cache (need root): the disk limit cannot be measured")
        try:
            got[name] = read_files(files, threads, block, direct=direct)
        except OSError as e:  # a filesystem without O_DIRECT (tmpfs before 6.6): the buffered read stands
            print(f"bench: disk read {name} failed ({e}); not part of the limit", file=sys.stderr)
    if shapes is not None:
        shapes.update(got)
    return measured("the disk's read bandwidth", max(got.values(), default=0.0))


def read_files(files: list[Path], threads: int, block: int, *, direct: bool) -> float:
    """GB/s reading every byte of ``files`` with ``threads`` workers of ``block`` bytes each
    (``direct``: O_DIRECT, past the page cache)."""
    import mmap

    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, block)]
    lock = threading.Lock()
    total = [0]

    def worker() -> None:
        buf = mmap.mmap(-1, block)  # page-aligned: O_DIRECT needs it
        fds: dict[Path, int] = {}
        while True:
            with lock:
                if not jobs:
                    break
                f, off = jobs.pop(0)
            fd = fds.get(f)
            if fd is None:
                fd = fds[f] = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            n = os.preadv(fd, [buf], off)
            with lock:
                total[0] += n
        for fd in fds.values():
            os.close(fd)
        buf.close()

    seconds = timed_threads(worker, threads)  # first: `total[0] / timed_threads(...)` read 0 before the run
    want = sum(f.stat().st_size for f in files)
    if total[0] < want:
        raise SystemExit(f"bench: read {total[0]} of {want} bytes ({threads} threads, direct={direct})")
    return total[0] / seconds / 1e9


def timed_threads(worker: Callable[[], None], threads: int) -> float:
    """Seconds for ``threads`` threads running ``worker`` to all finish."""
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def start_sidecar(store: Path, sock: Path, log: Path, extra_args: list[str] | tuple[str, ...] = (),
                  timeout: float = 120.0, program: tuple[str, ...] = ("-m", "sllmfs"),
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`sllmfs start` in the background; returns once its socket (and its mount, with --mount) is up.
    ``program``: what python runs instead of `-m sllmfs` (a bench's variant of the daemon); ``env``: its
    environment (default: this process's)."""
    extra = list(extra_args)
    mount = Path(extra[extra.index("--mount") + 1]) if "--mount" in extra else None
    if mount is not None:
        mount.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(sock)
    with open(log, "w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, *program, "start", "--storage-path", str(store),
                                 "--socket", str(sock), *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    # the mount's marker file shows once the FUSE view answers, which is after the socket listens
    while not (sock.exists() and (mount is None or (mount / ".sllmfs.json").exists())):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"sidecar did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc


def _remove_stale_socket(sock: Path) -> None:
    """A socket file left by a killed sidecar would look ready at once: remove it, refuse a live one."""
    if not sock.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(sock))
    except OSError:
        sock.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SystemExit(f"a sidecar already serves {sock}; stop it first")


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM (the sidecar unmounts and removes its socket), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
