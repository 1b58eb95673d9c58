"""A pod's CPU and memory limits, read from fake cgroup trees (v2 and v1) as the kernel lays them out."""

from __future__ import annotations

from pathlib import Path

from sllmfs.core.cgroup import cpu_limit, memory_limits


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_every_level_from_ours_up_binds(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "self-cgroup"
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(proc, "0::/kubepods/pod1\n")
    pod, slice_ = root / "kubepods" / "pod1", root / "kubepods"
    _write(pod / "cpu.max", "max 100000\n")
    _write(slice_ / "cpu.max", "250000 100000\n")  # 2.5 CPUs for the slice: 3
    _write(pod / "memory.max", "1073741824\n")
    _write(pod / "memory.current", "1000\n")
    _write(slice_ / "memory.max", "max\n")
    _write(root / "cpu.max", "100000 100000\n")  # the root's: not ours to read
    assert cpu_limit(root, proc) == 3
    assert memory_limits(root, proc) == [(1 << 30, 1000)]
    _write(proc, "0::/\n")  # the root cgroup: no limits
    assert cpu_limit(root, proc) is None and memory_limits(root, proc) == []


def test_v1_hierarchies_per_controller(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "self-cgroup"
    _write(proc, "4:memory:/process_api/abc\n2:cpu,cpuacct:/pod\n0::/\n")
    _write(root / "memory" / "process_api" / "abc" / "memory.limit_in_bytes", "536870912\n")
    _write(root / "memory" / "process_api" / "abc" / "memory.usage_in_bytes", "4096\n")
    _write(root / "memory" / "process_api" / "memory.limit_in_bytes", "9223372036854771712\n")  # none
    _write(root / "memory" / "process_api" / "memory.usage_in_bytes", "8192\n")
    _write(root / "cpu,cpuacct" / "pod" / "cpu.cfs_quota_us", "150000\n")
    _write(root / "cpu,cpuacct" / "pod" / "cpu.cfs_period_us", "100000\n")
    assert memory_limits(root, proc) == [(512 << 20, 4096)]
    assert cpu_limit(root, proc) == 2
    _write(root / "cpu,cpuacct" / "pod" / "cpu.cfs_quota_us", "-1\n")
    assert cpu_limit(root, proc) is None


def test_no_cgroups_no_limits(tmp_path: Path) -> None:
    assert cpu_limit(tmp_path / "none", tmp_path / "missing") is None
    assert memory_limits(tmp_path / "none", tmp_path / "missing") == []
