"""bench_sglang.py --sizes 7b,32b --tp 2 [--links]: tensor parallelism over several GPUs, in one run.

For each size (a Llama-2-7B-shaped 13.48 GB and a Qwen2.5-32B-shaped 65.5 GB bf16 checkpoint, random
weights) SGLang starts with TP=N: the default loader, sllm's any-TP first start (write-back), sllm's
fast path from the memory tier and sllm cold (memory tier evicted, page cache dropped). Greedy ids
from token ids must be identical across them. Each rank's load phase and copy GB/s, when the ranks'
copies ran (their overlap) and the aggregate GB/s over that window are recorded next to the limits
measured in the same run: each GPU's pinned H2D peak, all GPUs' pinned peak at once and host memory's
read bandwidth.

--links (the first size): sllmfs.integrations.torch.load_dict and transformers load_model with a
device map over every GPU, from the memory tier, bytes checked against the lease (multi_gpu_load.py).

--save-cli (7b): `sllmfs save --backend sglang --tensor-parallel-size N` beside the running sidecar
(its CUDA contexts on every GPU), then again (a complete set: no engine).

Disk and memory are planned up front (the x2 machine has ~64 GiB of disk): the source folder is kept
only where three copies fit, else it is removed once saved (the default loader runs first, from it);
where even the store's two copies (hf + per-rank) do not fit on disk, the store goes to tmpfs
when memory allows (then "cold" reads no disk: said in the JSON), else the size is skipped with why.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from limits import drop_caches
from links import overlap, per_pid, sidecar_copies
from llama_shapes import SHAPES, checkpoint_bytes, write_checkpoint

GB = 1e9
SLACK = 8 * GB  # beside what the bench writes: logs, SGLang's caches, a filesystem's reserve


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def plan(size: str, work: Path, *, dims: dict[str, object] | None = None) -> dict[str, object]:
    """Where the source and the store go for ``size``, from the free disk and memory now."""
    arch, shape = SHAPES[size]
    dims = dims or shape
    b = checkpoint_bytes(dims)
    work.mkdir(parents=True, exist_ok=True)
    disk, mem = shutil.disk_usage(work).free, _mem_available()
    out: dict[str, object] = {"size": size, "arch": arch, "bytes": b, "disk_free": disk, "mem_available": mem}
    if disk >= 3 * b + SLACK:  # source + hf + per-rank variants
        out.update(store=str(work / "store"), keep_source=True, cold="disk (page cache dropped)")
    elif disk >= 2 * b + SLACK:  # the source goes once saved: the default loader reads the mount
        out.update(store=str(work / "store"), keep_source=False, cold="disk (page cache dropped)")
    elif mem >= 3 * b + 42 * GB:
        # a tmpfs of our own holds the source while it is saved, then hf + per-rank (2b); the memory
        # tier one copy (b); the write-back's host snapshot shrinks as the per-rank files grow (so b
        # for both); SGLang's processes the rest
        out.update(store=str(work / "tmpfs" / "store"), tmpfs_bytes=int(2 * b + 4 * GB), keep_source=False,
                   cold="tmpfs store (memory tier evicted; no disk read: the disk could not hold hf + per-rank)")
    else:
        out["skip"] = (f"{size}: needs {(2 * b + SLACK) / GB:.0f} GB of disk at {work} (free {disk / GB:.0f}) or "
                       f"{(3 * b + 42 * GB) / GB:.0f} GB of available memory (have {mem / GB:.0f})")
    # the memory tier: hf and the per-rank state side by side when memory allows, else one copy
    out["pool_bytes"] = int(b + 2 * GB if "tmpfs_bytes" in out else max(b + 2 * GB, min(2 * b + 2 * GB, mem - 40 * GB)))
    return out


def _mount_tmpfs(where: Path, nbytes: int) -> None:
    """A tmpfs sized for this run (/dev/shm is half the memory: too small for 2 x 65.5 GB)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(where):
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench: cannot mount a {nbytes / GB:.0f} GB tmpfs at {where} ({proc.stderr.strip()}); "
                         "run as root or free disk for the store")
    atexit.register(subprocess.run, ["umount", "--lazy", str(where)], check=False)  # ours: the memory goes back


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sllmfs", *args], capture_output=True, text=True, timeout=timeout)


