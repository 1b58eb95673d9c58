"""A fill copies what the page cache holds in small reads checked as they land, and from the first
byte it lacks reads the piece on waiting for the disk. Every test first makes sure the page cache
really lacks the gaps (and holds the rest): the kernel keeps a large folio that straddles an evicted
range, so the gaps are whole 2 MiB folios, or such a range with its start read back in small pages.

Through the daemon: a file partly in the page cache fills the same bytes, and a flipped byte on
either side of the point the cache runs out (inside a window) or a short file is refused. In this
process (the fill's own counts): the hand-overs happen where the gaps start, a failing disk fails
the window it hit (never one verified READY), and O_DIRECT asked for on a filesystem without it
still copies from the page cache."""

from __future__ import annotations

import errno
import os
import random
import runpy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import sllmfs.store.reader as reader
from sllmfs.client.client import FillFailed
from sllmfs.fuse.storeio import _all_cached
from sllmfs.protocol.messages import FailCause, Readiness
from sllmfs.sidecar.fill import Fill
from sllmfs.sidecar.memtier import MemoryTier, Resident
from sllmfs.store import hashed_read
from sllmfs.store.format import CHUNK_SIZE, load_manifest
from sllmfs.store.reader import variant_identity
from tests.support.sidecar import make_model, sidecar, wait_log

MIB = 1 << 20
PAGE = 4096


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit

