"""Loading one GPU past one link (issue 26): relays through an idle peer, next to the limits, in one run.

    python bench/bench_relay.py --workdir /tmp/sllmfs-relay [--layers 32] [--reps 3] [--out DIR]
    python bench/bench_relay.py --workdir /tmp/sllmfs-relay --sglang [--out DIR]   (after the first)
    python bench/bench_relay.py --tiny [--out DIR]                                   (CPU, stand-in runtime)

GPU run (two GPUs with peer access, e.g. nvidia-h200-x2), measured in this one process:
1. limits: pinned (cudaHostAlloc) H2D peak of GPU 0's link; the same for GPU 1; both links at once;
   GPU 1 -> GPU 0 peer copy; host -> GPU 1 -> GPU 0 relay (torch streams, slots on GPU 1, both stages
   overlapped); the host memory read bandwidth (threads summing a buffer); then the copy engine alone
   (8 GiB pinned -> GPU 0 in this process, relays off and on, compared on the GPU);
2. builds the 13.48 GB Llama-2-7B-shaped checkpoint (bench/llama_shapes.py) and saves it;
3. for SLLMFS_RELAY=off, then auto: a fresh sidecar, a first load (fills the memory tier), then
   --reps FRESH client processes loading every tensor into GPU 0 through the sidecar
   (bench_gpu_load.py's client: destinations poisoned, every tensor compared on the GPU);
4. prints the load's GB/s and its ratio to one link's pinned peak (goal: >= 1.8 with relays), the
   relay's share and its cost to GPU 1 (staging memory, seconds its link was busy) from the sidecar's
   status; JSON to --out (default $OUT, else bench/results/).
--sglang: SGLang 0.5.17 on the same store (source bench/gpu_setup.sh first): greedy ids of the
   default loader, then sllm (any-TP + write-back, then the per-rank fast path from the memory tier)
   with relays on and off; each engine's "Load weight end" and whether the ids are identical.
--tiny: the same sidecar path on a machine without a GPU: a stand-in CUDA runtime with two peer GPUs
   and asynchronous streams (tests/support/cudart.py), the client's "GPU memory" a memfd; checks every
   tensor; no limits (there is no link), so it prints no ratio to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from limits import measured, pinned_peak, sh, start_sidecar, stop, stored_files  # noqa: E402

MODEL = "bench/llama-2-7b-shaped"  # bench_gpu_load's client loads this name
GiB = 1 << 30


def out_dir(arg: str | None) -> Path:
    d = Path(arg or os.environ.get("OUT") or HERE / "results")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------- limits (GPU)

def need_two_peer_gpus() -> None:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        raise SystemExit(f"bench_relay: needs 2 CUDA GPUs, torch sees {n}; on a CPU machine run it with --tiny")
    if not (torch.cuda.can_device_access_peer(0, 1) and torch.cuda.can_device_access_peer(1, 0)):
        raise SystemExit("bench_relay: GPU 0 and GPU 1 have no peer access (no NVLink/P2P): relays cannot help here")


def _timed(fn: Any, reps: int = 5) -> float:
    """Median seconds of fn() over reps (after one warm-up), every device synchronized around each."""
    import torch

    fn()
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_limits(gib: int = 4) -> dict[str, float]:
    import torch

    n = gib * GiB
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(7)
    src2 = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(9)
    dst0 = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    dst1 = torch.empty(n, dtype=torch.uint8, device="cuda:1")
    s0, s1 = torch.cuda.Stream(device=0), torch.cuda.Stream(device=1)

    def h2d(dst: Any, s: Any, a: Any) -> None:
        with torch.cuda.stream(s):
            dst.copy_(a, non_blocking=True)

    out = {"one_link_gbps": pinned_peak(gib),  # as bench_gpu_load measures it (CUDA events): the goal's base
           "one_link_wall_gbps": n / _timed(lambda: h2d(dst0, s0, src)) / 1e9,
           "gpu1_link_gbps": n / _timed(lambda: h2d(dst1, s1, src)) / 1e9,
           "both_links_gbps": 2 * n / _timed(lambda: (h2d(dst0, s0, src), h2d(dst1, s1, src2))) / 1e9,
           "p2p_1_to_0_gbps": n / _timed(lambda: dst0.copy_(dst1, non_blocking=True)) / 1e9}
    # host -> GPU 1 -> GPU 0: slots on GPU 1, a stream each; slot k's hop to GPU 0 overlaps slot k+1's upload
    slot, nslots = 32 << 20, 4
    slots = [torch.empty(slot, dtype=torch.uint8, device="cuda:1") for _ in range(nslots)]
    streams = [torch.cuda.Stream(device=1) for _ in range(nslots)]

    def relay() -> None:
        for i, off in enumerate(range(0, n, slot)):
            k, m = i % nslots, min(slot, n - off)
            with torch.cuda.device(1), torch.cuda.stream(streams[k]):
                slots[k][:m].copy_(src[off:off + m], non_blocking=True)
                dst0[off:off + m].copy_(slots[k][:m], non_blocking=True)

    out["relay_1_to_0_gbps"] = n / _timed(relay, reps=3) / 1e9
    dst0.fill_(0)
    relay()
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    if not torch.equal(dst0[:: 1 << 20].cpu(), src[:: 1 << 20]):
        raise SystemExit("bench_relay: the relay limit's own copy came out wrong; not reporting it")
    out["host_read_gbps"] = host_read_bw()
    for k, v in out.items():
        measured(k, v)
    return out  # its buffers go with this frame; the caller empties torch's cache


def host_read_bw(gib: int = 8, threads: int = 16) -> float:
    """GB/s of ``threads`` threads summing one host buffer (numpy releases the GIL), median of 3."""
    import numpy as np

    buf = np.ones(gib * GiB // 8, dtype=np.uint64)
    parts = np.array_split(buf, threads)

    def once() -> float:
        ts = [threading.Thread(target=p.sum) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return buf.nbytes / (time.perf_counter() - t0) / 1e9

    once()
    return statistics.median(once() for _ in range(3))


def engine_probe(gib: int = 8, reps: int = 3) -> dict[str, Any]:
    """The copy engine alone (this process, no sidecar): pinned host -> GPU 0, relays off and on, checked."""
    import torch

    from sllmfs.engine.copy_engine import CopyEngine, Relay, Segment

    n, piece = gib * GiB, 128 << 20
    want = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0")  # random bytes, made on the GPU
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.copy_(want)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    seg = Segment(src.data_ptr(), n, owners=(src,))
    rows = [[0, o, dst.data_ptr() + o, min(piece, n - o)] for o in range(0, n, piece)]
    out: dict[str, Any] = {"bytes": n}
    with CopyEngine(target="cuda", device=0, mode="register") as eng:
        eng.register(seg)
        for label, relay in (("off", None), ("on", Relay(peers=(1,)))):
            runs = []
            for _ in range(reps):
                dst.fill_(0)
                torch.cuda.synchronize(0)
                st = eng.copy([seg], rows, relay=relay)
                st["correct"] = bool(torch.equal(dst, want))
                runs.append(st)
            runs.sort(key=lambda r: r["seconds"])
            out[label] = runs[len(runs) // 2]
            out[label]["all_correct"] = all(r["correct"] for r in runs)
    del want, dst
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- loads through the sidecar

SIDECAR_ARGS = ["--mem-pool-size", "48GB", "--num-thread", "16", "--chunk-size", "64MiB"]


def build(work: Path, layers: int) -> tuple[Path, dict[str, float]]:
    from llama_shapes import write_checkpoint

    src, store = work / "src", work / "store"
    t0 = time.perf_counter()
    if not (src / "model.safetensors").exists():
        write_checkpoint(src, layers=layers)
    t1 = time.perf_counter()
    if not list(store.glob("models/*/variants/hf/manifest.json")):
        sh(sys.executable, "-m", "sllmfs", "save", "--model", MODEL, "--local-model-path", str(src),
           "--storage-path", str(store), "--force")
    return store, {"build_s": t1 - t0, "save_s": time.perf_counter() - t1}


def sidecar_status(sock: Path) -> dict[str, Any]:
    from sllmfs.client.client import connect

    with connect(str(sock)) as c:
        return c.status()


def gpu_loads(work: Path, store: Path, reps: int) -> dict[str, Any]:
    sock = work / "sllmfs.sock"
    out: dict[str, Any] = {}
    for setting in ("off", "auto"):
        os.environ["SLLMFS_RELAY"] = setting
        proc = start_sidecar(store, sock, work / f"sidecar-{setting}.log", SIDECAR_ARGS)
        try:
            runs = []
            for i in range(1 + reps):  # the first fills the memory tier; the rest are memory-tier hits
                res = sh(sys.executable, str(HERE / "bench_gpu_load.py"), "--client", str(sock), "sidecar",
                         str(store))
                run = json.loads(res.split("RESULT ", 1)[1])
                run["fill"] = i == 0
                runs.append(run)
                e = run["engine"]
                print(f"  relay={setting:<4} {'fill' if i == 0 else 'hit '} {run['gbps']:6.1f} GB/s e2e "
                      f"({run['seconds']:.3f} s), copy {e.get('gbps', 0):6.1f} GB/s, relayed "
                      f"{e.get('relay_bytes', 0) / 1e9:5.2f} GB, bad tensors {run['mismatches']}", flush=True)
            status = sidecar_status(sock)
        finally:
            stop(proc)
        hits = sorted(runs[1:], key=lambda r: r["seconds"])
        lines = (work / f"sidecar-{setting}.log").read_text().splitlines()
        out[setting] = {"runs": runs, "median": hits[len(hits) // 2] if hits else runs[0],
                        "mismatches": sum(r["mismatches"] for r in runs), "relay_status": status.get("relay"),
                        "sidecar_copies": [x[-220:] for x in lines if "gpu copy model=" in x or "relay" in x][-12:]}
    os.environ.pop("SLLMFS_RELAY", None)
    return out


def main_gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    need_two_peer_gpus()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"bench": "relay", "host": platform.node(), "gpus": [torch.cuda.get_device_name(i)
                              for i in range(torch.cuda.device_count())], "torch": torch.__version__}
    t0 = time.perf_counter()
    result["limits"] = lim = gpu_limits()
    torch.cuda.empty_cache()  # the limits' 16 GiB of GPU buffers: the loads need GPU 0's memory
    result["limits_s"] = time.perf_counter() - t0
    print("limits: " + ", ".join(f"{k} {v:.1f}" for k, v in lim.items()), flush=True)
    result["engine_probe"] = probe = engine_probe()
    for label in ("off", "on"):
        p = probe[label]
        print(f"engine alone, relay {label}: {p['gbps']:.1f} GB/s ({p['gbps'] / lim['one_link_gbps']:.2f} x one link),"
              f" correct {p['all_correct']}, relays {p['relays']}", flush=True)
    store, result["prepare"] = build(work, args.layers)
    result["stored_bytes"] = sum(f.stat().st_size for f in stored_files(store))
    result["loads"] = loads = gpu_loads(work, store, args.reps)
    peak = lim["one_link_gbps"]
    summary = {}
    for setting, r in loads.items():
        m = r["median"]
        e = m["engine"]
        summary[setting] = {"e2e_gbps": m["gbps"], "e2e_x_one_link": m["gbps"] / peak,
                            "copy_gbps": e.get("gbps", 0.0), "copy_x_one_link": e.get("gbps", 0.0) / peak,
                            "e2e_x_both_links": m["gbps"] / lim["both_links_gbps"],
                            "relay_bytes": e.get("relay_bytes", 0), "relay_peers": e.get("relay_peers", ""),
                            "relay_path_gbps": relay_rate(e.get("relay_peers", "")), "mismatches": r["mismatches"]}
    result["summary"] = summary
    return result


def relay_rate(peers: str) -> float:
    """GB/s the relays carried while busy, from the reply's "bus:bytes:busy_s:staging[:why]" entries."""
    carried = busy = 0.0
    for entry in filter(None, peers.split(";")):
        parts = entry.split(":")  # the bus id has colons itself: count from its end (4 fields of its own)
        b, s = float(parts[3]), float(parts[4])
        carried, busy = carried + b, max(busy, s)
    return carried / busy / 1e9 if busy else 0.0


