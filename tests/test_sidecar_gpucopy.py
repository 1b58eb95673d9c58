"""The load_ipc op on a machine without a GPU: clear refusals, the lease stays usable."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_sidecar import make_model, sidecar

from sllmfs.errors import BadInput


def test_load_ipc_without_cuda_is_a_clear_refusal(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        expected = make_model(sd.store, "org/m", tensors=3)
        with sd.connect() as c, c.acquire("org/m") as lease:
            lease.wait(timeout=30)
            blocks = [{"handle": bytes(64), "size": 1 << 20, "device": "0000:00:00.0"}]
            ref = next(iter(lease.entries.values()))
            pieces = [[ref.partition, ref.offset, 0, 0, ref.nbytes]]
            for _ in range(2):  # the second answer comes from the remembered reason
                with pytest.raises(BadInput, match="cannot copy to GPUs"):
                    lease.copy_to_gpu(blocks, pieces)
            with pytest.raises(BadInput, match="not held on this connection"):
                c._op("load_ipc", lease=lease.id + 99, blocks=blocks, pieces=pieces)
            with pytest.raises(BadInput, match="needs 'blocks' and 'pieces'"):
                c._op("load_ipc", lease=lease.id, blocks="x", pieces=pieces)
            assert {n: t.numpy().tobytes() for n, t in lease.tensors().items()} == expected