# Models in the aligned layout: a partition is exactly its tensors' 24 MiB, so the windows below fall where
# these figures say (the fill reads a safetensors-layout file the same way: by windows of its bytes).
# 8 MiB pieces: 2 windows each. The cache runs out at 2 MiB (inside window 0) and at 10 MiB
# (inside window 2); window 3 is half gap, half cached (read waiting all the same).
SHAPE = ("--chunk-size", "8MiB", "--num-thread", "2")
GAPS = ((2 * MIB, 2 * MIB), (10 * MIB, 4 * MIB))
# read back into the cache in small pages: window 0 then runs out at 2.5 MiB, in a short RWF_NOWAIT read
SHORT = ((2 * MIB, MIB // 2),)
R, F, P = Readiness.READY, Readiness.FAILED, Readiness.PENDING


def _data(store: Path, model: str) -> Path:
    return next((store / "models").glob(f"{model.replace('/', '%2F')}/variants/hf/data_0.bin"))


def _evict(path: Path, gaps: tuple[tuple[int, int], ...] = GAPS, keep: tuple[tuple[int, int], ...] = ()) -> None:
    """Drop ``gaps`` of the file from the page cache (written back first), read ``keep`` back without
    readahead, and check the page cache now lacks exactly the gaps less ``keep``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for off, n in gaps:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # this descriptor only: no readahead past keep
        for off, n in keep:
            assert len(os.pread(fd, n, off)) == n
        for at in range(0, os.fstat(fd).st_size, PAGE):
            lacked = any(o <= at < o + n for o, n in gaps) and not any(o <= at < o + n for o, n in keep)
            cached = _all_cached(fd, at, PAGE)
            assert cached is not None, "this kernel has no cachestat: cannot check what is cached"
            assert cached is not lacked, f"page at {at} of {path.name}: cached={cached}, wanted {not lacked}"
    finally:
        os.close(fd)


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x20]))


def _refusal(sd_client: object, model: str) -> FillFailed:
    lease = sd_client.acquire(model)  # type: ignore[attr-defined]
    with pytest.raises(FillFailed) as failed:
        lease.wait(timeout=30)
    lease.release()
    return failed.value


def test_a_file_partly_in_the_page_cache_fills_the_same_bytes(tmp_path: Path) -> None:
    with sidecar(tmp_path, *SHAPE) as sd, sd.connect() as c:
        want = make_model(sd.store, "org/m", tensors=24, nbytes=MIB, seed=5, aligned=True)
        data = _data(sd.store, "org/m")
        assert data.stat().st_size > 5 * 4 * MIB  # 6 windows: three pieces, some cached, some not
        _evict(data)
        with c.acquire("org/m") as lease:
            got = {k: v.tobytes() for k, v in lease.numpy().items()}
        assert got == want
        assert "filled model=org/m" in wait_log(sd, "filled model=org/m")


@pytest.mark.parametrize(("at", "window", "keep"), [
    (2 * MIB - 7, 0, ()),  # the window the cache runs out in (at 2 MiB): a byte hashed as it landed
    (2 * MIB + 100, 0, ()),  # ... and one of its bytes read waiting, hashed after
    (2 * MIB + MIB // 2 - 1, 0, SHORT),  # runs out at 2.5 MiB in a short read: the last byte it got
    (2 * MIB + MIB // 2, 0, SHORT),  # ... and the first it did not
    (10 * MIB - 5, 2, ()),  # the second piece: cache side of 10 MiB
    (10 * MIB + 3, 2, ()),  # ... disk side
    (13 * MIB + 7, 3, ()),  # in a window read wholly waiting
    (17 * MIB + 3, 4, ()),  # in a window read wholly from the cache
])
def test_a_flipped_byte_is_refused_cached_or_not(tmp_path: Path, at: int, window: int,
                                                 keep: tuple[tuple[int, int], ...]) -> None:
    with sidecar(tmp_path, *SHAPE) as sd, sd.connect() as c:
        make_model(sd.store, "org/bad", tensors=24, nbytes=MIB, seed=6, aligned=True)
        data = _data(sd.store, "org/bad")
        _flip(data, at)
        _evict(data, keep=keep)
        failed = _refusal(c, "org/bad")
        assert failed.cause == FailCause.DAMAGED
        assert f"data_0.bin window {window} fails its" in str(failed), str(failed)


def test_a_short_file_is_refused_past_a_gap(tmp_path: Path) -> None:
    with sidecar(tmp_path, *SHAPE) as sd, sd.connect() as c:
        make_model(sd.store, "org/short", tensors=24, nbytes=MIB, seed=7, aligned=True)
        data = _data(sd.store, "org/short")
        os.truncate(data, 10 * MIB + 7)  # ends inside the second gap (window 2)
        _evict(data)
        failed = _refusal(c, "org/short")
        assert failed.cause == FailCause.DAMAGED
        assert "data_0.bin is shorter than its manifest" in str(failed), str(failed)


# -- in this process: the fill's counts and readiness bytes ------------------------------------------


@contextmanager
def _resident(tmp_path: Path, seed: int, nbytes: int = MIB) -> Iterator[tuple[Resident, Path, bytes]]:
    """A 24 MiB model saved (one partition: 3 pieces, 6 windows) and a resident copy to fill;
    ``nbytes`` a tensor (24 of them): another size ends the partition inside its last window."""
    store = tmp_path / "store"
    make_model(store, "org/m", tensors=24, nbytes=nbytes, seed=seed, aligned=True)
    vdir = _data(store, "org/m").parent
    manifest = load_manifest(vdir)
    assert len(manifest.partitions) == 1 and 20 * MIB < manifest.partitions[0].size <= 24 * MIB + MIB
    res = MemoryTier(1 << 30).reserve("org/m", "hf", manifest, variant_identity(vdir))
    try:
        yield res, vdir, (vdir / manifest.partitions[0].file).read_bytes()
    finally:
        res.close()


def _run(fill: Fill) -> None:
    try:
        fill.worker()  # one thread: the pieces in file order
    finally:
        fill.close()


def _readiness(res: Resident) -> list[int]:
    return list(res.ready.mm[:len(res.manifest.partitions[0].chunks)])


def _ready_bytes(res: Resident) -> int:
    size = res.manifest.partitions[0].size
    return sum(min(CHUNK_SIZE, size - k * CHUNK_SIZE) for k, r in enumerate(_readiness(res)) if r == R)


@pytest.mark.parametrize(("keep", "ran_out"), [((), 2 * MIB), (SHORT, 2 * MIB + MIB // 2)])
def test_the_fill_hands_over_where_the_page_cache_runs_out(tmp_path: Path, keep: tuple[tuple[int, int], ...],
                                                           ran_out: int) -> None:
    with _resident(tmp_path, seed=8) as (res, vdir, want):
        _evict(vdir / "data_0.bin", keep=keep)
        fill = Fill(res, vdir, 8 * MIB)
        _run(fill)
        assert fill.error is None
        assert bytes(res.segments[0].mm[:len(want)]) == want
        assert _readiness(res) == [R] * 6 and res.filled == len(want)
        # pieces 0 and 1 ran out inside windows 0 and 2; piece 2 came whole from the cache
        assert fill.handovers == 2
        assert fill.cached_bytes == ran_out + (10 * MIB - 8 * MIB) + (len(want) - 16 * MIB)


class _PatchyCache(Fill):
    """The page cache runs out at any byte, not only at page boundaries the kernel would choose:
    a read that does not wait gets a random part of what it asked for, or EAGAIN."""

    native_reads = False  # the faults are behind _preadv: the Python reads go through it

    rng = random.Random(0)

    def _preadv(self, fd: int, dest: memoryview, off: int, flags: int = 0) -> int:
        r = self.rng.random()
        if not flags or r >= 0.4:
            return super()._preadv(fd, dest, off, flags)
        if r < 0.2 or len(dest) < 2:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return super()._preadv(fd, dest[:self.rng.randrange(1, len(dest))], off, flags)


def _random_trials(patchy: type[Fill], res: Resident, vdir: Path, want: bytes) -> list[int]:
    """20 fills of ``res`` by ``patchy`` (its ``rng`` seeded per trial), each from zeroed memory and
    PENDING windows, each checked whole; the bytes each copied from the cache."""
    cached = []
    for trial in range(20):
        fill = patchy(res, vdir, 8 * MIB)
        fill.rng = random.Random(trial)  # type: ignore[attr-defined]
        res.ready.mm[:6] = bytes(6)  # PENDING again, the copy zeroed: the next trial fills it anew
        res.segments[0].mm[:len(want)] = bytes(len(want))
        res.filled = 0
        _run(fill)
        assert fill.error is None, trial
        assert bytes(res.segments[0].mm[:len(want)]) == want, trial
        assert _readiness(res) == [R] * 6 and res.filled == len(want), trial
        cached.append(fill.cached_bytes)
    return cached


def test_the_cache_running_out_at_any_byte_fills_the_same_bytes(tmp_path: Path) -> None:
    with _resident(tmp_path, seed=13) as (res, vdir, want):
        assert all(0 < n < len(want) for n in _random_trials(_PatchyCache, res, vdir, want))


@pytest.mark.parametrize("native", [True, False] if hashed_read.read is not None else [False])
def test_a_short_last_window_the_cache_runs_out_in_is_counted_once(tmp_path: Path, native: bool) -> None:
    """The partition ends 1/4 into window 5 (a 4 MiB window of ~1 MiB) and the cache runs out in it:
    its bytes are exact, every window READY, and ``filled`` is the partition's size, on either path."""
    with _resident(tmp_path, seed=17, nbytes=MIB - 40_960) as (res, vdir, want):
        size = len(want)
        assert size % CHUNK_SIZE and size // CHUNK_SIZE == 5
        last = size // CHUNK_SIZE * CHUNK_SIZE
        # the last window's whole folios out, its first two pages read back small: it runs out 8 KiB in
        _evict(vdir / "data_0.bin", gaps=((last, _round_up(size, 2 * MIB) - last),), keep=((last, 2 * PAGE),))

        class Chosen(Fill):
            native_reads = native

        fill = Chosen(res, vdir, 8 * MIB)
        _run(fill)
        assert fill.error is None and (fill.hashed is not None) is native
        assert bytes(res.segments[0].mm[:size]) == want
        assert _readiness(res) == [R] * 6 and res.filled == size
        assert fill.handovers == 1 and fill.cached_bytes == last + 2 * PAGE


class _PatchyNative(Fill):
    """The native reads run out at any byte: a window's reads land a random part of it, then EAGAIN,
    a short read, or a filesystem that refuses reads that do not wait."""

    rng = random.Random(0)

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        real = self.hashed
        assert real is not None

        def patchy(fd: int, dst: memoryview, off: int, step: int, flags: int = 0) -> hashed_read.Hashed:
            r = self.rng.random()
            if r >= 0.5:
                return real(fd, dst, off, step, flags)
            got = real(fd, dst[:self.rng.randrange(0, len(dst))], off, step, flags)
            why = (errno.EAGAIN, 0, errno.EOPNOTSUPP)[int(r * 6) % 3]
            return got._replace(errno=why)

        self.hashed = patchy


@pytest.mark.skipif(hashed_read.read is None, reason="the native module did not bind")
def test_the_native_reads_running_out_at_any_byte_fill_the_same_bytes(tmp_path: Path) -> None:
    with _resident(tmp_path, seed=18, nbytes=MIB - 40_960) as (res, vdir, want):
        assert all(0 <= n <= len(want) for n in _random_trials(_PatchyNative, res, vdir, want))


class _FailingDisk(Fill):
    """The disk fails at byte ``bad``: a waiting read lands the bytes before it, one from it is EIO
    (a bad sector). What the page cache holds reads fine."""

    native_reads = False  # the faults are behind _preadv: the Python reads go through it

    bad = 0

    def _preadv(self, fd: int, dest: memoryview, off: int, flags: int = 0) -> int:
        if flags or not off <= self.bad < off + len(dest):
            return super()._preadv(fd, dest, off, flags)
        if off < self.bad:
            return super()._preadv(fd, dest[:self.bad - off], off, flags)
        raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.parametrize(("gaps", "keep", "bad", "readiness"), [
    # the cache runs out at 13 MiB (window 3) after window 2 was published READY from it
    (((12 * MIB, 2 * MIB),), ((12 * MIB, MIB),), 13 * MIB + 64 * 1024, [R, R, R, F, P, P]),
    # the disk fails in the window the cache ran out in (at 10 MiB)
    (GAPS, (), 11 * MIB, [R, R, F, P, P, P]),
    # ... or in the window after it: the one it ran out in was read, never verified (PENDING)
    (GAPS, (), 15 * MIB, [R, R, P, F, P, P]),
])
def test_a_failing_disk_fails_the_window_it_hit(tmp_path: Path, gaps: tuple[tuple[int, int], ...],
                                                keep: tuple[tuple[int, int], ...], bad: int,
                                                readiness: list[int]) -> None:
    with _resident(tmp_path, seed=9) as (res, vdir, _):
        _evict(vdir / "data_0.bin", gaps=gaps, keep=keep)
        fill = _FailingDisk(res, vdir, 8 * MIB)
        fill.bad = bad
        _run(fill)
        assert fill.error == f"data_0.bin: {os.strerror(errno.EIO)}"
        assert res.failure is not None and res.failure.cause == FailCause.READ
        assert fill.error in res.failure.line
        assert _readiness(res) == readiness
        assert res.filled == _ready_bytes(res)  # counted: exactly the windows published READY


class _FailingDiskNative(Fill):
    """As _FailingDisk, for the native reads of the page-cache path: the real reads land the bytes
    before ``bad``, then report EIO as the native module names it."""

    bad = 0

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        real = self.hashed
        assert real is not None

        def failing(fd: int, dst: memoryview, off: int, step: int, flags: int = 0) -> hashed_read.Hashed:
            if not off <= self.bad < off + len(dst):
                return real(fd, dst, off, step, flags)
            return real(fd, dst[:self.bad - off], off, step, flags)._replace(errno=errno.EIO)

        self.hashed = failing


@pytest.mark.skipif(hashed_read.read is None, reason="the native module did not bind")
def test_a_failing_disk_under_the_native_reads_fails_the_window_it_hit(tmp_path: Path) -> None:
    with _resident(tmp_path, seed=16) as (res, vdir, _):
        _evict(vdir / "data_0.bin", gaps=())  # all cached: every window goes through the native reads
        fill = _FailingDiskNative(res, vdir, 8 * MIB)
        fill.bad = 13 * MIB + 64 * 1024
        _run(fill)
        assert fill.error == f"data_0.bin: {os.strerror(errno.EIO)}"
        assert res.failure is not None and res.failure.cause == FailCause.READ
        assert _readiness(res) == [R, R, R, F, P, P]
        assert res.filled == _ready_bytes(res)


def test_a_failure_never_takes_back_a_window_published_ready(tmp_path: Path) -> None:
    """Whatever fails later names a READY window (its bytes verified, maybe copied already): it stays
    READY, the fill fails with that one line."""
    with _resident(tmp_path, seed=14) as (res, vdir, _):
        fill = Fill(res, vdir, 8 * MIB)
        _run(fill)
        assert _readiness(res) == [R] * 6
        fill._fail(0, 9 * MIB, "data_0.bin: something late", FailCause.READ)
        assert _readiness(res) == [R] * 6 and res.filled == _ready_bytes(res)
        assert fill.error == "data_0.bin: something late"
        assert res.failure is not None and res.failure.cause == FailCause.READ


def test_direct_on_a_filesystem_without_it_still_reads_the_page_cache(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_direct(path: object, *, flags: int = 0, **kw: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))  # as such a filesystem answers
        return open_regular(path, flags=flags, **kw)  # type: ignore[arg-type]

    open_regular = reader.open_regular
    with _resident(tmp_path, seed=10) as (res, vdir, want):
        _evict(vdir / "data_0.bin", gaps=())  # all cached
        monkeypatch.setattr(reader, "open_regular", no_direct)
        fill = Fill(res, vdir, 8 * MIB, direct=True)
        _run(fill)
        assert fill.error is None and bytes(res.segments[0].mm[:len(want)]) == want
        assert fill.cached_bytes == len(want) and fill.handovers == 0


def test_direct_where_the_filesystem_has_it_leaves_the_page_cache_out(tmp_path: Path) -> None:
    with _resident(tmp_path, seed=11) as (res, vdir, want):
        _evict(vdir / "data_0.bin", gaps=())
        fill = Fill(res, vdir, 8 * MIB, direct=True)
        _run(fill)
        assert fill.error is None and bytes(res.segments[0].mm[:len(want)]) == want
        assert fill.cached_bytes == 0


def test_the_old_order_bench_reads_every_piece_waiting(tmp_path: Path) -> None:
    """bench/old_fill_order.py's patch (not run as a script: nothing started) leaves the page cache out."""
    old = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "old_fill_order.py"))

    class OldOrder(Fill):
        _from_cache = old["_whole_pieces"]

    with _resident(tmp_path, seed=12) as (res, vdir, want):
        _evict(vdir / "data_0.bin", gaps=())  # all cached: the new order would copy it all from there
        fill = OldOrder(res, vdir, 8 * MIB)
        _run(fill)
        assert fill.error is None and bytes(res.segments[0].mm[:len(want)]) == want
        assert _readiness(res) == [R] * 6 and fill.cached_bytes == 0