def print_gpu(result: dict[str, Any]) -> None:
    lim = result["limits"]
    print(f"\n{result['stored_bytes'] / 1e9:.2f} GB into GPU 0. Limits (GB/s): one link {lim['one_link_gbps']:.1f}, "
          f"GPU 1 link {lim['gpu1_link_gbps']:.1f}, both links {lim['both_links_gbps']:.1f}, "
          f"GPU1->GPU0 {lim['p2p_1_to_0_gbps']:.1f}, host->GPU1->GPU0 {lim['relay_1_to_0_gbps']:.1f}, "
          f"host memory read {lim['host_read_gbps']:.1f}")
    print(f"{'relay':<7}{'e2e GB/s':>10}{'x link':>8}{'copy GB/s':>11}{'x link':>8}{'relayed GB':>12}"
          f"{'relay GB/s':>12}{'bad':>5}")
    for setting, s in result["summary"].items():
        print(f"{setting:<7}{s['e2e_gbps']:>10.1f}{s['e2e_x_one_link']:>8.2f}{s['copy_gbps']:>11.1f}"
              f"{s['copy_x_one_link']:>8.2f}{s['relay_bytes'] / 1e9:>12.2f}{s['relay_path_gbps']:>12.1f}"
              f"{s['mismatches']:>5}")
    print("goal: copy into GPU 0 >= 1.8 x one link's pinned peak with relays (e2e adds connect, acquire, handles)")
    cost = (result["loads"]["auto"].get("relay_status") or {}).get("peers", {})
    for bus, c in cost.items():
        print(f"cost to {bus}: {c['loads']} loads, {c['bytes'] / 1e9:.2f} GB carried, link busy "
              f"{c['busy_seconds']:.3f} s, staging {c['staging_bytes'] >> 20} MiB while a copy runs"
              + (f" (last: {c['last_skipped']})" if c["last_skipped"] else ""))


