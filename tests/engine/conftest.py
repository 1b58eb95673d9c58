"""The stand-in CUDA runtime with peers and asynchronous streams, compiled once per session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.cudart import FAKE_PEER_CUDART


@pytest.fixture(scope="session")
def fake_lib(tmp_path_factory) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler for the stand-in runtime")
    d = tmp_path_factory.mktemp("fakecuda")
    (d / "fake.c").write_text(FAKE_PEER_CUDART)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(d / "libfakecudart.so"), str(d / "fake.c")],
                   check=True)
    return d / "libfakecudart.so"
