"""`sllmfs doctor`: check what the sidecar and the GPU path need, and say how to fix it."""

from __future__ import annotations

import os
import resource
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from sllmfs.core.config import Settings
from sllmfs.core.pages import SHMEM_THP, shmem_thp, shmem_thp_modes


@dataclass
class Check:
    name: str
    level: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _fuse() -> list[Check]:
    out = []
    dev = Path("/dev/fuse")
    if not dev.exists():
        out.append(Check("/dev/fuse", "fail", "missing", "`modprobe fuse`, or give the container /dev/fuse"))
    elif not os.access(dev, os.R_OK | os.W_OK):
        out.append(Check("/dev/fuse", "fail", "not readable/writable by this user", "run the sidecar as root"))
    else:
        out.append(Check("/dev/fuse", "ok", "present"))
    fm = shutil.which("fusermount3")
    out.append(Check("fusermount3", "ok", fm) if fm else
               Check("fusermount3", "fail", "not on PATH", "apt-get install fuse3"))
    try:
        import pyfuse3  # noqa: F401

        out.append(Check("pyfuse3", "ok", "imports"))
    except ImportError as e:
        out.append(Check("pyfuse3", "fail", str(e), "apt-get install libfuse3-dev pkg-config && pip install pyfuse3"))
    return out


def _big_pages() -> list[Check]:
    out = []
    try:
        n = int(Path("/proc/sys/vm/nr_hugepages").read_text())
        free = _meminfo("HugePages_Free")
        level = "ok" if n > 0 else "warn"
        out.append(Check("hugetlb pages", level, f"{n} reserved, {free} free",
                         "" if n else "reserve 2 MiB pages for the memory tier: "
                         "sysctl vm.nr_hugepages=<model GiB * 512> (GPU registration is ~2x cheaper)"))
    except (OSError, ValueError):
        out.append(Check("hugetlb pages", "warn", "cannot read /proc/sys/vm/nr_hugepages"))
    if Path(SHMEM_THP).exists():
        ok = shmem_thp()
        out.append(Check("shmem THP", "ok" if ok else "warn", shmem_thp_modes(),
                         "" if ok else "echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled "
                         "(the mount's passthrough copies fault 2 MiB pages, in parallel)"))
    return out


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cuda() -> list[Check]:
    out = []
    try:
        import torch
    except ImportError:
        return [Check("torch", "warn", "not installed", "pip install 'sllmfs[transformers]' for the GPU loaders")]
    if torch.cuda.is_available():
        out.append(Check("GPU", "ok", f"{torch.cuda.device_count()} visible: {torch.cuda.get_device_name(0)}, "
                                      f"CUDA {torch.version.cuda}"))
    else:
        out.append(Check("GPU", "warn", f"none visible to torch {torch.__version__} (CUDA {torch.version.cuda})",
                         "loaders fall back to --device cpu; check the driver and CUDA_VISIBLE_DEVICES"))
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < 1 << 30:
        out.append(Check("memlock limit", "warn", f"{soft} bytes",
                         "raise it (LimitMEMLOCK=infinity in the unit, ulimit -l unlimited) for pinned buffers"))
    return out


def _paths(s: Settings) -> list[Check]:
    out = []
    store = Path(s.storage_path)
    probe = store if store.exists() else store.parent
    if os.access(probe, os.W_OK):
        out.append(Check("store", "ok", f"{store} writable"))
    else:
        out.append(Check("store", "fail", f"{store} not writable by uid {os.geteuid()}",
                         "pick a writable --storage-path or fix its owner"))
    sock = Path(s.socket)
    if sock.exists():
        mode = stat.S_IMODE(sock.stat().st_mode)
        lvl = "ok" if not mode & 0o007 else "fail"
        out.append(Check("socket", lvl, f"{sock} mode {mode:o}", "" if lvl == "ok" else "restart the sidecar"))
    else:
        out.append(Check("socket", "warn", f"{sock} absent: no sidecar running", "systemctl start sllmfs"))
    return out


def run_checks(settings: Settings) -> list[Check]:
    return _fuse() + _big_pages() + _cuda() + _paths(settings)
