"""Hostile names at the edges: FUSE lookups and CLI arguments (the protocol is fuzzed in test_reliability)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.fuse import Runner

NAMES = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"),
                min_size=1, max_size=300)
PATHS = st.lists(NAMES | st.sampled_from(["..", ".", "org", "tiny", "model.safetensors", "%2F", "..%2F.."]),
                 min_size=1, max_size=4)


@pytest.mark.skipif(not Path("/dev/fuse").exists() or os.geteuid() != 0, reason="needs root and /dev/fuse")
def test_odd_names_under_the_mount_never_escape_or_crash(tmp_path: Path, llama_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "org/tiny", llama_dir)
    runner = Runner(store.root, tmp_path / "mnt")
    mnt = tmp_path / "mnt"
    seen: list[int] = []
    try:
        @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
        @given(PATHS)
        def probe(parts: list[str]) -> None:
            path = os.path.join(str(mnt), *parts)
            try:
                found = os.lstat(path)
            except OSError as e:
                assert e.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EINVAL), (parts, e)
                seen.append(e.errno)
                return
            if found.st_dev == mnt_dev:  # served by the view (a `..` above its root is the kernel's walk)
                assert os.path.realpath(path).startswith(str(mnt)), parts

        mnt_dev = os.stat(mnt).st_dev
        probe()
        assert (mnt / "org" / "tiny" / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()
        assert seen  # most probes miss, as they should
    finally:
        runner.stop()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.text(min_size=0, max_size=300).filter(lambda s: "\x00" not in s and not s.startswith("-")))
def test_hostile_model_names_on_the_command_line_are_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                              name: str) -> None:
    store = tmp_path_factory.mktemp("cli") / "store"
    proc = subprocess.run([sys.executable, "-m", "sllmfs", "verify", "--model", name, "--storage-path", str(store)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sllmfs: error:"), proc.stderr
    assert not (store.parent / "models").exists()  # nothing written outside the store
