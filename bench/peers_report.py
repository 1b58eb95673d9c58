"""The table and the plot of bench/peers.py results (runs anywhere: no GPU, no torch).

    python3 bench/peers_report.py bench/results/peers-main-*.json bench/results/peers-scaling-*.json \
        bench/results/peers-sglang-*.json [--png bench/results/peers.png] [--readme README.md]

Merges the JSON files (a later file's load replaces an earlier one's of the same checkpoint, loader and
placement), prints a Markdown table of the main checkpoint (GB/s and seconds per placement, the ratio to
the pinned H2D peak measured in the same run, the ratio to the best peer in that column; sllmfs rows in
bold), the readers through the mount against the same readers from tmpfs and the disk (`--part mount`,
issue 20's goals) and the scaling figures, and draws the PNG: GB/s per loader and placement with the pinned peak,
load time against checkpoint size, GB/s for 100 vs 10,000 tensors. --readme replaces the text between
`<!-- peers:begin -->` and `<!-- peers:end -->` with the table and the image (or prints that block when
the markers are missing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import GOAL_COLD_VS_DISK, GOAL_HIT_VS_TMPFS, MOUNT_READERS  # noqa: E402  (which reader each mount row is: peers.py's contract)

BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"

# row order, label, sllmfs's own row
ROWS = (("safetensors", "safetensors `load_file`", False),
        ("transformers", "transformers `from_pretrained`", False),
        ("fastsafetensors", "fastsafetensors (no GDS)", False),
        ("runai", "Run:ai Model Streamer", False),
        ("instanttensor", "InstantTensor", False),
        ("sglang", "SGLang default loader ¹", False),
        ("sllmfs", "**sllmfs**, handles → GPU", True),
        ("sllmfs-fuse", "**sllmfs**, FUSE view + safetensors", True),
        ("fastsafetensors@mount", "**sllmfs**, FUSE view + fastsafetensors", True),
        ("instanttensor@mount", "**sllmfs**, FUSE view + InstantTensor", True))
SHORT = {"safetensors": "safetensors\nload_file", "transformers": "transformers\nfrom_pretrained",
         "fastsafetensors": "fastsafetensors\n(no GDS)", "runai": "Run:ai Model\nStreamer",
         "instanttensor": "InstantTensor", "sglang": "SGLang\ndefault loader", "sllmfs": "sllmfs\nhandles → GPU",
         "sllmfs-fuse": "sllmfs FUSE view\n+ safetensors",
         "fastsafetensors@mount": "sllmfs FUSE view\n+ fastsafetensors",
         "instanttensor@mount": "sllmfs FUSE view\n+ InstantTensor"}  # plot labels
LABEL = {key: SHORT[key].replace("\n", " ") for key in SHORT}
SLLMFS = {key for key, _, ours in ROWS if ours}
# column, header, the placement each row reports there (sllmfs: the sidecar owns the placement)
COLUMNS: tuple[tuple[str, str, dict[str, str]], ...] = (("tmpfs", "tmpfs", {}),
           ("warm", "page cache ²", {}),
           ("cold", "cold", {}),
           ("hit", "memory tier ³", {}))
COLORS = {"tmpfs": "#4c72b0", "warm": "#55a868", "cold": "#c44e52", "hit": "#8172b2"}


@dataclass
class Results:
    runs: dict[tuple[str, str, str, str], dict[str, Any]]  # (group, case, loader, placement) -> run
    files: list[str]

    def get(self, group: str, case: str, loader: str, placement: str) -> dict[str, Any] | None:
        return self.runs.get((group, case, loader, placement))

    def cases(self, group: str) -> list[str]:
        """This group's checkpoints, smallest first (then fewest tensors)."""
        sizes = {r["case"]: (r["bytes"], r["tensors"]) for r in self.runs.values() if r["group"] == group}
        return sorted(sizes, key=lambda c: sizes[c])


def load(paths: list[Path]) -> Results:
    runs: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for p in paths:
        data = json.loads(p.read_text())
        limits = data.get("limits", {})
        for r in data.get("runs", []):
            # each run keeps the limits measured with it: files may come from different machines
            r = {**r, "peak": limits.get("pinned_h2d_peak_gbps"), "disk": limits.get("disk_read_gbps"),
                 "source": p.name, "gpu": data.get("gpu")}
            runs[(r["group"], r["case"], r["loader"], r["placement"])] = r
    return Results(runs, [p.name for p in paths])