def test_status_gives_the_fill_timeline_on_the_clients_clock(tmp_path: Path) -> None:
    """A tier-empty load's steps, each a time.monotonic() every process on the node shares
    (bench_cold_stages --part warm-load lines them up with its own call); evicted and filled
    again, the timeline is the new fill's."""
    import time

    with sidecar(tmp_path, *SHAPE) as sd, sd.connect() as c:
        want = make_model(sd.store, "org/t", tensors=24, nbytes=MIB, seed=9, aligned=True)
        for _ in range(2):
            asked = time.monotonic()
            with c.acquire("org/t") as lease:
                got = {k: v.tobytes() for k, v in lease.numpy().items()}
            assert got == want
            wait_log(sd, "filled model=org/t")
            deadline = time.monotonic() + 30
            while True:
                variants = [v for m in c.status()["models"] if m["name"] == "org/t" for v in m["variants"]]
                tl = variants[0]["timeline"]
                if tl["fill_end"] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert asked <= tl["reserved"] <= tl["fill_start"] <= tl["first_ready"] <= tl["last_ready"] \
                <= tl["fill_end"] <= time.monotonic()
            assert tl["partitions"] == 1 and 0 <= tl["from_blanks"] <= 1 and tl["alloc_s"] >= 0
            assert c.evict("org/t") == ["hf"]


