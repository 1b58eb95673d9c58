"""The native hashed read (csrc/hashread.cpp) lands the bytes and hashes them as python xxhash does,
stops where the page cache or the file runs out, and names the error that stopped it."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from sllmfs.store import hashed_read

pytestmark = pytest.mark.skipif(hashed_read.read is None, reason="the native module did not bind (see its log line)")
MIB = 1 << 20


def _hex(data: bytes) -> str:
    return f"{xxhash.xxh3_64_intdigest(data):016x}"


@pytest.mark.parametrize("step", [4096, 1 << 20, 300_001])
def test_reads_land_the_bytes_and_hash_them_as_python_does(tmp_path: Path, step: int) -> None:
    data = os.urandom(4 * MIB + 123)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert hashed_read.read is not None
        dst = bytearray(4 * MIB)
        got = hashed_read.read(fd, memoryview(dst), 77, step, 0)
        assert got == hashed_read.Hashed(4 * MIB, _hex(data[77:77 + 4 * MIB]), 0)
        assert bytes(dst) == data[77:77 + 4 * MIB]
        past = bytearray(MIB)  # the file ends 123 bytes in: a short read, the digest of what landed
        assert hashed_read.read(fd, memoryview(past), 4 * MIB, step, 0) == hashed_read.Hashed(123, _hex(data[-123:]), 0)
        assert bytes(past[:123]) == data[-123:] and not any(past[123:])
    finally:
        os.close(fd)


def test_reads_that_do_not_wait_stop_where_the_page_cache_does(tmp_path: Path) -> None:
    data = os.urandom(8 * MIB)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 4 * MIB, 4 * MIB, os.POSIX_FADV_DONTNEED)
        assert hashed_read.read is not None
        got = hashed_read.read(fd, memoryview(bytearray(8 * MIB)), 0, MIB, os.RWF_NOWAIT)
        if got.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            pytest.skip(f"{tmp_path}'s filesystem has no RWF_NOWAIT reads")
        assert got.done == 4 * MIB and got.digest == _hex(data[:4 * MIB]), got  # EAGAIN or a short read
        assert got.errno in (0, errno.EAGAIN)
    finally:
        os.close(fd)


def test_an_error_stops_the_reads_and_is_named(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: every read is EISDIR
    try:
        assert hashed_read.read is not None
        got = hashed_read.read(fd, memoryview(bytearray(4096)), 0, 4096, 0)
        assert got == hashed_read.Hashed(0, _hex(b""), errno.EISDIR)
    finally:
        os.close(fd)


def test_a_read_only_buffer_is_refused() -> None:
    assert hashed_read.read is not None
    with pytest.raises(TypeError):
        hashed_read.read(0, memoryview(b"abc"), 0, 4096, 0)


@contextlib.contextmanager
def _both_opens(path: Path, data: bytes) -> Iterator[tuple[int, int]]:
    """``data`` written to ``path``, opened O_DIRECT and buffered (skips where the filesystem refuses O_DIRECT)."""
    path.write_bytes(data)
    try:
        fd_direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"this filesystem refuses O_DIRECT ({e})")
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd_direct, fd
    finally:
        os.close(fd)
        os.close(fd_direct)


@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize("size", [4 * MIB, 3 * MIB + 5000, 4096 + 7], ids=["whole", "unaligned-tail", "tiny"])
def test_direct_window_reads_land_the_bytes_and_never_past_the_buffer(tmp_path: Path, depth: int, size: int) -> None:
    """read_direct: O_DIRECT reads (queued at depth > 1) of the aligned part, the file's unaligned tail read
    buffered, so the buffer (exactly the window, as the tier's exact-size segments are) is never overrun."""
    assert hashed_read.read_direct is not None and hashed_read.DIRECT_STEP == 512 << 10
    data = os.urandom(size)
    # the window at the start of a mapping: past its end, its last page's rest and a guard page
    with _both_opens(tmp_path / "f", data) as (fd_direct, fd):
        room = (size + 4095) // 4096 * 4096
        with mmap.mmap(-1, room + 4096) as m:
            m[room:] = b"\xee" * 4096
            dst = memoryview(m)[:size]
            got = hashed_read.read_direct(fd_direct, fd, dst, 0, depth)
            assert got == hashed_read.Hashed(size, _hex(data), 0)
            assert bytes(dst) == data and m[room:] == b"\xee" * 4096
            assert m[size:room] == bytes(room - size)  # nothing landed past the window in its last page
            dst.release()


def test_direct_reads_are_refused_off_the_block() -> None:
    assert hashed_read.read_direct is not None
    buf = memoryview(bytearray(8192))[1:4097]  # not 4 KiB-aligned
    with pytest.raises(ValueError, match="4 KiB-aligned"):
        hashed_read.read_direct(0, 0, buf, 0, 1)


@pytest.mark.parametrize("depth", [1, 4])
def test_direct_windows_at_any_aligned_offset_and_past_the_end(tmp_path: Path, depth: int) -> None:
    assert hashed_read.read_direct is not None
    data = os.urandom(21 * MIB + 999)
    with _both_opens(tmp_path / "f", data) as (fd_direct, fd):
        with mmap.mmap(-1, 4 * MIB) as m:
            for at in (4 * MIB, 8 * MIB, 20 * MIB):  # the last window runs past the file's end
                dst = memoryview(m)
                got = hashed_read.read_direct(fd_direct, fd, dst, at, depth)
                want = data[at:at + 4 * MIB]
                assert got == hashed_read.Hashed(len(want), _hex(want), 0)
                assert bytes(dst[:len(want)]) == want
                dst.release()
            with pytest.raises(ValueError, match="4 KiB-aligned"):
                hashed_read.read_direct(fd_direct, fd, memoryview(m), 4097, depth)
