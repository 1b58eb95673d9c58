"""weights_as_filled: a first load's any-TP path gets each tensor as soon as its bytes are verified."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch  # noqa: F401  # imported before the lease: a loader has torch loaded already (2 s here)

from sllmfs.core.errors import Corrupt
from sllmfs.integrations.common.source import weights_as_filled
from tests.support.sidecar import make_model, sidecar

SLOW_FILL = ("--num-thread", "1", "--chunk-size", "4MiB", "--no-gpu-warmup", "--mem-pool-size", "1GiB")


def _uncache(store: Path) -> None:
    """The stored files out of the page cache (the fill then reads the disk: slow enough to watch)."""
    for f in store.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_tensors_stream_in_file_order_with_exact_bytes(tmp_path: Path) -> None:
    want = make_model(tmp_path / "store", "m", tensors=64, nbytes=8 << 20)
    _uncache(tmp_path / "store")
    with sidecar(tmp_path, *SLOW_FILL) as sd, sd.connect() as c, c.acquire("m") as lease:
        got, first_progress = {}, None
        for name, view in weights_as_filled(lease):
            if first_progress is None:
                first_progress = lease.progress()
            got[name] = view.numpy().tobytes()
        assert got == want
        places = [(lease.entries[n].partition, lease.entries[n].offset) for n in got]
        assert places == sorted(places)
        done, total = first_progress
        assert done < total, "the first tensor came only after the whole 512 MiB fill: nothing streamed"


def test_a_window_that_fails_its_checksum_stops_the_stream(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_model(store, "m", tensors=8, nbytes=8 << 20)
    data = sorted(store.rglob("*.safetensors"))[-1]
    with open(data, "r+b") as f:  # the last tensor's bytes change after the manifest was written
        f.seek(data.stat().st_size - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with sidecar(tmp_path, *SLOW_FILL) as sd, sd.connect() as c, c.acquire("m") as lease:
        seen = []
        with pytest.raises(Corrupt):
            for name, _view in weights_as_filled(lease):
                seen.append(name)
        assert 0 < len(seen) < 8  # the verified tensors before it were handed on, the bad one was not
