"""The start-time pass over the hugetlb reservation (sidecar/prefault.py), on real hugetlb pages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sllmfs.sidecar import prefault
from tests.support.sidecar import sidecar, wait_log

NR = Path("/proc/sys/vm/nr_hugepages")


@pytest.fixture
def hugepages() -> Iterator[int]:
    """128 more 2 MiB pages reserved for the test (root), given back after."""
    try:
        before = int(NR.read_text())
        NR.write_text(str(before + 128))
    except OSError:
        pytest.skip("cannot reserve hugetlb pages here (needs root and vm.nr_hugepages)")
    try:
        free, size = prefault.hugepages_free()
        if size != 2 << 20 or free < 128:
            pytest.skip(f"the kernel reserved {free} free pages of {size} bytes, not 128 of 2 MiB")
        yield free
    finally:
        NR.write_text(str(before))


def test_meminfo_is_read(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal: 1 kB\nHugePages_Total:     300\nHugePages_Free:      200\nHugepagesize:    2048 kB\n")
    assert prefault.hugepages_free(f) == (200, 2 << 20)
    f.write_text("MemTotal: 1 kB\n")  # no hugetlb support: nothing to touch
    assert prefault.hugepages_free(f) == (0, 0)
    assert prefault.hugepages_free(tmp_path / "missing") == (0, 0)


def test_touch_faults_the_pool_in_and_gives_it_back(hugepages: int) -> None:
    before = prefault.hugepages_free()[0]
    touched, seconds = prefault.touch_hugepages(budget=96 << 20, threads=3, piece=32 << 20)
    assert touched == 96 << 20  # the budget, in whole pieces
    assert seconds > 0
    assert prefault.hugepages_free()[0] == before  # every page back in the pool
    touched, _ = prefault.touch_hugepages(budget=1 << 40, threads=2, piece=64 << 20)
    assert touched == hugepages * (2 << 20) // (64 << 20) * (64 << 20)  # bounded by what is free


def test_no_pool_touches_nothing() -> None:
    if prefault.hugepages_free()[0]:
        pytest.skip("this machine has free hugetlb pages")
    assert prefault.touch_hugepages(budget=1 << 30, threads=2) == (0, 0.0)


def test_daemon_touches_at_start_unless_told_not_to(tmp_path: Path, hugepages: int) -> None:
    with sidecar(tmp_path / "on") as sd:
        assert "bytes of hugetlb pages" in wait_log(sd, "bytes of hugetlb pages")
    with sidecar(tmp_path / "off", "--no-prefault", "--log-level", "debug") as sd:
        assert "serving socket=" in wait_log(sd, "serving socket=")
        assert "hugetlb pages" not in sd.log()
