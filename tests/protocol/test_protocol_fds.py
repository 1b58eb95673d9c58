"""Replies with more descriptors than one sendmsg may carry (Linux: 253), send errors, reply deadlines."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

import sllmfs.client.client as sc
from sllmfs.protocol import wire
from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.sidecar import Sidecar, make_model, sidecar, wait_log


def _save(store_root: Path, name: str, *, tensors: int, files: int = 0) -> dict[str, bytes]:
    """A model with ``tensors`` small tensors, each in its own partition, and ``files`` extra metadata files."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    arrays = {f"layer.{i}.weight": rng.standard_normal(16, dtype=np.float32) for i in range(tensors)}
    src = store_root.parent / "src" / name
    src.mkdir(parents=True)
    save_file(arrays, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "test"}))
    for i in range(files):
        (src / f"extra_{i:03d}.txt").write_text(f"file {i}\n")
    save_model(Store(store_root), name, src, partition_target=1)  # any tensor overflows a 1-byte partition
    return {k: v.tobytes() for k, v in arrays.items()}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _serves_others(sd: Sidecar) -> None:
    expected = make_model(sd.store, "other", tensors=2, nbytes=4096)
    with sd.connect() as c, c.acquire("other") as lease:
        got = lease.numpy(timeout=30)
        assert {n: a.tobytes() for n, a in got.items()} == expected
        assert c.status()["connections"] == 1
    assert sd.proc.poll() is None and "internal error" not in sd.log()


def test_acquire_of_300_partitions_passes_every_fd(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        expected = _save(sd.store, "big", tensors=300)
        before = _open_fds()
        with sd.connect() as c, c.acquire("big") as lease:
            assert len(lease.maps) == 300
            got = lease.numpy(timeout=30)
            assert {n: a.tobytes() for n, a in got.items()} == expected
            assert {t.partition for t in lease.entries.values()} == set(range(300))
            del got
        assert _open_fds() == before  # every fd of the three batches was closed after mapping
        _serves_others(sd)


def test_files_op_passes_400_files(tmp_path: Path) -> None:
    from sllmfs.integrations.transformers import fetch_files

    with sidecar(tmp_path) as sd:
        _save(sd.store, "many", tensors=2, files=400)
        before = _open_fds()
        with sd.connect() as c:
            files = c.files("many")
            out = fetch_files(c, "many", "hf", tmp_path / "fetched")
        assert _open_fds() == before
        assert len(files) == 401 and files["config.json"] == b'{"model_type": "test"}'
        assert all(files[f"extra_{i:03d}.txt"] == f"file {i}\n".encode() for i in range(400))
        assert (out / "extra_399.txt").read_text() == "file 399\n"
        _serves_others(sd)


def test_failed_send_is_logged_and_closes_the_connection(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "m", tensors=2, nbytes=4096)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sd.socket))
        wire.send(s, {"op": "hello", "version": 1})
        wire.recv(s)
        s.shutdown(socket.SHUT_RD)  # before the request: the sidecar's reply then always fails with EPIPE
        wire.send(s, {"op": "acquire", "model": "m"})
        log = wait_log(sd, "lease ended")
        s.close()
        assert "send failed" in log and "op=acquire" in log, log
        assert "(connection closed)" in log  # its lease ended with the connection
        _serves_others(sd)


def _silent_sidecar(path: Path, *, greet: bool) -> threading.Thread:
    """A socket that accepts one client, answers hello if ``greet``, then never replies again."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            wire.recv(conn)
            if greet:
                wire.send(conn, {"ok": True, "version": 1, "pid": 1})
            try:
                while conn.recv(1 << 16):  # read requests, answer nothing, until the client hangs up
                    pass
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("greet", [True, False])
def test_reply_deadline_names_the_op_and_socket(tmp_path: Path, greet: bool) -> None:
    path = tmp_path / "silent.sock"
    t = _silent_sidecar(path, greet=greet)
    op = "status" if greet else "hello"
    with pytest.raises(sc.SidecarError, match=f"no reply to '{op}' from the sidecar at {path} within 0.3 s"):
        with sc.connect(str(path), timeout=0.3) as c:
            c.status()
    t.join(5)
    assert not t.is_alive()  # the client closed its socket: a late reply cannot answer its next request


def test_wire_round_trip_of_600_fds_in_order() -> None:
    a, b = socket.socketpair()
    sent = [os.memfd_create(f"t{i}") for i in range(600)]
    try:
        for i, fd in enumerate(sent):
            os.ftruncate(fd, i)  # its size names it: the order must survive the batches
        with a, b:
            wire.send(a, {"ok": True}, sent)
            reply, got = wire.recv(b)
        assert reply == {"ok": True, "fds": 600}
        assert [os.fstat(fd).st_size for fd in got] == list(range(600))
    finally:
        for fd in sent + got:
            os.close(fd)


def test_wire_refuses_and_closes_fds_beyond_the_announced_count() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    before = _open_fds()
    with a, b:
        a.sendall(wire.pack({"ok": True, "fds": 1}))
        socket.send_fds(a, [b"\0"], [r, w])
        with pytest.raises(wire.ProtocolError, match="1 fds announced, 2 received"):
            wire.recv(b)
    os.close(r)
    os.close(w)
    assert _open_fds() == before - 4  # the socketpair and the pipe; nothing received was kept


def test_a_live_sidecar_is_not_taken_for_a_dead_one_after_a_call(tmp_path: Path) -> None:
    """Calls run under a reply deadline; between calls the socket is blocking again, so the
    MSG_DONTWAIT probe a waiting lease makes answers at once (it once waited out the deadline,
    then called a live sidecar dead: 'went away while filling' under load)."""
    import time

    with sidecar(tmp_path) as sd, sd.connect() as c:
        c.status()
        t0 = time.monotonic()
        assert c.closed_by_peer() is False
        assert time.monotonic() - t0 < 0.5
