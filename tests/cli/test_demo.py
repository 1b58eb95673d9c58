"""The README's demo: build, save, serve, read back by mount and by handles, generate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.cli import sllmfs


@pytest.mark.skipif(not Path("/dev/fuse").exists() or os.geteuid() != 0, reason="needs root and /dev/fuse")
def test_demo_runs_the_whole_path(tmp_path: Path) -> None:
    out = sllmfs("demo", timeout=300, env={"TMPDIR": str(tmp_path)})
    assert not list(tmp_path.iterdir())  # its scratch dir is gone: nothing left in /tmp
    text = out.stdout + out.stderr
    assert "tensors identical = True" in text
    assert "same by both paths: True" in text
    assert text.rstrip().endswith("stopped") or "demo ok" in text
