"""A real SGLang engine loading through sllmfs, next to SGLang's default loader, in one run.

    source .gpu/sglang-env.sh && source .gpu/fuse-env.sh
    python bench/bench_sglang.py --workdir /tmp/sgl [--tiny] [--big] [--layers 32]

--tiny: a tiny Llama (built offline) served from a real FUSE mount; greedy tokens with the
        default loader (from the source folder and from the mount) and with load_format="sllm"
        (first start: any-TP path + write-back; second start: per-rank fast path) must be identical.
--big:  a Llama-2-7B-shaped bf16 checkpoint (~13.5 GB): SGLang's "Load weight end" time for the
        default loader (warm page cache), sllm cold (page cache dropped, memory tier empty) and sllm
        from the memory tier, next to the pinned H2D peak measured in the same run.
--tp N: every engine (and save --backend sglang) with tensor parallelism N (N GPUs; for a
        two-GPU machine: the per-rank fast path and write-back with TP=2).
--sizes 7b,32b (with --tp 2 on two GPUs; bench/tp_sizes.py): 13.48 GB and 65.5 GB (Qwen2.5-32B
        shapes) checkpoints: default loader, sllm any-TP first start, fast path from the memory tier,
        sllm cold; greedy ids, each rank's load phase and copy window, the aggregate next to the
        limits measured in the same run (bench/links.py). --links: load_dict / transformers
        load_model over every GPU too; --save-cli: save --backend sglang beside the sidecar.
        --cpu-check runs what needs no GPU on a tiny shape.
Each engine runs in a fresh process; results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
PROMPTS = [[1, 10, 11, 12, 13], [1, 5, 6, 7]]
from limits import drop_caches  # noqa: E402

LOAD_END = re.compile(r"Load weight end\. elapsed=([0-9.]+) s")


def _tp() -> int:
    """--tp, handed to the engine children through the environment."""
    return int(os.environ.get("SLLMFS_BENCH_TP", "1"))


def engine_child(model_path: str, load_format: str, extra: str, generate: str) -> None:
    """Runs in a fresh process: start an Engine, report load time (from its log) and greedy ids.

    ``generate``: "1" greedy ids through the tokenizer's engine, "ids" greedy ids from token ids with
    no tokenizer (the shaped checkpoints are weights + config only), "0" none."""
    import sglang

    t0 = time.perf_counter()
    kw = dict(model_path=model_path, load_format=load_format, tp_size=_tp(), disable_cuda_graph=True,
              mem_fraction_static=0.5,
              sampling_backend="pytorch", attention_backend="triton", log_level="info", random_seed=0)
    if extra:
        kw["model_loader_extra_config"] = extra
    if generate != "1":
        kw["skip_tokenizer_init"] = True
    llm = sglang.Engine(**kw)
    ready = time.perf_counter() - t0
    ids = None
    if generate != "0":
        out = llm.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": 8, "temperature": 0.0,
                                                               "ignore_eos": True})
        ids = [o["output_ids"] for o in out]
    llm.shutdown()
    print("RESULT " + json.dumps({"ready_s": ready, "ids": ids}), flush=True)


def run_engine(label: str, model_path: str, load_format: str, log_dir: Path, *, extra: str = "",
               generate: bool | str = True, env: dict[str, str] | None = None) -> dict[str, object]:
    mode = generate if isinstance(generate, str) else "1" if generate else "0"
    args = [sys.executable, __file__, "--child", model_path, load_format, extra, mode]
    t0 = time.perf_counter()
    # SGLANG_LOG_MS: per-rank lines with milliseconds, so each rank's copy window can be placed
    proc = subprocess.run(args, capture_output=True, text=True, timeout=540,
                          env={**os.environ, "SGLANG_LOG_MS": "1", **(env or {})})
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    from links import ranks

    res_ranks = ranks(log)
    (log_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") + ".log")).write_text(log)
    res: dict[str, object] = {"label": label, "wall_s": wall, "rc": proc.returncode, "ranks": res_ranks}
    m = LOAD_END.findall(log)
    res["load_weight_s"] = float(m[-1]) if m else None
    sllm = re.findall(r"sllmfs: loaded .* by the ([a-z-]+) path in ([0-9.]+) s", log)
    res["sllm_log"] = [line[-240:] for line in log.splitlines() if "sllmfs:" in line][-6:]
    if sllm:
        res["sllm_path"], res["sllm_load_s"] = sllm[-1][0], float(sllm[-1][1])
    for line in log.splitlines():
        if line.startswith("RESULT "):
            res.update(json.loads(line[7:]))
    if proc.returncode:
        res["error_tail"] = log.splitlines()[-15:]
    print(f"  {label:<28} rc={proc.returncode} load_weight_s={res['load_weight_s']} "
          f"path={res.get('sllm_path')} wall={wall:.1f}s", flush=True)
    return res


class Sidecar:
    def __init__(self, store: Path, sock: Path, mnt: Path, log: Path, pool: str = "48GB"):
        mnt.mkdir(parents=True, exist_ok=True)
        self.sock, self.mnt, self.log = sock, mnt, log
        self.proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(store),
                                      "--socket", str(sock), "--mount", str(mnt), "--mem-pool-size", pool,
                                      "--num-thread", "16", "--chunk-size", "64MiB"],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (mnt / ".sllmfs.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sidecar did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "sllmfs", *args, "--socket", str(self.sock)], check=True,
                       capture_output=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def tiny(work: Path, logs: Path, save_only: bool = False) -> dict[str, object]:
    from sllmfs.ops.demo import build_model

    src, store = work / "tiny-src", work / "store"
    build_model(src, "llama", hidden=256, layers=2)
    subprocess.run([sys.executable, "-m", "sllmfs", "save", "--model", "demo/tiny-llama", "--local-model-path",
                    str(src), "--storage-path", str(store), "--force"], check=True)
    side = Sidecar(store, work / "sllmfs.sock", work / "mnt", logs / "sidecar-tiny.log")
    view = str(side.mnt / "demo" / "tiny-llama")
    saved: dict[str, object] = {}
    try:
        runs = [run_engine("default (source folder)", str(src), "auto", logs)]
        if not save_only:
            runs += [run_engine("default (FUSE mount)", view, "auto", logs),
                     run_engine("sllm first (any-TP)", view, "sllm", logs, extra='{"sllm_write_back": "sync"}'),
                     run_engine("sllm second (fast path)", view, "sllm", logs)]
        # the per-rank variant made ahead of time by the CLI, then served by the fast path
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "sllmfs", "save", "--backend", "sglang", "--model",
                               "demo/tiny-llama-cli", "--local-model-path", str(src), "--storage-path", str(store),
                               "--tensor-parallel-size", str(_tp())], capture_output=True, text=True, timeout=400)
        saved = {"rc": proc.returncode, "seconds": time.perf_counter() - t0,
                 "stored": [x for x in proc.stdout.splitlines() if x.startswith("stored ")],
                 "tail": (proc.stdout + proc.stderr).splitlines()[-8:]}
        runs.append(run_engine("sllm after save --backend sglang", str(side.mnt / "demo" / "tiny-llama-cli"),
                               "sllm", logs))
    finally:
        side.stop()
    ref = runs[0].get("ids")
    return {"runs": runs, "identical": bool(ref) and all(r.get("ids") == ref for r in runs),
            "save_backend_sglang": saved, "cli_variant_fast": runs[-1].get("sllm_path") == "fast"}


def big(work: Path, logs: Path, layers: int, src: Path | None, ab_overlap: bool = False, only_fast: bool = False,
        profile: bool = False, reps: int = 1,
        saved: Callable[[dict[str, object]], None] = lambda part: None) -> dict[str, object]:
    from limits import pinned_peak
    from llama_shapes import write_checkpoint

    src, store = src or work / "big-src", work / "store"
    if not (src / "model.safetensors").exists():
        write_checkpoint(src, layers=layers)
    subprocess.run([sys.executable, "-m", "sllmfs", "save", "--model", "bench/llama-7b", "--local-model-path",
                    str(src), "--storage-path", str(store), "--force"], check=True)
    nbytes = (src / "model.safetensors").stat().st_size
    peak = pinned_peak()
    subprocess.run(["cat", str(src / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)  # warm
    side = Sidecar(store, work / "sllmfs.sock", work / "mnt", logs / "sidecar-big.log")
    view = str(side.mnt / "bench" / "llama-7b")
    runs: dict[str, object] = {}
    part = {"bytes": nbytes, "pinned_h2d_peak_gbps": peak, "runs": runs}
    try:
        if not only_fast:
            runs["default_warm_page_cache"] = run_engine("default (page cache)", str(src), "auto", logs,
                                                         generate=False)
        runs["sllm_any_tp_first"] = run_engine("sllm any-TP + write-back", view, "sllm", logs,
                                               extra='{"sllm_write_back": "sync"}', generate=False)
        if only_fast:
            # the memory-tier runs below must find the per-rank variant resident (SLLMFS_BENCH_NO_WARM:
            # leave that to the write-back, which asks the sidecar to fill what it wrote)
            from sllmfs.store.store import Store

            for key in Store(store).get("bench/llama-7b").variants:
                if key.startswith("sglang.") and not os.environ.get("SLLMFS_BENCH_NO_WARM"):
                    side.cli("load", "--model", "bench/llama-7b", "--variant", key, "--warm")
        else:
            side.cli("evict", "--model", "bench/llama-7b")
            drop_caches()
            runs["sllm_fast_cold"] = run_engine("sllm fast, cold", view, "sllm", logs, generate=False)
        saved(part)
        for rep in range(reps):  # fresh processes vary: repeat the headline run
            key = "sllm_fast_memory_tier" + (f"_{rep + 1}" if rep else "")
            runs[key] = run_engine(f"sllm fast, memory tier {rep + 1}", view, "sllm", logs, generate=False)
            saved(part)
        if ab_overlap:  # the same start with the copy after the model build (the one change)
            runs["sllm_fast_memory_tier_no_overlap"] = run_engine(
                "sllm fast, memory tier, copy after build", view, "sllm", logs, generate=False,
                extra='{"sllm_overlap": false}')
            saved(part)
        if profile:  # where the load phase goes (cProfile inflates Python-heavy parts)
            runs["sllm_fast_memory_tier_profiled"] = run_engine(
                "sllm fast, memory tier, profiled", view, "sllm", logs, generate=False,
                env={"SLLMFS_PROFILE_LOAD": str(logs / "profile")})
    finally:
        side.stop()
    return part


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-links":
        from multi_gpu_load import links_child

        links_child(sys.argv[2])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/sllmfs-sglang")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--tiny-save-only", action="store_true", help="--tiny with only default vs save --backend sglang")
    ap.add_argument("--ab-overlap", action="store_true",
                    help="--big also starts from the memory tier with the copy after the model build")
    ap.add_argument("--only-fast", action="store_true", help="--big without the default loader and the cold start")
    ap.add_argument("--profile", action="store_true", help="--big also profiles a memory-tier start")
    ap.add_argument("--reps", type=int, default=1, help="--big: memory-tier starts with the defaults")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size of every engine (one GPU per rank)")
    ap.add_argument("--sizes", default="", help="7b,32b: TP=--tp SGLang starts on these shapes (bench/tp_sizes.py)")
    ap.add_argument("--links", action="store_true", help="--sizes: load_dict / load_model over every GPU too")
    ap.add_argument("--save-cli", action="store_true", help="--sizes 7b: save --backend sglang beside the sidecar")
    ap.add_argument("--cpu-check", action="store_true", help="what --sizes runs without a GPU, on a tiny shape")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--big-src", default=None, help="reuse a checkpoint folder (e.g. bench_gpu_load's)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    os.environ["SLLMFS_BENCH_TP"] = str(args.tp)
    work = Path(args.workdir)
    logs = Path(args.out) / "sglang-logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.cpu_check:
        from tp_sizes import cpu_check

        found = cpu_check(work, logs)
        print(json.dumps(found, indent=1))
        return
    import sglang
    import torch

    result: dict[str, object] = {"bench": "sglang", "host": platform.node(), "gpu": torch.cuda.get_device_name(0),
                                 "gpus": torch.cuda.device_count(),
                                 "sglang": sglang.__version__, "torch": torch.__version__, "tp": args.tp,
                                 "command": "python bench/bench_sglang.py " + " ".join(sys.argv[1:]),
                                 "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                                 "no_warm": bool(os.environ.get("SLLMFS_BENCH_NO_WARM"))}
    sizes = [x for x in args.sizes.split(",") if x]
    tag = f"-tp{args.tp}-{'-'.join(sizes)}" if sizes else ""
    dest = Path(args.out) / f"sglang{tag}-{time.strftime('%Y%m%d-%H%M')}.json"

    def saved(key: str) -> Callable[[dict[str, object]], None]:
        def write(part: dict[str, object]) -> None:  # after each engine: a run cut short keeps what it measured
            result[key] = part
            dest.write_text(json.dumps(result, indent=1))
        return write

    if args.tiny or args.tiny_save_only:
        result["tiny"] = tiny(work, logs, save_only=args.tiny_save_only)
        saved("tiny")(result["tiny"])  # type: ignore[arg-type]
    if args.big:
        saved("big")(big(work, logs, args.layers, Path(args.big_src) if args.big_src else None,
                         ab_overlap=args.ab_overlap, only_fast=args.only_fast, profile=args.profile,
                         reps=args.reps,
                         saved=saved("big")))
    if sizes:
        from tp_sizes import sized

        for i, size in enumerate(sizes):
            saved(size)(sized(size, work, logs, args.tp, links=args.links and i == 0,
                              save_cli=args.save_cli and size == "7b", saved=saved(size)))
    if "tiny" in result:
        t = result["tiny"]
        assert isinstance(t, dict)
        print(f"\ntiny: greedy ids identical across loaders = {t['identical']}; save --backend sglang "
              f"{t['save_backend_sglang']}; its variant served by the fast path = {t['cli_variant_fast']}")
    if "big" in result:
        b = result["big"]
        assert isinstance(b, dict)
        peak, nb = b["pinned_h2d_peak_gbps"], b["bytes"]
        assert isinstance(peak, float) and isinstance(nb, int)
        base = b["runs"].get("default_warm_page_cache", {}).get("load_weight_s")  # type: ignore[union-attr]
        print(f"\n{nb / 1e9:.2f} GB; pinned H2D peak {peak:.1f} GB/s")
        print(f"{'run':<26}{'load s':>8}{'GB/s':>8}{'/peak':>7}{'speedup':>9}")
        for name, r in b["runs"].items():  # type: ignore[union-attr]
            s = r["load_weight_s"]
            if s:
                g = nb / s / 1e9
                print(f"{name:<26}{s:>8.2f}{g:>8.1f}{g / peak:>7.2f}{(base or 0) / s:>9.2f}")
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
