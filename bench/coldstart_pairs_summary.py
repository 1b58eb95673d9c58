"""Every SGLang start pair so far, pooled (#21.3): `bench_coldstart.py --part pairs` runs on the H200 hold 1-3
pairs each (a device call's worth), too few alone under a start's +-3 s spread.

For each pair (the default loader and `--load-format sllm` from the memory tier, same machine, order alternated)
it prints how much sooner the sllm start was ready from its launch, on the engine's clock (Engine() to ready), and
on the scheduler's own clock (its init to ready: load, KV cache, CUDA graphs; the scheduler child's imports,
which run before any code of ours, left out), and the load phases; then the medians against the goal (the
default's load phase - 0.3 s). Reads the JSON files given (default: bench/results/coldstart-pairs-*.json).

    python3 bench/coldstart_pairs_summary.py [FILES...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limits import write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def pairs_of(path: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(default, sllm) for every pair in one run whose two starts both ran and sllm took the fast path."""
    runs = json.loads(path.read_text())["runs"]
    by_pair: dict[str, dict[str, dict[str, Any]]] = {}
    for key, r in runs.items():
        if key.startswith("pair") and "_" in key:
            i, kind = key[4:].split("_", 1)
            by_pair.setdefault(i, {})[kind] = r
    out = []
    for g in by_pair.values():
        d, m = g.get("default"), g.get("sllm")
        if d and m and d.get("rc") == 0 and m.get("rc") == 0 and m.get("sllm_path") == "fast" and \
                all(k in r for r in (d, m) for k in ("engine_s", "scheduler_e2e_s", "load_weight_s")):
            out.append((d, m))
    return out


def interval(values: list[float], draws: int = 10000, level: float = 0.9) -> tuple[float, float]:
    """A bootstrap interval of the median (resampled with a fixed seed): how far the pairs so far pin it."""
    import random

    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    cut = int(draws * (1 - level) / 2)
    return meds[cut], meds[draws - 1 - cut]


def ready(r: dict[str, Any]) -> float:  # launch to engine ready (the first token minus its generate)
    return float(r["first_token_wall_s"]) - float(r["first_generate_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    files = args.files or sorted(f for f in RESULTS.glob("coldstart-pairs-*.json")
                                 if not f.name.startswith("coldstart-pairs-summary-"))  # this script's own
    rows = []
    for f in files:
        for d, m in pairs_of(f):
            rows.append({"run": f.name, "launch_s": ready(d) - ready(m),
                         "engine_s": float(d["engine_s"]) - float(m["engine_s"]),
                         "scheduler_s": float(d["scheduler_e2e_s"]) - float(m["scheduler_e2e_s"]),
                         "load_default_s": float(d["load_weight_s"]), "load_sllm_s": float(m["load_weight_s"])})
    if not rows:
        raise SystemExit("coldstart_pairs_summary: no complete pair in " + ", ".join(map(str, files)))
    need = statistics.median(r["load_default_s"] for r in rows) - 0.3
    med = {k: statistics.median(r[k] for r in rows) for k in ("launch_s", "engine_s", "scheduler_s")}
    for r in rows:
        print(f"{r['run']:<48} sooner: launch {r['launch_s']:+6.2f} s  engine {r['engine_s']:+6.2f} s  "
              f"scheduler {r['scheduler_s']:+6.2f} s  load {r['load_default_s']:.2f} / {r['load_sllm_s']:.2f} s")
    spread = {k: interval([r[k] for r in rows]) for k in med}
    for k, (lo, hi) in spread.items():
        print(f"  {k[:-2]:<9} clock: median {med[k]:+.2f} s, 90% bootstrap interval of the median {lo:+.2f} .. "
              f"{hi:+.2f} s (goal {need:.2f} s{': inside it' if lo <= need <= hi else ''})")
    print(f"median of {len(rows)} pairs, sllm ready sooner: from launch {med['launch_s']:+.2f} s, engine "
          f"{med['engine_s']:+.2f} s, scheduler's clock {med['scheduler_s']:+.2f} s; goal >= {need:.2f} s "
          f"(default load - 0.3): {med['launch_s'] / need:.2f}x / {med['engine_s'] / need:.2f}x / "
          f"{med['scheduler_s'] / need:.2f}x")
    if args.out:
        write_result(args.out, "coldstart-pairs-summary", {f"sooner on the {k[:-2]} clock / goal": v / need
                                                           for k, v in med.items()},
                     {"files": [f.name for f in files], "pairs": rows, "goal_sooner_s": need,
                      "median_sooner_s": med, "median_interval_90_s": spread})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
