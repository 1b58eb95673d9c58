"""What the sllmfs plugin adds to an engine start outside the load phase (issue #21.4: ≤ 0.1 s).

    python bench/bench_plugin_cost.py [--framework sglang|vllm] [--role R] [--reps 7] [--out bench/results/X.json]

An engine loads its plugins first thing in every process (SGLang: ``load_plugins()`` in the launching
process and in each scheduler; vLLM: ``load_general_plugins()`` in the API server, the engine core and
each worker). Each measured process does what that process of a real start does around the call: the
imports before it, the call, then the imports the process makes later anyway (a hook that imports a
module early only moves that cost; one the process would never import is added cost). Two roles per
engine, the first process of a start and one of the processes it starts (they run in parallel, so one
of them is on the critical path):

    sglang  launch (CLI/Engine)           scheduler (TP rank)
    vllm    front end (API server/LLM)    engine core (with the TP=1 worker)

"without": the plugin filtered out by the engine's own switch (SGLANG_PLUGINS / VLLM_PLUGINS naming
only the other plugins), which is what an uninstalled sllmfs looks like to the engine (its entry point
is still read: one more dist-info, the same for every installed package). "with": the plugin loaded,
its kernel caches in three states: "empty" (a fresh node, an empty store), "new-node" (the store holds
this key's entry of --entry-files files / --entry-mb MB, restored into an empty working dir) and
"warm" (a later start on the same node). Worker processes inherit the first one's decision
(SLLMFS_KERNEL_CACHE_DIR). "pieces-<state>": the plugin's steps one by one (its imports, the kernel
cache key, opening the store, activation with restore and the publisher, the hooks, SGLang applying
them; the publisher's per-second scan), not counted in the totals.

Every run is a process of its own, forked (--mode fork, the default) from a parent that made the
role's imports before the plugin call: the engine's own imports (~20 s per process on the H200 host)
are paid once per role, not per run. Copy-on-write pages make a forked child pay a little more for
whatever it touches, so this errs against the plugin. --mode spawn starts a new interpreter per run
instead. One warm-up round first (discarded: .pyc compilation, page cache), then --reps rounds, the
variants interleaved. Prints medians, spread, the difference and its ratio to the 0.1 s limit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LIMIT_S = 0.1
GROUP = {"sglang": "sglang.srt.plugins", "vllm": "vllm.general_plugins"}
SWITCH_ENV = {"sglang": "SGLANG_PLUGINS", "vllm": "VLLM_PLUGINS"}
PLUGIN_MODULE = {"sglang": "sllmfs.integrations.sglang.plugin", "vllm": "sllmfs.integrations.vllm.plugin"}
# role -> (first process of a start?, imports before the plugin call (alternatives: the first that imports),
#          imports the process makes later anyway (alternatives likewise))
ROLES: dict[str, dict[str, tuple[bool, list[list[str]], list[list[str]]]]] = {
    "sglang": {
        "launch": (True, [["sglang.srt.server_args", "sglang.srt.plugins"]],
                   [["sglang.srt.entrypoints.http_server"], ["sglang.srt.entrypoints.engine"]]),
        "scheduler": (False, [["sglang.srt.managers.scheduler", "sglang.srt.plugins"],
                              ["sglang.srt.server_args", "sglang.srt.plugins"]],
                      [["sglang.srt.model_executor.model_runner"]]),
    },
    "vllm": {
        "frontend": (True, [["vllm.engine.arg_utils", "vllm.plugins"]],
                     [["vllm.entrypoints.openai.api_server"], ["vllm.v1.engine.async_llm"]]),
        "engine-core": (False, [["vllm.v1.engine.core", "vllm.plugins"], ["vllm.engine.arg_utils", "vllm.plugins"]],
                        [["vllm.v1.worker.gpu_model_runner"], ["vllm.model_executor.model_loader"]]),
    },
}
FIRST_STATES = ("empty", "new-node", "warm")
MARK = "SLLMFS_KERNEL_CACHE_DIR"
CACHE_VARS = ("TRITON_CACHE_DIR", "TVM_FFI_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE", "TORCHINDUCTOR_CACHE_DIR",
              "VLLM_CACHE_ROOT", "SLLMFS_KERNEL_CACHE", MARK)


# -- in the measured processes ----------------------------------------------------------------------


def _torchvision_fix() -> None:
    """A CPU torch beside PyPI's CUDA torchvision (the CPU venvs here): tests/support/sglang_env's fix."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        sys.path.insert(0, str(REPO))
        from tests.support.sglang_env import _torchvision_without_ops

        _torchvision_without_ops()


