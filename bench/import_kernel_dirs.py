"""Does pointing the kernel caches at sllmfs' working directories slow a process's imports? (#21:
the `--load-format sllm` start's scheduler child spent 2.2-4 s longer in its imports than the default
start's in every pair so far, and 3.3 s less with SLLMFS_KERNEL_CACHE=0: bench/NOTES-coldstart.md.)

Fresh interpreters (-X importtime), alternating: the import SGLang's scheduler process makes before `Scheduler()`,
with the environment as it is, and with the variables the plugin sets (TRITON_CACHE_DIR,
TVM_FFI_CACHE_DIR, FLASHINFER_WORKSPACE_BASE, TORCHINDUCTOR_CACHE_DIR) pointing at directories of
their own (``--dirs``: empty ones by default, or a kernel-cache working dir a start left). Medians.

    python3 bench/import_kernel_dirs.py [--rounds 3] [--module sglang.srt.managers.scheduler] [--dirs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllmfs.integrations.kernel_cache import CACHE_VARS  # noqa: E402

PROBE = "import time; t = time.perf_counter(); import {m}; print(time.perf_counter() - t)"
TOP = 12  # modules listed by how much more of their own import time the pointed runs spent


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _one(module: str, env: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    """Seconds to import ``module`` in a fresh interpreter, the CPU seconds the interpreter used (user + sys:
    an import whose wall time swings while its CPU time does not is waiting, not working), and each module's
    own seconds (-X importtime)."""
    cpu0 = _children_cpu()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", PROBE.format(m=module)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode or not proc.stdout.strip():
        raise SystemExit(f"import_kernel_dirs: importing {module} failed: {proc.stderr.strip().splitlines()[-1:]}")
    own: dict[str, float] = {}
    for line in proc.stderr.splitlines():  # "import time:  self [us] | cumulative | name" (the header skips)
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            name = parts[2].strip()
            own[name] = own.get(name, 0.0) + int(parts[0]) / 1e6
    return float(proc.stdout.strip().splitlines()[-1]), _children_cpu() - cpu0, own


def _slower_modules(runs: dict[str, list[dict[str, float]]]) -> list[tuple[str, float]]:
    """The modules whose own import time grew most with the directories pointed (medians per kind)."""
    def med(kind: str, name: str) -> float:
        return statistics.median(r.get(name, 0.0) for r in runs[kind])

    names = {n for rs in runs.values() for r in rs for n in r}
    diff = [(n, med("kernel dirs pointed", n) - med("as is", n)) for n in names]
    return [(n, round(d, 4)) for n, d in sorted(diff, key=lambda x: -x[1])[:TOP]]


def _heaviest(runs: list[dict[str, float]]) -> list[tuple[str, float]]:
    """The modules with the most own import time (medians over the rounds)."""
    names = {n for r in runs for n in r}
    med = [(n, statistics.median(r.get(n, 0.0) for r in runs)) for n in names]
    return [(n, round(s, 3)) for n, s in sorted(med, key=lambda x: -x[1])[:TOP]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--module", default="sglang.srt.managers.scheduler")
    ap.add_argument("--dirs", type=Path, default=None, help="a kernel-cache working dir (kind subdirs) to point at")
    ap.add_argument("--kinds", default=",".join(CACHE_VARS), help="which caches to point (of: %(default)s)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = args.dirs or Path(tempfile.mkdtemp(prefix="kc-empty-"))
    plain = {k: v for k, v in os.environ.items() if k not in {var for var, _ in CACHE_VARS.values()}}
    pointed = dict(plain)
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        pointed[CACHE_VARS[kind][0]] = str(root / kind)
    _one(args.module, plain)  # the first import reads the files from disk: not counted
    got: dict[str, list[float]] = {"as is": [], "kernel dirs pointed": []}
    cpu: dict[str, list[float]] = {"as is": [], "kernel dirs pointed": []}
    own: dict[str, list[dict[str, float]]] = {"as is": [], "kernel dirs pointed": []}
    for i in range(args.rounds):  # which goes first alternates: an order effect is not a cost
        for kind, env in ((("as is", plain), ("kernel dirs pointed", pointed))[:: 1 if i % 2 == 0 else -1]):
            seconds, cpu_s, modules = _one(args.module, env)
            got[kind].append(seconds)
            cpu[kind].append(round(cpu_s, 3))
            own[kind].append(modules)
    files = {k: sum(1 for p in (root / k).rglob("*") if p.is_file()) for k in kinds}  # what the imports wrote
    out = {"command": " ".join(["python3", *sys.argv]),
           "module": args.module, "dirs": str(root), "kinds": kinds, "files_written": files, "seconds": got,
           "cpu_s": cpu, "cpu_note": "user + sys of the whole interpreter (its start and exit included)",
           "median_s": {k: statistics.median(v) for k, v in got.items()}}
    out["added_s"] = out["median_s"]["kernel dirs pointed"] - out["median_s"]["as is"]
    out["slower_modules_s"] = _slower_modules(own)  # where the added seconds went, module by module
    out["heaviest_modules_s"] = _heaviest(own["as is"])  # where an import's seconds go at all
    print(json.dumps(out))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"import-kernel-dirs-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json").write_text(
            json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