def sized(size: str, work: Path, logs: Path, tp: int, *, links: bool, save_cli: bool,
          saved: Callable[[dict[str, object]], None]) -> dict[str, object]:
    from bench_sglang import Sidecar, run_engine

    p = plan(size, work / size)
    part: dict[str, object] = {"plan": p, "tp": tp}
    if "skip" in p:
        print(f"bench: skipping {p['skip']}", flush=True)
        return part
    b = int(p["bytes"])  # type: ignore[call-overload]
    store, model = Path(str(p["store"])), f"bench/{size}"
    src = work / size / "src"
    if "tmpfs_bytes" in p:
        _mount_tmpfs(store.parent, int(p["tmpfs_bytes"]))  # type: ignore[call-overload]
        src = store.parent / "src"
    runs: dict[str, object] = {}
    part["runs"] = runs
    side: Any = None

    def engine(key: str, label: str, path: str, fmt: str, extra: str = "") -> None:
        mark = side.log.stat().st_size if side else 0
        r = run_engine(label, path, fmt, logs, extra=extra, generate="ids")
        if side:
            with open(side.log, errors="replace") as f:
                f.seek(mark)
                r["sidecar_copies"] = per_pid(sidecar_copies(f.read()))
        runs[key] = r
        saved(part)

    t0 = time.perf_counter()
    if not (src / "config.json").exists():
        write_checkpoint(src, dims=SHAPES[size][1], arch=str(p["arch"]), shard_bytes=5 << 30)
    part["write_s"] = time.perf_counter() - t0
    # the default loader first, from the source folder in a warm page cache (or tmpfs): the FUSE
    # view would cap it at the daemon's ~2 GB/s, and where the source cannot stay it goes after the save
    subprocess.run(["cat", *map(str, sorted(src.glob("*.safetensors")))], stdout=subprocess.DEVNULL, check=True)
    if not links:
        part["limits"] = limits_run(tp)
    engine("default", "default (source folder)", str(src), "auto")
    t0 = time.perf_counter()
    store.parent.mkdir(parents=True, exist_ok=True)
    proc = _run("save", "--model", model, "--local-model-path", str(src), "--storage-path", str(store), "--force")
    if proc.returncode:
        raise SystemExit(f"bench: sllmfs save failed:\n{proc.stderr[-2000:]}")
    part["save_s"] = time.perf_counter() - t0
    if not p["keep_source"]:
        shutil.rmtree(src)
    side = Sidecar(store, work / f"{size}.sock", work / f"mnt-{size}", logs / f"sidecar-{size}.log",
                   pool=f"{int(p['pool_bytes']) >> 20}MiB")  # type: ignore[call-overload]
    view = str(side.mnt / "bench" / size)
    try:
        if links:
            part["links"] = links_run(side, model, tp, logs)
            part["limits"] = part["links"]["limits"]  # type: ignore[index]
            saved(part)
            _print_links(part["links"])  # type: ignore[arg-type]
        engine("sllm_any_tp_first", "sllm any-TP + write-back", view, "sllm", '{"sllm_write_back": "sync"}')
        part["status_after_any_tp"] = _tier(side.sock, model)  # #22 item 3: hf filled once for every rank
        keys = sorted(k for k in _variants(store, model) if k.startswith(f"sglang.tp{tp}."))
        part["rank_variants"] = keys
        side.cli("evict", "--model", model)  # hf out: the memory tier holds the per-rank state alone
        for k in keys:
            side.cli("load", "--model", model, "--variant", k, "--warm")
        engine("sllm_fast_memory_tier", "sllm fast, memory tier", view, "sllm")
        side.cli("evict", "--model", model)
        part["cold_dropped_page_cache"] = drop_caches()
        engine("sllm_fast_cold", f"sllm fast, cold: {p['cold']}", view, "sllm")
        if save_cli and keys:
            part["save_backend_sglang"] = save_cli_run(side, store, model, keys, tp)
            saved(part)
    finally:
        side.stop()
    summarize(part, b)
    return part


