"""Defaults that follow the machine: the CPUs this process may use, not the host's count."""

from __future__ import annotations

import os
import subprocess
import sys


def test_usable_cpus_follow_the_affinity_not_the_host() -> None:
    """A daemon pinned to one CPU (taskset, a pod's cpuset) reads with one thread and keeps buffered
    copies (O_DIRECT pays from COPY_DIRECT_CPUS up), whatever os.cpu_count() says."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "from sllmfs.core.config import Settings, usable_cpus\n"
            "from sllmfs.fuse import backing\n"
            "from sllmfs.engine.copy_engine import _default_threads\n"
            "s = Settings(); print(usable_cpus(), s.num_thread, s.copy_direct, backing.COPY_THREADS,"
            " backing.MAPPED_COPY_THREADS, _default_threads(), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:6] == ["1", "1", "False", "1", "1", "1"], out
    from sllmfs.core.config import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_the_cgroup_directories_are_where_the_limits_are() -> None:
    """usable_cpus and the mount's backings read cpu.max and memory.max on this process's cgroup v2
    directory and every ancestor below the root; a v1 or hybrid mount gives none, and both fall back
    to the host's figures."""
    from sllmfs.core.config import CGROUP_ROOT, cgroup_dirs
    from sllmfs.fuse.backing import room

    dirs = cgroup_dirs()
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        assert all(d.is_dir() and CGROUP_ROOT in d.parents for d in dirs)
        assert all(a.parent == b for a, b in zip(dirs, dirs[1:], strict=False))  # from ours up, in order
    else:
        assert dirs == []
    assert room() > 0


def test_cgroup_dirs_walk_from_ours_up_to_the_root(tmp_path) -> None:
    from sllmfs.core.config import cgroup_dirs

    root, proc = tmp_path / "cgroup", tmp_path / "self-cgroup"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    proc.write_text("0::/kubepods/pod1\n")
    assert cgroup_dirs(root, proc) == []  # no cgroup.controllers: a v1 mount, whose limits are not read
    (root / "cgroup.controllers").write_text("cpu memory\n")
    assert cgroup_dirs(root, proc) == [root / "kubepods" / "pod1", root / "kubepods"]
    proc.write_text("0::/\n")
    assert cgroup_dirs(root, proc) == []  # the root cgroup sets no limits
    proc.write_text("12:memory:/x\n")
    assert cgroup_dirs(root, proc) == []  # no v2 line at all
