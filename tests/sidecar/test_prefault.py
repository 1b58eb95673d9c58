"""Blank segments made at start (sidecar/prefault.py) and the memory tier's use of them, on real
hugetlb pages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sllmfs.sidecar import prefault
from sllmfs.sidecar.memtier import Segment
from tests.support.sidecar import make_model, sidecar, wait_log

NR = Path("/proc/sys/vm/nr_hugepages")
MiB = 1 << 20


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


def free_pages() -> int:
    return prefault.hugepages_free()[0]


def test_meminfo_is_read(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal: 1 kB\nHugePages_Total:     300\nHugePages_Free:      200\nHugepagesize:    2048 kB\n")
    assert prefault.hugepages_free(f) == (200, 2 << 20)
    f.write_text("MemTotal: 1 kB\n")  # no hugetlb support: nothing to touch
    assert prefault.hugepages_free(f) == (0, 0)
    assert prefault.hugepages_free(tmp_path / "missing") == (0, 0)


def test_blanks_hold_faulted_pages_until_dropped(hugepages: int) -> None:
    before = free_pages()
    blanks = prefault.Blanks()
    made, seconds = prefault.make_blanks(blanks, budget=256 * MiB, threads=3, size=64 * MiB)
    assert made == 192 * MiB or made == 256 * MiB  # the budget, in whole blanks, bounded by the pool
    assert seconds > 0 and blanks.nbytes == made
    assert free_pages() == before - made // (2 * MiB)  # faulted in: taken from the pool, held
    assert blanks.drop_one()
    assert free_pages() == before - made // (2 * MiB) + 32
    blanks.close_all()
    assert free_pages() == before and blanks.nbytes == 0
    assert not blanks.drop_one()


def test_budget_bounds_the_blanks(hugepages: int) -> None:
    blanks = prefault.Blanks()
    made, _ = prefault.make_blanks(blanks, budget=100 * MiB, threads=2, size=64 * MiB)
    assert made == 64 * MiB  # a second blank would pass the budget
    blanks.close_all()


def test_no_pool_makes_nothing() -> None:
    if free_pages():
        pytest.skip("this machine has free hugetlb pages")
    assert prefault.make_blanks(prefault.Blanks(), budget=1 << 30, threads=2)[0] == 0


def test_a_segment_shrinks_or_grows_its_blank(hugepages: int) -> None:
    blanks = prefault.Blanks()
    prefault.make_blanks(blanks, budget=128 * MiB, threads=2, size=64 * MiB)
    before = free_pages()
    fd, _ = blanks.take()
    small = Segment("t:small", 40 * MiB, blank=fd)  # shrinks: 12 pages back to the pool
    assert small.huge and small.length == 40 * MiB and free_pages() == before + 12
    small.mm[: 5] = b"bytes"
    assert bytes(small.mm[:5]) == b"bytes" and small.mm[40 * MiB - 1] == 0
    fd, _ = blanks.take()
    big = Segment("t:big", 70 * MiB, blank=fd)  # grows: 3 more pages, faulted from the pool when written
    assert big.huge and big.length == 70 * MiB and free_pages() == before + 12
    assert big.mm[64 * MiB - 1] == 0
    for off in range(64 * MiB, 70 * MiB, 2 * MiB):
        big.mm[off] = 1
    assert free_pages() == before + 12 - 3
    small.close()
    big.close()
    assert free_pages() == before + 64  # both blanks' pages back


def test_daemon_fills_into_blanks_unless_told_not_to(tmp_path: Path, hugepages: int) -> None:
    with sidecar(tmp_path / "on") as sd, sd.connect() as c:
        assert "as blank segments" in wait_log(sd, "as blank segments")
        held = hugepages - free_pages()
        assert held >= 64  # the 256 MiB test budget in 64 MiB blanks, as far as the pool allowed
        want = make_model(sd.store, "org/m", tensors=2, nbytes=36 * MiB)  # one ~72 MiB partition
        with c.acquire("org/m") as lease:
            assert {k: v.tobytes() for k, v in lease.numpy().items()} == want
        # a blank became the segment (grown by what it lacked), the tier's budget still holds
        assert hugepages - free_pages() <= 128
    with sidecar(tmp_path / "off", "--no-prefault", "--log-level", "debug") as sd:
        assert "serving socket=" in wait_log(sd, "serving socket=")
        assert "as blank segments" not in sd.log() and free_pages() == hugepages