def _tier(sock: Path, model: str) -> dict[str, object]:
    """What the memory tier holds of ``model`` (from `sllmfs status --json`) and its fill counters."""
    proc = _run("status", "--json", "--socket", str(sock))
    if proc.returncode:
        return {"error": proc.stderr.strip()[-300:]}
    st = json.loads(proc.stdout)
    rows = [v for m in st["models"] if m["name"] == model for v in m["variants"]]
    return {"resident": [{"variant": v["variant"], "bytes": v["bytes"], "state": v["state"]} for v in rows],
            "hf_copies": sum(1 for v in rows if v["variant"] == "hf"), "memory_used": st["memory"]["used"],
            "counters": {k: st["counters"].get(k) for k in ("hits", "misses", "bytes_filled")}}


def _variants(store: Path, model: str) -> list[str]:
    from sllmfs.store.store import Store

    return list(Store(store).get(model).variants)


def save_cli_run(side: Any, store: Path, model: str, keys: list[str], tp: int) -> dict[str, object]:
    """#22 item 1 on the GPUs: the per-rank state removed, then `save --backend sglang` beside the sidecar."""
    out: dict[str, object] = {"removed_first": [_run("rm", "--model", model, "--variant", k, "--yes", "--storage-path",
                                                     str(store)).returncode == 0 for k in keys]}
    for attempt in ("first", "again"):
        t0 = time.perf_counter()
        proc = _run("save", "--backend", "sglang", "--model", model, "--tensor-parallel-size", str(tp),
                    "--storage-path", str(store), timeout=600)
        out[attempt] = {"rc": proc.returncode, "seconds": time.perf_counter() - t0,
                        "stdout": proc.stdout.splitlines()[-8:], "stderr_tail": proc.stderr.splitlines()[-6:]}
        print(f"  save --backend sglang ({attempt}) rc={proc.returncode} {time.perf_counter() - t0:.1f}s "
              f"{proc.stdout.splitlines()[-tp:]}", flush=True)
    out["rank_variants_after"] = sorted(k for k in _variants(store, model) if k.startswith(f"sglang.tp{tp}."))
    out["complete"] = out["rank_variants_after"] == keys
    return out


def limits_run(tp: int) -> dict[str, object]:
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_sglang.py")), "--child-links",
                           json.dumps({"tp": tp})], capture_output=True, text=True, timeout=300)
    return _result(proc)["limits"]  # type: ignore[no-any-return]