@pytest.mark.parametrize("kib", [256, 64])
def test_smaller_page_cache_reads_fill_the_same_bytes_and_refuse_a_flip(tmp_path: Path, kib: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/fill_read_size.py's patch (NOTES-cold run 11): the page-cache path in reads of ``kib`` KiB
    checks every window the same way: all cached, the bytes are exact; a flipped byte fails its window."""
    import sllmfs.sidecar.fill as fill_mod

    patch = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "fill_read_size.py"))
    monkeypatch.setattr(fill_mod, "CACHED_READ", fill_mod.CACHED_READ)  # both restored after the test
    monkeypatch.setattr(fill_mod, "HASHED_READ", fill_mod.HASHED_READ)
    patch["set_read_size"](kib)
    assert fill_mod.CACHED_READ == kib << 10
    sizes: list[int] = []  # of the reads that do not wait (the page-cache path)

    class Counted(Fill):
        native_reads = False  # the reads counted are behind _preadv, which the native reads skip

        def _preadv(self, fd: int, dest: memoryview, off: int, flags: int = 0) -> int:
            if flags:
                sizes.append(len(dest))
            return super()._preadv(fd, dest, off, flags)

    with _resident(tmp_path, seed=14) as (res, vdir, want):
        _evict(vdir / "data_0.bin", gaps=())  # all cached: every window comes in reads of kib KiB
        fill = Counted(res, vdir, 8 * MIB)
        _run(fill)
        assert fill.error is None and bytes(res.segments[0].mm[:len(want)]) == want
        assert _readiness(res) == [R] * 6 and fill.cached_bytes == len(want)
        assert max(sizes) == kib << 10 and len(sizes) >= len(want) // (kib << 10), (kib, len(sizes))
    with _resident(tmp_path / "flip", seed=15) as (res, vdir, want):
        _flip(vdir / "data_0.bin", 9 * MIB + kib * 1024 + 3)  # window 2 (8-12 MiB), a read past its first
        _evict(vdir / "data_0.bin", gaps=())
        fill = Fill(res, vdir, 8 * MIB)
        _run(fill)
        assert fill.error is not None and _readiness(res)[2] == F


@pytest.mark.parametrize("nbytes", [MIB, MIB - 40_960], ids=["whole-windows", "short-last-window"])
def test_windows_a_gpu_copy_published_are_neither_read_nor_counted_again(tmp_path: Path, nbytes: int) -> None:
    """Fill.adopt publishes the windows a GPU-first copy teed into the segment (with gaps, the short last one
    included); the fill then reads only the rest: a store byte changed under a published window is never
    read back into it, and a window already FAILED is not published."""
    import numpy as np

    with _resident(tmp_path, seed=23, nbytes=nbytes) as (res, vdir, want):
        size = len(want)
        nwin = -(-size // CHUNK_SIZE)
        res.segments[0].mm[:size] = want  # what the copy's tee wrote: every window's bytes
        teed = np.zeros(nwin, np.uint8)
        teed[[0, 2, 3, nwin - 1]] = 1  # the copy read windows 0, 2, 3 and the last
        data = vdir / res.manifest.partitions[0].file
        with open(data, "r+b") as f:  # the store's copy of window 2 changes after the copy read it
            f.seek(2 * CHUNK_SIZE + 5)
            f.write(bytes([want[2 * CHUNK_SIZE + 5] ^ 0xFF]))
        fill = Fill(res, vdir, 8 * MIB)
        published = fill.adopt([teed])
        last = size - (nwin - 1) * CHUNK_SIZE
        assert published == fill.adopted == 3 * CHUNK_SIZE + last
        assert fill.adopt([teed]) == 0  # twice: nothing more
        _run(fill)
        assert fill.error is None  # window 2 was not read again
        assert fill.read_bytes == size - published
        assert bytes(res.segments[0].mm[:size]) == want
        assert _readiness(res) == [R] * nwin and res.filled == size


def test_a_failed_window_is_not_published_by_a_gpu_copy(tmp_path: Path) -> None:
    import numpy as np

    with _resident(tmp_path, seed=29) as (res, vdir, _want):
        fill = Fill(res, vdir, 8 * MIB)
        try:
            res.ready.mm[res.chunk_base[0] + 1] = Readiness.FAILED
            assert fill.adopt([np.ones(6, np.uint8)]) == 5 * CHUNK_SIZE
            assert _readiness(res)[1] == Readiness.FAILED
        finally:
            fill.close()


@pytest.mark.skipif(hashed_read.read_direct is None, reason="the native module did not bind")
def test_a_file_refusing_o_direct_partway_is_read_buffered_from_that_window(tmp_path: Path) -> None:
    """The native direct path answers EINVAL in window 1, after part of it landed: that window on is read the
    buffered way, every window READY once, the bytes exact."""
    with _resident(tmp_path, seed=31) as (res, vdir, want):
        calls: list[int] = []

        class Refusing(Fill):
            def __init__(self, *args: object, **kw: object) -> None:
                super().__init__(*args, **kw)  # type: ignore[arg-type]
                real = self.hashed_direct
                assert real is not None

                def direct(fd_direct: int, fd: int, dst: memoryview, off: int, depth: int) -> hashed_read.Hashed:
                    calls.append(off)
                    if off == CHUNK_SIZE:  # half of it landed, then the refusal
                        got = real(fd_direct, fd, dst[:CHUNK_SIZE // 2], off, depth)
                        return got._replace(errno=errno.EINVAL)
                    return real(fd_direct, fd, dst, off, depth)

                self.hashed_direct = direct

        fill = Refusing(res, vdir, 8 * MIB, direct=True)
        if not fill._reads_direct(0):
            fill.close()
            pytest.skip("this filesystem refuses O_DIRECT")
        _run(fill)
        assert fill.error is None
        assert calls[:2] == [0, CHUNK_SIZE] and all(c < CHUNK_SIZE * 2 for c in calls)  # buffered from window 1
        assert bytes(res.segments[0].mm[:len(want)]) == want
        assert _readiness(res) == [R] * 6 and res.filled == len(want)
