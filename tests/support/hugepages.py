"""hugetlb pages reserved for one test (the memory tier's blanks and segments)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllmfs.core import pages
from sllmfs.sidecar import prefault

NR = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def reserved_hugepages(pages: int) -> Iterator[int]:
    """``pages`` more 2 MiB pages reserved (root), given back after; yields how many are free. Skips the
    test where the kernel will not reserve them."""
    try:
        before = int(NR.read_text())
        NR.write_text(str(before + pages))
    except OSError:
        pytest.skip("cannot reserve hugetlb pages here (needs root and vm.nr_hugepages)")
    try:
        free, size = prefault.hugepages_free()
        if size != 2 << 20 or free < pages:
            pytest.skip(f"the kernel reserved {free} free pages of {size} bytes, not {pages} of 2 MiB")
        yield free
    finally:
        NR.write_text(str(before))


@contextlib.contextmanager
def shmem_thp_mode(mode: str) -> Iterator[None]:
    """The host's shmem transparent huge pages set to ``mode`` (root), as before after. The memory tier
    gives a variant stored as its files their exact twins only where shmem gives 2 MiB pages (advise,
    as systemd/sllmfs.service sets it); skips where the setting cannot be written."""
    path = Path(pages.SHMEM_THP)
    try:
        text = path.read_text()
        before = text[text.index("[") + 1:text.index("]")]
        path.write_text(mode)
    except (OSError, ValueError):
        pytest.skip(f"cannot set {path} here (needs root and a kernel with shmem THP)")
    try:
        yield
    finally:
        path.write_text(before)
