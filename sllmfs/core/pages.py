"""What the kernel gives shared memory for pages: facts the tiers and the mount decide by."""

from __future__ import annotations

SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def shmem_thp(path: str = SHMEM_THP) -> bool:
    """Whether a shmem mapping that asks (MADV_HUGEPAGE) gets transparent 2 MiB pages: the mode in
    brackets is advise, always, within_size or force (`sllmfs doctor` says how to set it)."""
    try:
        with open(path) as f:
            mode = f.read()
    except OSError:
        return False
    return any(f"[{m}]" in mode for m in ("advise", "always", "within_size", "force"))