def links_run(side: Any, model: str, tp: int, logs: Path) -> dict[str, object]:
    socket = str(side.sock)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_sglang.py")), "--child-links",
                           json.dumps({"tp": tp, "model": model, "socket": socket})],
                          capture_output=True, text=True, timeout=400)
    (logs / "links.log").write_text(proc.stdout + proc.stderr)
    return _result(proc)


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise SystemExit(f"bench: the links child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


# -- the table ------------------------------------------------------------------------------------


def _print_links(found: dict[str, object]) -> None:
    lim = found.get("limits") or {}
    assert isinstance(lim, dict)
    twice = lim.get("twice_single_gbps")
    print(f"\nload_dict / load_model from the memory tier; limits {json.dumps(lim)}")
    rows = dict(found.get("load_dict") or {})  # type: ignore[call-overload]
    if found.get("load_model"):
        rows["transformers load_model, every GPU, sidecar copies"] = found["load_model"]
    for label, r in rows.items():
        if "error" in r:
            print(f"  {label:<52} failed: {r['error']}")
            continue
        copy = r.get("copy_gbps")
        ratio = f"{copy / twice:.2f}" if copy and isinstance(twice, float) else "-"
        print(f"  {label:<52} {r['gbps']:6.1f} GB/s call, {copy or 0:6.1f} copy ({ratio} of 2x peak), at once "
              f"{r.get('all_at_once_fraction') or 0:.2f}, on {r.get('placed')}, "
              f"bytes identical {r.get('bytes_identical')}")


def summarize(part: dict[str, object], nbytes: int) -> None:
    lim = part.get("limits") or {}
    assert isinstance(lim, dict)
    twice, together, host = lim.get("twice_single_gbps"), lim.get("pinned_together_gbps"), lim.get("host_read_gbps")
    runs = part.get("runs") or {}
    assert isinstance(runs, dict)
    ref = next(iter(runs.values()), {}).get("ids")
    part["greedy_ids_identical"] = bool(ref) and all(r.get("ids") == ref for r in runs.values())
    print(f"\n{part['plan']['size']}: {nbytes / GB:.2f} GB, TP={part['tp']}; limits: 2x one GPU's pinned peak "  # type: ignore[index]
          f"{twice} GB/s, both at once {together}, host read {host}")
    # "x1 GPU": the aggregate over one GPU's pinned peak (the goal: >= 1.8); "/both": over every GPU's
    # pinned peak measured at once (what the links and host memory allow together)
    print(f"{'run':<24}{'path':>8}{'rank load s':>14}{'load GB/s':>12}{'copy GB/s':>12}{'agg GB/s':>10}"
          f"{'x1 GPU':>8}{'/2x peak':>9}{'/both':>7}{'/host':>7}{'at once':>8}")
    tp = int(part["tp"])  # type: ignore[call-overload]
    for key, r in runs.items():
        ranks = r.get("ranks") or {}
        for v in ranks.values():  # each rank's load phase moves its 1/tp of the bytes
            if v.get("load_weight_s"):
                v["load_gbps"] = nbytes / tp / float(v["load_weight_s"]) / GB
        windows = [(float(v["copy_start"]), float(v["copy_end"]), int(float(v["copy_gb"]) * GB))
                   for v in ranks.values() if "copy_start" in v]
        ov = overlap(windows) if len(windows) > 1 else {}
        if not ov and len(r.get("sidecar_copies") or []) > 1:
            ov = overlap([tuple(w) for w in r["sidecar_copies"]])  # type: ignore[misc]
        r["aggregate"] = ov
        agg = ov.get("aggregate_gbps")
        load = "/".join(f"{v.get('load_weight_s', 0):.2f}" for v in ranks.values())
        load_rate = "/".join(f"{v.get('load_gbps', 0):.1f}" for v in ranks.values())
        rate = "/".join(f"{v.get('copy_gbps', 0):.1f}" for v in ranks.values())
        single = twice / tp if isinstance(twice, float) else None
        ratio = {k: (agg / x if agg and isinstance(x, float) else None) for k, x in
                 (("one_gpu", single), ("twice", twice), ("together", together), ("host", host))}
        r["aggregate_ratio"] = ratio
        fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else "-"  # noqa: E731
        print(f"{key:<24}{str(r.get('sllm_path') or 'default'):>8}{load:>14}{load_rate:>12}{rate:>12}{fmt(agg):>10}"
              f"{fmt(ratio['one_gpu']):>8}{fmt(ratio['twice']):>9}{fmt(ratio['together']):>7}{fmt(ratio['host']):>7}"
              f"{fmt(ov.get('all_at_once_fraction')):>8}")
    print(f"greedy ids identical across runs: {part['greedy_ids_identical']}")


def cpu_check(work: Path, logs: Path) -> dict[str, object]:
    """What runs without a GPU, on a tiny Qwen2-shaped checkpoint: the plan, the sharded write, the
    save, a sidecar with its mount, and the links child (load_dict to the host, bytes checked)."""
    from bench_sglang import Sidecar

    dims: dict[str, object] = dict(vocab=512, hidden=128, inter=256, layers=4, heads=4, kv_heads=2, bias=True)
    p = plan("32b", work / "cpu", dims=dims)
    src, store = work / "cpu" / "src", work / "cpu" / "store"
    nbytes = write_checkpoint(src, dims=dims, arch="qwen2", shard_bytes=256 << 10)
    proc = _run("save", "--model", "bench/cpu", "--local-model-path", str(src), "--storage-path", str(store),
                "--force")
    if proc.returncode:
        raise SystemExit(f"bench: sllmfs save failed:\n{proc.stderr[-2000:]}")
    side = Sidecar(store, work / "cpu.sock", work / "mnt-cpu", logs / "sidecar-cpu.log", pool="256MiB")
    try:
        got = links_run(side, "bench/cpu", 2, logs)
        tier = _tier(side.sock, "bench/cpu")
        copies = sidecar_copies(side.log.read_text())
    finally:
        side.stop()
    return {"plan": p, "bytes": nbytes, "shards": len(list(src.glob("*.safetensors"))), "links": got,
            "tier": tier, "sidecar_gpu_copies": len(copies)}
