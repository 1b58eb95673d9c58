"""A real vLLM engine loading through sllmfs, next to vLLM's default loader, in one run.

On the GPU machine (vLLM packed by bench/prepare-vllm-gpu.sh; it cannot travel with .gpu/'s SGLang:
carry .gpu-vllm, .gpu/fuse and .gpu/fuse-env.sh), one call each for --tiny and --big (10 min a call):
    export NO_SGLANG=1 && source bench/gpu_setup.sh 8192 && source .gpu-vllm/vllm-env.sh &&
    python3 bench/bench_vllm.py --tiny --budget-s 380 --out $OUT     # then --big; --tp 2 on two GPUs

--tiny: a tiny Llama (built offline) served from a real FUSE mount: greedy ids of vLLM's default
        loader (source folder, then the mount) and of load_format="sllm" (first start: any-TP path +
        write-back; second: per-rank fast path; then the variant `sllmfs save --backend vllm` made
        ahead of time) must be identical. Eager engines (no compile): ids, not times.
--big:  a Llama-2-7B-shaped bf16 checkpoint (13.5 GB, bench/llama_shapes.py), vLLM's defaults (torch.compile,
        CUDA graphs): greedy ids and, per start, vLLM's own "Model loading took" (the load phase) and
        launch to first token (process start, `import vllm` included, to the first generated token):
        sllm first start (any-TP + write-back; it also fills vLLM's compile cache), default (page cache
        warm), sllm hit (memory tier), sllm cold (memory tier evicted, page cache dropped), default
        cold (page cache dropped). Every big start names the checkpoint folder as its model (the sllm
        ones find the store model by `sllm_model`), so they share one compile cache entry: vLLM keys
        it by the model path.
--cpu:  no GPU (this CI machine): each "engine" is vLLM's loader filling vLLM's model on the CPU
        (tests/support/vllm_env.py) and its "ids" a digest of the weights: checks the orchestration.
Each engine runs in a fresh process; the JSON (with this command) goes to --out after every start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from limits import drop_caches, start_sidecar, stop  # noqa: E402

PROMPTS = [[1, 10, 11, 12, 13], [1, 5, 6, 7]]
TINY, BIG = "demo/tiny-llama", "bench/llama-7b"
LOAD_PHASE = re.compile(r"Model loading took ([0-9.]+) GiB(?: memory)? and ([0-9.]+) seconds")
SLLM_PATH = re.compile(r"sllmfs: loaded .* by the ([a-z-]+) path in ([0-9.]+) s")
PHASES = {  # vLLM's own log lines after the load (best effort: absent lines are left out)
    "default_loader_weights_s": re.compile(r"Loading weights took ([0-9.]+) seconds"),
    "compile_s": re.compile(r"torch\.compile took ([0-9.]+) s in total"),
    "graph_capture_s": re.compile(r"Graph capturing finished in ([0-9.]+) secs"),
    "engine_init_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s"),
}


def engine_child(model: str, load_format: str, extra: str, eager: bool) -> None:
    """Fresh process: start vLLM's LLM, time the first token from the launch, report greedy ids."""
    launched = float(os.environ["SLLMFS_BENCH_LAUNCH"])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw: dict[str, Any] = dict(model=model, load_format=load_format, skip_tokenizer_init=True, seed=0,
                              tensor_parallel_size=int(os.environ.get("SLLMFS_BENCH_TP", "1")),
                              attention_backend="TRITON_ATTN",  # FA2/FA3 are not in the GPU pack
                              gpu_memory_utilization=0.5, enforce_eager=eager)
    if extra:
        kw["model_loader_extra_config"] = json.loads(extra)
    llm = LLM(**kw)
    ready = time.time() - launched
    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
    first = time.time() - launched
    out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], SamplingParams(max_tokens=8, **greedy),
                       use_tqdm=False)
    print("RESULT " + json.dumps({"ready_s": ready, "first_token_s": first,
                                  "ids": [list(o.outputs[0].token_ids) for o in out]}), flush=True)


