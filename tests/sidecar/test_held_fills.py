"""HeldFills' rules (sidecar/gpufirst.py): a held fill never starts while a copy reads its files."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from sllmfs.sidecar.gpufirst import HeldFills


def held(copy_direct: bool = False) -> tuple[HeldFills, list[tuple[Any, str]], Any]:
    started: list[tuple[Any, str]] = []
    fills = HeldFills(lambda f, why: started.append((f, why)))
    res = SimpleNamespace(model="org/m", variant="hf")
    fill = SimpleNamespace(res=res, stop=False, copy_direct=copy_direct)  # what HeldFills reads of a Fill
    fills.hold(fill)  # type: ignore[arg-type]
    return fills, started, fill


def test_the_last_copy_starts_the_fill_and_later_copies_read_the_tier() -> None:
    fills, started, fill = held()
    first, second = fills.begin_copy(fill.res), fills.begin_copy(fill.res)  # two GPUs at once
    assert first is not None and second is not None and first.fill is fill and second.fill is fill
    assert not first.tee and not second.tee  # read through the page cache: the fill finds the bytes there
    fills.end_copy(fill.res)
    assert not started
    fills.end_copy(fill.res)
    assert started == [(fill, "after the GPU copy")] and not fills.holds(fill.res)
    assert fills.begin_copy(fill.res) is None  # the fill runs: copy from the tier
    fills.end_copy(fill.res)  # a copy that read the tier ends: nothing to do
    assert len(started) == 1


def test_a_reader_during_a_copy_waits_for_its_end() -> None:
    fills, started, fill = held()
    fills.begin_copy(fill.res)
    fills.release(fill.res, "pid 7 reads the segments")  # the fill would close the files the copy reads
    assert not started and fills.holds(fill.res)
    fills.end_copy(fill.res)
    assert started == [(fill, "after the GPU copy")]


def test_a_reader_or_lease_end_with_no_copy_starts_it_at_once() -> None:
    fills, started, fill = held()
    fills.release(fill.res, "lease 3 ended")
    fills.release(fill.res, "again")  # already started: nothing more
    assert started == [(fill, "lease 3 ended")]


def test_stopping_forgets_idle_fills_and_stops_those_a_copy_reads() -> None:
    fills, started, idle = held()
    busy = SimpleNamespace(res=SimpleNamespace(model="org/b", variant="hf"), stop=False, copy_direct=False)
    fills.hold(busy)  # type: ignore[arg-type]
    fills.begin_copy(busy.res)
    assert fills.drain() == [idle] and busy.stop and idle.stop
    assert not fills.holds(idle.res) and fills.holds(busy.res)
    fills.end_copy(busy.res)  # its start ends at once (stop) and closes the files after the copy
    assert started == [(busy, "after the GPU copy")]


def test_only_the_first_o_direct_copy_tees_into_the_tier() -> None:
    """A copy past the page cache writes what it reads into the tier (the fill reads only the rest); a
    second copy at the same time must not write windows the first may have published by then."""
    fills, started, fill = held(copy_direct=True)
    first, second = fills.begin_copy(fill.res), fills.begin_copy(fill.res)
    assert first is not None and first.tee and second is not None and not second.tee
    fills.end_copy(fill.res)
    third = fills.begin_copy(fill.res)  # the second still reads the files: the fill is held yet
    assert third is not None and not third.tee
    fills.end_copy(fill.res)
    fills.end_copy(fill.res)
    assert started == [(fill, "after the GPU copy")]