# ---------------------------------------------------------------- SGLang

PROMPTS = [[1, 10, 11, 12, 13], [1, 5, 6, 7]]


def sglang_child(model_path: str, load_format: str, extra: str) -> None:
    """A fresh process: an SGLang engine (TP=1, GPU 0), greedy ids of PROMPTS (no tokenizer: ids in, ids out)."""
    import sglang

    kw: dict[str, Any] = dict(model_path=model_path, load_format=load_format, tp_size=1, disable_cuda_graph=True,
                              mem_fraction_static=0.5, skip_tokenizer_init=True, sampling_backend="pytorch",
                              attention_backend="triton", log_level="info", random_seed=0)
    if extra:
        kw["model_loader_extra_config"] = extra
    llm = sglang.Engine(**kw)
    out = llm.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": 8, "temperature": 0.0,
                                                           "ignore_eos": True})
    llm.shutdown()
    print("RESULT " + json.dumps({"ids": [o["output_ids"] for o in out]}), flush=True)


def run_sglang(label: str, model_path: str, load_format: str, logs: Path, extra: str = "") -> dict[str, Any]:
    import re

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--sglang-child", model_path, load_format, extra],
                          capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    (logs / (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") + ".log")).write_text(log)
    res: dict[str, Any] = {"label": label, "rc": proc.returncode, "wall_s": time.perf_counter() - t0}
    m = re.findall(r"Load weight end\. elapsed=([0-9.]+) s", log)
    res["load_weight_s"] = float(m[-1]) if m else None
    path = re.findall(r"sllmfs: loaded .* by the ([a-z-]+) path in ([0-9.]+) s", log)
    if path:
        res["sllm_path"], res["sllm_load_s"] = path[-1][0], float(path[-1][1])
    for line in log.splitlines():
        if line.startswith("RESULT "):
            res.update(json.loads(line[7:]))
    if proc.returncode:
        res["error_tail"] = log.splitlines()[-15:]
    print(f"  {label:<28} rc={proc.returncode} load_weight_s={res['load_weight_s']} path={res.get('sllm_path')} "
          f"wall={res['wall_s']:.1f}s", flush=True)
    return res


def main_sglang(args: argparse.Namespace) -> dict[str, Any]:
    """SGLang's load phase with relays off and on, greedy ids against its default loader."""
    need_two_peer_gpus()
    work = Path(args.workdir)
    store, prep = build(work, args.layers)
    src, sock, mnt = work / "src", work / "sgl.sock", work / "mnt"
    logs = out_dir(args.out) / "relay-sglang-logs"
    logs.mkdir(parents=True, exist_ok=True)
    view = str(mnt / MODEL)
    runs: dict[str, Any] = {"default": run_sglang("default (source folder)", str(src), "auto", logs)}
    for setting in ("off", "auto"):
        os.environ["SLLMFS_RELAY"] = setting
        proc = start_sidecar(store, sock, logs / f"sidecar-{setting}.log", [*SIDECAR_ARGS, "--mount", str(mnt)])
        try:
            if setting == "off":  # the per-rank variant, written back by the first sllm start
                runs["sllm_any_tp"] = run_sglang("sllm any-TP + write-back", view, "sllm", logs,
                                                 extra='{"sllm_write_back": "sync"}')
            from sllmfs.store.store import Store

            for key in Store(store).get(MODEL).variants:
                if key.startswith("sglang."):
                    sh(sys.executable, "-m", "sllmfs", "load", "--model", MODEL, "--variant", key, "--warm",
                       "--socket", str(sock))
            run = runs[f"sllm_fast_relay_{setting}"] = run_sglang(f"sllm fast, relay {setting}", view, "sllm", logs)
            run["relay_status"] = sidecar_status(sock).get("relay")
        finally:
            stop(proc)
        lines = (logs / f"sidecar-{setting}.log").read_text().splitlines()
        run["sidecar_copies"] = [x[-220:] for x in lines if "gpu copy model=" in x or "relay into=" in x][-12:]
    os.environ.pop("SLLMFS_RELAY", None)
    ref = runs["default"].get("ids")
    return {"bench": "relay-sglang", "prepare": prep, "runs": runs,
            "identical": bool(ref) and all(r.get("ids") == ref for r in runs.values())}


# ---------------------------------------------------------------- tiny (CPU, stand-in runtime)

def main_tiny(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import save_file

    from sllmfs.client.client import connect
    from sllmfs.store.format import digest
    from tests.support.cudart import FAKE_PEER_CUDART

    work = Path(args.workdir if args.workdir != DEFAULT_WORK else tempfile.mkdtemp(prefix="sllmfs-relay-tiny-"))
    work.mkdir(parents=True, exist_ok=True)
    lib = work / "libfakepeers.so"
    (work / "fake.c").write_text(FAKE_PEER_CUDART)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(work / "fake.c")], check=True)
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.w": rng.integers(0, 256, (13 << 20) + 4096 * i, dtype=np.uint8) for i in range(48)}
    src, store = work / "src", work / "store"
    src.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    sh(sys.executable, "-m", "sllmfs", "save", "--model", MODEL, "--local-model-path", str(src),
       "--storage-path", str(store), "--force")
    os.environ["SLLMFS_CUDART"] = str(lib)
    sock = work / "sllmfs.sock"
    result: dict[str, Any] = {"bench": "relay-tiny", "runtime": "stand-in (tests/support/cudart.py)", "loads": {}}
    for setting in ("off", "auto"):
        os.environ["SLLMFS_RELAY"] = setting
        proc = start_sidecar(store, sock, work / f"sidecar-{setting}.log", ["--mem-pool-size", "2GiB"])
        try:
            deadline = time.monotonic() + 30
            while "0000:00:07.0" not in (work / f"sidecar-{setting}.log").read_text():
                if time.monotonic() > deadline:
                    raise SystemExit("bench_relay --tiny: the sidecar started no engine on the stand-in GPU 1")
                time.sleep(0.1)
            runs = [tiny_load(connect, str(sock), digest) for _ in range(3)]
            status = sidecar_status(sock)
        finally:
            stop(proc)
        result["loads"][setting] = {"runs": runs, "relay_status": status.get("relay")}
        for r in runs:
            print(f"  relay={setting:<4} {r['bytes'] / 1e6:.0f} MB, relayed {r['relay_bytes'] / 1e6:.0f} MB, "
                  f"bad tensors {r['mismatches']}", flush=True)
    return result


def tiny_load(connect: Any, sock: str, digest: Any) -> dict[str, Any]:
    """One load into a memfd playing GPU 0 (the stand-in runtime maps it in the sidecar through the handle)."""
    import numpy as np

    from tests.support.cudart import memfd_handle

    with connect(sock) as c, c.acquire(MODEL) as lease:
        lease.wait(timeout=60)
        views = lease.tensors()
        total = sum(r.nbytes for r in lease.entries.values())
        fd = os.memfd_create("stand-in-gpu0")
        try:
            os.ftruncate(fd, total)
            mem = np.memmap(f"/proc/self/fd/{fd}", dtype=np.uint8, mode="r+", shape=(total,))
            mem[:] = 0xEE
            handle = memfd_handle(fd, total)
            at, where, pieces = 0, {}, []
            for name, ref in lease.entries.items():
                pieces.append([ref.partition, ref.offset, 0, at, ref.nbytes])
                where[name] = (at, ref.nbytes)
                at += ref.nbytes
            t0 = time.perf_counter()
            stats = lease.copy_to_gpu([{"handle": handle, "size": total, "device": "0000:00:06.0"}], pieces,
                                      timeout=60)
            seconds = time.perf_counter() - t0
            bad = [n for n, (a, k) in where.items()
                   if digest(memoryview(mem[a:a + k])) != digest(memoryview(views[n].numpy().view(np.uint8)))]
            del mem
        finally:
            os.close(fd)
    return {"bytes": total, "seconds": seconds, "mismatches": len(bad), "relay_bytes": stats.get("relay_bytes", 0),
            "relay_peers": stats.get("relay_peers", ""), "direct_bytes": stats.get("direct_bytes", total)}


DEFAULT_WORK = "/tmp/sllmfs-relay"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sglang-child":
        sglang_child(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=DEFAULT_WORK)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="fresh client processes per setting (median reported)")
    ap.add_argument("--out", default=None, help="where the JSON goes (default $OUT, else bench/results/)")
    ap.add_argument("--tiny", action="store_true", help="CPU machine: the stand-in runtime, a small model")
    ap.add_argument("--sglang", action="store_true", help="SGLang's load phase with relays off and on")
    args = ap.parse_args()
    command = "python bench/bench_relay.py " + " ".join(sys.argv[1:])
    t0 = time.perf_counter()
    if args.tiny:
        result, name = main_tiny(args), "relay-tiny"
        bad = sum(r["mismatches"] for s in result["loads"].values() for r in s["runs"])
        relayed = sum(r["relay_bytes"] for r in result["loads"]["auto"]["runs"])
        ok = not bad and relayed > 0 and not any(r["relay_bytes"] for r in result["loads"]["off"]["runs"])
        print(f"\ntiny: bad tensors {bad}; relayed with auto {relayed / 1e6:.0f} MB, with off 0: "
              f"{'ok' if ok else 'WRONG'} (stand-in runtime: no speeds)")
    elif args.sglang:
        result, name = main_sglang(args), "relay-sglang"
        for label, r in result["runs"].items():
            print(f"{label:<24} load_weight_s={r.get('load_weight_s')} path={r.get('sllm_path')} rc={r['rc']}")
        print(f"greedy ids identical to the default loader: {result['identical']}")
    else:
        result, name = main_gpu(args), "relay"
        print_gpu(result)
    result["command"] = command
    result["wall_s"] = time.perf_counter() - t0
    dest = out_dir(args.out) / f"{name}-{time.strftime('%Y%m%d-%H%M')}.json"
    dest.write_text(json.dumps(result, indent=1, default=str))
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
