"""The sidecar's ``files`` op (a real daemon, a real socket): metadata files are checked against the
digests recorded at save before any fd is handed out; a damaged one is a ``Corrupt`` reply of one line;
what a client gets is a sealed copy of the checked bytes, never the store file."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from sllmfs.core.errors import Corrupt
from sllmfs.protocol import wire
from sllmfs.protocol.messages import ErrorKind
from sllmfs.store.save import save_model
from tests.store.test_metafiles import ADAPTER_CONFIG, CONFIG, DAMAGE, TOKENIZER, checkpoint, make_legacy, saved
from tests.support.sidecar import raw_hello, sidecar, wait_log

F_GET_SEALS = 1034


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_file_is_a_corrupt_reply_and_other_models_are_served(tmp_path: Path, kind: str) -> None:
    store = saved(tmp_path, with_adapter=True)
    save_model(store, "org/good", checkpoint(tmp_path / "src2"))
    DAMAGE[kind][0](store.get("org/m").files_dir / "config.json")
    with sidecar(tmp_path, store=store.root) as sd, sd.connect() as c:
        with pytest.raises(Corrupt) as e:
            c.files("org/m")
        line = str(e.value)
        assert "\n" not in line and "model 'org/m': files/config.json" in line and DAMAGE[kind][1] in line
        assert c.files("org/m", "lora.chat") == {"adapter_config.json": ADAPTER_CONFIG}  # its own files are fine
        assert c.files("org/good") == {"config.json": CONFIG, "tokenizer.json": TOKENIZER}
        s = raw_hello(sd.socket)
        wire.send(s, {"op": "files", "model": "org/m"})
        reply, fds = wire.recv(s)
        assert reply["ok"] is False and reply["kind"] == ErrorKind.CORRUPT and fds == []  # typed, no fd
        s.close()
        assert sd.proc.poll() is None


def test_a_damaged_adapter_file_is_refused_and_the_model_files_are_served(tmp_path: Path) -> None:
    store = saved(tmp_path, with_adapter=True)
    DAMAGE["extend"][0](store.get("org/m").variant_files_dir("lora.chat") / "adapter_config.json")
    with sidecar(tmp_path, store=store.root) as sd, sd.connect() as c:
        with pytest.raises(Corrupt, match=r"\[lora.chat\]: files/adapter_config.json is"):
            c.files("org/m", "lora.chat")
        assert c.files("org/m")["config.json"] == CONFIG


def test_clients_get_a_sealed_copy_of_the_checked_bytes(tmp_path: Path) -> None:
    store = saved(tmp_path)
    with sidecar(tmp_path, store=store.root) as sd:
        s = raw_hello(sd.socket)
        wire.send(s, {"op": "files", "model": "org/m"})
        reply, fds = wire.recv(s)
        try:
            assert reply["files"] == [["config.json", len(CONFIG)], ["tokenizer.json", len(TOKENIZER)]]
            assert os.pread(fds[0], 1 << 20, 0) == CONFIG and os.pread(fds[1], 1 << 20, 0) == TOKENIZER
            # damage on disk now changes nothing a client already holds
            DAMAGE["flip"][0](store.get("org/m").files_dir / "config.json")
            assert os.pread(fds[0], 1 << 20, 0) == CONFIG
            assert fcntl.fcntl(fds[0], F_GET_SEALS) & 0x0f == 0x0f  # seal, shrink, grow, write
            rw = os.open(f"/proc/self/fd/{fds[0]}", os.O_RDWR)  # root may reopen it; still nobody writes
            try:
                for change in (lambda: os.pwrite(rw, b"x", 0), lambda: os.ftruncate(rw, 1)):
                    with pytest.raises(OSError) as e:
                        change()
                    assert e.value.errno == errno.EPERM
            finally:
                os.close(rw)
            assert os.pread(fds[0], 1 << 20, 0) == CONFIG
        finally:
            for fd in fds:
                os.close(fd)
            s.close()


def test_a_legacy_model_is_served_with_one_log_line(tmp_path: Path) -> None:
    store = saved(tmp_path, with_adapter=True)
    make_legacy(store)
    with sidecar(tmp_path, store=store.root) as sd, sd.connect() as c:
        for _ in range(3):
            assert c.files("org/m") == {"config.json": CONFIG, "tokenizer.json": TOKENIZER}
        assert c.files("org/m", "lora.chat") == {"adapter_config.json": ADAPTER_CONFIG}
        log = wait_log(sd, "served unverified")
    lines = [line for line in log.splitlines() if "served unverified" in line]
    assert len(lines) == 2, lines  # the model's files, the adapter's files: once each
    assert all("--repair" in line for line in lines)
