"""Launch to first token: a real SGLang engine in a fresh process, every phase of its start.

    source bench/gpu_setup.sh && python bench/bench_coldstart.py --workdir /tmp/cs [--layers 32]
    ... --part pairs --pairs 3      (#21.3: is sllm ready sooner, by its load phase? one ~8 min call)
    ... --part pairs --pairs 1 --with-mount-default   (+ the default loader on the mount: whose seconds?)

Each start is a new Python process (what `launch_server` costs a user), CUDA graphs on and the
default memory fraction. Wall clocks from the parent: process start, `import sglang`, engine ready,
first token (a 1-token greedy generate) — and the engine's own "Engine startup timings" line
(load_weight, kv_cache_allocation, cuda_graph, scheduler_e2e). "Fresh machine" gives the engine a
new, empty HOME, XDG cache and TORCHINDUCTOR_CACHE_DIR, so every kernel cache starts empty; the
same directories reused make the "warm machine". After the fresh start, what the engine wrote into
those directories is listed (the kernel caches a later change keeps in the store). Greedy ids of
every start must be identical; results go to --out as JSON with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_T_FILE = time.time()  # when this process began running this file (SGLang's spawned children run it first)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_sglang import PROMPTS, Sidecar  # noqa: E402
from limits import drop_caches  # noqa: E402

MARKS_ENV = "SLLMFS_BENCH_MARKS"  # a start's marks file: one JSON line per mark, from each of its processes
MEMINFO = ("MemAvailable", "Cached", "Dirty", "HugePages_Free")
TIMINGS = re.compile(r"Engine startup timings \(s\): load_weight=([0-9.]+), kv_cache_allocation=([0-9.]+), "
                     r"scheduler_e2e=([0-9.]+), cuda_graph=\{([^}]*)\}")


def mark(what: str, t: float | None = None) -> None:
    """Append one time mark of this start (any of its processes) to the start's marks file."""
    path = os.environ.get(MARKS_ENV)
    if not path:
        return
    line = json.dumps({"what": what, "t": time.time() if t is None else t, "pid": os.getpid()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines from several processes never interleave
    finally:
        os.close(fd)


def watch_scheduler() -> None:
    """In SGLang's spawned children: mark when the scheduler module is imported and Scheduler() begins
    (where SGLang's scheduler_e2e clock starts), without importing anything sooner than SGLang does."""
    from sllmfs.integrations.common.after_import import after_import

    def hooked(module: Any) -> None:
        mark("scheduler_module")
        init = module.Scheduler.__init__

        def timed(self: Any, *args: Any, **kwargs: Any) -> None:
            mark("scheduler_init")
            init(self, *args, **kwargs)

        module.Scheduler.__init__ = timed

    after_import("sglang.srt.managers.scheduler", hooked)


def watch_engine(engine: Any) -> None:
    """In the launching process: mark SGLang's launch of its processes (after ServerArgs), the scheduler
    spawn and the tokenizer manager's end (SGLang logs 'No chat template found' there)."""
    launch, spawn, tokenizer = (engine._launch_subprocesses.__func__, engine._launch_scheduler_processes.__func__,
                                engine.init_tokenizer_manager_func)

    def launched(cls: Any, *args: Any, **kwargs: Any) -> Any:
        mark("launch")
        return launch(cls, *args, **kwargs)

    def spawned(cls: Any, *args: Any, **kwargs: Any) -> Any:
        mark("spawn")
        return spawn(cls, *args, **kwargs)

    def tokenizer_made(*args: Any, **kwargs: Any) -> Any:
        out = tokenizer(*args, **kwargs)
        mark("tokenizer_manager")
        return out

    engine._launch_subprocesses = classmethod(launched)
    engine._launch_scheduler_processes = classmethod(spawned)
    engine.init_tokenizer_manager_func = staticmethod(tokenizer_made)


def phases(marks: list[dict[str, Any]], res: dict[str, Any]) -> dict[str, float]:
    """Where the time outside SGLang's scheduler clock goes, from a start's marks (seconds).
    spawn_s: Engine() to the scheduler's spawn (ServerArgs, plugins); child_python_s: spawn to the child
    running this file; child_imports_s: to SGLang's scheduler module imported; to_scheduler_s: to
    Scheduler() (load_plugins, configure, publish); after_scheduler_s: Scheduler() + scheduler_e2e to ready."""
    first: dict[str, dict[str, Any]] = {}
    for m in marks:
        first.setdefault(m["what"], m)
    need = ("engine", "spawn", "scheduler_init", "ready")
    if any(k not in first for k in need):
        return {}
    sched_pid = first["scheduler_init"]["pid"]
    child = next((m for m in marks if m["what"] == "child_main" and m["pid"] == sched_pid), None)
    t = {k: float(v["t"]) for k, v in first.items()}
    out = {"spawn_s": t["spawn"] - t["engine"], "scheduler_init_at_s": t["scheduler_init"] - t["engine"]}
    if "launch" in t:
        out["server_args_s"] = t["launch"] - t["engine"]
    if "tokenizer_manager" in t:
        out["tokenizer_manager_to_scheduler_s"] = t["scheduler_init"] - t["tokenizer_manager"]
    if child is not None and "scheduler_module" in t:
        out.update(child_python_s=float(child["t"]) - t["spawn"],
                   child_imports_s=t["scheduler_module"] - float(child["t"]),
                   to_scheduler_s=t["scheduler_init"] - t["scheduler_module"])
    if res.get("scheduler_e2e_s") is not None:
        out["after_scheduler_s"] = t["ready"] - t["scheduler_init"] - float(res["scheduler_e2e_s"])
    return out


def meminfo_gb() -> dict[str, float]:
    """The host's memory at a start (a start slowed by page-cache eviction shows here)."""
    got: dict[str, float] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in MEMINFO:
                n = int(rest.split()[0])
                got[name] = round(n * (2 << 20 if name.startswith("HugePages") else 1024) / 1e9, 2)
    return got


def child(model_path: str, load_format: str, extra: str) -> None:
    """Runs in the fresh process: times the import, the engine, the first token and the greedy ids."""
    t_proc = float(os.environ["SLLMFS_BENCH_SPAWN"])
    marks = {"python_start_s": time.time() - t_proc}
    t = time.perf_counter()
    import sglang

    marks["import_sglang_s"] = time.perf_counter() - t
    import sglang.srt.server_args  # noqa: F401  (every start imports these: not the plugin's cost)
    import torch  # noqa: F401
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.plugins import load_plugins

    watch_engine(Engine)
    t = time.perf_counter()  # what our plugin adds outside the load phase (the Engine's own call is then a no-op)
    load_plugins()
    marks["plugins_s"] = time.perf_counter() - t
    kw: dict[str, Any] = dict(model_path=model_path, load_format=load_format, skip_tokenizer_init=True,
                              sampling_backend="pytorch", attention_backend="triton", random_seed=0, log_level="info")
    if extra:
        kw["model_loader_extra_config"] = extra
    kw.update(json.loads(os.environ.get("SLLMFS_BENCH_ENGINE_KW", "{}")))  # e.g. {"device": "cpu"}: a CPU smoke
    mark("engine")
    t = time.perf_counter()
    llm = sglang.Engine(**kw)
    marks["engine_s"] = time.perf_counter() - t
    mark("ready")
    t = time.perf_counter()
    llm.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 1, "temperature": 0.0})
    marks["first_generate_s"] = time.perf_counter() - t
    marks["first_token_wall_s"] = time.time() - t_proc
    out = llm.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": 8, "temperature": 0.0,
                                                           "ignore_eos": True})
    llm.shutdown()
    print("RESULT " + json.dumps({**marks, "ids": [o["output_ids"] for o in out]}), flush=True)


