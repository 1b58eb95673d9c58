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
            "s = Settings(); print(usable_cpus(), s.num_thread, s.copy_direct, os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == ["1", "1", "False"], out
    from sllmfs.core.config import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
