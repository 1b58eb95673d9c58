"""A fill copies what the page cache holds in small reads checked as they land, and reads the rest
waiting for the disk: a file partly in the page cache (gaps starting inside a window) lands the same
verified bytes, and a bad byte or a short file on either side of a gap is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sllmfs.client.client import FillFailed
from sllmfs.protocol.messages import FailCause
from tests.support.sidecar import make_model, sidecar, wait_log

MIB = 1 << 20
# 2 windows a piece; the gaps start inside windows 0 and 2 and end inside windows 0 and 3
SHAPE = ("--chunk-size", "8MiB", "--num-thread", "2")
GAPS = ((MIB + MIB // 2, MIB), (9 * MIB, 4 * MIB))


def _data(store: Path, model: str) -> Path:
    return next((store / "models").glob(f"{model.replace('/', '%2F')}/variants/hf/data_0.bin"))


def _evict(path: Path, gaps: tuple[tuple[int, int], ...] = GAPS) -> None:
    """Drop these ranges of the file from the page cache (its pages written back first)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        for off, n in gaps:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
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
        want = make_model(sd.store, "org/m", tensors=24, nbytes=MIB, seed=5)
        data = _data(sd.store, "org/m")
        assert data.stat().st_size > 5 * 4 * MIB  # 6 windows: three pieces, some cached, some not
        _evict(data)
        with c.acquire("org/m") as lease:
            got = {k: v.tobytes() for k, v in lease.numpy().items()}
        assert got == want
        assert "filled model=org/m" in wait_log(sd, "filled model=org/m")


@pytest.mark.parametrize(("at", "window"), [
    (2 * MIB + 100, 0),  # in a gap that starts inside its window: half hashed from the cache, half after
    (12 * MIB + 7, 3),  # in a window the gap covers to its end
    (17 * MIB + 3, 4),  # in a window read wholly from the cache
])
def test_a_flipped_byte_is_refused_cached_or_not(tmp_path: Path, at: int, window: int) -> None:
    with sidecar(tmp_path, *SHAPE) as sd, sd.connect() as c:
        make_model(sd.store, "org/bad", tensors=24, nbytes=MIB, seed=6)
        data = _data(sd.store, "org/bad")
        _flip(data, at)
        _evict(data)
        failed = _refusal(c, "org/bad")
        assert failed.cause == FailCause.DAMAGED
        assert f"data_0.bin window {window} fails its" in str(failed), str(failed)


def test_a_short_file_is_refused_past_a_gap(tmp_path: Path) -> None:
    with sidecar(tmp_path, *SHAPE) as sd, sd.connect() as c:
        make_model(sd.store, "org/short", tensors=24, nbytes=MIB, seed=7)
        data = _data(sd.store, "org/short")
        os.truncate(data, 10 * MIB + 7)  # ends inside the second gap (window 2)
        _evict(data)
        failed = _refusal(c, "org/short")
        assert failed.cause == FailCause.DAMAGED
        assert "data_0.bin is shorter than its manifest" in str(failed), str(failed)