def cache_env(home: Path) -> dict[str, str]:
    """Every kernel cache an engine may write, under one directory (empty = a fresh machine)."""
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor"), "TRITON_CACHE_DIR": str(home / ".triton" / "cache"),
            "TVM_FFI_CACHE_DIR": str(home / ".cache" / "tvm-ffi"),
            "CUDA_CACHE_PATH": str(home / ".nv" / "ComputeCache")}


def store_env(home: Path, store: Path) -> dict[str, str]:
    """A machine whose kernel caches come from the store: an empty HOME (a fresh machine, or the same
    one again: warm), the cache directories left to the plugin. TMPDIR stays the machine's: the
    plugin's working directory must have the same path on every node (ninja files hold it)."""
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "SLLMFS_STORAGE_PATH": str(store)}


def new_node() -> None:
    """Forget this host's kernel working directories: the next start is a new node's."""
    import glob
    import shutil
    import tempfile

    for d in glob.glob(os.path.join(tempfile.gettempdir(), "sllmfs-kernels-*")):
        shutil.rmtree(d)


def written(home: Path) -> dict[str, dict[str, int]]:
    """What a start left under its cache home: files and bytes per directory two levels down."""
    found: dict[str, dict[str, int]] = {}
    for p in home.rglob("*"):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(home).parts
            key = "/".join(rel[:2]) if len(rel) > 2 else "/".join(rel[:-1]) or "."
            d = found.setdefault(key, {"files": 0, "bytes": 0})
            d["files"] += 1
            d["bytes"] += p.stat().st_size
    return found


