"""This process's cgroup limits (a pod's CPUs and memory), cgroup v2 and v1 alike.

A limit set on any level from our cgroup up binds us (a pod's on its own level, a node's slice above
it), so every level below the root is read and the tightest wins. Missing files, a root cgroup and
hosts without cgroups all mean "no limit": the host's figures stand.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc/self/cgroup")
_UNLIMITED_V1 = 1 << 62  # v1 writes "no limit" as a page-rounded LONG_MAX


def _paths(proc: Path) -> dict[str, str]:
    """controller -> our cgroup path in its hierarchy ("" for the v2 hierarchy)."""
    out: dict[str, str] = {}
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(",") if parts[1] else [""]:
                out[ctrl] = parts[2].strip()
    return out


def _levels(base: Path, rel: str) -> list[Path]:
    """``base``/``rel`` and its ancestors below ``base``, those that exist, ours first."""
    d, out = base / rel.lstrip("/"), []
    while d != base and base in d.parents:
        if d.is_dir():
            out.append(d)
        d = d.parent
    return out


def _v1_base(root: Path, ctrl: str) -> Path | None:
    """Where the v1 hierarchy of ``ctrl`` is mounted (cpu may be mounted only as "cpu,cpuacct")."""
    names = [ctrl, "cpu,cpuacct"] if ctrl == "cpu" else [ctrl]
    return next((root / n for n in names if (root / n).is_dir()), None)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _dirs(root: Path, proc: Path, ctrl: str) -> tuple[str, list[Path]]:
    """("v2" or "v1", the levels holding ``ctrl``'s limits): the v2 tree where /sys/fs/cgroup is one,
    else the v1 hierarchy of that controller."""
    paths = _paths(proc)
    if (root / "cgroup.controllers").exists():
        return "v2", _levels(root, paths[""]) if "" in paths else []
    base = _v1_base(root, ctrl)
    return "v1", _levels(base, paths[ctrl]) if base is not None and ctrl in paths else []


def cpu_limit(root: Path = ROOT, proc: Path = PROC) -> int | None:
    """The fewest CPUs any of our cgroup levels allows (a quota of 1.5 CPUs: 2), or None without a quota."""
    kind, levels = _dirs(root, proc, "cpu")
    allowed: list[int] = []
    for d in levels:
        try:
            if kind == "v2":
                words = (_read(d / "cpu.max") or "max").split()
                quota, period = words[0], words[1] if len(words) > 1 else "100000"
            else:
                quota, period = _read(d / "cpu.cfs_quota_us") or "-1", _read(d / "cpu.cfs_period_us") or "1"
            if quota not in ("max", "-1"):
                allowed.append(max(1, -(-int(quota) // int(period))))
        except ValueError:
            continue  # a file we cannot parse sets nothing we can honour
    return min(allowed, default=None)


def memory_limits(root: Path = ROOT, proc: Path = PROC) -> list[tuple[int, int]]:
    """(limit, bytes charged now) of each of our cgroup levels that sets a memory limit."""
    kind, levels = _dirs(root, proc, "memory")
    out = []
    for d in levels:
        limit, used = ((_read(d / "memory.max"), _read(d / "memory.current")) if kind == "v2" else
                       (_read(d / "memory.limit_in_bytes"), _read(d / "memory.usage_in_bytes")))
        try:
            if limit is not None and limit != "max" and used is not None and int(limit) < _UNLIMITED_V1:
                out.append((int(limit), int(used)))
        except ValueError:
            continue
    return out