def good(r: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """A load that ran, finished, did not deliver wrong bytes and was not found invalid afterwards."""
    return r is not None and "gbps" in r and "error" not in r and r.get("ok") is not False and "invalid" not in r


def status(r: dict[str, Any] | None) -> str:
    """Why a load has no figure: skipped, failed, wrong (bytes), or '' when it never ran."""
    if r is None:
        return ""
    if "invalid" in r:
        return "invalid"
    return "skipped" if "skipped" in r else "wrong" if r.get("ok") is False else "failed"


# ---------------------------------------------------------------------------------------------
# the tables


def main_case(res: Results) -> str | None:
    cases = res.cases("main")
    return cases[-1] if cases else None


def column_runs(res: Results, case: str, column: str, moves: dict[str, str]) -> dict[str, dict[str, Any] | None]:
    return {key: res.get("main", case, key, moves.get(key, column)) for key, _l, _o in ROWS}


def best_peer(runs: dict[str, dict[str, Any] | None]) -> float | None:
    speeds = [r["gbps"] for key, r in runs.items() if key not in SLLMFS and good(r)]
    return max(speeds) if speeds else None


def cell(r: dict[str, Any] | None, best: float | None, top: float | None) -> list[str]:
    """GB/s (seconds; bold: the column's fastest), ratio to the pinned peak, ratio to the best peer."""
    if r is None:
        return ["—", "", ""]
    if "skipped" in r:
        return ["skipped", "", ""]
    if "error" in r or "gbps" not in r:
        return ["failed", "", ""]
    speed = f"{r['gbps']:.1f} ({r['seconds']:.2f} s)"
    if r.get("ok") is False:
        speed += " ✗"
    if good(r) and top and r["gbps"] >= top:
        speed = f"**{speed}**"
    peak = f"{r['gbps'] / r['peak']:.2f}" if r.get("peak") else ""
    vs = f"{r['gbps'] / best:.2f}×" if best and good(r) else ""
    return [speed, peak, vs]


def main_table(res: Results) -> str:
    case = main_case(res)
    if case is None:
        return "(no runs of the main checkpoint in these results)"
    cols = [(name, title, column_runs(res, case, name, moves)) for name, title, moves in COLUMNS]
    best = {name: best_peer(runs) for name, _t, runs in cols}
    # peers have no memory tier: a hit is set against the fastest any peer loads from anywhere
    best["hit"] = max((b for b in best.values() if b is not None), default=None)
    top = {name: max((r["gbps"] for r in runs.values() if good(r)), default=None) for name, _t, runs in cols}
    head = ["loader"] + [h for _n, title, _r in cols for h in (f"{title} GB/s (s)", "/ peak", "/ best peer")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, label, _ours in ROWS:
        row = [label]
        for name, _t, runs in cols:
            row += cell(runs[key], best[name], top[name])
        if any(c not in ("—", "") for c in row[1:]):
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def caption(res: Results) -> str:
    case = main_case(res)
    runs = [r for r in res.runs.values() if r["group"] == "main" and r["case"] == case]
    if not runs:
        return ""
    r0 = runs[0]
    peaks = sorted({f"{r['peak']:.1f}" for r in runs if r.get("peak")})
    disks = sorted({f"{r['disk']:.2f}" for r in runs if r.get("disk")})
    where = f" on {r0['gpu']}" if r0.get("gpu") else ""
    return (f"{r0['bytes'] / 1e9:.2f} GB bf16 checkpoint, {r0['tensors']} tensors, into GPU memory{where}, each "
            f"load in a fresh process, every tensor checksummed; pinned H2D peak {' / '.join(peaks) or '?'} GB/s, "
            f"disk read {' / '.join(disks) or '?'} GB/s in the same runs ({', '.join(res.files)}).")


FOOTNOTES = ("¹ SGLang's \"Load weight end\" (its model construction included; weights not checksummed).  \n"
             "² the file in the page cache; sllmfs: a first load with the memory tier empty and the stored "
             "files in the page cache (the sidecar fills its tier while the GPU copy streams).  \n"
             "³ sllmfs only: a hit in the sidecar's memory tier, set against the best peer of any column. "
             "Cold: page cache dropped (sllmfs: evicted "
             "too). ✗: wrong bytes.")


MOUNT_LABEL = {"safetensors": "safetensors `load_file`", "fastsafetensors": "fastsafetensors (no GDS)",
               "instanttensor": "InstantTensor", "cat": "`cat` (plain read, no GPU)"}


def mount_ratio(res: Results, r: dict[str, Any] | None, key: str) -> tuple[float, float] | None:
    """(ratio, the figure it is set against) of a mount row: vs_tmpfs / vs_disk as peers.py recorded them,
    or (files from before those fields) the same file's tmpfs load of the same reader and its disk limit."""
    if not good(r):
        return None
    if key in r:
        v = r[key]
        return (v["ratio"], v["gbps"]) if "ratio" in v else None
    if key == "vs_disk":
        return (r["gbps"] / r["disk"], r["disk"]) if r.get("disk") and r["placement"] == "cold" else None
    pair = res.get(r["group"], r["case"], MOUNT_READERS[r["loader"]], "tmpfs")
    if good(pair) and pair["source"] == r["source"]:
        return r["gbps"] / pair["gbps"], pair["gbps"]
    return None


def mount_table(res: Results) -> str:
    """Each reader through the mount (a model resident in the memory tier, and cold) beside itself from
    tmpfs and the disk, in the same run: issue 20's goals are 0.8x and 0.9x."""
    case = main_case(res)
    readers = [m for m in MOUNT_READERS if case and any(res.get("main", case, m, p) for p in ("hit", "cold"))]
    if not readers:
        return "(no runs through the mount in these results)"
    assert case is not None
    head = ["reader", "tmpfs GB/s", "mount, memory tier GB/s", "/ tmpfs", "mount, cold GB/s", "/ disk"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in readers:
        peer = MOUNT_READERS[m]
        tmpfs = res.get("main", case, peer, "tmpfs")
        row = [MOUNT_LABEL.get(peer, peer), f"{tmpfs['gbps']:.2f}" if good(tmpfs) else status(tmpfs) or "—"]
        for placement, key in (("hit", "vs_tmpfs"), ("cold", "vs_disk")):
            r = res.get("main", case, m, placement)
            ratio = mount_ratio(res, r, key)
            row += [f"{r['gbps']:.2f}" if good(r) else status(r) or "—",
                    f"{ratio[0]:.2f}× of {ratio[1]:.2f}" if ratio else ""]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\nGoals (issue 20): through the mount of a model in the memory tier ≥ {GOAL_HIT_VS_TMPFS}× the same "
                 f"reader from tmpfs; cold ≥ {GOAL_COLD_VS_DISK}× the disk's read. Each row in a fresh process; a "
                 "memory-tier row starts with no passthrough copy and the page cache dropped (its first open "
                 "makes the copy); cold: evicted, page cache dropped.")
    return "\n".join(lines)


def scaling_table(res: Results) -> str:
    sizes, counts = res.cases("size"), res.cases("count")
    if not sizes and not counts:
        return "(no scaling runs in these results)"
    head = ["loader"] + [f"{gb(res, 'size', c)} GB: s" for c in sizes] + [
        f"{tensors(res, 'count', c):,} tensors: GB/s" for c in counts]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, label, _ours in ROWS:
        row = [label]
        for group, cases, field, fmt in (("size", sizes, "seconds", "{:.2f}"), ("count", counts, "gbps", "{:.1f}")):
            for c in cases:
                r = res.get(group, c, key, "hit" if key in SLLMFS else "warm")
                row.append(fmt.format(r[field]) if good(r) else status(r) or "—")
        if any(c != "—" for c in row[1:]):
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def gb(res: Results, group: str, case: str) -> str:
    r = next(r for r in res.runs.values() if r["group"] == group and r["case"] == case)
    return f"{r['bytes'] / 1e9:.2f}"


def tensors(res: Results, group: str, case: str) -> int:
    return int(next(r for r in res.runs.values() if r["group"] == group and r["case"] == case)["tensors"])


# ---------------------------------------------------------------------------------------------
# the plot


def plot(res: Results, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 9.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.15, 1])
    plot_main(res, fig.add_subplot(grid[0, :]))
    plot_sizes(res, fig.add_subplot(grid[1, 0]))
    plot_counts(res, fig.add_subplot(grid[1, 1]))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_main(res: Results, ax: Any) -> None:
    case = main_case(res)
    places = ("tmpfs", "warm", "cold", "hit")
    keys = [k for k, _l, _o in ROWS if case and any(res.get("main", case, k, p) for p in places)]
    if not case or not keys:
        ax.text(0.5, 0.5, "no runs of the main checkpoint", ha="center", transform=ax.transAxes)
        return
    width = 0.8 / len(COLUMNS)
    for j, (name, title, moves) in enumerate(COLUMNS):
        runs = column_runs(res, case, name, moves)
        xs = [i + (j - (len(COLUMNS) - 1) / 2) * width for i in range(len(keys))]
        rs = [runs[k] for k in keys]
        ys = [r["gbps"] if good(r) else 0.0 for r in rs]
        bars = ax.bar(xs, ys, width, label=title.rstrip(" ²³"), color=COLORS[name])
        for bar, y, r in zip(bars, ys, rs, strict=True):
            note = f"{y:.1f}" if y else status(r)
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                        fontsize=7 if y else 6, rotation=0 if y else 90, xytext=(0, 1), textcoords="offset points")
    peaks = [r["peak"] for r in res.runs.values() if r["case"] == case and r.get("peak")]
    if peaks:
        ax.axhline(max(peaks), color="black", ls="--", lw=1, label=f"pinned H2D peak {max(peaks):.1f} GB/s")
    disks = [r["disk"] for r in res.runs.values() if r["case"] == case and r.get("disk")]
    if disks:
        ax.axhline(max(disks), color="gray", ls=":", lw=1, label=f"disk read {max(disks):.2f} GB/s")
    ax.set_xticks(range(len(keys)), [SHORT[k] for k in keys], fontsize=8)
    for tick, k in zip(ax.get_xticklabels(), keys, strict=True):
        tick.set_fontweight("bold" if k in SLLMFS else "normal")
    r0 = next(r for r in res.runs.values() if r["case"] == case)
    ax.set_ylabel("GB/s into GPU memory")
    ax.set_title(f"{r0['bytes'] / 1e9:.2f} GB bf16 checkpoint ({r0['tensors']} tensors), fresh process per load")
    ax.legend(fontsize=8, loc="upper left")


