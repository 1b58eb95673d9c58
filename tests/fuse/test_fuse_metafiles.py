"""Metadata files through a real mount: a file that does not match what was saved fails its open with
EIO and one log line naming model and file; everything else of the mount is served as before; a model
saved before digests were recorded is served, with one line saying so."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from sllmfs.store.save import save_adapter
from tests.store.test_metafiles import ADAPTER_CONFIG, CONFIG, DAMAGE, TOKENIZER, adapter, make_legacy, saved, symlink
from tests.support.fuse import Runner, force_unmount

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")


def _read(path: Path) -> bytes | int:
    """The file's bytes, or the errno its open or read failed with."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return e.errno or -1


def _log(runner: Runner) -> list[str]:
    runner.stop()
    assert runner.proc.stderr is not None
    return runner.proc.stderr.read().splitlines()


@pytest.mark.parametrize("kind", [*sorted(DAMAGE), "symlink"])
def test_a_damaged_metadata_file_is_eio_with_one_log_line_and_the_rest_is_served(tmp_path: Path, kind: str) -> None:
    store = saved(tmp_path)
    save_adapter(store, "org/m", "chat", adapter(tmp_path / "lora"))
    mnt = tmp_path / "mnt"
    runner = Runner(store.root, mnt)
    try:
        model = mnt / "org" / "m"
        assert sorted(p.name for p in model.iterdir()) == ["adapters", "config.json", "model.safetensors",
                                                           "tokenizer.json"]  # listed before the damage
        damage = symlink if kind == "symlink" else DAMAGE[kind][0]
        damage(store.model_path("org/m") / "files" / "tokenizer.json")
        for _ in range(3):  # every open fails, however often it is tried
            assert _read(model / "tokenizer.json") == errno.EIO
        cat = subprocess.run(["cat", str(model / "tokenizer.json")], capture_output=True)
        assert cat.returncode != 0 and b"Input/output error" in cat.stderr
        assert _read(model / "adapters" / "chat" / "adapter_config.json") == ADAPTER_CONFIG
        if kind != "symlink":  # a symlink refuses the whole model on its next listing (Store.get)
            assert _read(model / "config.json") == CONFIG
            assert isinstance(_read(model / "model.safetensors"), bytes)
    finally:
        log = _log(runner)
        force_unmount(mnt)
    lines = [line for line in log if "tokenizer.json" in line]
    assert len(lines) == 1, log
    assert "model 'org/m'" in lines[0] and "files/tokenizer.json" in lines[0]
    assert "not served" in lines[0] and "sllmfs verify --model org/m" in lines[0]


def test_a_damaged_adapter_file_is_eio_and_the_model_files_are_served(tmp_path: Path) -> None:
    store = saved(tmp_path, with_adapter=True)
    mnt = tmp_path / "mnt"
    runner = Runner(store.root, mnt)
    try:
        path = mnt / "org" / "m" / "adapters" / "chat" / "adapter_config.json"
        DAMAGE["flip"][0](store.get("org/m").variant_files_dir("lora.chat") / "adapter_config.json")
        assert _read(path) == errno.EIO
        assert _read(path) == errno.EIO
        assert _read(mnt / "org" / "m" / "tokenizer.json") == TOKENIZER
    finally:
        log = _log(runner)
        force_unmount(mnt)
    lines = [line for line in log if "adapter_config.json" in line]
    assert len(lines) == 1 and "model 'org/m' [lora.chat]" in lines[0] and "fails its xxh3_64 checksum" in lines[0]


def test_a_legacy_model_is_served_with_one_line_saying_its_files_are_unverified(tmp_path: Path) -> None:
    store = saved(tmp_path)
    make_legacy(store)
    mnt = tmp_path / "mnt"
    runner = Runner(store.root, mnt)
    try:
        for _ in range(3):
            assert _read(mnt / "org" / "m" / "config.json") == CONFIG
            assert _read(mnt / "org" / "m" / "tokenizer.json") == TOKENIZER
    finally:
        log = _log(runner)
        force_unmount(mnt)
    lines = [line for line in log if "served unverified" in line]
    assert len(lines) == 1 and "org/m" in lines[0] and "--repair" in lines[0], log