def start(label: str, model_path: str, load_format: str, home: Path, logs: Path, extra: str = "",
          store: Path | None = None, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    machine = store_env(home, store) if store else cache_env(home)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")
    marks_file = logs / (name + ".marks.jsonl")
    marks_file.unlink(missing_ok=True)
    mem = meminfo_gb()
    env = {**os.environ, **machine, **(env_extra or {}), MARKS_ENV: str(marks_file),
           "SLLMFS_BENCH_SPAWN": repr(time.time())}
    proc = subprocess.run([sys.executable, __file__, "--child", model_path, load_format, extra],
                          capture_output=True, text=True, timeout=560, env=env)
    log = proc.stdout + proc.stderr
    (logs / (name + ".log")).write_text(log)
    res: dict[str, Any] = {"label": label, "rc": proc.returncode, "model_path": model_path,
                           "load_format": load_format, "meminfo_gb": mem}
    for line in log.splitlines():
        if line.startswith("RESULT "):
            res.update(json.loads(line[7:]))
    m = TIMINGS.findall(log)
    if m:
        lw, kv, sched, graphs = m[-1]
        res.update(load_weight_s=float(lw), kv_cache_s=float(kv), scheduler_e2e_s=float(sched),
                   cuda_graph_s={k.strip(): float(v) for k, v in (x.split("=") for x in graphs.split(",") if "=" in x)})
    path = re.findall(r"sllmfs: loaded .* by the ([a-z-]+) path in ([0-9.]+) s", log)
    if path:
        res["sllm_path"], res["sllm_load_s"] = path[-1][0], float(path[-1][1])
    if "engine_s" in res and "scheduler_e2e_s" in res:
        res["outside_scheduler_s"] = float(res["engine_s"]) - float(res["scheduler_e2e_s"])
    if marks_file.exists():
        res["phases"] = phases([json.loads(x) for x in marks_file.read_text().splitlines() if x.strip()], res)
    if proc.returncode:
        res["error_tail"] = log.splitlines()[-20:]
    ph = {k.removesuffix("_s"): round(v, 2) for k, v in res.get("phases", {}).items()}
    print(f"  {label:<34} rc={proc.returncode} first token {res.get('first_token_wall_s', float('nan')):.1f} s "
          f"load_weight {res.get('load_weight_s')} path={res.get('sllm_path')} outside the scheduler "
          f"{res.get('outside_scheduler_s', float('nan')):.2f} s {ph}", file=sys.stderr, flush=True)
    return res


def served(src: Path, work: Path, logs: Path, log_name: str, save: bool = True) -> tuple[Path, Sidecar, str]:
    """The checkpoint saved into a store (``save``: anew; else as a previous run left it, with its
    written-back variant and kernel caches) and a sidecar (with its mount) serving it: (store, sidecar,
    the model's folder in the mount)."""
    store = work / "store"
    if save:
        subprocess.run([sys.executable, "-m", "sllmfs", "save", "--model", "bench/llama-7b", "--local-model-path",
                        str(src), "--storage-path", str(store), "--force"], check=True)
    side = Sidecar(store, work / "sllmfs.sock", work / "mnt", logs / log_name)
    return store, side, str(side.mnt / "bench" / "llama-7b")


def kernels(src: Path, work: Path, logs: Path, keep: Any) -> None:
    """Machine A compiles and publishes its kernels to the store; machine B starts fresh from the
    store's copy, then again warm; the default loader on warm B for the load-phase comparison."""
    store, side, view = served(src, work, logs, "sidecar-kernels.log")
    new_node()
    try:
        keep("sllm_first_start_machine_a", start("sllm first start, machine A (fresh)", view, "sllm",
                                                 work / "machine-a", logs, extra='{"sllm_write_back": "sync"}',
                                                 store=store))
        new_node()
        keep("sllm_hit_machine_b_fresh", start("sllm hit, machine B fresh (kernels from the store)", view, "sllm",
                                               work / "machine-b", logs, store=store))
        keep("written_outside_the_store_b", written(work / "machine-b"))  # what the store does not keep
        keep("sllm_hit_machine_b_warm", start("sllm hit, machine B warm", view, "sllm", work / "machine-b", logs,
                                              store=store))
    finally:
        side.stop()


PAIRS_SO_FAR = "pairs-so-far.json"  # in the workdir: what --resume adds to
KINDS = {"default": "the default loader, the plain folder", "mount-default": "the default loader, the mount",
         "sllm": "--load-format sllm, the mount",
         "sllm-no-kernel-cache": "sllm, kernel caches not served"}


def pairs(src: Path, work: Path, logs: Path, keep: Any, n: int, mount_default: bool = False,
          no_kernel_cache: bool = False, resume: bool = False) -> dict[str, Any]:
    """Is an sllm memory-tier start ready sooner than the default loader's by (its load phase - 0.3 s)
    (#21.3)? One warm machine (kernel caches shared), the sllm first start to write the per-rank state
    back, then ``n`` pairs of starts, the order alternating so drift favours neither. A start's noise
    (process spawn, imports: several seconds) is far larger than the ~2 s in question, so each pair's
    difference is kept and the median of them judged, on the engine's own start (Engine() to ready)
    and on the wall clock from the launch to ready. ``mount_default``: each pair also starts the default
    loader on the mount's folder (a triple, the order rotating), which tells the mount's share of a
    difference outside the load phase from the sllm loader's; every start records its phases outside
    SGLang's scheduler clock (``phases``), each kind's median is printed. ``no_kernel_cache``: each pair
    also starts the sllm loader with the plugin's kernel caches off (SLLMFS_KERNEL_CACHE=0): both sllm
    starts of 2026-12-01 spent 2.2-4 s more than the default's in the scheduler child's imports, and the
    caches' directories are what else differs between them. ``resume``: the machine a previous run of
    this part left (the same ``work``: its store, homes and pairs so far, ``PAIRS_SO_FAR``): its pairs
    count with this run's, and one sllm start (uncounted) fills the new sidecar's tier instead of the
    first start and the warm-up (a device call holds ~1.5 pairs after those)."""
    import statistics

    so_far = work / PAIRS_SO_FAR
    resume = resume and so_far.exists()
    _, side, view = served(src, work, logs, "sidecar-pairs.log", save=not resume)
    home = work / "home-pairs"
    kinds = ["default", "mount-default", "sllm"] if mount_default else ["default", "sllm"]
    if no_kernel_cache:
        kinds.append("sllm-no-kernel-cache")
    got: list[dict[str, dict[str, Any]]] = json.loads(so_far.read_text()) if resume else []
    try:
        if resume:
            keep("pairs_sllm_refill", start("sllm, tier filled again (resumed)", view, "sllm", home, logs))
        else:
            keep("pairs_sllm_first", start("sllm first (any-TP, write-back)", view, "sllm", home, logs,
                                           extra='{"sllm_write_back": "sync"}'))
            keep("pairs_default_warmup", start("default, warm-up", str(src), "auto", home, logs))
        for i in range(len(got), len(got) + n):
            one = {}
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)] if len(kinds) > 2 else \
                (kinds if i % 2 == 0 else kinds[::-1])
            for kind in order:
                r = start(f"pair {i} {kind}", str(src) if kind == "default" else view,
                          "sllm" if kind.startswith("sllm") else "auto", home, logs,
                          env_extra={"SLLMFS_KERNEL_CACHE": "0"} if kind == "sllm-no-kernel-cache" else None)
                keep(f"pair{i}_{kind}", r)
                one[kind] = r
            got.append(one)
            so_far.write_text(json.dumps(got))
    finally:
        side.stop()

    def ready(r: dict[str, Any]) -> float:  # launch to engine ready (the first token minus its generate)
        return float(r.get("first_token_wall_s", float("nan"))) - float(r.get("first_generate_s", float("nan")))

    ok = [(g["default"], g["sllm"]) for g in got
          if g["default"].get("rc") == 0 and g["sllm"].get("rc") == 0 and g["sllm"].get("sllm_path") == "fast"
          and g["default"].get("load_weight_s") is not None and "engine_s" in g["default"] and "engine_s" in g["sllm"]]
    if not ok:
        raise SystemExit("pairs: no pair where both starts ran and sllm took the fast path")
    need = statistics.median(float(d["load_weight_s"]) for d, _ in ok) - 0.3
    engine = statistics.median(float(d["engine_s"]) - float(m["engine_s"]) for d, m in ok)
    wall = statistics.median(ready(d) - ready(m) for d, m in ok)
    # the scheduler's own clock (its init to ready: load, KV cache, CUDA graphs) leaves out the child's imports,
    # which run before any code of ours and swing +-3 s between starts on these hosts (NOTES-coldstart.md)
    sched = [float(d["scheduler_e2e_s"]) - float(m["scheduler_e2e_s"]) for d, m in ok
             if "scheduler_e2e_s" in d and "scheduler_e2e_s" in m]
    out: dict[str, Any] = {"pairs": len(ok), "goal_sooner_s": need, "engine_sooner_s_median": engine,
                           "ready_sooner_s_median": wall,
                           "engine_sooner_s": [float(d["engine_s"]) - float(m["engine_s"]) for d, m in ok],
                           "ready_sooner_s": [ready(d) - ready(m) for d, m in ok],
                           "scheduler_sooner_s": sched,
                           "scheduler_sooner_s_median": statistics.median(sched) if sched else None}
    out["outside_scheduler_median_s"] = by_kind = {}
    for kind in kinds:  # where a kind's extra seconds outside the scheduler's clock are, phase by phase
        runs = [g[kind] for g in got if g[kind].get("rc") == 0]
        keys = ["outside_scheduler_s", "load_weight_s"] + sorted({k for r in runs for k in r.get("phases", {})})
        by_kind[kind] = {k: statistics.median(vals) for k in keys
                         if (vals := [float(r[k] if k in r else r["phases"][k]) for r in runs
                                      if k in r or k in r.get("phases", {})])}
        print(f"{KINDS[kind]:<36} median of {len(runs)}: " +
              ", ".join(f"{k} {v:.2f}" for k, v in by_kind[kind].items()), flush=True)
    print(f"sllm ready sooner than default (median of {len(ok)} pairs): engine {engine:.2f} s, "
          f"from launch {wall:.2f} s; goal >= {need:.2f} s (default load phase - 0.3): "
          f"engine {engine / need:.2f}x, launch {wall / need:.2f}x",
          flush=True)
    if sched:
        print(f"  on the scheduler's own clock (its init to ready, the child's imports left out): "
              f"{out['scheduler_sooner_s_median']:.2f} s sooner = {out['scheduler_sooner_s_median'] / need:.2f}x "
              f"the goal", flush=True)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/sllmfs-coldstart")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--src", default=None, help="reuse a checkpoint folder")
    ap.add_argument("--part", choices=["default", "sllm", "first", "kernels", "pairs", "all"], default="all",
                    help="first: one sllm first start with the default (background) write-back, then the default "
                         "loader; kernels: fresh machines whose kernel caches come from the store, next to a warm one; "
                         "pairs: warm-machine starts, default and sllm hit alternating (is sllm ready sooner?)")
    ap.add_argument("--pairs", type=int, default=3, help="--part pairs: default/sllm pairs after the first start")
    ap.add_argument("--with-mount-default", action="store_true",
                    help="--part pairs: each pair also starts the default loader on the mount's folder")
    ap.add_argument("--resume", action="store_true", help="--part pairs: go on from the pairs a previous run left "
                    "in --workdir (the same machine, still warm): its store, homes and pairs are kept. On the device "
                    "tool the workdir must lie outside the repo (e.g. /tmp/cs: it resets the working tree per call)")
    ap.add_argument("--with-sllm-no-kernel-cache", action="store_true",
                    help="--part pairs: each pair also starts the sllm loader with the kernel caches not served")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    from llama_shapes import write_checkpoint

    work, out = Path(a.workdir), Path(a.out)
    logs = out / "coldstart-logs"
    logs.mkdir(parents=True, exist_ok=True)
    src = Path(a.src) if a.src else work / "src"
    if not (src / "model.safetensors").exists():
        write_checkpoint(src, layers=a.layers)
    import sglang
    import torch

    result: dict[str, Any] = {"bench": "coldstart", "host": platform.node(), "gpu": torch.cuda.get_device_name(0),
                              "sglang": sglang.__version__, "torch": torch.__version__,
                              "bytes": (src / "model.safetensors").stat().st_size,
                              "command": "python bench/bench_coldstart.py " + " ".join(sys.argv[1:]), "runs": {}}
    dest = out / f"coldstart-{a.part}-{time.strftime('%Y%m%d-%H%M')}.json"
    runs: dict[str, Any] = result["runs"]

    def keep(key: str, r: dict[str, Any]) -> None:
        runs[key] = r
        dest.write_text(json.dumps(result, indent=1))

    subprocess.run(["cat", str(src / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)  # page cache
    if a.part in ("default", "all"):
        fresh = work / "home-default"
        keep("default_fresh_machine", start("default, fresh machine", str(src), "auto", fresh, logs))
        result["kernel_caches_written"] = written(fresh)
        keep("default_warm_machine", start("default, warm machine", str(src), "auto", fresh, logs))
    if a.part in ("sllm", "all"):
        _, side, view = served(src, work, logs, "sidecar.log")
        warm = work / "home-sllm"
        try:
            keep("sllm_first_start", start("sllm first (any-TP, write-back)", view, "sllm", warm, logs,
                                           extra='{"sllm_write_back": "sync"}'))
            keep("sllm_hit_warm_machine", start("sllm hit, warm machine", view, "sllm", warm, logs))
            keep("sllm_hit_fresh_machine", start("sllm hit, fresh machine", view, "sllm", work / "home-sllm-fresh",
                                                 logs))
            side.cli("evict", "--model", "bench/llama-7b")
            drop_caches()
            keep("sllm_cold_warm_machine", start("sllm cold (tier empty, no page cache)", view, "sllm", warm, logs))
        finally:
            side.stop()
    if a.part == "first":  # a user's first start as they get it: write-back in the background (the default)
        _, side, view = served(src, work, logs, "sidecar.log")
        try:
            keep("sllm_first_start_default_write_back", start("sllm first (any-TP, write-back default)", view,
                                                              "sllm", work / "home-sllm", logs))
            keep("default_warm_machine", start("default, warm machine", str(src), "auto", work / "home-sllm", logs))
        finally:
            side.stop()
    if a.part == "pairs":
        result["pairs"] = pairs(src, work, logs, keep, a.pairs, a.with_mount_default, a.with_sllm_no_kernel_cache,
                                a.resume)
    if a.part == "kernels":
        kernels(src, work, logs, keep)
        result["kernel_entries"] = subprocess.run([sys.executable, "-m", "sllmfs", "kernels", "ls", "--storage-path",
                                                   str(work / "store")], capture_output=True, text=True).stdout
    ids = [r.get("ids") for r in runs.values() if "rc" in r]
    result["identical"] = bool(ids) and ids[0] is not None and all(i == ids[0] for i in ids)
    dest.write_text(json.dumps(result, indent=1))
    print(f"{'start':<26}{'1st token':>10}{'import':>8}{'engine':>8}{'load':>7}{'kv':>6}{'graphs':>8}")
    for k, r in runs.items():
        if "rc" not in r:
            continue
        g = sum(r.get("cuda_graph_s", {}).values())
        print(f"{k:<26}{r.get('first_token_wall_s', float('nan')):>10.1f}{r.get('import_sglang_s', float('nan')):>8.1f}"
              f"{r.get('engine_s', float('nan')):>8.1f}{r.get('load_weight_s') or float('nan'):>7.2f}"
              f"{r.get('kv_cache_s') or float('nan'):>6.2f}{g:>8.1f}")
    print(f"greedy ids identical: {result['identical']}  -> {dest}")
    # one archive: the GPU machine hands back at most 8 files (2026-12-01 lost four logs to that)
    shutil.make_archive(str(dest.with_suffix("")) + "-logs", "gztar", logs)
    shutil.rmtree(logs)


if __name__ == "__mp_main__" and os.environ.get(MARKS_ENV):  # a process SGLang spawned for a timed start
    mark("child_main", _T_FILE)
    watch_scheduler()

if __name__ == "__main__":
    main()
