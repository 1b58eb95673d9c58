"""Blank segments made at start (sidecar/prefault.py) and the memory tier's use of them, on real
hugetlb pages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllmfs.engine.segments import address_of
from sllmfs.sidecar import prefault
from sllmfs.sidecar.memtier import Segment
from tests.support.hugepages import reserved_hugepages
from tests.support.sidecar import make_model, sidecar, wait_log

MiB = 1 << 20


@pytest.fixture
def hugepages() -> Iterator[int]:
    """128 more 2 MiB pages reserved for the test (root), given back after."""
    with reserved_hugepages(128) as free:
        yield free


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


def test_a_blank_whose_room_a_reserve_took_meanwhile_is_given_back(hugepages: int) -> None:
    """The tier's room is asked before a blank is faulted in and again before it is offered: a reserve
    that took the room meanwhile (the budget) keeps it, and the blank's pages go back to the pool."""
    blanks = prefault.Blanks()
    asked = iter([64 * MiB, 0])  # room before the fault, none after it
    made, _ = prefault.make_blanks(blanks, budget=128 * MiB, threads=2, size=64 * MiB, room=lambda: next(asked, 0))
    assert made == 0 and blanks.nbytes == 0
    assert prefault.hugepages_free()[0] * prefault.HUGE_PAGE >= 64 * MiB  # its pages are back in the pool


def test_no_pool_makes_nothing() -> None:
    if free_pages():
        pytest.skip("this machine has free hugetlb pages")
    assert prefault.make_blanks(prefault.Blanks(), budget=1 << 30, threads=2)[0] == 0


def test_a_segment_shrinks_or_grows_its_blank(hugepages: int) -> None:
    blanks = prefault.Blanks()
    prefault.make_blanks(blanks, budget=128 * MiB, threads=2, size=64 * MiB)
    before = free_pages()
    blank = blanks.take()
    assert blank is not None
    kept = blank.address
    small = Segment("t:small", 40 * MiB, blank=blank)  # shrinks: 12 pages back to the pool
    assert small.huge and small.length == 40 * MiB and free_pages() == before + 12
    assert address_of(small.mm) == kept  # the blank's own map (a pin of it would still hold)
    small.mm[: 5] = b"bytes"
    assert bytes(small.mm[:5]) == b"bytes" and small.mm[40 * MiB - 1] == 0
    fd = small.readonly_fd()  # what a client maps: the same bytes, the memfd's new size
    try:
        assert os.fstat(fd).st_size == 40 * MiB and os.pread(fd, 5, 0) == b"bytes"
    finally:
        os.close(fd)
    blank = blanks.take()
    assert blank is not None
    big = Segment("t:big", 70 * MiB, blank=blank)  # grows: 3 more pages, faulted from the pool when written
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


class Pins:
    """Stands in for the GPU copier's pins (CUDA is not on this machine): records what is pinned and
    unpinned, in pin pieces."""

    def __init__(self) -> None:
        self.held: set[tuple[int, int]] = set()  # (address, length) of each piece pinned
        self.refuse = False

    def pin(self, blank: prefault.Blank) -> None:
        if self.refuse:
            return  # a refused pin leaves the blank unpinned, as GpuCopier.pin_blank does
        for off in range(0, blank.length, prefault.PIN_PIECE):
            self.held.add((blank.address + off, min(prefault.PIN_PIECE, blank.length - off)))
        blank.unpin = self.unpin

    def unpin(self, address: int, length: int) -> None:
        self.held -= {p for p in self.held if address <= p[0] < address + length}

    def of(self, address: int, length: int = 64 * MiB) -> list[int]:
        """Offsets of the pieces held in the blank at ``address``."""
        return sorted(a - address for a, _ in self.held if address <= a < address + length)