def _import_first(alternatives: list[list[str]]) -> tuple[list[str] | None, str]:
    """Import the first list of modules that imports whole; (that list, why others failed)."""
    why = []
    for names in alternatives:
        try:
            for name in names:
                importlib.import_module(name)
            return names, "; ".join(why)
        except Exception as e:  # a CPU venv without uvicorn, setproctitle, ...
            why.append(f"{names[0]}: {type(e).__name__}: {e}")
    return None, "; ".join(why)


def _load_plugins(fw: str) -> None:
    if fw == "sglang":
        from sglang.srt.plugins import load_plugins

        load_plugins()
    else:
        from vllm.plugins import load_general_plugins

        load_general_plugins()


def _measure(fw: str, role: str, later: list[list[str]]) -> dict[str, Any]:
    """One process's plugin call and its later imports: wall and CPU seconds, modules added."""
    before = len(sys.modules)
    t0, c0 = time.perf_counter(), time.process_time()
    _load_plugins(fw)
    t1, c1 = time.perf_counter(), time.process_time()
    after_plugins = len(sys.modules)
    by_plugins = list(sys.modules)[before:]  # insertion order: what the call imported
    names, why = _import_first(later)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"plugins_s": t1 - t0, "later_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0,
            # every module but ours once the process has made its later imports: compared with and without
            # the plugin (summarize), it shows what the plugin imported that the process would not have
            "others_after": sorted(m for m in sys.modules if not m.startswith("sllmfs")),
            "others_by_plugins": sorted(m for m in by_plugins if not m.startswith("sllmfs")),
            "plugins_cpu_s": c1 - c0, "modules_by_plugins": after_plugins - before,
            "modules_total": len(sys.modules) - before, "later": names, "later_failed": why,
            "sllmfs_modules": sorted(m for m in sys.modules if m.startswith("sllmfs")),
            "sidecar_lookup": "sllmfs.integrations.common.locate" in sys.modules,
            "plugin_loaded": PLUGIN_MODULE[fw] in sys.modules}


def _pieces(fw: str) -> dict[str, Any]:
    """The plugin's steps one at a time, in the order register() takes them."""
    out: dict[str, Any] = {}

    def timed(name: str, fn: Any) -> Any:
        t = time.perf_counter()
        value = fn()
        out[f"{name}_s"] = time.perf_counter() - t
        return value

    plugin = timed("import_plugin", lambda: importlib.import_module(PLUGIN_MODULE[fw]))
    kc = timed("import_kernel_cache", lambda: importlib.import_module("sllmfs.integrations.kernel_cache"))
    # the store's own modules load in the activation's thread, beside the start: only the key's here
    timed("import_key", lambda: (importlib.import_module("sllmfs.store.kernel_key"),
                                 importlib.import_module("sllmfs.store.layout")))
    from sllmfs.store import kernel_key

    key = timed("kernel_key", lambda: kernel_key.current(fw))
    defaults = {}
    if fw == "sglang":
        from sllmfs.integrations.sglang import compat

        defaults = timed("engine_cache_defaults", compat.cache_defaults)
    act = timed("activate", lambda: kc.activate(framework=fw, key=key, engine_defaults=defaults))
    # not on the start's path: how long the restore ran beside it, after activate() returned
    out["restored"] = timed("restore_beside", lambda: act.wait_restored(60)) if act else None
    out["publisher"] = bool(act and act.keeper.store is not None and act.keeper.is_alive())
    timed("register_rest", plugin.register)  # the hooks; activate() returns at once now (MARK is set)
    if fw == "sglang":
        from sglang.srt.plugins.hook_registry import HookRegistry

        timed("apply_hooks", HookRegistry.apply_hooks)
    if act:
        from sllmfs.store import kernels

        out["files_in_workdir"] = len(timed("publisher_scan", lambda: kernels.scan(act.dirs)))
    out["sidecar_lookup"] = "sllmfs.integrations.common.locate" in sys.modules
    return out


