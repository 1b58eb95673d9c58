"""End-to-end GPU load through the sidecar, next to the machine's limits, in one run.

    python bench/bench_gpu_load.py --workdir /tmp/sllmfs-bench [--layers 32] [--modes auto,register,stage]

1. builds a Llama-2-7B-shaped bf16 checkpoint (random weights, ~13.5 GB) and `sllmfs save`s it;
2. starts the sidecar;
3. measures the limits: pinned (cudaHostAlloc) H2D peak, and the disk's parallel read bandwidth
   (page cache dropped) over the stored partition files;
4. for a FRESH client process each time: (b) cold → GPU (page cache dropped, memory tier empty:
   the fill and the GPU copies overlap) and (a) memory-tier hit → GPU, end to end from
   `connect()` to the last byte on the GPU (mapping and registration included);
5. checks every tensor: destinations poisoned first, then compared on the GPU with the stored bytes.
Prints GB/s and ratios; writes JSON to --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
MODEL = "bench/llama-2-7b-shaped"

from limits import disk_read_bw, drop_caches, pinned_peak, sh, stored_files  # noqa: E402

# label -> (who copies, engine mode, allocation: "slab" (one block), "tensor" (one each), "reserved"
# (one each, after sllmfs.engine.ipc.reserve_segment, as sllmfs's own loaders allocate))
PATHS = {"sidecar": ("sidecar", "auto", "tensor"), "sidecar-slab": ("sidecar", "auto", "slab"),
         "sidecar-reserved": ("sidecar", "auto", "reserved"), "client": ("client", "auto", "tensor"),
         # PyTorch's VMM allocator (no legacy IPC handles): load_into's path and load_dict
         "vmm": ("auto", "auto", "tensor"), "vmm-dict": ("auto", "auto", "load_dict")}
VMM_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def client_run(socket: str, label: str, store: str) -> dict[str, object]:
    """One fresh-process load: allocate + poison GPU tensors, then time connect → last byte."""
    import torch

    from sllmfs.client.client import connect
    from sllmfs.client.transfer import copy_into

    who, mode, alloc = PATHS[label]
    if who != "auto":
        os.environ["SLLMFS_GPU_COPY"] = who
    if alloc == "load_dict":
        return _load_dict_run(socket)
    from sllmfs.store.store import Store

    m = Store(store, cleanup=False).get(MODEL).manifest("hf")  # shapes, without starting a fill
    shapes = {n: (tuple(m.entry(n).shape), m.entry(n).nbytes) for n in m.names()}
    if alloc == "reserved":
        from sllmfs.engine.ipc import large_pool_bytes, reserve_segment

        reserve_segment("cuda", large_pool_bytes(n for _s, n in shapes.values()))
    if alloc == "slab":  # as a framework that allocates its weights in one block would
        buf = torch.empty(sum(-(-n // 256) * 256 for _s, n in shapes.values()), dtype=torch.uint8, device="cuda")
        dst, at = {}, 0
        for name, (shape, n) in shapes.items():
            dst[name] = buf[at:at + n].view(torch.bfloat16).view(shape)
            at += -(-n // 256) * 256
    else:
        dst = {n: torch.empty(s, dtype=torch.bfloat16, device="cuda") for n, (s, _b) in shapes.items()}
    for t in dst.values():
        t.view(torch.int16).fill_(-1)  # poison: 0xFFFF is a NaN in bf16, never a stored random weight
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with connect(socket) as c, c.acquire(MODEL, "hf") as lease:
        t_acq = time.perf_counter()
        stats = copy_into(lease, dst, mode=mode, timeout=600)
        t1 = time.perf_counter()
        stats.engine["acquire_s"] = t_acq - t0
        views = lease.tensors()
        bad = [n for n, v in views.items() if not torch.equal(dst[n], v.to("cuda", non_blocking=False))]
    nbytes = sum(t.numel() * 2 for t in dst.values())
    return {"seconds": t1 - t0, "bytes": nbytes, "gbps": nbytes / (t1 - t0) / 1e9, "mismatches": len(bad),
            "first_bad": bad[:3], "engine": stats.engine}


def _load_dict_run(socket: str) -> dict[str, object]:
    import torch

    from sllmfs.client.client import connect
    from sllmfs.integrations.torch import load_dict

    torch.cuda.init()
    t0 = time.perf_counter()
    out = load_dict(MODEL, device_map={"": 0}, socket=socket, timeout=600)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    with connect(socket) as c, c.acquire(MODEL, "hf") as lease:
        views = lease.tensors()
        bad = [n for n, v in views.items() if not torch.equal(out[n], v.to("cuda", non_blocking=False))]
    nbytes = sum(t.numel() * t.element_size() for t in out.values())
    return {"seconds": t1 - t0, "bytes": nbytes, "gbps": nbytes / (t1 - t0) / 1e9, "mismatches": len(bad),
            "first_bad": bad[:3], "engine": {}, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/sllmfs-bench")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--paths", default="sidecar,sidecar-slab,sidecar-reserved,client")
    ap.add_argument("--warm-reps", type=int, default=3, help="fresh processes per memory-tier hit (median reported)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--client", nargs=3, metavar=("SOCKET", "PATH", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print("RESULT " + json.dumps(client_run(*args.client)))
        return
    import torch
    from llama_shapes import write_checkpoint

    work = Path(args.workdir)
    src, store, sock = work / "src", work / "store", str(work / "sllmfs.sock")
    t0 = time.perf_counter()
    if not (src / "model.safetensors").exists():
        write_checkpoint(src, layers=args.layers)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not list(store.glob("models/*/variants/hf/manifest.json")):
        sh(sys.executable, "-m", "sllmfs", "save", "--model", MODEL, "--local-model-path", str(src),
           "--storage-path", str(store), "--force")
    save_s = time.perf_counter() - t0
    files = stored_files(store)
    stored = sum(f.stat().st_size for f in files)
    result: dict[str, object] = {"bench": "gpu-load", "host": platform.node(), "gpu": torch.cuda.get_device_name(0),
                                 "torch": torch.__version__, "stored_bytes": stored, "build_s": build_s,
                                 "save_s": save_s, "save_gbps": stored / save_s / 1e9,
                                 "command": "python bench/bench_gpu_load.py " + " ".join(sys.argv[1:])}
    result["pinned_h2d_peak_gbps"] = pinned_peak()
    result["disk_read_gbps"] = disk_read_bw(files)
    daemon = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(store), "--socket",
                               sock, "--mem-pool-size", "48GB", "--num-thread", "16", "--chunk-size", "64MiB"],
                              stdout=open(work / "sidecar.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sidecar did not start:\n{(work / 'sidecar.log').read_text()[-3000:]}")
            time.sleep(0.1)
        runs: dict[str, object] = {}
        for path in args.paths.split(","):
            # tier empty, checkpoint in the page cache (a write-back just landed, a file just copied)
            sh(sys.executable, "-m", "sllmfs", "evict", "--model", MODEL, "--socket", sock)
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(64 << 20):
                        pass
            out = sh(sys.executable, __file__, "--client", sock, path, str(store),
                     env=VMM_ENV if path.startswith("vmm") else None)
            runs[f"pagecache.{path}"] = json.loads(out.split("RESULT ", 1)[1])
            sh(sys.executable, "-m", "sllmfs", "evict", "--model", MODEL, "--socket", sock)
            result["dropped_caches"] = drop_caches()
            for label in ["cold"] + ["warm"] * args.warm_reps:
                out = sh(sys.executable, __file__, "--client", sock, path, str(store),
                         env=VMM_ENV if path.startswith("vmm") else None)
                run = json.loads(out.split("RESULT ", 1)[1])
                if label == "warm":  # several fresh processes: report the median, keep each
                    prev = runs.get(f"warm.{path}", {"each": []})
                    each = [*prev["each"], run]  # type: ignore[index]
                    run = dict(sorted(each, key=lambda r: r["seconds"])[len(each) // 2], each=each)
                    run["mismatches"] = sum(r["mismatches"] for r in each)
                runs[f"{label}.{path}"] = run
        result["runs"] = runs
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        result["daemon_log_tail"] = (work / "sidecar.log").read_text().splitlines()[-20:]
    peak, disk = result["pinned_h2d_peak_gbps"], result["disk_read_gbps"]
    assert isinstance(peak, float) and isinstance(disk, float)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"gpu-load-{time.strftime('%Y%m%d-%H%M')}.json"
    dest.write_text(json.dumps(result, indent=1))
    print(f"\nstored {stored / 1e9:.2f} GB; pinned H2D peak {peak:.1f} GB/s; disk parallel read {disk:.2f} GB/s")
    print(f"{'run':<16}{'s':>8}{'GB/s':>8}{'/peak':>8}{'/disk':>8}{'bad':>6}")
    for name, r in runs.items():
        assert isinstance(r, dict)
        g = r["gbps"]
        print(f"{name:<16}{r['seconds']:>8.3f}{g:>8.2f}{g / peak:>8.2f}{g / disk:>8.2f}{r['mismatches']:>6}")
        e = r["engine"]
        print("    " + " ".join(f"{k}={e[k] * 1e3:.1f}ms" for k in ("acquire_s", "plan_s", "export_s", "request_s",
                                                               "wall_s", "seconds", "ipc_open_s") if k in e))
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