@pytest.fixture
def pin_pieces(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pin pieces of 8 MiB, so a 64 MiB test blank has eight."""
    monkeypatch.setattr(prefault, "PIN_PIECE", 8 * MiB)
    import sllmfs.sidecar.memtier as memtier

    monkeypatch.setattr(memtier, "PIN_PIECE", 8 * MiB)
    return 8 * MiB


def test_blanks_are_pinned_before_they_are_offered(hugepages: int, pin_pieces: int) -> None:
    blanks = prefault.Blanks()
    prefault.make_blanks(blanks, budget=128 * MiB, threads=2, size=64 * MiB)  # two, made before any GPU
    pins = Pins()
    assert blanks.pin_all(pins.pin) == 2
    assert len(pins.held) == 16  # 2 x 8 pieces
    prefault.make_blanks(blanks, budget=64 * MiB, threads=2, size=64 * MiB)  # a third, pinned as it is put
    assert len(pins.held) == 24
    pins.refuse = True  # a blank the driver refuses is still offered, unpinned, after the pinned ones
    prefault.make_blanks(blanks, budget=64 * MiB, threads=2, size=64 * MiB)
    assert len(pins.held) == 24 and blanks.nbytes == 256 * MiB
    got = [blanks.take() for _ in range(4)]
    assert [b.unpin is not None for b in got if b] == [True, True, True, False]
    for b in got:
        assert b is not None
        blanks.put(b)
    assert blanks.drop_one()  # the unpinned one goes first: the pinned are worth more
    assert len(pins.held) == 24 and blanks.nbytes == 192 * MiB
    assert blanks.drop_one()  # then a pinned blank: unpinned before its map goes
    assert len(pins.held) == 16
    blanks.close_all()
    assert not pins.held and blanks.nbytes == 0


def test_a_segment_keeps_its_blanks_pins_until_the_pieces_past_its_end_are_dropped(
        hugepages: int, pin_pieces: int) -> None:
    blanks = prefault.Blanks()
    prefault.make_blanks(blanks, budget=192 * MiB, threads=2, size=64 * MiB)
    pins = Pins()
    blanks.pin_all(pins.pin)
    blank = blanks.take()
    assert blank is not None
    at = blank.address
    seg = Segment("t:cut", 20 * MiB + 5, blank=blank)  # 22 MiB, shrunk and sealed, every piece still pinned
    assert seg.pinned and len(pins.of(at)) == 8 and seg.length == 22 * MiB == os.fstat(seg.fd).st_size
    assert seg.held == 64 * MiB
    seg.mm[20 * MiB:20 * MiB + 5] = b"tail!"  # the partition's last bytes, in the piece crossing the end
    assert bytes(seg.mm[20 * MiB:20 * MiB + 5]) == b"tail!"
    assert seg.drop_past_end() == 40 * MiB and seg.drop_past_end() == 0
    assert pins.of(at) == [0, 8 * MiB, 16 * MiB] and seg.held == 24 * MiB  # the crossing piece: its life long
    seg.close()  # never unmapped pinned
    assert pins.of(at) == [] and seg.held == 22 * MiB
    blank = blanks.take()
    assert blank is not None
    at = blank.address
    whole = Segment("t:whole", 64 * MiB, blank=blank)  # fits: every piece kept
    assert whole.pinned and len(pins.of(at)) == 8
    whole.close()
    blank = blanks.take()
    assert blank is not None
    at = blank.address
    grown = Segment("t:grown", 70 * MiB, blank=blank)  # a new map: its blank's pins cannot come along
    assert not grown.pinned and pins.of(at) == [] and grown.huge
    grown.close()
    blanks.close_all()
    assert not pins.held


def test_memory_an_eviction_gives_back_becomes_blanks_again(tmp_path: Path, hugepages: int) -> None:
    """The start-time blanks serve the first fills only: once a fill took one and the model is evicted,
    its pages come back to the pool and a blank pass makes a blank of them again (the next tier-empty
    load then writes into memory faulted in, and pinned on a GPU node); none while a fill runs."""
    import time

    def blanks(c: object) -> int:
        return int(c.status()["memory"]["blanks"])  # type: ignore[attr-defined]

    with sidecar(tmp_path) as sd, sd.connect() as c:
        wait_log(sd, "as blank segments")
        full = blanks(c)
        assert full == 256 * MiB  # the test budget, in 64 MiB blanks
        want = make_model(sd.store, "org/m", tensors=4, nbytes=16 * MiB)  # one 64 MiB partition: one blank
        with c.acquire("org/m") as lease:
            assert {k: v.tobytes() for k, v in lease.numpy().items()} == want
        # one blank became its segment, one was given back for its readiness page: no room for another
        assert blanks(c) == full - 128 * MiB
        assert c.evict("org/m") == ["hf"]
        deadline = time.monotonic() + 30
        while blanks(c) < full and time.monotonic() < deadline:
            time.sleep(0.05)
        assert blanks(c) == full and sd.log().count("as blank segments") == 2
        with c.acquire("org/m") as lease:  # and into a blank again: the same bytes
            assert {k: v.tobytes() for k, v in lease.numpy().items()} == want