def zygote(plan: dict[str, Any]) -> None:
    """Make the role's imports, then run each planned variant in a forked child (or here, once)."""
    fw, role = plan["framework"], plan["role"]
    _first, pre, later = ROLES[fw][role]
    if fw == "sglang":
        _torchvision_fix()
    t = time.perf_counter()
    pre_names, pre_why = _import_first(pre)
    if pre_names is None:
        raise SystemExit(f"bench: cannot import what a {fw} {role} process imports first: {pre_why}")
    print("RESULT " + json.dumps({"pre": pre_names, "pre_failed": pre_why, "pre_s": time.perf_counter() - t}),
          flush=True)
    if plan["fork"]:  # the imported objects out of the collector's reach: a child's collections would
        gc.collect()  # otherwise touch (and so copy) the whole inherited heap, which no fresh process does
        gc.freeze()
    for run in plan["runs"]:
        _prepare_state(plan, run)
        result = _forked(lambda run=run: _one(plan, run, later)) if plan["fork"] else _one(plan, run, later)
        print("RESULT " + json.dumps({**run, **result}), flush=True)


def _one(plan: dict[str, Any], run: dict[str, Any], later: list[list[str]]) -> dict[str, Any]:
    os.environ.update(run["env"])
    for name in run.get("unset", []):
        os.environ.pop(name, None)
    if run["variant"].startswith("pieces"):
        return _pieces(plan["framework"])
    return _measure(plan["framework"], plan["role"], later)


def _forked(fn: Any) -> dict[str, Any]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the bench
            out = {"error": f"{type(e).__name__}: {e}"}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(out))
        os._exit(0)  # no atexit: the kernel cache's last publish is after a start, not part of it
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "the measured process died"}


def _prepare_state(plan: dict[str, Any], run: dict[str, Any]) -> None:
    """The node's working dir for this run: removed (fresh node) or filled (a later start)."""
    work_root = Path(plan["tmpdir"]) / f"sllmfs-kernels-{os.getuid()}"
    state = run.get("state")
    if state in ("empty", "new-node"):
        shutil.rmtree(work_root, ignore_errors=True)
    elif state == "warm":  # a start before this one on this node restored (and would have published) it all
        env = {**run["env"]}
        _forked(lambda: _fill_workdir(plan["framework"], env))


def _fill_workdir(fw: str, env: dict[str, str]) -> dict[str, Any]:
    os.environ.update(env)
    from sllmfs.integrations import kernel_cache

    act = kernel_cache.activate(framework=fw)
    return {"restored": act.wait_restored(60) if act else None}


# -- the store the runs read ------------------------------------------------------------------------


def prepare(fw: str, root: Path, files: int, mbytes: float) -> None:
    """Two stores: an empty one, and one holding this host's kernel cache entry for ``fw`` (synthetic
    files of the sizes a start writes: the H200's SGLang entry held 99 files, 8.1 MB)."""
    import random

    from sllmfs.store import kernel_key, kernels
    from sllmfs.store.store import Store

    Store(root / "store-empty")
    store = Store(root / "store-entry")
    key = kernel_key.current(fw)
    src = root / "compiled"
    rng = random.Random(0)
    each = max(1, int(mbytes * 1e6 / max(files, 1)))
    kinds = ["triton", "tvm-ffi", "flashinfer"] if fw == "sglang" else ["triton", "vllm"]
    for i in range(files):
        kind = kinds[i % len(kinds)]
        f = src / kind / f"{i % 7:02x}{i:04x}" / f"kernel_{i}.so"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(rng.randbytes(each))
    entry = kernels.publish(store, key, src)
    print("RESULT " + json.dumps({"key": key.name, "files": len(entry.files), "bytes": entry.size}), flush=True)


# -- the parent -------------------------------------------------------------------------------------


def _results(cmd: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"bench: {cmd[2]} {cmd[3][:80]} failed (exit {proc.returncode}): " + " | ".join(tail))
    return lines


