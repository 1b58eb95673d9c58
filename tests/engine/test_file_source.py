"""File sources on the host target: the stagers read stored files (checksummed per window) into the ring."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sllmfs.engine import copy_engine as ce
from sllmfs.store.format import digest
from tests.engine.test_copy_engine import make_dst, tensor_pieces

MiB = 1 << 20
WINDOW = MiB  # small windows: a test file spans many, and a block several


def stored(tmp_path, data: np.ndarray, name: str, *, direct: bool = False) -> tuple[int, list[str]]:
    """A file holding ``data`` and its per-window digests, as the manifest records them (``direct``: the
    fd opened O_DIRECT, as the sidecar opens a cold model's files for the copy)."""
    path = tmp_path / name
    path.write_bytes(data.tobytes())
    raw = data.tobytes()
    digests = [digest(raw[o:o + WINDOW]) for o in range(0, len(raw), WINDOW)]
    if not direct:
        return os.open(path, os.O_RDONLY), digests
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), digests
    except OSError as e:
        pytest.skip(f"this filesystem refuses O_DIRECT ({e})")


@pytest.fixture(params=[False, True], ids=["buffered", "O_DIRECT"])
def files(tmp_path, request):
    rng = np.random.default_rng(11)
    datas = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5 * MiB + 123, 3 * MiB, 4096)]
    opened = [stored(tmp_path, d, f"p{i}", direct=request.param) for i, d in enumerate(datas)]
    yield datas, [ce.FileSegment.of(fd, d.nbytes, ds, WINDOW) for (fd, ds), d in zip(opened, datas, strict=True)]
    for fd, _ in opened:
        os.close(fd)