def scaling_keys(res: Results, group: str) -> list[str]:
    return [k for k, _l, _o in ROWS if any(r["loader"] == k and r["group"] == group and good(r)
                                           for r in res.runs.values())]


def plot_sizes(res: Results, ax: Any) -> None:
    cases = res.cases("size")
    keys = scaling_keys(res, "size")
    if not keys:
        ax.text(0.5, 0.5, "no size-scaling runs", ha="center", transform=ax.transAxes)
        return
    for k in keys:
        pts = [(r["bytes"] / 1e9, r["seconds"]) for c in cases
               for r in [res.get("size", c, k, "hit" if k in SLLMFS else "warm")] if good(r)]
        ax.plot(*zip(*pts, strict=True), marker="o", label=LABEL[k], lw=2.5 if k in SLLMFS else 1.2)
    ax.set_xlabel("checkpoint size (GB)")
    ax.set_ylabel("load time (s)")
    ax.set_title("load time against size (page cache warm / sllmfs memory tier)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_counts(res: Results, ax: Any) -> None:
    cases = res.cases("count")
    keys = scaling_keys(res, "count")
    if not keys:
        ax.text(0.5, 0.5, "no tensor-count runs", ha="center", transform=ax.transAxes)
        return
    width = 0.8 / max(len(cases), 1)
    for j, c in enumerate(sorted(cases, key=lambda c: tensors(res, "count", c))):
        rs = [res.get("count", c, k, "hit" if k in SLLMFS else "warm") for k in keys]
        xs = [i + (j - (len(cases) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [r["gbps"] if good(r) else 0.0 for r in rs], width,
               label=f"{tensors(res, 'count', c):,} tensors ({gb(res, 'count', c)} GB)")
    ax.set_xticks(range(len(keys)), [SHORT[k] for k in keys], fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title("per-tensor overhead: the same bytes in 100 vs 10,000 tensors", fontsize=10)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------


def readme_block(res: Results, png: Path, readme: Path) -> str:
    image = os.path.relpath(png.resolve(), readme.resolve().parent)
    return "\n".join([caption(res), "", main_table(res), "", FOOTNOTES, "", f"![peers]({image})"])


def update_readme(readme: Path, block: str) -> bool:
    """Replace what lies between the markers; False (and nothing written) when they are missing."""
    text = readme.read_text()
    a, b = text.find(BEGIN), text.find(END)
    if a < 0 or b < a:
        return False
    readme.write_text(text[:a + len(BEGIN)] + "\n" + block + "\n" + text[b:])
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="peers-*.json files from bench/peers.py")
    ap.add_argument("--png", type=Path, default=HERE / "results" / "peers.png")
    ap.add_argument("--readme", type=Path, help="README to update between the peers markers")
    args = ap.parse_args(argv)
    res = load(args.results)
    print(caption(res) + "\n\n" + main_table(res) + "\n\n" + FOOTNOTES + "\n\n" + mount_table(res) + "\n\n"
          + scaling_table(res) + "\n")
    plot(res, args.png)
    print(f"-> {args.png}")
    if args.readme:
        block = readme_block(res, args.png, args.readme)
        if update_readme(args.readme, block):
            print(f"-> {args.readme} (between {BEGIN} and {END})")
        else:
            print(f"{args.readme} has no {BEGIN} ... {END} markers; the block to paste:\n\n{block}")


if __name__ == "__main__":
    main()
