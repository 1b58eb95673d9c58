"""Reads through the FUSE view as ratios to the same bytes read from tmpfs, in one run.

    python bench/bench_fuse.py [--size-gb 1] [--work /var/tmp/sllmfs-bench] [--repeat 2] [--device cpu|cuda:0]
        [--servers pyfuse3,kernel,passthrough,zero-copy] [--cold-servers pyfuse3,passthrough]
        [--peers instanttensor,fastsafetensors] [--peer-servers pyfuse3,passthrough,zero-copy] [--tag T]

Builds a stored model of random bf16 tensors (64 x 16 MiB = 1 GiB by default) and copies its
synthesized model.safetensors to /dev/shm (the tmpfs reference: the same bytes). Then, for each way
of serving the mount, on a FRESH mount (empty FUSE page cache, no backing yet) whose server has the
variant resident in a SIMULATED memory tier (each partition copied into a memfd mapping, passed as
resident_view, as the sidecar does), it reads the file once with each reader:

  readers: cat > /dev/null; Python 16 MiB readinto; safetensors.torch.load_file(device=--device)
           (on the CPU load_file maps the file: each page is touched, a page-fault figure)
  servers: pyfuse3           today's path: every read through the Python daemon
           kernel            our /dev/fuse driver, passthrough off (same Ops; isolates the driver)
           passthrough       our driver, resident files opened in FUSE passthrough on a memfd
                             backing (built at the first open: its copy is inside the timer)
           zero-copy         passthrough on the memory tier's own memory: a SIMULATED tier that
                             holds the variant laid out as its safetensors file (built at server
                             start, as a fill would), handed over as resident_file: no copy, no
                             second copy held (what a memtier change would give; not wired yet)
  cold:    the store's data file read directly, page cache dropped (the disk's sequential read), and
           the mount's first read of a variant not resident, page cache dropped

Every ratio is mount / tmpfs (or / disk for cold) of the same reader, paired in time, the median over
--repeat pairs; "next open" is a second read on the same mount (FUSE page cache, or the lingering
backing). --peers runs bench/peers.py's children (a fresh process per load, its tensors checksummed
against the file) on the tmpfs file and through a fresh mount of each --peer-servers. Prints GB/s
(1e9 B/s) and writes bench/results/fuse-<host>[-<tag>].json with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 16 << 20
TENSOR = 16 << 20
HERE = Path(__file__).resolve().parent
# server -> (driver, passthrough, the simulated tier also holds each file as a sealed memfd)
SERVERS = {"pyfuse3": ("pyfuse3", False, False), "kernel": ("kernel", False, False),
           "passthrough": ("kernel", True, False), "zero-copy": ("kernel", True, True)}


def build(work: Path, size_gb: float) -> tuple[Path, str]:
    import torch
    from safetensors.torch import save_file

    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store

    store_root = work / "store"
    name = "bench/random"
    store = Store(store_root)
    count = max(1, int(size_gb * (1 << 30)) // TENSOR)
    if store.has(name) and store.get(name).manifest("hf").total_bytes >= count * TENSOR:
        return store_root, name
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randint(0, 65535, (TENSOR // 2,), dtype=torch.int32, generator=g)
               .to(torch.uint16).view(torch.bfloat16).reshape(2048, -1) for i in range(count)}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    del tensors
    (src / "config.json").write_text('{"model_type": "llama"}\n')
    save_model(store, name, src, force=True)
    shutil.rmtree(src)
    return store_root, name


# -- the server, in its own process (as the daemon runs it) ---------------------


def serve_main(store_root: str, mnt: str, name: str, resident: bool, server: str) -> None:
    import trio

    from sllmfs.fuse.main import serve
    from sllmfs.fuse.tierfile import TierFile
    from sllmfs.store.store import Store

    store = Store(store_root, create=False, cleanup=False)
    segments: list[memoryview] | None = None
    if resident:  # SIMULATED memory tier: one memfd mapping per partition, same byte layout
        info = store.get(name)
        segments = []
        for p in info.manifest("hf").partitions:
            fd = os.memfd_create("sllmfs-bench")
            os.ftruncate(fd, p.size)
            m = mmap.mmap(fd, p.size)
            with open(info.variant_dir("hf") / p.file, "rb", buffering=0) as f:
                f.readinto(m)  # type: ignore[attr-defined]
            segments.append(memoryview(m))

    def resident_view(model: str, variant: str, identity: object) -> list[memoryview] | None:
        return segments if (model, variant) == (name, "hf") else None

    driver, passthrough, zero_copy = SERVERS[server]
    files: dict[str, int] = {}
    if resident and zero_copy:  # the tier laid out as safetensors files (a fill would write it so)
        from sllmfs.fuse.backing import build
        from sllmfs.fuse.synth import layout

        assert segments is not None
        for synth in layout(store.get(name).manifest("hf")).files:
            files[synth.name] = build(synth, segments)

    def resident_file(model: str, variant: str, identity: object, file: str) -> TierFile | None:
        fd = files.get(file) if (model, variant) == (name, "hf") else None
        return TierFile(os.dup(fd), os.fstat(fd).st_size, lambda: None) if fd is not None else None

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: serve(
                    Path(mnt), store, resident_view if resident else None, "", driver=driver,
                    passthrough=passthrough, resident_file=resident_file if zero_copy else None,
                    task_status=task_status))
                print("serving", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    trio.run(main)


class Server:
    def __init__(self, store_root: Path, mnt: Path, name: str, resident: bool, server: str):
        self.mnt = mnt
        args = [sys.executable, __file__, "--serve", str(store_root), str(mnt), name, "--server", server]
        if resident:
            args.append("--resident")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "serving":
            self.proc.kill()
            raise SystemExit(f"bench: the {server} server did not start: {line!r}")

    def cpu(self) -> float:
        """User + system CPU seconds the server has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