def _other_plugins(fw: str) -> str:
    from importlib.metadata import entry_points

    others = sorted({ep.name for ep in entry_points(group=GROUP[fw]) if ep.name != "sllmfs"})
    return ",".join(others) or "sllmfs-off"  # a name no plugin has: the engine loads none


def _plan_runs(fw: str, role: str, store: dict[str, str], reps: int) -> list[dict[str, Any]]:
    first = ROLES[fw][role][0]
    without = {"variant": "without", "env": {SWITCH_ENV[fw]: _other_plugins(fw),
                                             "SLLMFS_STORAGE_PATH": store["new-node"]}}
    if first:
        variants = [without] + [{"variant": "with", "state": s, "env": {"SLLMFS_STORAGE_PATH": store[s]}}
                                for s in FIRST_STATES]
        pieces = [{"variant": f"pieces-{s}", "state": s, "env": {"SLLMFS_STORAGE_PATH": store[s]}}
                  for s in FIRST_STATES]
    else:  # the first process decided: its directories and mark are inherited
        work = str(Path(store["tmpdir"]) / f"sllmfs-kernels-{os.getuid()}" / store["key"])
        inherited = {MARK: work, "TRITON_CACHE_DIR": f"{work}/triton", "TVM_FFI_CACHE_DIR": f"{work}/tvm-ffi",
                     "FLASHINFER_WORKSPACE_BASE": f"{work}/flashinfer", "TORCHINDUCTOR_CACHE_DIR": f"{work}/inductor"}
        if fw == "vllm":
            inherited["VLLM_CACHE_ROOT"] = f"{work}/vllm"
        variants = [without, {"variant": "with", "state": "inherited",
                              "env": {"SLLMFS_STORAGE_PATH": store["new-node"], **inherited}}]
        pieces = []
    for v in variants:
        v.setdefault("unset", [SWITCH_ENV[fw]] if v["variant"] == "with" else [])
    runs = []
    for rnd in range(reps + 1):  # round 0: warm-up, discarded
        order = variants if rnd % 2 else variants[::-1]  # interleaved, alternating: drift hits both sides
        runs += [{**v, "round": rnd} for v in order] + [{**p, "round": rnd, "unset": []} for p in pieces]
    return runs


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2], "n": len(xs)}