def cpu_child(model: str, load_format: str, extra: str) -> None:
    """--cpu: vLLM's loader for ``load_format`` fills vLLM's model on the CPU; "ids": the weights' digest."""
    launched = float(os.environ["SLLMFS_BENCH_LAUNCH"])
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    from sllmfs.integrations.vllm import plugin
    from tests.support.vllm_env import cpu_platform, init_single_process, vllm_config

    cpu_platform()
    plugin.register()
    vc = vllm_config(model, "safetensors" if load_format == "auto" else load_format, json.loads(extra or "{}"))
    init_single_process(vc)
    t0 = time.perf_counter()
    with set_current_vllm_config(vc):
        model_obj = get_model_loader(vc.load_config).load_model(vllm_config=vc, model_config=vc.model_config)
    print(f"Model loading took 0.0 GiB memory and {time.perf_counter() - t0:.6f} seconds", flush=True)
    import torch

    digest = hashlib.sha256()
    for name, t in sorted(model_obj.state_dict().items()):
        digest.update(name.encode() + t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    print("RESULT " + json.dumps({"ready_s": time.time() - launched, "first_token_s": None,
                                  "ids": digest.hexdigest()}), flush=True)


def run_engine(label: str, model: str, load_format: str, logs: Path, *, extra: dict[str, Any] | None = None,
               eager: bool = False) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", model, load_format, json.dumps(extra) if extra else "",
            "1" if eager else "0"]
    launched = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "SLLMFS_BENCH_LAUNCH": repr(launched)})
    wall = time.time() - launched
    log = proc.stdout + proc.stderr
    (logs / (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") + ".log")).write_text(log)
    res: dict[str, Any] = {"label": label, "model": model, "load_format": load_format, "extra": extra or {},
                           "rc": proc.returncode, "wall_s": round(wall, 2)}
    load = LOAD_PHASE.findall(log)
    res["load_phase_s"] = float(load[-1][1]) if load else None
    sllm = SLLM_PATH.findall(log)
    if sllm:
        res["sllm_path"], res["sllm_load_s"] = sllm[-1][0], float(sllm[-1][1])
    res["sllm_log"] = [line[-240:] for line in log.splitlines() if "sllmfs" in line][-6:]
    for key, pattern in PHASES.items():
        found = pattern.findall(log)
        if found:
            res[key] = float(found[-1])
    for line in log.splitlines():
        if line.startswith("RESULT "):
            res.update(json.loads(line[7:]))
    if proc.returncode:
        res["error_tail"] = log.splitlines()[-20:]
    print(f"  {label:<34} rc={proc.returncode} load={res['load_phase_s']} first_token={res.get('first_token_s')} "
          f"path={res.get('sllm_path')} wall={wall:.1f}s", flush=True)
    return res


def save(store: Path, model: str, src: Path, *backend: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sllmfs", "save", "--model", model, "--local-model-path", str(src),
                           "--storage-path", str(store), "--force", *backend], capture_output=True, text=True,
                          timeout=600)
    out = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
           "tail": (proc.stdout + proc.stderr).splitlines()[-6:]}
    if proc.returncode and not backend:  # the store copy every start needs
        raise SystemExit(f"sllmfs save failed: {out['tail']}")
    if proc.returncode:  # a per-rank save that failed is a result: the starts go on
        print(f"sllmfs save {' '.join(backend)} failed: {out['tail'][-1:]}", flush=True)
    return out