# -- readers ----------------------------------------------------------------------


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def py_read(path: Path) -> tuple[int, float]:
    buf = bytearray(CHUNK)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total, time.perf_counter() - t0


def cat_read(path: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return path.stat().st_size, time.perf_counter() - t0


def load_file_read(path: Path, device: str) -> tuple[int, float]:
    import torch
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    tensors = load_file(str(path), device=device)
    if device != "cpu":
        torch.cuda.synchronize()
    else:  # on the CPU load_file maps the file: fault in every page, or nothing is read
        for t in tensors.values():
            t.reshape(-1).view(torch.uint8)[::4096].sum()
    secs = time.perf_counter() - t0
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    return n, secs


def fresh_pages(nbytes: int) -> tuple[int, float]:
    """The platform's cost of new tmpfs pages (a passthrough backing is such pages)."""
    path = Path("/dev/shm") / f"sllmfs-bench-{os.getpid()}"
    buf = os.urandom(CHUNK)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(max(1, nbytes // CHUNK)):
            f.write(buf)
    secs = time.perf_counter() - t0
    path.unlink()
    return max(1, nbytes // CHUNK) * CHUNK, secs


def peer_load(peer: str, path: Path, device: str, placement: str, ref: Path) -> dict[str, object]:
    """One load by a peer in a fresh process (peers.py's child), its tensors checksummed against ``ref``."""
    cmd = [sys.executable, str(HERE / "peers.py"), "--child", peer, str(path), "--device", device,
           "--placement", placement, "--ref", str(ref)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    return {"error": (proc.stdout + proc.stderr).splitlines()[-5:]}


def kernel_fuse_config() -> str:
    """The kernel's FUSE options (passthrough, io_uring), where it tells."""
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            return " ".join(line.strip() for line in f if line.startswith("CONFIG_FUSE"))
    except OSError as e:
        return f"no /proc/config.gz ({e.strerror})"


def gbps(nbytes: int, secs: float) -> float:
    return round(nbytes / secs / 1e9, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/sllmfs-bench"))
    ap.add_argument("--repeat", type=int, default=2, help="runs per figure; the best is kept")
    ap.add_argument("--device", default="cpu", help="where safetensors load_file puts the tensors")
    ap.add_argument("--servers", default="pyfuse3,kernel,passthrough,zero-copy")
    ap.add_argument("--cold-servers", default="pyfuse3,passthrough", help="servers read cold (page cache dropped)")
    ap.add_argument("--peers", default="", help="comma-separated peers.py loaders to run (e.g. instanttensor)")
    ap.add_argument("--peer-servers", default="pyfuse3,passthrough,zero-copy", help="servers the peers read through")
    ap.add_argument("--tag", default="", help="results go to bench/results/fuse-<host>[-<tag>].json")
    ap.add_argument("--serve", nargs=3, metavar=("STORE", "MOUNT", "NAME"), help=argparse.SUPPRESS)
    ap.add_argument("--server", default="pyfuse3", help=argparse.SUPPRESS)
    ap.add_argument("--resident", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        store_arg, mnt_arg, name_arg = args.serve
        serve_main(store_arg, mnt_arg, name_arg, resident=args.resident, server=args.server)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    store_root, name = build(args.work, args.size_gb)
    from sllmfs.fuse import mount as fuse_mount
    from sllmfs.store.store import Store

    info = Store(store_root, create=False).get(name)
    data = info.variant_dir("hf") / info.manifest("hf").partitions[0].file
    mnt = args.work / "mnt"
    if fuse_mount.mount_entry(mnt) is not None:  # left by a killed run
        fuse_mount.lazy_unmount(mnt)
    fuse_file = mnt / name / "model.safetensors"
    shm = Path("/dev/shm/sllmfs-bench")
    shm.mkdir(exist_ok=True)
    tmpfs_file = shm / "model.safetensors"
    server = Server(store_root, mnt, name, False, "kernel")
    try:
        shutil.copyfile(fuse_file, tmpfs_file)  # the same bytes, as a plain tmpfs file
    finally:
        server.stop()
    size = tmpfs_file.stat().st_size
    readers = {"cat": cat_read, "python 16 MiB": py_read,
               f"load_file {args.device}": lambda p: load_file_read(p, args.device)}
    if args.device != "cpu":
        import torch

        torch.empty(1, device=args.device)  # the CUDA context exists before any timer
        load_file_read(tmpfs_file, args.device)  # and the caching allocator holds the blocks a load needs
    fuse_config = kernel_fuse_config()
    print(f"kernel {platform.release()}: {fuse_config}", flush=True)
    load_at_start = os.getloadavg()
    can_drop = drop_caches()
    results: dict[str, float] = {}
    peers: dict[str, object] = {}

    def record(key: str, runs: list[float]) -> None:
        results[key] = max(runs)
        print(f"{key:58s} {results[key]:7.2f} GB/s   runs {runs}", flush=True)

    record("platform: write fresh tmpfs pages", [gbps(*fresh_pages(size)) for _ in range(args.repeat)])
    print(f"file {fuse_file}: {size / 1e9:.2f} GB; drop_caches {'works' if can_drop else 'NOT allowed'}", flush=True)

    # Each mount figure is paired with the same reader on the tmpfs file right after it: on a busy
    # machine the ratio of neighbouring runs is steadier than either figure. The ratio kept is the
    # median over the pairs.
    def paired(key: str, mount_run, tmpfs_run, limit: str) -> None:  # type: ignore[no-untyped-def]
        from limits import measured  # bench/ is this script's folder: on sys.path

        pairs = [(mount_run(), measured(f"{limit} for {key}", tmpfs_run())) for _ in range(args.repeat)]
        record(key, [m for m, _ in pairs])
        results[f"{key}: {limit} in the same pairs"] = max(t for _, t in pairs)
        ratio = round(statistics.median(m / t for m, t in pairs), 2)
        results[f"ratio: {key} / {limit}"] = ratio
        print(f"{'  ratio to ' + limit + ' (median of pairs)':58s} {ratio:7.2f}   pairs "
              f"{[(m, t) for m, t in pairs]}", flush=True)

    for server_name in filter(None, args.servers.split(",")):
        for reader, fn in readers.items():
            cpu: list[float] = []
            again: list[float] = []

            def mount_run(server_name: str = server_name, fn=fn, cpu: list[float] = cpu,  # type: ignore[no-untyped-def]
                          again: list[float] = again) -> float:
                py_read(data)  # store pages warm: the figure is the mount's, not the disk's
                srv = Server(store_root, mnt, name, True, server_name)  # fresh mount: FUSE page cache empty
                try:
                    c0 = srv.cpu()
                    n, secs = fn(fuse_file)
                    cpu.append(round((srv.cpu() - c0) / (n / 1e9), 3))
                    again.append(gbps(*fn(fuse_file)))  # the next open: FUSE page cache / backing kept
                    return gbps(n, secs)
                finally:
                    srv.stop()

            key = f"mount {server_name}, memory tier, first open, {reader}"
            paired(key, mount_run, lambda fn=fn: gbps(*fn(tmpfs_file)), "tmpfs")
            results[f"{key}: server CPU s per GB"] = min(cpu)
            results[f"mount {server_name}, memory tier, next open, {reader}"] = max(again)
            tmpfs_best = results[f"{key}: tmpfs in the same pairs"]
            results[f"ratio: mount {server_name}, memory tier, next open, {reader} / tmpfs"] = round(
                max(again) / tmpfs_best, 2)
            print(f"{'  next open (best) / best tmpfs of the pairs':58s} {max(again) / tmpfs_best:7.2f}   "
                  f"server CPU s/GB (first open) {min(cpu)}", flush=True)
    for server_name in filter(None, args.cold_servers.split(",") if can_drop else []):

        def cold_mount(server_name: str = server_name) -> float:
            drop_caches()
            srv = Server(store_root, mnt, name, False, server_name)
            try:
                drop_caches()
                return gbps(*py_read(fuse_file))
            finally:
                srv.stop()

        def cold_disk() -> float:
            drop_caches()
            return gbps(*py_read(data))

        paired(f"mount {server_name}, store cold (python 16 MiB)", cold_mount, cold_disk, "disk")

    wanted_peers = list(filter(None, args.peers.split(",")))
    ref = args.work / "reference.json"
    if wanted_peers:
        from peers import reference  # bench/ is this script's folder: on sys.path

        ref.write_text(json.dumps(reference(tmpfs_file)))
    for peer in wanted_peers:
        for server_name in filter(None, args.peer_servers.split(",")):  # a fresh mount per load
            got_tmpfs = peer_load(peer, tmpfs_file, args.device, "tmpfs", ref)
            py_read(data)
            srv = Server(store_root, mnt, name, True, server_name)
            try:
                got_mount = peer_load(peer, fuse_file, args.device, "tmpfs", ref)
            finally:
                srv.stop()
            peers[f"{peer} / {server_name}"] = {"tmpfs": got_tmpfs, "mount, memory tier, first open": got_mount}
            key = f"peer {peer}, mount {server_name}, memory tier, first open"
            if "gbps" in got_tmpfs and "gbps" in got_mount:
                t, m = float(got_tmpfs["gbps"]), float(got_mount["gbps"])  # type: ignore[arg-type]
                results[key], results[f"{key}: tmpfs in the same pair"] = round(m, 3), round(t, 3)
                results[f"ratio: {key} / tmpfs"] = round(m / t, 2)
                print(f"{key:58s} {m:7.2f} GB/s   tmpfs {t:.2f}, ratio {m / t:.2f}, checksums "
                      f"{got_mount.get('ok')}/{got_tmpfs.get('ok')}", flush=True)
            else:
                print(f"{key}: {got_tmpfs.get('skipped') or got_tmpfs.get('error')} / "
                      f"{got_mount.get('skipped') or got_mount.get('error')}", flush=True)
    tmpfs_file.unlink()
    from sllmfs.core.pages import shmem_thp_modes

    defrag = Path("/sys/kernel/mm/transparent_hugepage/defrag")
    out = HERE / "results" / f"fuse-{platform.node()}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", "bench/bench_fuse.py", *sys.argv[1:]]),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "file_bytes": size, "device": args.device, "kernel_fuse_config": fuse_config,
        "shmem_thp": shmem_thp_modes(), "thp_defrag": defrag.read_text().strip() if defrag.exists() else "unknown",
        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
        "drop_caches": can_drop, "repeat": args.repeat, "unit": "GB/s (1e9 B/s), best of repeat",
        "results": results, "peers": peers,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
