"""A fill from the store that fails tells the lease's client why (cause and line), as the sidecar's
refusal of the model says it: the same line, not "see the sidecar log"."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllmfs.client.client import FillFailed
from sllmfs.core.errors import Corrupt
from sllmfs.protocol.messages import FailCause
from tests.support.sidecar import make_model, sidecar


def test_a_damaged_window_reaches_the_lease_as_damaged_with_the_refusal_line(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd, sd.connect() as c:
        make_model(sd.store, "org/bad")
        data = sd.store / "models" / "org%2Fbad" / "variants" / "hf" / "data_0.bin"
        with open(data, "r+b") as f:
            f.seek(5000)
            byte = f.read(1)
            f.seek(5000)
            f.write(bytes([byte[0] ^ 0xFF]))
        lease = c.acquire("org/bad")
        with pytest.raises(FillFailed) as failed:
            lease.wait(timeout=30)
        lease.release()
        assert failed.value.cause == FailCause.DAMAGED
        line = str(failed.value)
        assert "data_0.bin window 0 fails its" in line and "sllmfs verify --model org/bad" in line, line
        with pytest.raises(Corrupt) as refused:  # the next acquire is refused with the same line
            c.acquire("org/bad")
        assert str(refused.value) == line