# slot_bytes: smaller than a window (checked at its last read), equal, larger and not a multiple; file
# blocks of chunk_bytes (the default), one window, or three; O_DIRECT reads one at a time or three in flight
@pytest.mark.parametrize("depth", [1, 3], ids=["depth1", "depth3"])
@pytest.mark.parametrize("file_block", [0, WINDOW, 3 * WINDOW], ids=["chunk", "window", "3-windows"])
@pytest.mark.parametrize("slot_bytes", [WINDOW // 4, WINDOW, 3 * WINDOW // 2])
def test_file_copy_matches_source(files, slot_bytes, file_block, depth):
    datas, segs = files
    dst = make_dst(64 * MiB)
    pieces, expect = tensor_pieces(datas, np.random.default_rng(slot_bytes), dst.ctypes.data)
    with ce.CopyEngine(target="host", mode="auto", threads=2, chunk_bytes=2 * MiB, slot_bytes=slot_bytes,
                       file_block_bytes=file_block, read_depth=depth) as eng:
        for _ in range(2):  # the second copy reuses the ring
            dst[:] = 0xAB
            stats = eng.copy(segs, pieces)
            assert np.array_equal(dst[: expect.size], expect)
            assert (dst[expect.size:] == 0xAB).all()
    assert stats["mode"] == "stage"
    assert stats["bytes"] == stats["staged_bytes"] == int(pieces[:, 3].sum())


@pytest.mark.parametrize("depth", [1, 3], ids=["depth1", "depth3"])
@pytest.mark.parametrize("overlap", [4096, 12288])
@pytest.mark.parametrize("slot_bytes", [WINDOW // 4, 3 * WINDOW // 2])
def test_overlapping_direct_reads_match_source(tmp_path, slot_bytes, overlap, depth):
    """Reads that ask past their step (fastsafetensors' 516 KiB at 512 KiB strides) land the extra bytes
    where the next read puts them again: the same bytes arrive, each window still checked, and a file
    whose last window ends off a 4 KiB boundary reads to its end."""
    rng = np.random.default_rng(overlap + depth)
    datas = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5 * MiB + 123, 3 * MiB + 4096 + 7)]
    opened = [stored(tmp_path, d, f"o{i}", direct=True) for i, d in enumerate(datas)]
    try:
        segs = [ce.FileSegment.of(fd, d.nbytes, ds, WINDOW) for (fd, ds), d in zip(opened, datas, strict=True)]
        dst = make_dst(32 * MiB)
        pieces, expect = tensor_pieces(datas, rng, dst.ctypes.data)
        with ce.CopyEngine(target="host", threads=2, chunk_bytes=2 * MiB, slot_bytes=slot_bytes,
                           read_depth=depth, read_overlap=overlap) as eng:
            eng.copy(segs, pieces)
        assert np.array_equal(dst[: expect.size], expect) and (dst[expect.size:] == 0xAB).all()
    finally:
        for fd, _ in opened:
            os.close(fd)


def test_read_overlap_and_depth_are_checked() -> None:
    for bad in ({"read_overlap": 100}, {"read_overlap": 2 << 20}, {"read_depth": 0}):
        with pytest.raises(ValueError, match="read_overlap must be|read_depth must be"):
            ce.CopyEngine(target="host", threads=1, **bad)


def test_file_and_mapped_segments_in_one_copy(files):
    datas, segs = files
    mem = np.arange(3 * MiB, dtype=np.uint32).view(np.uint8)[: 3 * MiB - 5]  # leaves a stager's slot unaligned
    dst = make_dst(datas[0].nbytes + mem.nbytes)
    pieces = np.array([[0, 0, dst.ctypes.data, datas[0].nbytes],
                       [1, 0, dst.ctypes.data + datas[0].nbytes, mem.nbytes]], np.uint64)
    with ce.CopyEngine(target="host", threads=2, chunk_bytes=2 * MiB) as eng:
        eng.copy([segs[0], ce.Segment.from_buffer(mem)], pieces)
    assert np.array_equal(dst[: datas[0].nbytes], datas[0]) and np.array_equal(dst[datas[0].nbytes:], mem)


@pytest.mark.parametrize("direct,depth", [(False, 1), (True, 1), (True, 4)],
                         ids=["buffered", "O_DIRECT", "O_DIRECT-depth4"])
@pytest.mark.parametrize("slot_bytes", [WINDOW // 4, WINDOW])
def test_damaged_file_fails_the_copy_naming_the_window(tmp_path, slot_bytes, direct, depth):
    data = np.random.default_rng(3).integers(0, 256, 4 * MiB, dtype=np.uint8)
    fd, digests = stored(tmp_path, data, "damaged", direct=direct)
    try:
        with open(tmp_path / "damaged", "r+b") as f:  # one byte of window 2 changes after the digests
            f.seek(2 * MiB + 77)
            f.write(bytes([data[2 * MiB + 77] ^ 0xFF]))
        dst = make_dst(data.nbytes)
        seg = ce.FileSegment.of(fd, data.nbytes, digests, WINDOW)
        with ce.CopyEngine(target="host", threads=2, chunk_bytes=2 * MiB, slot_bytes=slot_bytes,
                           read_depth=depth) as eng:
            with pytest.raises(ce.SourceCorrupt, match=r"segment 0: checksum window 2 \(bytes 2097152\.\.\+1048576\)"):
                eng.copy([seg], np.array([[0, 0, dst.ctypes.data, data.nbytes]], np.uint64))
            if slot_bytes == WINDOW:  # a window that fits a slot is checked before its bytes move on
                assert (dst[2 * MiB: 3 * MiB] == 0xAB).all()
            # the engine serves the next copy (the undamaged windows)
            assert eng.copy([seg], np.array([[0, 0, dst.ctypes.data, 2 * MiB]], np.uint64))["bytes"] == 2 * MiB
        assert np.array_equal(dst[: 2 * MiB], data[: 2 * MiB])
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct,depth", [(False, 1), (True, 1), (True, 4)],
                         ids=["buffered", "O_DIRECT", "O_DIRECT-depth4"])
def test_short_file_is_a_read_failure(tmp_path, direct, depth):
    data = np.random.default_rng(4).integers(0, 256, 3 * MiB, dtype=np.uint8)
    fd, digests = stored(tmp_path, data, "short", direct=direct)
    try:
        os.truncate(tmp_path / "short", 2 * MiB + 5)
        dst = make_dst(data.nbytes)
        with ce.CopyEngine(target="host", threads=1, chunk_bytes=2 * MiB, read_depth=depth) as eng:
            with pytest.raises(ce.SourceReadFailed, match="the file ends early"):
                eng.copy([ce.FileSegment.of(fd, data.nbytes, digests, WINDOW)],
                         np.array([[0, 0, dst.ctypes.data, data.nbytes]], np.uint64))
    finally:
        os.close(fd)


def test_bad_file_sources_are_refused(files):
    datas, segs = files
    dst = make_dst(datas[0].nbytes)
    one = np.array([[0, 0, dst.ctypes.data, datas[0].nbytes]], np.uint64)
    with pytest.raises(ce.BadPieces, match="needs 6 digests, got 5"):
        ce.FileSegment.of(segs[0].fd, datas[0].nbytes, ["0" * 16] * 5, WINDOW)
    with ce.CopyEngine(target="host", mode="register", threads=1) as eng:
        with pytest.raises(ce.BadPieces, match="copy them in stage mode"):
            eng.copy(segs[:1], one)
    odd = ce.FileSegment(segs[0].fd, datas[0].nbytes, segs[0].digests, 3 * MiB)  # does not divide 2 MiB blocks
    with ce.CopyEngine(target="host", threads=1, chunk_bytes=2 * MiB, file_block_bytes=2 * MiB) as eng:
        with pytest.raises(ce.BadPieces, match="window that divides the file block size"):
            eng.copy([odd], one)


def test_file_sources_are_not_relayed(files):
    datas, segs = files
    dst = make_dst(datas[0].nbytes)
    with ce.CopyEngine(target="host", threads=1, chunk_bytes=2 * MiB) as eng:
        with pytest.raises(ce.BadPieces, match="cannot be relayed"):
            eng.copy(segs[:1], np.array([[0, 0, dst.ctypes.data, datas[0].nbytes]], np.uint64),
                     relay=ce.Relay(peers=(1,)))


@pytest.mark.parametrize("cached", ["none", "first half"])
def test_files_the_page_cache_lacks_are_read_from_disk(tmp_path, cached):
    """What the page cache lacks is read in one waiting read per window: the same bytes, still checked."""
    data = np.random.default_rng(5).integers(0, 256, 6 * MiB + 99, dtype=np.uint8)
    fd, digests = stored(tmp_path, data, "cold")
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            if os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT) > 0:
                pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to read from disk")
        except BlockingIOError:
            pass  # not cached: as wanted
        if cached == "first half":
            os.pread(fd, 3 * MiB, 0)
        dst = make_dst(data.nbytes)
        with ce.CopyEngine(target="host", threads=2, chunk_bytes=2 * MiB, slot_bytes=WINDOW) as eng:
            eng.copy([ce.FileSegment.of(fd, data.nbytes, digests, WINDOW)],
                     np.array([[0, 0, dst.ctypes.data, data.nbytes]], np.uint64))
        assert np.array_equal(dst, data)
    finally:
        os.close(fd)


def test_an_o_direct_source_needs_aligned_slots(tmp_path):
    """O_DIRECT reads land at aligned places of the slot: a ring whose slots are not whole 4 KiB pages is
    refused for such a source, not read wrong."""
    data = np.random.default_rng(6).integers(0, 256, 2 * MiB, dtype=np.uint8)
    fd, digests = stored(tmp_path, data, "direct", direct=True)
    try:
        dst = make_dst(data.nbytes)
        with ce.CopyEngine(target="host", threads=1, chunk_bytes=2 * MiB, slot_bytes=WINDOW + 512) as eng:
            with pytest.raises(ce.BadPieces, match="O_DIRECT file source needs slots"):
                eng.copy([ce.FileSegment.of(fd, data.nbytes, digests, WINDOW)],
                         np.array([[0, 0, dst.ctypes.data, data.nbytes]], np.uint64))
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct,depth", [(False, 1), (True, 1), (True, 4)],
                         ids=["buffered", "O_DIRECT", "O_DIRECT-depth4"])
@pytest.mark.parametrize("slot_bytes", [WINDOW // 4, WINDOW])
def test_tee_gets_every_window_read_and_flags_only_verified_ones(tmp_path, slot_bytes, direct, depth):
    """A file source with a tee (the memory tier's segment): every window the copy reads lands there too,
    and ``teed`` flags a window only once it matched its digest; windows no piece touches are not read."""
    data = np.random.default_rng(5).integers(0, 256, 6 * MiB + 4096 + 321, dtype=np.uint8)
    fd, digests = stored(tmp_path, data, "teed", direct=direct)
    try:
        tier = np.full(data.nbytes, 0xCD, dtype=np.uint8)
        seg = ce.FileSegment.of(fd, data.nbytes, digests, WINDOW, tee=tier)
        assert seg.teed is not None and len(seg.teed) == 7
        dst = make_dst(data.nbytes)
        # windows 0-1 whole, a piece inside window 3, and the file's unaligned tail (window 6)
        pieces = np.array([[0, 0, dst.ctypes.data, 2 * MiB],
                           [0, 3 * MiB + 100, dst.ctypes.data + 3 * MiB + 100, 1000],
                           [0, 6 * MiB, dst.ctypes.data + 6 * MiB, data.nbytes - 6 * MiB]], np.uint64)
        with ce.CopyEngine(target="host", threads=2, chunk_bytes=2 * MiB, slot_bytes=slot_bytes,
                           read_depth=depth) as eng:
            eng.copy([seg], pieces)
            assert seg.teed.tolist() == [1, 1, 0, 1, 0, 0, 1]
            for k in (0, 1, 3, 6):  # whole windows, even where only part of one was asked for
                lo, hi = k * MiB, min((k + 1) * MiB, data.nbytes)
                assert np.array_equal(tier[lo:hi], data[lo:hi])
            assert (tier[2 * MiB: 3 * MiB] == 0xCD).all() and (tier[4 * MiB: 6 * MiB] == 0xCD).all()

            with open(tmp_path / "teed", "r+b") as f:  # window 4 changes after its digest was taken
                f.seek(4 * MiB + 9)
                f.write(bytes([data[4 * MiB + 9] ^ 0xFF]))
            seg2 = ce.FileSegment.of(fd, data.nbytes, digests, WINDOW, tee=tier)
            assert seg2.teed is not None
            with pytest.raises(ce.SourceCorrupt, match="checksum window 4"):
                eng.copy([seg2], np.array([[0, 4 * MiB, dst.ctypes.data, MiB]], np.uint64))
            assert seg2.teed[4] == 0  # its bytes may be in the tee, but nobody is told they are good
    finally:
        os.close(fd)



def test_a_tee_too_short_is_refused_before_the_copy() -> None:
    digests = ["0" * 16] * 3
    with pytest.raises(ce.BadPieces, match="tee must be 3000000 writable contiguous bytes"):
        ce.FileSegment.of(0, 3_000_000, digests, WINDOW, tee=np.zeros(4096, np.uint8))
    with pytest.raises(ce.BadPieces, match="teed must be 3"):
        ce.FileSegment(0, 3_000_000, np.zeros(3, np.uint64), WINDOW, tee=np.zeros(3_000_000, np.uint8),
                       teed=np.zeros(2, np.uint8))
