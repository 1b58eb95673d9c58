"""What the kernel gives shared memory for pages: facts the tiers and the mount decide by."""

from __future__ import annotations

SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
SHMEM_THP_2M = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled"  # Linux >= 6.10
_ON = ("advise", "always", "within_size", "force")


def shmem_thp(path: str = SHMEM_THP, size_path: str = SHMEM_THP_2M) -> bool:
    """Whether a shmem mapping that asks (MADV_HUGEPAGE) gets transparent 2 MiB pages: the mode in
    brackets is advise, always, within_size or force, and the 2 MiB size (where the kernel sets sizes
    apart) inherits it or is on itself (`sllmfs doctor` says how to set it)."""
    mode = _mode(path)
    if mode not in _ON:
        return False
    per_size = _mode(size_path)
    return per_size is None or per_size == "inherit" or per_size in _ON


def shmem_thp_modes(path: str = SHMEM_THP, size_path: str = SHMEM_THP_2M) -> str:
    """The two settings as the kernel shows them (for doctor and the benches)."""
    return f"shmem_enabled={_mode(path)} 2048kB={_mode(size_path)}"


def _mode(path: str) -> str | None:
    """The bracketed choice of a sysfs multiple-choice file; None when the file is not there."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def thp_file_counts(path: str = "/proc/vmstat") -> tuple[int, int]:
    """(shmem/file huge pages allocated, allocations that fell back to 4 KiB pages) since boot, host-wide:
    the difference across a copy says whether it got its 2 MiB pages. (0, 0) where vmstat is not there."""
    counts = {"thp_file_alloc": 0, "thp_file_fallback": 0}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in counts:
                    counts[key] = int(value)
    except (OSError, ValueError):
        pass
    return counts["thp_file_alloc"], counts["thp_file_fallback"]
