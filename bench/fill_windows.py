"""A cold fill, as a reader of the mount sees it (#20: cold through the mount >= 0.9x the disk): an in-order
reader through the mount against the disk's read of the same files and the fill's own rate, and an A/B of two
sllmfs trees (NOTES-mount.md 2026-12-03 evening: publishing a cold fill's windows one at a time, tried here).

One store, one model (``--size-gb``), rounds alternating between sidecars started from this tree and, with
``--other TREE``, from another (a `git worktree` of an earlier commit: its native modules copied in), or with
``--other-args``, this tree with other sidecar options (``--fill-direct``). Each
round: the model evicted, the page cache dropped, then `cat`-like 16 MiB reads of every file through the
mount in order (GB/s, against the disk's buffered read of the same files in the same run), and the sidecar's
own `filled` line (its rate and first_ready_s). Needs root (drop_caches) and FUSE.

    python bench/fill_windows.py --work /var/tmp/sllmfs-fw [--size-gb 1.5] [--rounds 3] [--other /tmp/wt-old]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_mount_direct import build  # noqa: E402
from limits import drop_caches, measured, read_files, start_sidecar, stop, write_result  # noqa: E402

READ = 16 << 20  # cat's shape: one reader, in order


class Side:
    """A sidecar with its mount, started from ``tree`` with ``extra`` options."""

    def __init__(self, tree: Path, store: Path, work: Path, tag: str, extra: list[str], pool: int):
        self.sock, self.mnt, self.log = work / f"{tag}.sock", work / f"mnt-{tag}", work / f"sidecar-{tag}.log"
        # the tree first, the rest kept (on the GPU machine trio and pyfuse3 come in through PYTHONPATH)
        self.env = {**os.environ,
                    "PYTHONPATH": os.pathsep.join(x for x in (str(tree), os.environ.get("PYTHONPATH")) if x)}
        self.proc = start_sidecar(store, self.sock, self.log, ["--mount", str(self.mnt), "--mem-pool-size", str(pool),
                                                               *extra], env=self.env)
        self.seen = 0

    def _cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "sllmfs", *args, "--socket", str(self.sock)], env=self.env,
                              capture_output=True, text=True, timeout=60).stdout

    def evict(self, model: str) -> None:
        self._cli("evict", "--model", model)
        deadline = time.monotonic() + 30  # the mount's backings of the evicted copy go too
        while '"mount_files": 0' not in self._cli("status", "--json") and time.monotonic() < deadline:
            time.sleep(0.2)

    def last_fill(self) -> dict[str, float]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.findall(r"filled model=\S+ variant=hf bytes=\d+ seconds=([\d.]+) rate=([\d.]+)GB/s.*"
                           r"first_ready_s=([\d.]+)", self.log.read_text())
            if m and len(m) > self.seen:
                self.seen = len(m)
                s, r, f = m[-1]
                return {"fill_s": float(s), "fill_gbps": float(r), "first_ready_s": float(f)}
            time.sleep(0.2)
        tail = "".join(self.log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"fill_windows: no fill finished in {self.log}; its last lines:\n{tail}")

    def stop(self) -> None:
        stop(self.proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/sllmfs-fw"))
    ap.add_argument("--size-gb", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--other", type=Path, default=None, help="another sllmfs tree to run beside this one")
    ap.add_argument("--other-args", default="", help="sidecar options for the other side (its tree: --other, "
                    "else this one), e.g. '--fill-direct'")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store, model = build(args.work, args.size_gb)
    trees = {"this": (HERE.parent, [])}
    if args.other or args.other_args:
        trees["other"] = (args.other or HERE.parent, args.other_args.split())
    stored = sorted((store / "models").rglob("*.safetensors"))
    pool = 2 * sum(p.stat().st_size for p in stored) + (1 << 30)  # the model is resident with room to spare
    got: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    disk: list[float] = []
    for r in range(args.rounds):
        if not drop_caches():
            raise SystemExit("fill_windows: cannot drop the page cache (needs root)")
        disk.append(measured("the disk's read", read_files(stored, 1, READ, direct=False)))  # the limit, each round
        for tag in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            side = Side(trees[tag][0], store, args.work, tag, trees[tag][1], pool)
            try:
                side.evict(model)
                drop_caches()
                files = sorted((side.mnt / model).glob("*.safetensors"))
                gbps = read_files(files, 1, READ, direct=False)
                row = {"mount_gbps": gbps, **side.last_fill()}
            finally:
                side.stop()
            got[tag].append(row)
            print(f"#{r} {tag:<6} through the mount {row['mount_gbps']:.2f} GB/s, fill {row['fill_gbps']:.2f} "
                  f"GB/s, first window {row['first_ready_s']:.3f} s; disk {disk[-1]:.2f} GB/s", flush=True)
    limit = statistics.median(disk)
    summary = {tag: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for tag, rows in got.items()}
    ratios = {f"{tag} through the mount / the disk ({med['mount_gbps']:.2f} / {limit:.2f} GB/s)":
              med["mount_gbps"] / limit for tag, med in summary.items()}
    if "other" in summary:
        ratios["other's fill / this one's"] = summary["other"]["fill_gbps"] / summary["this"]["fill_gbps"]
    record = {"bytes": sum(p.stat().st_size for p in stored), "disk_gbps": disk, "rounds": got, "median": summary,
              "trees": {k: [str(t), a] for k, (t, a) in trees.items()}}
    if args.out:
        write_result(args.out, "fill-windows", ratios, record)
    else:
        for k, v in ratios.items():
            print(f"{k}  {v:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