class Bench:
    def __init__(self, work: Path, out: Path, tp: int, budget_s: float, command: str, meta: dict[str, Any]):
        self.work, self.tp, self.deadline = work, tp, time.monotonic() + budget_s
        self.logs = out / "vllm-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.store = work / "store"
        self.result: dict[str, Any] = {"bench": "vllm", "command": command, "tp": tp, **meta}
        self.dest = out / f"vllm-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def write(self) -> None:  # after every start: a run cut short keeps what it measured
        self.dest.write_text(json.dumps(self.result, indent=1))

    def engine(self, runs: dict[str, Any], key: str, label: str, *args: Any, **kw: Any) -> None:
        if time.monotonic() > self.deadline:
            runs[key] = {"label": label, "skipped": "past --budget-s"}
        else:
            runs[key] = run_engine(label, *args, self.logs, **kw)
        self.write()

    def sidecar(self, name: str, mount: bool) -> tuple[Any, Path, Path]:
        sock, mnt = self.work / "sllmfs.sock", self.work / "mnt"
        args = ["--mem-pool-size", os.environ.get("SLLMFS_BENCH_POOL", "40GB"), "--num-thread", "16",
                "--chunk-size", "64MiB"] + (["--mount", str(mnt)] if mount else [])
        return start_sidecar(self.store, sock, self.logs / f"sidecar-{name}.log", args), sock, mnt

    def settle(self, part: dict[str, Any], runs: dict[str, Any]) -> None:
        """Greedy ids compared across the starts that ran, and the path each sllm start took."""
        ids = [r.get("ids") for r in runs.values() if "skipped" not in r]
        part["identical"] = bool(ids) and ids[0] is not None and all(i == ids[0] for i in ids)
        part["paths"] = {k: r.get("sllm_path") for k, r in runs.items()}
        self.write()

    def tiny(self) -> None:
        from sllmfs.ops.demo import build_model

        src = self.work / "tiny-src"
        build_model(src, "llama", hidden=256, layers=2)
        part: dict[str, Any] = {"runs": {}}
        self.result["tiny"] = part
        part["save"] = save(self.store, TINY, src)
        cpu = os.environ.get("SLLMFS_BENCH_CPU") == "1"
        if cpu:  # the CLI runs vLLM's engine, which needs a GPU
            part["save_backend_vllm"] = {"skipped": "no GPU"}
        else:
            part["save_backend_vllm"] = save(self.store, TINY + "-cli", src, "--backend", "vllm",
                                             "--tensor-parallel-size", str(self.tp))
        side, sock, mnt = self.sidecar("tiny", mount=True)
        runs = part["runs"]
        view = str(mnt / TINY)
        try:
            self.engine(runs, "default_source", "tiny default (source folder)", str(src), "auto", eager=True)
            self.engine(runs, "default_mount", "tiny default (FUSE mount)", view, "auto", eager=True)
            self.engine(runs, "sllm_first", "tiny sllm first (any-TP)", view, "sllm",
                        extra={"sllm_write_back": "sync"}, eager=True)
            self.engine(runs, "sllm_second", "tiny sllm second (fast path)", view, "sllm", eager=True)
            if not cpu and part["save_backend_vllm"].get("rc") == 0:
                self.engine(runs, "sllm_saved", "tiny sllm, save --backend vllm", str(mnt / (TINY + "-cli")),
                            "sllm", eager=True)
        finally:
            stop(side)
        self.settle(part, runs)

    def big(self, layers: int) -> None:
        from limits import pinned_peak
        from llama_shapes import write_checkpoint

        src = self.work / "big-src"
        if not (src / "model.safetensors").exists():
            write_checkpoint(src, layers=layers)
        nbytes = (src / "model.safetensors").stat().st_size
        part: dict[str, Any] = {"bytes": nbytes, "runs": {}}
        self.result["big"] = part
        if os.environ.get("SLLMFS_BENCH_CPU") != "1":
            part["pinned_h2d_peak_gbps"] = pinned_peak()
        part["save"] = save(self.store, BIG, src)
        side, sock, _ = self.sidecar("big", mount=False)
        sllm = {"sllm_model": BIG, "sllm_socket": str(sock)}
        runs = part["runs"]
        try:
            self.engine(runs, "sllm_first", "big sllm first (any-TP + write-back)", str(src), "sllm",
                        extra={**sllm, "sllm_write_back": "sync"})
            subprocess.run(["cat", str(src / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)
            self.engine(runs, "default_warm", "big default (page cache warm)", str(src), "auto")
            self.engine(runs, "sllm_hit", "big sllm hit (memory tier)", str(src), "sllm", extra=sllm)
            subprocess.run([sys.executable, "-m", "sllmfs", "evict", "--model", BIG, "--socket", str(sock)],
                           check=True, capture_output=True)
            part["dropped_page_cache"] = drop_caches()
            self.engine(runs, "sllm_cold", "big sllm cold (evicted, caches dropped)", str(src), "sllm", extra=sllm)
            drop_caches()
            self.engine(runs, "default_cold", "big default cold (caches dropped)", str(src), "auto")
        finally:
            stop(side)
        self.settle(part, runs)


def summary(result: dict[str, Any]) -> None:
    for name in ("tiny", "big"):
        part = result.get(name)
        if not part:
            continue
        print(f"\n{name}: greedy ids identical across loaders = {part.get('identical')}; sllm paths {part['paths']}")
        base = part["runs"].get("default_warm", {})
        print(f"{'start':<16}{'load s':>8}{'first token s':>15}{'load vs default':>17}")
        for key, r in part["runs"].items():
            load, first = r.get("load_phase_s"), r.get("first_token_s")
            ratio = f"{base['load_phase_s'] / load:.2f}x" if load and base.get("load_phase_s") else ""
            print(f"{key:<16}{load if load is not None else '-':>8}"
                  f"{round(first, 1) if first is not None else '-':>15}{ratio:>17}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        if os.environ.get("SLLMFS_BENCH_CPU") == "1":
            cpu_child(*sys.argv[2:5])
        else:
            engine_child(*sys.argv[2:5], eager=sys.argv[5] == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="no GPU: loaders fill vLLM's model on the CPU")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size of every engine (one GPU per rank)")
    ap.add_argument("--layers", type=int, default=32, help="--big: layers of the 7B-shaped checkpoint")
    ap.add_argument("--budget-s", type=float, default=480, help="skip the starts left after this many seconds")
    ap.add_argument("--workdir", default="/tmp/sllmfs-vllm")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    both = not (args.tiny or args.big)
    os.environ["SLLMFS_BENCH_TP"] = str(args.tp)
    os.environ["SLLMFS_BENCH_CPU"] = "1" if args.cpu else "0"
    work = Path(args.workdir)
    os.environ["SLLMFS_STORAGE_PATH"] = str(work / "store")  # where the engines' write-back commits
    import torch
    import vllm

    meta = {"host": platform.node(), "vllm": vllm.__version__, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    bench = Bench(work, Path(args.out), args.tp, args.budget_s,
                  "python bench/bench_vllm.py " + " ".join(sys.argv[1:]), meta)
    if args.tiny or both:
        bench.tiny()
    if args.big or both:
        bench.big(args.layers)
    summary(bench.result)
    print(f"-> {bench.dest}")


if __name__ == "__main__":
    main()
