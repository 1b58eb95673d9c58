"""A window checked as its bytes land, in reads of any size, answers as the whole-window check does."""

from __future__ import annotations

import os

import pytest

from sllmfs.store.format import CHUNK_SIZE, Partition, digest
from sllmfs.store.reader import WindowCheck, window_ok


@pytest.mark.parametrize("reads", [[CHUNK_SIZE], [1 << 20] * 4, [4096, 1 << 20, 12_288, CHUNK_SIZE]])
def test_a_window_fed_in_reads_checks_as_the_whole(reads: list[int]) -> None:
    data = os.urandom(CHUNK_SIZE + 1000)
    tail = data[CHUNK_SIZE:]
    p = Partition("data_0.bin", len(data), [digest(data[:CHUNK_SIZE]), digest(tail)])
    flipped = bytearray(data)
    flipped[3 * CHUNK_SIZE // 4] ^= 1
    for body, k, want in ((data, 0, True), (bytes(flipped), 0, False), (data, 1, True), (data[:-1], 1, False)):
        window = body[k * CHUNK_SIZE:(k + 1) * CHUNK_SIZE]
        check, at = WindowCheck(p, k), 0
        for n in reads:  # reads past the window's end come back short, as the file's would
            check.update(window[at:at + n])
            at += n
        assert check.ok() is want is window_ok(p, k, window)


def test_a_window_the_manifest_lacks_never_checks() -> None:
    p = Partition("data_0.bin", 10, [digest(b"0123456789")])
    check = WindowCheck(p, 1)
    check.update(b"")
    assert not check.ok() and not window_ok(p, 1, b"")