def run_framework(fw: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / fw
    root.mkdir(parents=True, exist_ok=True)
    tmpdir = root / "tmp"
    tmpdir.mkdir(exist_ok=True)
    # an installed sllmfs has its .pyc files (an editable checkout writes them on its first start): with
    # PYTHONDONTWRITEBYTECODE every run would compile our modules again, a cost no real start pays
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(TMPDIR=str(tmpdir), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    [prep] = _results([sys.executable, str(Path(__file__).resolve()), "--prepare", fw, str(root),
                       str(args.entry_files), str(args.entry_mb)], env)
    store = {"empty": str(root / "store-empty"), "new-node": str(root / "store-entry"),
             "warm": str(root / "store-entry"), "tmpdir": str(tmpdir), "key": prep["key"]}
    out: dict[str, Any] = {"entry": prep, "roles": {}}
    for role in [r for r in ROLES[fw] if not args.role or r in args.role]:
        runs = _plan_runs(fw, role, store, args.reps)
        plans = [{"framework": fw, "role": role, "tmpdir": str(tmpdir), "fork": True, "runs": runs}] \
            if args.mode == "fork" else \
            [{"framework": fw, "role": role, "tmpdir": str(tmpdir), "fork": False, "runs": [r]} for r in runs]
        got: list[dict[str, Any]] = []
        pre: dict[str, Any] = {}
        for plan in plans:
            lines = _results([sys.executable, str(Path(__file__).resolve()), "--zygote", json.dumps(plan)], env)
            pre = lines[0]
            got += lines[1:]
        bad = [g for g in got if "error" in g]
        if bad:
            raise SystemExit(f"bench: a {fw} {role} run failed: {bad[0]['variant']}: {bad[0]['error']}")
        out["roles"][role] = {"pre": pre, "runs": [g for g in got if g["round"] > 0]}
        print(f"  {fw} {role}: {len(got)} runs", flush=True)
    return out


def _later_modules(runs: list[dict[str, Any]]) -> float:
    """How many modules a process's later imports brought (median)."""
    return statistics.median(r["modules_total"] - r["modules_by_plugins"] for r in runs)


def summarize(fw: str, data: dict[str, Any]) -> dict[str, Any]:
    """Medians per role and variant, the differences, the critical path, the ratio to the limit."""
    summary: dict[str, Any] = {}
    for role, rd in data["roles"].items():
        runs = rd["runs"]
        later_ok = all(r.get("later") for r in runs if not r["variant"].startswith("pieces"))
        metric = "total_s" if later_ok else "plugins_s"  # without the later imports, the plugin call alone
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            name = r["variant"] if r["variant"] != "with" else f"with-{r['state']}"
            groups.setdefault(name, []).append(r)
        role_sum: dict[str, Any] = {"metric": metric, "later_failed": sorted({r["later_failed"] for r in runs
                                                                              if r.get("later_failed")})}
        for name, rs in groups.items():
            if name.startswith("pieces"):
                keys = [k for k in rs[0] if k.endswith("_s")]
                role_sum[name] = {k: _stats([r[k] for r in rs]) for k in keys}
                role_sum[name]["restored"] = rs[0].get("restored")
                role_sum[name]["sidecar_lookup"] = any(r.get("sidecar_lookup") for r in rs)
                continue
            role_sum[name] = {m: _stats([r[m] for r in rs]) for m in ("plugins_s", "later_s", "total_s", "cpu_s")}
            role_sum[name]["modules_by_plugins"] = statistics.median(r["modules_by_plugins"] for r in rs)
            role_sum[name]["sidecar_lookup"] = any(r["sidecar_lookup"] for r in rs)
            role_sum[name]["plugin_loaded"] = all(r["plugin_loaded"] for r in rs)
        base = role_sum["without"][metric]["median"]
        base_cpu = role_sum["without"]["cpu_s"]["median"]
        if role_sum["without"]["plugin_loaded"] or not all(role_sum[n]["plugin_loaded"] for n in groups
                                                          if n.startswith("with-")):
            raise SystemExit(f"bench: {fw} {role}: the engine's switch did not turn the plugin off and on as asked")
        plain = set(groups["without"][0]["others_after"])
        role_sum["modules_only_with"] = {n[5:]: sorted(set(groups[n][0]["others_after"]) - plain)
                                         for n in groups if n.startswith("with-")}
        for r in runs:
            r.pop("others_after", None)  # thousands of names per run: the difference above is what matters
        withs = [n for n in groups if n.startswith("with-")]
        base_call = role_sum["without"]["plugins_s"]["median"]
        role_sum["added_call_s"] = {n[5:]: role_sum[n]["plugins_s"]["median"] - base_call for n in withs}
        role_sum["added_total_s"] = {n[5:]: role_sum[n][metric]["median"] - base for n in withs}
        # what counts: with the later imports when the plugin moved some of them into its call (they then
        # import fewer modules: the move is no cost); else the larger of the two, so that the later imports'
        # noise (a scheduler's ±0.05 s) never subtracts the call's own cost
        role_sum["moved_imports"] = {n[5:]: _later_modules(groups[n]) < _later_modules(groups["without"]) - 10
                                     for n in withs}
        role_sum["added_s"] = {k: v if role_sum["moved_imports"][k] else max(v, role_sum["added_call_s"][k])
                               for k, v in role_sum["added_total_s"].items()}
        role_sum["added_cpu_s"] = {n[5:]: role_sum[n]["cpu_s"]["median"] - base_cpu for n in groups
                                   if n.startswith("with-")}
        summary[role] = role_sum
    first, worker = list(ROLES[fw])
    if first not in summary or worker not in summary:
        return summary  # one role measured (--role): no start figure
    worker_added = max(summary[worker]["added_s"].values())
    path = {s: summary[first]["added_s"][s] + worker_added for s in FIRST_STATES}
    summary["start_added_s"] = path
    summary["worst_s"] = max(path.values())
    summary["ratio_to_limit"] = summary["worst_s"] / LIMIT_S
    return summary


def report(fw: str, summary: dict[str, Any]) -> None:
    for role in [r for r in ROLES[fw] if r in summary]:
        rs = summary[role]
        m = rs["metric"]
        print(f"{fw} {role} ({'plugin call + later imports' if m == 'total_s' else 'plugin call only'}):")
        for name, v in rs.items():
            if isinstance(v, dict) and m in v:
                s = v[m]
                print(f"  {name:16s} median {s['median']:.4f} s  [{s['min']:.4f} .. {s['max']:.4f}, "
                      f"IQR {s['q1']:.4f}-{s['q3']:.4f}, n={s['n']}]  plugin call {v['plugins_s']['median']:.4f} s, "
                      f"cpu {v['cpu_s']['median']:.4f} s, +{v['modules_by_plugins']:.0f} modules")
        for state, d in rs["added_s"].items():
            extra = rs["modules_only_with"][state]
            print(f"  added by the plugin ({state}): {d:+.4f} s wall (its call {rs['added_call_s'][state]:+.4f}, "
                  f"with the later imports {rs['added_total_s'][state]:+.4f}), {rs['added_cpu_s'][state]:+.4f} s CPU; "
                  f"{len(extra)} modules not sllmfs' own that the process would not have had: "
                  f"{', '.join(extra[:12])}{' ...' if len(extra) > 12 else ''}")
        if rs["later_failed"]:
            print(f"  (later imports not importable here: {rs['later_failed'][0][:160]})")
        for name, v in rs.items():
            if name.startswith("pieces") and isinstance(v, dict):
                parts = ", ".join(f"{k[:-2]} {s['median'] * 1e3:.1f}" for k, s in v.items()
                                  if isinstance(s, dict) and k.endswith("_s"))
                print(f"  {name} (ms, medians): {parts}; restored {v['restored']}")
    if "start_added_s" not in summary:
        return
    for state, d in summary["start_added_s"].items():
        print(f"{fw} start, first process + one worker, kernel caches {state}: {d:+.4f} s "
              f"= {d / LIMIT_S:.2f} x the {LIMIT_S} s limit")
    verdict = "met" if summary["worst_s"] <= LIMIT_S else "NOT met"
    print(f"{fw}: worst {summary['worst_s']:+.4f} s = {summary['ratio_to_limit']:.2f} x the limit ({verdict})")


def _host() -> dict[str, Any]:
    gpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()[0]
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.node(), "gpu": gpu}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--zygote":
        zygote(json.loads(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--prepare":
        prepare(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--framework", choices=sorted(ROLES), action="append",
                    help="default: each one importable here")
    ap.add_argument("--role", action="append", choices=sorted({r for roles in ROLES.values() for r in roles}),
                    help="only these processes (default: the first process and a worker of each engine)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--mode", choices=("fork", "spawn"), default="fork")
    ap.add_argument("--entry-files", type=int, default=99)
    ap.add_argument("--entry-mb", type=float, default=8.1)
    ap.add_argument("--workdir", type=Path, help="default: a new temporary directory, removed after")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.reps < 5:
        raise SystemExit("bench: --reps must be at least 5 (medians of fewer say little)")
    fws = args.framework or [f for f in ROLES if importlib.util.find_spec(f) is not None]
    if not fws:
        raise SystemExit("bench: neither SGLang nor vLLM is importable here; run with their Python")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sllmfs-plugin-cost-"))
    result: dict[str, Any] = {"bench": "plugin-cost", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "limit_s": LIMIT_S, "mode": args.mode, "reps": args.reps, "host": _host(),
                              "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "frameworks": {}}
    try:
        for fw in fws:
            version = subprocess.run([sys.executable, "-c", f"from importlib.metadata import version; "
                                      f"print(version({fw!r}))"], capture_output=True, text=True).stdout.strip()
            print(f"{fw} {version}: measuring ({args.mode}, {args.reps} rounds + 1 warm-up)", flush=True)
            data = run_framework(fw, args, work)
            summary = summarize(fw, data)
            report(fw, summary)
            result["frameworks"][fw] = {"version": version, "summary": summary, **data}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
