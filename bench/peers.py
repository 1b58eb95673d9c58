r"""sllmfs next to its peers: one bf16 checkpoint into GPU memory by every common loader, in one run.

On the GPU machine, from the repo root (the peers' wheels travel in .whl/):

    source bench/gpu_setup.sh 16384 >/dev/null 2>&1; python3 -m pip install -q --no-index --no-deps \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH; \
        python3 bench/peers.py --part main --out $OUT          # then --part mount, scaling, sglang

Parts (each fits one 10-minute device call; --budget skips what would not finish in time):
  main     a Llama-2-7B-shaped bf16 checkpoint (random weights, 13.48 GB, 291 tensors) loaded by
           safetensors, transformers, fastsafetensors (no GDS), Run:ai Model Streamer and InstantTensor
           from tmpfs, from the warm page cache and cold (page cache dropped); sllmfs from its memory
           tier (hit) and cold (evicted + page cache dropped), by handles and through its FUSE view
           read with safetensors; the pinned H2D peak and the disk's read bandwidth of the same run.
  scaling  load time against checkpoint size (0.93, 4.17, 13.48 GB) and against tensor count
           (1 GB as 100 or as 10,000 1-D tensors), page cache warm / memory-tier hit.
  mount    the peers pointed at sllmfs's FUSE view (issue 20): safetensors, fastsafetensors, InstantTensor
           and a plain read of every file (`cat`: one reused buffer, no GPU) through the mount of a model
           resident in the memory tier (hit) and cold, each beside the same reader from tmpfs in the same
           run (ratio "/tmpfs") and, cold, the disk's read ("/disk"); the goals are 0.8x and 0.9x.
  sglang   SGLang's default loader ("Load weight end") from the warm page cache, tmpfs and cold.
  cold-pairs  sllmfs cold and fastsafetensors cold (the best peer from disk), alternated --reps times.
  all      main, mount, scaling and sglang in order (longer than one device call: give --budget 0).

Reading through the mount: the rows are named after the reader with "@mount" (sllmfs-fuse is safetensors
@mount, its name from before), placed "hit" or "cold" as the sidecar's own rows are; each starts from a view
the kernel holds nothing of (view_fresh / view_cold: no passthrough copy left, page cache dropped).

Every load runs in a FRESH process (`peers.py --child LOADER PATH ...`, printing `RESULT {json}`) that
imports torch and creates its CUDA context before the timer; the timer runs from the loader's call to
`torch.cuda.synchronize()` after the last tensor is on the GPU. Each loaded tensor is then checksummed
on the GPU (its bits summed as integers) against a reference computed once from the file with numpy.
A missing package is recorded as skipped and a crash with its error tail; the run goes on. The JSON
(rewritten after every load, so a killed run keeps what it had) goes to --out as
peers-<part>-<YYYYmmdd-HHMM>.json; bench/peers_report.py turns such files into the table and plot.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import mmap
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from limits import disk_read_bw, drop_caches, sh, start_sidecar, stop, stored_files  # noqa: E402

PEERS = ("safetensors", "transformers", "fastsafetensors", "runai", "instanttensor")
# a reader pointed at the FUSE view -> the same reader from tmpfs, its pair (sllmfs-fuse keeps its old name)
MOUNT_READERS = {"sllmfs-fuse": "safetensors", "fastsafetensors@mount": "fastsafetensors",
                 "instanttensor@mount": "instanttensor", "cat@mount": "cat"}
LOADERS = (*PEERS, "cat", "sglang", "sllmfs", *MOUNT_READERS)
MODULE = {"safetensors": "safetensors", "transformers": "transformers", "fastsafetensors": "fastsafetensors",
          "runai": "runai_model_streamer", "instanttensor": "instanttensor", "sglang": "sglang",
          "sllmfs": "sllmfs.client.client", "sllmfs-fuse": "pyfuse3", "cat": "os",
          "fastsafetensors@mount": "fastsafetensors", "instanttensor@mount": "instanttensor", "cat@mount": "os"}
CUDA_ONLY = {"instanttensor": "InstantTensor loads to CUDA devices only"}
# issue 20: through the mount of a resident model >= 0.8x the same reader from tmpfs; cold >= 0.9x the disk
GOAL_HIT_VS_TMPFS, GOAL_COLD_VS_DISK = 0.8, 0.9
CAT_BUFFER = 16 << 20  # the plain read's one reused buffer (bench_fuse.py's "Python 16 MiB reads")
COPIES_GONE_S = 30.0  # the mount drops an evicted model's passthrough copies within its 5 s expiry pass
DISTS = ("torch", "safetensors", "transformers", "accelerate", "fastsafetensors", "runai-model-streamer",
         "instanttensor", "sglang", "sllmfs", "numpy")
SIZE_LAYERS = (1, 9, 32)  # 0.93, 4.17 and 13.48 GB of Llama-2-7B shapes
COUNTS = (100, 10_000)  # the same bytes in this many 1-D tensors
SHM = Path("/dev/shm/sllmfs-peers")
SIDECAR_ARGS = ["--mem-pool-size", "48GB", "--num-thread", "16", "--chunk-size", "64MiB"]
INT_BITS = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}  # checksums sum the raw bits as signed ints


class Skip(Exception):
    """A loader that cannot run here (its package, or the device): recorded as skipped."""


# ---------------------------------------------------------------------------------------------
# safetensors files: header, writer, reference checksums (no torch in the parent)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, tensor entries) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def item_size(code: str) -> int:
    from sllmfs.core import dtypes

    return dtypes.by_code(code).itemsize


def file_complete(path: Path) -> bool:
    """A checkpoint left half-written by a killed run must be rebuilt, not measured."""
    try:
        start, header = read_header(path)
    except (OSError, ValueError, struct.error):
        return False
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    return path.stat().st_size == start + end


def reference(path: Path) -> dict[str, int]:
    """Per-tensor checksum: the tensor's bits as signed ints of its item size, summed (numpy, threads)."""
    import numpy as np

    start, header = read_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def one(item: tuple[str, dict[str, Any]]) -> tuple[str, int]:
        name, e = item
        a, b = e["data_offsets"]
        size = min(item_size(e["dtype"]), 8)
        arr = np.frombuffer(mm, dtype=INT_BITS[size], count=(b - a) // size, offset=start + a)
        return name, int(arr.sum(dtype=np.int64))

    with ThreadPoolExecutor(16) as pool:  # numpy sums release the GIL: the page cache is read in parallel
        out = dict(pool.map(one, header.items()))
    mm.close()
    return out


def write_flat(path: Path, count: int, numel: int) -> int:
    """A safetensors file of ``count`` 1-D bf16 tensors of ``numel`` random values each; returns data bytes."""
    import torch

    nb = numel * 2
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        header[f"t.{i:05d}"] = {"dtype": "BF16", "shape": [numel], "data_offsets": [i * nb, (i + 1) * nb]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = count * numel
        while left:  # the tensors lie back to back: write the data as one stream of 64M-value pieces
            n = min(left, 1 << 26)
            t = (torch.randn(n, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
            f.write(t.cpu().view(torch.uint8).numpy().tobytes())
            left -= n
    tmp.rename(path)
    return count * nb


# ---------------------------------------------------------------------------------------------
# the child: one load in a fresh process


def checksums(tensors: dict[str, Any]) -> dict[str, int]:
    """The reference checksum, computed where the tensors are (one transfer back for all of them)."""
    import torch

    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    names = list(tensors)
    if not names:
        return {}
    sums = [tensors[n].view(ints[min(tensors[n].element_size(), 8)]).sum(dtype=torch.int64) for n in names]
    return dict(zip(names, torch.stack(sums).tolist(), strict=True))


def verify(tensors: dict[str, Any], ref_path: str) -> dict[str, Any]:
    if not ref_path:
        return {"ok": None}
    ref = json.loads(Path(ref_path).read_text())
    got = checksums({n: tensors[n] for n in sorted(ref) if n in tensors})
    bad = [n for n, s in got.items() if s != ref[n]]
    missing = [n for n in ref if n not in tensors]
    return {"ok": not bad and not missing, "checked": len(got), "mismatches": len(bad), "first_bad": bad[:3],
            "missing": len(missing), "first_missing": missing[:3]}


LoadFn = Callable[[], dict[str, Any]]


def env_or(name: str, default: str) -> str:
    return os.environ.get(name, f"unset ({default})")


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def files_of(path: Path) -> list[Path]:
    """A file, or every safetensors file of a folder: the FUSE view is an ordinary HF folder, one file or
    shards + index when the store has several partitions (a 13.5 GB model shows three files)."""
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise Skip(f"no .safetensors file under {path}")
    return files


def prep_safetensors(path: Path, a: argparse.Namespace) -> tuple[LoadFn, dict[str, Any]]:
    from safetensors.torch import load_file

    files = files_of(path)

    def load() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in files:
            out.update(load_file(str(f), device=a.device))
        return out

    return load, {"call": f'for each file: safetensors.torch.load_file(f, device="{a.device}")',
                  "files": [f.name for f in files]}


def prep_transformers(path: Path, a: argparse.Namespace) -> tuple[LoadFn, dict[str, Any]]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    try:  # transformers 5 reads with a thread pool of its own size; 4.x had an opt-in variable instead
        from transformers.core_model_loading import GLOBAL_WORKERS

        threads: int | None = GLOBAL_WORKERS
    except ImportError:
        threads = None
    folder = path if path.is_dir() else path.parent
    names = set(read_header(folder / "model.safetensors")[1])
    keep: dict[str, Any] = {}

    def load() -> dict[str, Any]:
        model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.bfloat16, device_map=a.device)
        keep["model"] = model
        return {k: v for k, v in model.state_dict().items() if k in names}  # only what the file holds

    return load, {"call": f'AutoModelForCausalLM.from_pretrained(dir, torch_dtype=torch.bfloat16, '
                          f'device_map="{a.device}")',
                  "transformers": transformers.__version__, "reader_threads": threads,
                  "HF_ENABLE_PARALLEL_LOADING": env_or("HF_ENABLE_PARALLEL_LOADING", "4.x: off")}


def prep_fastsafetensors(path: Path, a: argparse.Namespace) -> tuple[LoadFn, dict[str, Any]]:
    if a.placement == "warm":  # its default O_DIRECT reads bypass the page cache this column is about
        os.environ.setdefault("FASTSAFETENSORS_ODIRECT", "0")
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    threads, bbuf_kb = min(16, os.cpu_count() or 16), 16 << 10
    files = files_of(path)

    def load() -> dict[str, Any]:
        loader = SafeTensorsFileLoader(SingleGroup(), a.device, nogds=True, max_threads=threads, bbuf_size_kb=bbuf_kb)
        try:
            loader.add_filenames({0: [str(f) for f in files]})
            fb = loader.copy_files_to_device()
            try:
                return {k: fb.get_tensor(k) for k in loader.get_keys()}  # tensors own their memory
            finally:
                fb.close()
        finally:
            loader.close()

    return load, {"call": f'SafeTensorsFileLoader(SingleGroup(), "{a.device}", nogds=True, max_threads={threads}, '
                          f'bbuf_size_kb={bbuf_kb}); add_filenames({{0: files}}); copy_files_to_device(); '
                          'get_tensor(k) for k in get_keys()', "files": [f.name for f in files],
                  "FASTSAFETENSORS_ODIRECT": env_or("FASTSAFETENSORS_ODIRECT",
                                                    "O_DIRECT on a local disk, buffered on tmpfs")}


def prep_runai(path: Path, a: argparse.Namespace) -> tuple[LoadFn, dict[str, Any]]:
    from runai_model_streamer import SafetensorsStreamer

    def load() -> dict[str, Any]:
        out = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(str(path))
            for name, t in streamer.get_tensors():  # views into its CPU buffer, freed on exit
                out[name] = t.clone() if a.device == "cpu" else t.to(a.device)
        return out

    return load, {"call": f'with SafetensorsStreamer() as s: s.stream_file(path); '
                          f'{{n: t.to("{a.device}") for n, t in s.get_tensors()}}',
                  "RUNAI_STREAMER_CONCURRENCY": env_or("RUNAI_STREAMER_CONCURRENCY", "16 on a file system"),
                  "RUNAI_STREAMER_CHUNK_BYTESIZE": env_or("RUNAI_STREAMER_CHUNK_BYTESIZE", "2 MiB"),
                  "RUNAI_STREAMER_MEMORY_LIMIT": env_or("RUNAI_STREAMER_MEMORY_LIMIT",
                                                        "40 GB in 0.16: the whole file in one pass")}


def prep_instanttensor(path: Path, a: argparse.Namespace) -> tuple[LoadFn, dict[str, Any]]:
    if a.device == "cpu":
        raise Skip(CUDA_ONLY["instanttensor"])
    from instanttensor import BackendPolicy, safe_open

    # default: direct I/O on a disk (its cold-start choice) and on the FUSE view (not tmpfs to it), mmap on
    # tmpfs; BUFFERED is its advice for repeated loads from the page cache
    policy = BackendPolicy.BUFFERED if a.placement == "warm" else None
    chosen: dict[str, Any] = {}
    files = files_of(path)

    def load() -> dict[str, Any]:
        out = {}
        with safe_open([str(f) for f in files], framework="pt", device=a.device, backend=policy) as f:
            for name, t in f.tensors():  # copy=True (default): each tensor owns its memory
                out[name] = t
            chosen.update(backend=f.backend.name, chunk_size=f.chunk_size, io_depth=f.io_depth,
                          concurrency=f.concurrency, buffer_size=f.buffer_size)
        return out

    return load, {"call": f'with safe_open(files, framework="pt", device="{a.device}", '
                          f'backend={"BackendPolicy.BUFFERED" if policy else "None"}) as f: dict(f.tensors())',
                  "chosen": chosen, "files": [f.name for f in files]}


def child_cat(path: Path) -> dict[str, Any]:
    """`cat`: every byte of every file read in order into one reused buffer; no GPU, no tensors. Checked
    by count (each file read to its size); the loaders' rows check the bytes of the same files."""
    try:
        files = files_of(path)
    except Skip as e:
        return {"skipped": f"Skip: {e}"}
    sizes = {f.name: f.stat().st_size for f in files}
    buf = bytearray(CAT_BUFFER)
    got: dict[str, int] = {}
    t0 = time.perf_counter()
    for f in files:
        n = 0
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
        got[f.name] = n
    seconds = time.perf_counter() - t0
    short = [name for name in sizes if got[name] != sizes[name]]
    out: dict[str, Any] = {"seconds": seconds, "bytes": sum(got.values()), "gbps": sum(got.values()) / seconds / 1e9,
                           "settings": {"call": f"for each file: open(f, 'rb', buffering=0).readinto("
                                                f"{CAT_BUFFER >> 20} MiB buffer) until EOF", "files": list(sizes)},
                           "ok": None, "check": "sizes", "sizes_ok": not short}
    if short:
        out["error"] = [f"short read of {name}: {got[name]} of {sizes[name]} bytes" for name in short]
    return out


def prep_sllmfs(path: Path, a: argparse.Namespace) -> tuple[LoadFn, dict[str, Any]]:
    """Like the peers, sllmfs allocates the tensors itself inside the timer: ``sllmfs.integrations.torch.load_dict``
    (one cudaMalloc for the weights, then the sidecar copies into them over CUDA IPC). Loading into a
    framework's pre-allocated tensors is bench/bench_gpu_load.py's subject."""
    from sllmfs.integrations.torch import load_dict

    def load() -> dict[str, Any]:
        return load_dict(a.model, device_map={"": a.device}, socket=a.socket, timeout=600)

    return load, {"call": 'sllmfs.integrations.torch.load_dict(model, device_map={"": "cuda:0"}, socket=sock)',
                  "SLLMFS_GPU_COPY": env_or("SLLMFS_GPU_COPY", "auto: the sidecar copies over CUDA IPC")}


PREPARE: dict[str, Callable[[Path, argparse.Namespace], tuple[LoadFn, dict[str, Any]]]] = {
    "safetensors": prep_safetensors, "transformers": prep_transformers, "fastsafetensors": prep_fastsafetensors,
    "runai": prep_runai, "instanttensor": prep_instanttensor, "sllmfs": prep_sllmfs}


def sync(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def child_load(loader: str, path: Path, a: argparse.Namespace) -> dict[str, Any]:
    """``loader``: a PREPARE key, or a reader pointed at the mount (MOUNT_READERS: the same reader)."""
    loader = MOUNT_READERS.get(loader, loader)
    if loader == "cat":
        return child_cat(path)
    import torch

    if a.device != "cpu":
        torch.empty(1, device=a.device)  # the CUDA context exists before the timer starts
        sync(a.device)
    try:
        load, settings = PREPARE[loader](path, a)  # imports and allocations: before the timer
    except (ImportError, Skip) as e:
        return {"skipped": f"{type(e).__name__}: {e}"}
    t0 = time.perf_counter()
    tensors = load()
    sync(a.device)
    seconds = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    out: dict[str, Any] = {"seconds": seconds, "bytes": nbytes, "gbps": nbytes / seconds / 1e9,
                           "tensors": len(tensors), "settings": settings, **verify(tensors, a.ref)}
    if a.device != "cpu":
        out["torch_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del tensors  # free before exit; the process ends anyway
    return out


def child_main(a: argparse.Namespace) -> dict[str, Any]:
    task, path = a.child[0], Path(a.child[1])
    if task == "write-llama":
        from llama_shapes import write_checkpoint

        t0 = time.perf_counter()
        nbytes = write_checkpoint(path, layers=a.layers)
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}
    if task == "write-flat":
        t0 = time.perf_counter()
        nbytes = write_flat(path, a.count, a.numel)
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}
    if task == "pinned-peak":
        import torch
        from limits import pinned_peak

        return {"gbps": pinned_peak(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    return child_load(task, path, a)


# ---------------------------------------------------------------------------------------------
# the parent: checkpoints, limits, the order of the loads


@dataclass
class Ckpt:
    case: str  # llama-L32, flat-100, ...
    dir: Path
    bytes: int
    tensors: int
    ref: Path  # per-tensor reference checksums (JSON)

    @property
    def file(self) -> Path:
        return self.dir / "model.safetensors"

    @property
    def model(self) -> str:  # its sllmfs name: no '/', so its FUSE folder is MOUNT/<model>/
        return f"peers-{self.case}"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir)
        self.store, self.sock, self.mount = self.work / "store", self.work / "sllmfs.sock", self.work / "mnt"
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.only = set(args.only.split(",")) if args.only else set(LOADERS)
        self.budget = args.budget if args.budget is not None else (0 if args.part == "all" else 480)
        self.t0 = time.monotonic()
        self.dest = fresh_path(Path(args.out), f"peers-{args.part}-{time.strftime('%Y%m%d-%H%M')}")
        self.saved: set[str] = set()
        self.result: dict[str, Any] = {
            "bench": "peers", "part": args.part, "command": "python3 bench/peers.py " + " ".join(sys.argv[1:]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "device": args.device,
            "kernel": platform.release(), "shmem_thp": shmem_thp_setting(),  # the mount's copies use 2 MiB pages
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "versions": {d: dist_version(d) for d in DISTS}, "budget_s": self.budget,
            "limits": {}, "checkpoints": {}, "runs": []}

    # -- bookkeeping ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dest.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.rename(self.dest)

    def record(self, run: dict[str, Any]) -> dict[str, Any]:
        self.result["runs"].append(run)
        self.save()
        print("  " + run_line(run), flush=True)
        return run

    def skip(self, group: str, ck: Ckpt, loader: str, placement: str, why: str) -> None:
        if self.wants(loader):
            self.record({**run_base(group, ck, loader, placement), "skipped": why})

    def fail_rest(self, group: str, ck: Ckpt, rows: tuple[tuple[str, str], ...], error: str) -> None:
        """Record ``error`` for those of ``rows`` that this run has not recorded yet."""
        done = {(r["loader"], r["placement"]) for r in self.result["runs"] if r["case"] == ck.case
                and r["group"] == group}
        for loader, placement in rows:
            if self.wants(loader) and (loader, placement) not in done:
                self.record({**run_base(group, ck, loader, placement), "error": error.splitlines()[-12:]})

    def wants(self, loader: str) -> bool:
        return loader in self.only

    def why_not(self, loader: str, estimate: float) -> str | None:
        if importlib.util.find_spec(MODULE[loader].split(".")[0]) is None:
            return f"not installed: no module {MODULE[loader]!r}"
        cuda_only = CUDA_ONLY.get(MOUNT_READERS.get(loader, loader))
        if cuda_only and self.args.device == "cpu":  # said here too: a mount row's reset would be wasted
            return f"Skip: {cuda_only}"
        if self.budget and self.elapsed() + estimate > self.budget:
            return f"time budget: {self.elapsed():.0f} s spent of {self.budget:.0f} s, this one needs ~{estimate:.0f} s"
        return None

    # -- one load ------------------------------------------------------------------------------

    def load(self, group: str, ck: Ckpt, loader: str, placement: str, path: Path, *, extra: tuple[str, ...] = (),
             before: Callable[[], dict[str, Any]] | None = None,
             after: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Run one load in a fresh process and record it, with its ratios to the figures it is set
        against (pair_ratios); None when --only leaves the loader out. ``before`` prepares the placement
        (what it returns goes into the run), ``after`` adds what the placement looked like afterwards."""
        if not self.wants(loader):
            return None
        run = run_base(group, ck, loader, placement)
        why = self.why_not(loader, estimate_s(loader, placement, ck.bytes))
        if why:
            return self.record({**run, "skipped": why})
        if before:
            run.update(before())
        cmd = [sys.executable, __file__, "--child", loader, str(path), "--placement", placement,
               "--device", self.args.device, "--ref", str(ck.ref), *extra]
        t0 = time.perf_counter()
        run.update(run_child(cmd, self.child_timeout()))
        run["wall_s"] = time.perf_counter() - t0
        if after:
            after(run)
        run.update(pair_ratios(run, self.result["runs"], self.result["limits"].get("disk_read_gbps")))
        return self.record(run)

    def child_timeout(self) -> float:
        left = self.budget - self.elapsed() if self.budget else 600
        return max(60.0, min(600.0, left))

    def child(self, task: str, path: Path, *extra: str) -> dict[str, Any]:
        res = run_child([sys.executable, __file__, "--child", task, str(path), "--device", self.args.device,
                         *extra], 600)
        if "error" in res:
            raise SystemExit(f"{task} {path} failed:\n" + "\n".join(res["error"]))
        return res

    # -- checkpoints ----------------------------------------------------------------------------

    def ckpt(self, case: str, folder: Path, build: Callable[[], dict[str, Any]], *also: str) -> Ckpt:
        """The checkpoint in ``folder``, built first unless a complete one is there (``also``: its other files)."""
        if not file_complete(folder / "model.safetensors") or not all((folder / f).is_file() for f in also):
            shutil.rmtree(folder, ignore_errors=True)
            built = build()
            print(f"built {case}: {built['bytes'] / 1e9:.2f} GB in {built['seconds']:.1f} s", flush=True)
            self.result["checkpoints"].setdefault(case, {})["build_s"] = built["seconds"]
        start, header = read_header(folder / "model.safetensors")
        nbytes = max((e["data_offsets"][1] for e in header.values()), default=0)
        ck = Ckpt(case, folder, nbytes, len(header), self.work / f"ref-{case}.json")
        self.result["checkpoints"].setdefault(case, {}).update(path=str(ck.file), bytes=nbytes, tensors=ck.tensors)
        return ck

    def llama(self, layers: int) -> Ckpt:
        folder = self.work / f"llama-L{layers}"
        return self.ckpt(f"llama-L{layers}", folder,
                         lambda: self.child("write-llama", folder, "--layers", str(layers)), "config.json")

    def flat(self, count: int) -> Ckpt:
        numel = int(self.args.flat_mb * 1e6) // 2 // count
        folder = self.work / f"flat-{count}x{numel}"  # another --flat-mb gets a file of its own
        return self.ckpt(f"flat-{count}", folder, lambda: self.child(
            "write-flat", folder / "model.safetensors", "--count", str(count), "--numel", str(numel)))

    def reference(self, ck: Ckpt) -> None:
        """Checksums of the source file, once (this pass also leaves the file in the page cache)."""
        if ck.ref.exists() and ck.ref.stat().st_mtime > ck.file.stat().st_mtime:
            warm_file(ck.file)
            return
        t0 = time.perf_counter()
        ck.ref.write_text(json.dumps(reference(ck.file)))
        self.result["checkpoints"][ck.case]["reference_s"] = time.perf_counter() - t0

    def save_model(self, ck: Ckpt) -> str | None:
        """`sllmfs save` the checkpoint (skipped when the store already has this build); None or why not."""
        from sllmfs.core.names import model_dirname

        manifest = self.store / "models" / model_dirname(ck.model) / "variants" / "hf" / "manifest.json"
        if ck.model in self.saved or (manifest.exists() and manifest.stat().st_mtime > ck.file.stat().st_mtime):
            return None
        t0 = time.perf_counter()
        try:
            sh(sys.executable, "-m", "sllmfs", "save", "--model", ck.model, "--local-model-path", str(ck.dir),
               "--storage-path", str(self.store), "--force")
        except SystemExit as e:
            return f"sllmfs save failed: {str(e)[-600:]}"
        self.saved.add(ck.model)
        self.result["checkpoints"][ck.case]["save_s"] = time.perf_counter() - t0
        return None

    # -- limits ---------------------------------------------------------------------------------

    def limits(self, file: Path) -> None:
        """Pinned H2D peak and the disk's parallel read of ``file`` (which leaves it in the page cache)."""
        lim = self.result["limits"]
        if lim:
            warm_file(file)
            return
        if self.args.device == "cpu":
            lim["pinned_h2d_peak_gbps"] = None
            lim["pinned_skipped"] = "--device cpu"
        else:
            try:
                peak = self.child("pinned-peak", Path("-"))
                lim["pinned_h2d_peak_gbps"] = peak["gbps"]
                self.result.update(gpu=peak["gpu"], torch=peak["torch"], cuda=peak["cuda"])
            except SystemExit as e:  # the loads are still worth measuring
                lim["pinned_h2d_peak_gbps"], lim["pinned_error"] = None, str(e).splitlines()[-12:]
        lim["caches_dropped"] = drop_caches()
        lim["disk_reads_gbps"] = {}
        lim["disk_read_gbps"] = disk_read_bw([file], shapes=lim["disk_reads_gbps"])
        lim["disk_file"] = str(file)
        self.save()
        shapes = ", ".join(f"{k} {v:.2f}" for k, v in lim["disk_reads_gbps"].items())
        print(f"limits: pinned H2D peak {lim['pinned_h2d_peak_gbps']} GB/s, disk read {lim['disk_read_gbps']:.2f} "
              f"GB/s, the best of {shapes} (page cache dropped: {lim['caches_dropped']})", flush=True)

    # -- the sidecar ----------------------------------------------------------------------------

    @contextmanager
    def sidecar(self, fuse: bool) -> Iterator[str | None]:
        """A running sidecar; yields None when its FUSE view is mounted, else why not."""
        why = fuse_missing() if fuse else "not asked for"
        args = [*SIDECAR_ARGS, *(["--copy-direct"] if self.args.copy_direct else []),
                *(["--copy-read-depth", str(self.args.copy_read_depth)] if self.args.copy_read_depth else []),
                *(["--copy-read-overlap", str(self.args.copy_read_overlap)] if self.args.copy_read_overlap else [])]
        extra = [*args, *(["--mount", str(self.mount)] if why is None else [])]
        try:
            proc = start_sidecar(self.store, self.sock, self.logs / "sidecar.log", extra)
        except SystemExit as e:
            if why is not None:
                raise
            why = f"the sidecar could not mount: {str(e)[-400:]}"
            proc = start_sidecar(self.store, self.sock, self.logs / "sidecar.log", args)
        try:
            yield why
        finally:
            stop(proc)
            self.result.setdefault("sidecar_log_tail", []).extend(
                (self.logs / "sidecar.log").read_text(errors="replace").splitlines()[-10:])

    def sllmfs_cli(self, *args: str) -> None:
        sh(sys.executable, "-m", "sllmfs", *args, "--socket", str(self.sock))

    def cold(self, ck: Ckpt | None = None) -> dict[str, Any]:
        """Before a cold load: the model out of the memory tier (when given) and the page cache dropped."""
        if ck is not None:
            self.sllmfs_cli("evict", "--model", ck.model)
        return {"caches_dropped": drop_caches()}

    def mount_copies(self) -> int:
        """Bytes the mount holds in passthrough backings now: copies, or the tier's own files (the status)."""
        from sllmfs.client import client as sidecar_client
        from sllmfs.core.errors import SllmfsError

        try:
            with sidecar_client.connect(str(self.sock)) as c:
                mem = c.status()["memory"]  # copies, or the tier's own files (a cold read must find neither)
                return int(mem.get("mount_copies", 0)) + int(mem.get("mount_files", 0))
        except SllmfsError as e:  # as the CLI's failures: the rows not run say why
            raise SystemExit(f"sllmfs status failed: {e}") from None

    def copies_gone(self) -> float:
        """Wait until the mount holds no passthrough copy (after an eviction); the seconds it took."""
        t0 = time.monotonic()
        while (held := self.mount_copies()) > 0:
            if time.monotonic() - t0 > COPIES_GONE_S:
                raise SystemExit(f"the mount still holds {held} bytes of passthrough copies {COPIES_GONE_S:.0f} s "
                                 "after the model was evicted: a reader of the view would find a warm copy")
            time.sleep(0.25)
        return time.monotonic() - t0


def shmem_thp_setting() -> str | None:
    """transparent_hugepage/shmem_enabled as the kernel shows it ([advise]: the passthrough copies may ask)."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text().strip()
    except OSError:
        return None


def fresh_path(folder: Path, stem: str) -> Path:
    """folder/stem.json, or stem-2.json, ... when a run of the same minute wrote it already."""
    dest, n = folder / f"{stem}.json", 1
    while dest.exists():
        n += 1
        dest = folder / f"{stem}-{n}.json"
    return dest


def estimate_s(loader: str, placement: str, nbytes: int) -> float:
    """A pessimistic guess of one load's wall time (process start included), for the time budget."""
    if loader == "sglang":
        return 90.0
    rate = 1.0e9 if placement == "cold" else 3.0e9
    reset = 0.0
    if loader in MOUNT_READERS:  # the view's reset (view_fresh: the model filled again from the disk)
        rate = 0.6e9 if placement == "cold" else rate
        reset = 6.0 + (nbytes / 1.5e9 if placement == "hit" else 0.0)
    return 8.0 + reset + (10.0 if loader == "transformers" else 0.0) + nbytes / rate


def pair_ratios(run: dict[str, Any], runs: list[dict[str, Any]], disk_gbps: float | None) -> dict[str, Any]:
    """A reader through the mount against the same reader from tmpfs in this run (``vs_tmpfs``); a cold
    load against the disk's read measured in this run (``vs_disk``); each with its goal (issue 20)."""
    out: dict[str, Any] = {}
    if "gbps" not in run or "error" in run or run.get("ok") is False:
        return out
    peer = MOUNT_READERS.get(run["loader"])
    if peer is not None:
        pair = next((r for r in reversed(runs) if (r["group"], r["case"], r["loader"], r["placement"])
                     == (run["group"], run["case"], peer, "tmpfs")), None)
        if pair is not None and "gbps" in pair and "error" not in pair and pair.get("ok") is not False:
            out["vs_tmpfs"] = {"loader": peer, "gbps": pair["gbps"], "ratio": run["gbps"] / pair["gbps"],
                               "goal": GOAL_HIT_VS_TMPFS if run["placement"] == "hit" else None}
        else:
            out["vs_tmpfs"] = {"loader": peer, "missing": "no good tmpfs load of it in this run"}
    if run["placement"] == "cold" and disk_gbps:
        out["vs_disk"] = {"gbps": disk_gbps, "ratio": run["gbps"] / disk_gbps,
                          "goal": GOAL_COLD_VS_DISK if peer is not None else None}
    return out


def run_child(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a child; its `RESULT {json}` line, or {"error": [last lines of its output]}."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = b"".join(x if isinstance(x, bytes) else (x or "").encode() for x in (e.stdout, e.stderr))
        return {"error": [f"timed out after {timeout:.0f} s", *out.decode(errors="replace").splitlines()[-12:]]}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": [f"exit {proc.returncode}", *(proc.stdout + proc.stderr).splitlines()[-15:]]}


def warm_file(path: Path, block: int = 64 << 20) -> None:
    """Read a file once so that it is in the page cache (cheap when it already is)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        while f.readinto(buf):
            pass


def fuse_missing() -> str | None:
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not importable (source bench/gpu_setup.sh first)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    return None


@contextmanager
def tmpfs_copy(ck: Ckpt) -> Iterator[Path | str]:
    """The checkpoint folder copied into /dev/shm, removed afterwards; or why it does not fit."""
    files = [p for p in ck.dir.iterdir() if p.is_file()]
    need = sum(p.stat().st_size for p in files)
    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    if free < need + (256 << 20):
        yield f"/dev/shm has {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB"
        return
    dest = SHM / ck.case
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    try:
        try:
            sh("cp", *map(str, files), str(dest))
        except SystemExit as e:
            yield f"copy to tmpfs failed: {str(e)[-300:]}"
            return
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def target(loader: str, folder: Path) -> Path:
    """transformers and SGLang take the model folder; the others take the file."""
    return folder if loader in ("transformers", "sglang") else folder / "model.safetensors"


# ---------------------------------------------------------------------------------------------
# the parts


def part_main(b: Bench) -> None:
    ck = b.llama(b.args.layers)
    sllm = b.wants("sllmfs") or b.wants("sllmfs-fuse")
    save_error = b.save_model(ck) if sllm else None
    b.limits(ck.file)  # drops the page cache, then reads the file: warm from here on
    b.reference(ck)
    for loader in PEERS:
        b.load("main", ck, loader, "warm", target(loader, ck.dir))
    tmpfs_rows(b, ck, [loader for loader in PEERS if b.wants(loader)])
    if sllm:
        sllmfs_rows(b, ck, save_error)
    for loader in PEERS:
        b.load("main", ck, loader, "cold", target(loader, ck.dir), before=b.cold)


COPY_WORDS = ("gpu copy", "fill started", "filled", "faulted in", "pinned model")  # a handle load's own lines
SLLMFS_ROWS = (("sllmfs", "cold"), ("sllmfs", "hit"), ("sllmfs", "warm"), ("sllmfs-fuse", "hit"),
               ("sllmfs-fuse", "cold"))


def tmpfs_rows(b: Bench, ck: Ckpt, loaders: list[str]) -> None:
    """Each loader from a tmpfs copy of the checkpoint (the column the others are set against)."""
    if not loaders:
        return
    with tmpfs_copy(ck) as shm:
        for loader in loaders:
            if isinstance(shm, str):
                b.skip("main", ck, loader, "tmpfs", shm)
            else:
                b.load("main", ck, loader, "tmpfs", target(loader, shm))


def sllmfs_rows(b: Bench, ck: Ckpt, save_error: str | None) -> None:
    """Handles cold, from the memory tier, then with the tier empty and the store's files in the page
    cache (the peers' "warm" column: a first load after the files were read); the FUSE view from the
    memory tier, then cold."""
    if save_error:
        for loader, placement in SLLMFS_ROWS:
            b.skip("main", ck, loader, placement, save_error)
        return
    handle = ("--socket", str(b.sock), "--model", ck.model)
    try:
        with b.sidecar(fuse=b.wants("sllmfs-fuse")) as fuse_why:
            for placement, prepare in (("cold", partial(b.cold, ck)), ("hit", partial(warm_model, b, ck)),
                                       ("warm", partial(tier_empty, b, ck))):
                before, after = logged(b, prepare, COPY_WORDS)
                b.load("main", ck, "sllmfs", placement, ck.file, extra=handle, before=before, after=after)
            for placement in ("hit", "cold"):
                mount_load(b, ck, "sllmfs-fuse", placement, fuse_why)
    except SystemExit as e:  # the sidecar or one of its commands failed: say so in the rows not run
        b.fail_rest("main", ck, SLLMFS_ROWS, str(e))


# hits first: the goal's figures; then cold, the plain read first (the disk's own kind of read)
MOUNT_ROWS = (*((reader, "hit") for reader in MOUNT_READERS),
              *((reader, "cold") for reader in ("cat@mount", "sllmfs-fuse", "fastsafetensors@mount",
                                                "instanttensor@mount")))


def part_mount(b: Bench) -> None:
    """Each reader of MOUNT_READERS from tmpfs, then through the mount: hit, then cold (MOUNT_ROWS)."""
    ck = b.llama(b.args.layers)
    b.only |= {peer for reader, peer in MOUNT_READERS.items() if b.wants(reader)}  # a mount row brings its pair
    save_error = b.save_model(ck)
    b.limits(ck.file)
    b.reference(ck)
    tmpfs_rows(b, ck, [peer for peer in MOUNT_READERS.values() if b.wants(peer)])
    if save_error:
        for reader, placement in MOUNT_ROWS:
            b.skip("main", ck, reader, placement, save_error)
        return
    if not any(b.wants(reader) for reader in MOUNT_READERS):
        return
    try:
        with b.sidecar(fuse=True) as fuse_why:
            for reader, placement in MOUNT_ROWS:
                mount_load(b, ck, reader, placement, fuse_why)
    except SystemExit as e:
        b.fail_rest("main", ck, MOUNT_ROWS, str(e))


def mount_load(b: Bench, ck: Ckpt, reader: str, placement: str, fuse_why: str | None) -> None:
    """One reader through the view, from a state where the kernel holds none of the view's pages and the
    mount no passthrough copy (view_fresh / view_cold); the run says whether passthrough served it."""
    if fuse_why:
        b.skip("main", ck, reader, placement, fuse_why)
        return
    before, lines = logged(b, partial(view_fresh if placement == "hit" else view_cold, b, ck),
                           ("passthrough", "through the daemon"))

    def after(run: dict[str, Any]) -> None:
        run["mount_copies_after"] = b.mount_copies()  # > 0: passthrough backings served the reads
        lines(run)

    b.load("main", ck, reader, placement, b.mount / ck.model, before=before, after=after)


def logged(b: Bench, prepare: Callable[[], dict[str, Any]], words: tuple[str, ...]) -> tuple[
        Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]:
    """(before, after) for Bench.load: ``prepare`` the placement, then record in the run the sidecar's log
    lines of the load itself that hold one of ``words`` (its copy's figures: why one load is slower)."""
    log = b.logs / "sidecar.log"
    mark = {"at": 0}

    def before() -> dict[str, Any]:
        state = prepare()
        mark["at"] = log.stat().st_size
        return state

    def after(run: dict[str, Any]) -> None:
        with open(log, "rb") as f:
            f.seek(mark["at"])
            new = f.read().decode(errors="replace").splitlines()
        run["sidecar_lines"] = [line for line in new if any(w in line for w in words)][-8:]

    return before, after


def view_fresh(b: Bench, ck: Ckpt) -> dict[str, Any]:
    """The model resident in the memory tier and the kernel holding none of the view's pages: a copy an
    earlier reader left (passthrough keeps one a minute after the last close) goes with an eviction, the
    view's own page cache (reads through the daemon keep it) with the page cache; then the model is
    loaded into the tier again. A new mount's state, without a new mount."""
    held = b.mount_copies()
    waited = None
    if held:
        b.sllmfs_cli("evict", "--model", ck.model)
        waited = b.copies_gone()
    dropped = drop_caches()
    b.sllmfs_cli("load", "--model", ck.model, "--warm")
    return {"view_state": ("an earlier reader's passthrough copy dropped (evicted, gone after "
                           f"{waited:.1f} s), " if waited is not None else "no passthrough copy, ")
            + ("page cache dropped" if dropped else "page cache NOT dropped (not root)")
            + ", the model loaded into the memory tier (load --warm)",
            "mount_copies_before": held, "caches_dropped": dropped}


def view_cold(b: Bench, ck: Ckpt) -> dict[str, Any]:
    """Evicted, no passthrough copy left (a copy serves new opens until the mount's next expiry pass),
    page cache dropped."""
    b.sllmfs_cli("evict", "--model", ck.model)
    waited = b.copies_gone()
    dropped = drop_caches()
    return {"view_state": f"evicted, no passthrough copy left (after {waited:.1f} s), "
                          + ("page cache dropped" if dropped else "page cache NOT dropped (not root)"),
            "caches_dropped": dropped}


def tier_empty(b: Bench, ck: Ckpt) -> dict[str, Any]:
    """The model out of the memory tier, its stored files in the page cache."""
    from sllmfs.core.names import model_dirname

    b.sllmfs_cli("evict", "--model", ck.model)
    files = stored_files(b.store / "models" / model_dirname(ck.model))
    if not files:
        raise SystemExit(f"no stored data files for {ck.model} under {b.store}")
    for f in files:
        warm_file(f)
    return {"page_cache_files": len(files)}


def warm_model(b: Bench, ck: Ckpt) -> dict[str, Any]:
    """Make sure the model is in the memory tier (a no-op after a cold load filled it)."""
    b.sllmfs_cli("load", "--model", ck.model, "--warm")
    return {}


def part_scaling(b: Bench) -> None:
    sizes = [b.llama(n) for n in sorted({n for n in SIZE_LAYERS if n < b.args.layers} | {b.args.layers})]
    counts = [b.flat(n) for n in COUNTS]
    groups = [("size", ck) for ck in sizes] + [("count", ck) for ck in counts]
    save_errors = {ck.case: b.save_model(ck) for _g, ck in groups} if b.wants("sllmfs") else {}
    b.limits(sizes[-1].file)
    for group, ck in groups:
        b.result["checkpoints"][ck.case]["group"] = group
        b.reference(ck)
    try:
        with b.sidecar(fuse=False) if b.wants("sllmfs") else nullcontext():
            for group, ck in groups:
                warm_file(ck.file)  # still cached from the reference pass: cheap, and sure
                for loader in PEERS:
                    if loader != "transformers" or group == "size":  # the flat files are no model
                        b.load(group, ck, loader, "warm", target(loader, ck.dir))
                why = save_errors.get(ck.case)
                if why:
                    b.skip(group, ck, "sllmfs", "hit", why)
                else:
                    b.load(group, ck, "sllmfs", "hit", ck.file, extra=("--socket", str(b.sock), "--model", ck.model),
                           before=partial(warm_model, b, ck))
    except SystemExit as e:
        for group, ck in groups:
            b.fail_rest(group, ck, (("sllmfs", "hit"),), str(e))


def part_sglang(b: Bench) -> None:
    if not b.wants("sglang"):
        return
    import bench_sglang

    ck = b.llama(b.args.layers)
    b.limits(ck.file)
    engine_logs = b.logs / "sglang"
    engine_logs.mkdir(parents=True, exist_ok=True)

    def engine(placement: str, folder: Path, before: Callable[[], dict[str, Any]] | None = None) -> None:
        run = run_base("main", ck, "sglang", placement)
        why = b.why_not("sglang", estimate_s("sglang", placement, ck.bytes))
        if why:
            b.record({**run, "skipped": why})
            return
        if before:
            run.update(before())
        res = bench_sglang.run_engine(f"sglang default {placement}", str(folder), "auto", engine_logs,
                                      generate=False)
        s = res.get("load_weight_s")
        run.update(wall_s=res["wall_s"], rc=res["rc"], ok=None, settings={
            "call": 'sglang.Engine(model_path=dir, load_format="auto", skip_tokenizer_init=True, ...) '
                    '(bench_sglang.run_engine); time: its "Load weight end" log line',
            "note": "not checksummed: the weights stay inside the engine"})
        if isinstance(s, float) and s > 0:
            run.update(seconds=s, gbps=ck.bytes / s / 1e9)
        else:
            run["error"] = res.get("error_tail") or ["no 'Load weight end' line in the engine log"]
        b.record(run)

    warm_file(ck.file)
    engine("warm", ck.dir)
    with tmpfs_copy(ck) as shm:
        if isinstance(shm, str):
            b.skip("main", ck, "sglang", "tmpfs", shm)
        else:
            engine("tmpfs", shm)
    engine("cold", ck.dir, before=b.cold)


def run_base(group: str, ck: Ckpt, loader: str, placement: str) -> dict[str, Any]:
    return {"group": group, "case": ck.case, "loader": loader, "placement": placement, "bytes": ck.bytes,
            "tensors": ck.tensors}


def run_line(r: dict[str, Any]) -> str:
    head = f"{r['group']:<6} {r['case']:<12}{r['loader']:<22}{r['placement']:<6}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    if "error" in r:
        return f"{head} FAILED: {' | '.join(r['error'][-3:])}"
    line = f"{head}{r['seconds']:>8.2f} s{r['gbps']:>7.2f} GB/s  {check(r)}"
    return line + "".join(f"  {ratio_text(r, key)}" for key in ("vs_tmpfs", "vs_disk") if key in r)


def check(r: dict[str, Any]) -> str:
    if r.get("check") == "sizes":  # the plain read: its byte count, not its bytes
        return "sizes ok" if r.get("sizes_ok") else "SHORT READ"
    return {True: "ok", False: "WRONG BYTES", None: "unchecked"}[r.get("ok")]


def ratio_text(r: dict[str, Any], key: str) -> str:
    """'= 0.81x its tmpfs 26.60 GB/s (goal 0.8: met)' for a run's vs_tmpfs / vs_disk."""
    v = r[key]
    if "ratio" not in v:
        return f"(no tmpfs figure of {v['loader']}: {v['missing']})"
    what = f"its tmpfs {v['gbps']:.2f} GB/s" if key == "vs_tmpfs" else f"the disk {v['gbps']:.2f} GB/s"
    goal = "" if v.get("goal") is None else \
        f" (goal {v['goal']}: {'met' if v['ratio'] >= v['goal'] else 'NOT met'})"
    return f"= {v['ratio']:.2f}x {what}{goal}"


def print_table(b: Bench) -> None:
    lim = b.result["limits"]
    peak = lim.get("pinned_h2d_peak_gbps")
    print(f"\npeers {b.args.part}: pinned H2D peak {peak} GB/s, disk read {lim.get('disk_read_gbps')} GB/s, "
          f"{b.elapsed():.0f} s in all")
    print(f"{'case':<12}{'loader':<22}{'where':<7}{'s':>8}{'GB/s':>8}{'/peak':>7}{'/tmpfs':>7}{'/disk':>7}  check")
    for r in b.result["runs"]:
        if "gbps" not in r:
            print(f"{r['case']:<12}{r['loader']:<22}{r['placement']:<7}{'-':>8}{'-':>8}{'-':>7}{'-':>7}{'-':>7}  "
                  f"{'skipped' if 'skipped' in r else 'FAILED'}")
            continue
        gpu = MOUNT_READERS.get(r["loader"], r["loader"]) != "cat"  # the plain read puts nothing on the GPU
        ratio = f"{r['gbps'] / peak:.2f}" if peak and gpu else "-"
        tmpfs, disk = (f"{r[k]['ratio']:.2f}" if "ratio" in r.get(k, {}) else "-" for k in ("vs_tmpfs", "vs_disk"))
        print(f"{r['case']:<12}{r['loader']:<22}{r['placement']:<7}{r['seconds']:>8.2f}{r['gbps']:>8.2f}"
              f"{ratio:>7}{tmpfs:>7}{disk:>7}  {check(r)}")
    mounted = [r for r in b.result["runs"] if r["loader"] in MOUNT_READERS]
    if mounted:
        print(f"through the mount (issue 20 goals: a hit >= {GOAL_HIT_VS_TMPFS}x the same reader from tmpfs, "
              f"cold >= {GOAL_COLD_VS_DISK}x the disk):")
        for r in mounted:
            what = f"{r['loader']} ({MOUNT_READERS[r['loader']]}) {r['placement']}:"
            if "gbps" not in r or "error" in r:
                print(f"  {what} {'skipped' if 'skipped' in r else 'FAILED'}")
                continue
            held = r.get("mount_copies_after", 0)
            copies = (f"{held / 1e9:.2f} GB held in passthrough backings after it (copies or the tier's own files)"
                      if held else "no passthrough backing after it")
            ratios = " ".join(ratio_text(r, k) for k in ("vs_tmpfs", "vs_disk") if k in r)
            print(f"  {what} {r['gbps']:.2f} GB/s {ratios} [{copies}; {check(r)}]")
    print(f"-> {b.dest}")


def extents(path: Path) -> str:
    """filefrag's line for a file (how many extents it lies in on the disk), or why there is none."""
    try:
        out = subprocess.run(["filefrag", str(path)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no filefrag: {e}"
    return (out.stdout or out.stderr).strip()


COLD_PEER = "fastsafetensors"  # the best peer from disk in every main run so far (its parallel reads)


def part_cold_pairs(b: Bench) -> None:
    """sllmfs cold and the best cold peer, alternated --reps times in one run: the virtual disks here swing
    1.0-2.6 GB/s from minute to minute, so one cold row of each (part main) cannot rank them."""
    ck = b.llama(b.args.layers)
    save_error = b.save_model(ck)
    if save_error:
        raise SystemExit(f"peers cold-pairs: sllmfs save failed: {save_error}")
    b.limits(ck.file)
    b.reference(ck)
    handle = ("--socket", str(b.sock), "--model", ck.model)
    def ours() -> None:
        before, after = logged(b, partial(b.cold, ck), COPY_WORDS)
        b.load("pairs", ck, "sllmfs", "cold", ck.file, extra=handle, before=before, after=after)

    def peer() -> None:
        b.load("pairs", ck, COLD_PEER, "cold", target(COLD_PEER, ck.dir), before=b.cold)

    # the same reader on the store's own files (the safetensors layout: each partition is a safetensors file):
    # the same bytes as ck.file, but other files on the disk, where sllmfs reads them (NOTES-cold run 25)
    from sllmfs.store.store import Store

    store_files = Store(b.store).get(ck.model).variant_dir("hf")
    b.result["extents"] = {str(f): extents(f) for f in (ck.file, *sorted(store_files.glob("*.safetensors")))}

    def peer_on_store() -> None:
        b.load("pairs-store", ck, COLD_PEER, "cold", store_files, before=b.cold)

    first = []
    with b.sidecar(fuse=False):
        for rep in range(b.args.reps):  # who goes first alternates: a read right after a read of the same bytes
            pair = (ours, peer, peer_on_store) if rep % 2 == 0 else (peer_on_store, peer, ours)  # may find the
            first.append("sllmfs" if pair[0] is ours else COLD_PEER)  # virtual disk's host side warm
            for load in pair:
                load()

    def rates(group: str, name: str) -> list[float]:
        return [r["gbps"] for r in b.result["runs"] if (r["group"], r["loader"]) == (group, name) and "gbps" in r
                and r.get("ok")]

    ours, peer, on_store = rates("pairs", "sllmfs"), rates("pairs", COLD_PEER), rates("pairs-store", COLD_PEER)
    if not ours or len(ours) != len(peer) or len(on_store) != len(peer):
        raise SystemExit(f"peers cold-pairs: {len(ours)} sllmfs, {len(peer)} {COLD_PEER} and {len(on_store)} "
                         f"{COLD_PEER} on the store's files loads measured correctly: no ratio (see the rows' errors)")
    ratios = [o / p for o, p in zip(ours, peer, strict=True)]
    same_files = [o / p for o, p in zip(ours, on_store, strict=True)]
    files = [s / p for s, p in zip(on_store, peer, strict=True)]
    b.result["cold_pairs"] = {"peer": COLD_PEER, "ratios": ratios, "median": statistics.median(ratios),
                              "first": first, "vs_peer_on_store_files": same_files,
                              "peer_store_files_vs_source": files}
    print(f"cold pairs: sllmfs / {COLD_PEER} " + " ".join(f"{r:.2f}" for r in ratios)
          + f" (median {statistics.median(ratios):.2f}x; goal >= 1.0)", flush=True)
    print(f"  sllmfs / {COLD_PEER} reading the store's files: " + " ".join(f"{r:.2f}" for r in same_files)
          + f" (median {statistics.median(same_files):.2f}x); {COLD_PEER} store's files / source file: "
          + " ".join(f"{r:.2f}" for r in files) + f" (median {statistics.median(files):.2f}x)", flush=True)


PARTS: dict[str, tuple[Callable[[Bench], None], ...]] = {
    "main": (part_main,), "mount": (part_mount,), "scaling": (part_scaling,), "sglang": (part_sglang,),
    "cold-pairs": (part_cold_pairs,),
    "all": (part_main, part_mount, part_scaling, part_sglang)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), default="main")
    ap.add_argument("--layers", type=int, default=32,
                    help="layers of the main model (32: 13.48 GB; 2 for a smoke test)")
    ap.add_argument("--only", default="", help=f"comma-separated loaders to run, of: {','.join(LOADERS)}")
    ap.add_argument("--workdir", default="/tmp/sllmfs-peers", help="checkpoints, store, socket, mount, logs")
    ap.add_argument("--out", default=str(HERE / "results"), help="where the JSON goes")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds this invocation may take; loads that would not fit are skipped "
                         "(default 480 for one part, none for --part all; 0: none)")
    ap.add_argument("--reps", type=int, default=3, help="--part cold-pairs: alternated pairs")
    ap.add_argument("--copy-read-depth", type=int, default=0, help="the sidecar's O_DIRECT reads in flight per copy "
                    "thread (sllmfs start --copy-read-depth; NOTES-cold run 26; 0: its default)")
    ap.add_argument("--copy-read-overlap", type=int, default=0, help="bytes each of the sidecar's O_DIRECT reads asks "
                    "past its 512 KiB step (sllmfs start --copy-read-overlap; NOTES-cold run 27; 0: its default)")
    ap.add_argument("--copy-direct", action="store_true", help="the sidecar's GPU-first copies of uncached files "
                    "read O_DIRECT (sllmfs start --copy-direct; NOTES-cold run 22: its A/B is two cold-pairs runs)")
    ap.add_argument("--flat-mb", type=float, default=1000, help="size of the tensor-count checkpoints in MB")
    ap.add_argument("--device", default="cuda:0", help="where loads go; 'cpu' is a debug mode for machines "
                                                        "without a GPU (no pinned peak, no InstantTensor; "
                                                        "safetensors maps the file: its time misses the reads)")
    # a child's own options
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--placement", default="warm", help=argparse.SUPPRESS)
    ap.add_argument("--ref", default="", help=argparse.SUPPRESS)
    ap.add_argument("--socket", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--numel", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    unknown = set(filter(None, a.only.split(","))) - set(LOADERS)
    if unknown:
        ap.error(f"--only: unknown loader(s) {', '.join(sorted(unknown))}; choose from {', '.join(LOADERS)}")
    return a


def main() -> None:
    args = parse_args()
    if args.child:
        print("RESULT " + json.dumps(child_main(args), default=str), flush=True)
        return
    b = Bench(args)
    print(f"peers --part {args.part}: workdir {b.work}, budget {b.budget or 'none'} s -> {b.dest}", flush=True)
    try:
        for part in PARTS[args.part]:
            part(b)
    finally:
        shutil.rmtree(SHM, ignore_errors=True)
        b.save()
    print_table(b)


if __name__ == "__main__":
    main()
