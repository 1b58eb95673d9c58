"""Scratch directories go on every way out, an interrupt at any point included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sllmfs.core import scratch
from sllmfs.core.scratch import scratch_dir


@pytest.fixture(autouse=True)
def _tmp_as_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scratch.tempfile, "gettempdir", lambda: str(tmp_path))


def test_removed_at_the_end_and_on_an_error_or_interrupt(tmp_path: Path) -> None:
    with scratch_dir("t-") as d:
        (d / "f").write_text("x")
        assert d.parent == tmp_path and d.is_dir() and (d.stat().st_mode & 0o777) == 0o700
    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc), scratch_dir("t-") as d:
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_right_after_the_mkdir_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.mkdir

    def mkdir_then_interrupted(self: Path, *a: object, **k: object) -> None:
        real(self, *a, **k)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # where tempfile.TemporaryDirectory would lose track of it

    monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupted)
    with pytest.raises(KeyboardInterrupt), scratch_dir("t-"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_during_removal_finishes_it_then_goes_on(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = shutil.rmtree, []

    def rmtree_interrupted_once(path: Path, ignore_errors: bool = False) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(scratch.shutil, "rmtree", rmtree_interrupted_once)
    with pytest.raises(KeyboardInterrupt), scratch_dir("t-") as d:
        (d / "f").write_text("x")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
