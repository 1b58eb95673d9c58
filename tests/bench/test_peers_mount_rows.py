"""bench/peers.py's rows through the mount: the plain read in a real child process, the ratios each mount
row carries to its tmpfs pair and the disk, and the report's table of them (no GPU, no sidecar: the bench's
own CPU run covers the mount itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import bench.peers as peers
import bench.peers_report as report

PEERS_PY = Path(peers.__file__)


def run(loader: str, placement: str, gbps: float | None, **more: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"group": "main", "case": "llama-L1", "loader": loader, "placement": placement,
                         "bytes": 10**9, "tensors": 12, **more}
    if gbps is not None:
        r.update(gbps=gbps, seconds=1 / gbps, ok=True)
    return r


def shards(folder: Path) -> dict[str, int]:
    """Two files of an HF folder as the view shows them (their bytes need not be safetensors to be read)."""
    folder.mkdir()
    sizes = {"model-00001-of-00002.safetensors": (3 << 20) + 5, "model-00002-of-00002.safetensors": 4096}
    for name, n in sizes.items():
        (folder / name).write_bytes(bytes(range(256)) * (n // 256) + b"x" * (n % 256))
    (folder / "config.json").write_text("{}")  # not a safetensors file: not read
    return sizes


def child(loader: str, path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(PEERS_PY), "--child", loader, str(path), "--device", "cpu"],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))))


def test_the_plain_read_through_a_mount_reads_every_file_to_its_size(tmp_path: Path) -> None:
    sizes = shards(tmp_path / "view")
    res = child("cat@mount", tmp_path / "view")  # the mount row runs the same reader as the tmpfs one
    assert res["bytes"] == sum(sizes.values())
    assert res["sizes_ok"] is True and res["check"] == "sizes" and "error" not in res
    assert res["settings"]["files"] == sorted(sizes)
    assert peers.check(res) == "sizes ok"


def test_the_plain_read_of_one_file_and_of_an_empty_folder(tmp_path: Path) -> None:
    sizes = shards(tmp_path / "view")
    name = sorted(sizes)[0]
    assert child("cat", tmp_path / "view" / name)["bytes"] == sizes[name]
    (tmp_path / "empty").mkdir()
    assert "no .safetensors file" in child("cat@mount", tmp_path / "empty")["skipped"]


def test_a_mount_row_is_set_against_its_own_tmpfs_pair_and_the_disk() -> None:
    runs = [run("fastsafetensors", "tmpfs", 25.0), run("safetensors", "tmpfs", 4.0), run("cat", "tmpfs", None,
                                                                                         skipped="x")]
    hit = peers.pair_ratios(run("fastsafetensors@mount", "hit", 20.0), runs, 1.7)
    assert hit["vs_tmpfs"] == {"loader": "fastsafetensors", "gbps": 25.0, "ratio": 0.8, "goal": 0.8}
    assert "vs_disk" not in hit
    cold = peers.pair_ratios(run("sllmfs-fuse", "cold", 1.7), runs, 2.0)  # sllmfs-fuse is safetensors@mount
    assert cold["vs_tmpfs"]["loader"] == "safetensors" and cold["vs_tmpfs"]["goal"] is None
    assert cold["vs_disk"] == {"gbps": 2.0, "ratio": 0.85, "goal": 0.9}
    assert peers.pair_ratios(run("cat@mount", "hit", 3.0), runs, 1.7)["vs_tmpfs"]["missing"]  # its pair skipped
    assert peers.pair_ratios(run("instanttensor@mount", "hit", None, error=["x"]), runs, 1.7) == {}
    peer_cold = peers.pair_ratios(run("safetensors", "cold", 1.0), runs, 2.0)  # a peer's cold: no goal of ours
    assert peer_cold == {"vs_disk": {"gbps": 2.0, "ratio": 0.5, "goal": None}}
    line = peers.run_line({**run("fastsafetensors@mount", "hit", 20.0), **hit})
    assert "= 0.80x its tmpfs 25.00 GB/s (goal 0.8: met)" in line


def test_the_report_shows_each_reader_through_the_mount_with_its_ratios(tmp_path: Path) -> None:
    runs = [run("fastsafetensors", "tmpfs", 25.0), run("safetensors", "tmpfs", 4.0), run("cat", "tmpfs", 8.0)]
    for r in [run("fastsafetensors@mount", "hit", 20.0), run("fastsafetensors@mount", "cold", 1.5),
              run("cat@mount", "hit", 6.0), run("instanttensor@mount", "hit", None, skipped="not installed")]:
        r.update(peers.pair_ratios(r, runs, 2.0))
        runs.append(r)
    runs.append(run("sllmfs-fuse", "hit", 5.0))  # a file from before the ratio fields: paired by the report
    path = tmp_path / "peers-mount.json"
    path.write_text(json.dumps({"limits": {"disk_read_gbps": 2.0, "pinned_h2d_peak_gbps": 55.0}, "runs": runs}))
    table = report.mount_table(report.load([path]))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["fastsafetensors (no GDS)"] == "| fastsafetensors (no GDS) | 25.00 | 20.00 | 0.80× of 25.00 | 1.50 | " \
                                              "0.75× of 2.00 |"
    assert "| 6.00 | 0.75× of 8.00 | — |" in rows["`cat` (plain read, no GPU)"]
    assert "| 5.00 | 1.25× of 4.00 |" in rows["safetensors `load_file`"]
    assert "| — | skipped |" in rows["InstantTensor"]
    assert "≥ 0.8×" in table and "≥ 0.9×" in table
