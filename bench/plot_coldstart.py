"""Stacked bars of where a start's time goes, from bench_coldstart.py's JSON (SVG, no plotting library).

    python bench/plot_coldstart.py bench/results/coldstart-*.json --out bench/results/coldstart.svg

Also prints the phases as a Markdown table (the README's), one row per start.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PHASES = [  # (label, colour)
    ("import sglang", "#9e9e9e"),
    ("engine processes start", "#bdbdbd"),
    ("scheduler other", "#80cbc4"),
    ("load weight", "#e53935"),
    ("KV cache", "#fb8c00"),
    ("CUDA graphs", "#3949ab"),
    ("first generate", "#8e24aa"),
    ("rest", "#eeeeee"),
]


def phases(r: dict[str, Any]) -> list[float]:
    graphs = sum(r.get("cuda_graph_s", {}).values())
    load, kv, sched = r["load_weight_s"], r["kv_cache_s"], r["scheduler_e2e_s"]
    parts = [r["import_sglang_s"], r["engine_s"] - sched, sched - load - kv - graphs, load, kv, graphs,
             r["first_generate_s"]]
    return parts + [max(0.0, r["first_token_wall_s"] - sum(parts))]


def svg(rows: list[tuple[str, list[float]]]) -> str:
    scale, left, bar, gap = 5.0, 230, 22, 10  # px per second
    width = left + int(max(sum(p) for _, p in rows) * scale) + 80
    height = 40 + len(rows) * (bar + gap) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="12">', '<text x="10" y="18">SGLang 0.5.17, 13.48 GB bf16, one H200: launch to first token (s)'
           '</text>']
    for i, (name, parts) in enumerate(rows):
        y, x = 30 + i * (bar + gap), float(left)
        out.append(f'<text x="10" y="{y + 15}">{name}</text>')
        for (label, colour), s in zip(PHASES, parts, strict=True):
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{s * scale:.1f}" height="{bar}" fill="{colour}">'
                       f'<title>{label} {s:.2f} s</title></rect>')
            x += s * scale
        out.append(f'<text x="{x + 4:.1f}" y="{y + 15}">{sum(parts):.1f}</text>')
    y = 30 + len(rows) * (bar + gap) + 10
    x = 10.0
    for label, colour in PHASES:
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{x + 16}" y="{y + 11}">{label}</text>')
        x += 30 + 7 * len(label)
    return "\n".join(out + ["</svg>"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default="bench/results/coldstart.svg")
    a = ap.parse_args()
    rows = [(k, phases(r)) for f in a.results for k, r in json.loads(Path(f).read_text())["runs"].items()
            if r.get("rc") == 0]
    if not rows:
        raise SystemExit("no successful start in " + " ".join(a.results))
    Path(a.out).write_text(svg(rows))
    print("| start | first token s | " + " | ".join(label for label, _ in PHASES) + " |")
    print("|---" * (len(PHASES) + 2) + "|")
    for name, p in rows:
        print(f"| {name} | {sum(p):.1f} | " + " | ".join(f"{s:.2f}" for s in p) + " |")


if __name__ == "__main__":
    main()
