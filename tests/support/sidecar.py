"""The sidecar as a real process for tests and benchmarks: a model in the store, a started daemon,
its log, a raw connection."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import sllmfs.client.client as sc
from sllmfs.protocol import wire
from sllmfs.store.save import save_model
from sllmfs.store.store import Store


def make_model(store_root: Path, name: str, *, tensors: int = 6, nbytes: int = 256 << 10, seed: int = 0,
               force: bool = False, aligned: bool = False) -> dict[str, bytes]:
    """A safetensors checkpoint of random float32 tensors, saved into the store; returns name -> bytes.
    ``aligned``: its hf variant in the aligned layout (as per-rank variants are: partitions of exactly the
    tensors' bytes, what the hugetlb blanks are sized for) instead of as its safetensors file."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    arrays = {f"layer.{i}.weight": rng.standard_normal(nbytes // 4, dtype=np.float32).reshape(-1, 64)
              for i in range(tensors)}
    src = store_root.parent / "src" / f"{name.replace('/', '_')}-{seed}"
    src.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "test"}))
    if aligned:
        from tests.support.synth import save_aligned

        save_aligned(Store(store_root), name, src)
    else:
        save_model(Store(store_root), name, src, force=force)
    return {k: v.tobytes() for k, v in arrays.items()}


class Sidecar:
    def __init__(self, proc: subprocess.Popen[bytes], sock: Path, log: Path, store: Path):
        self.proc, self.socket, self.log_path, self.store = proc, sock, log, store

    def connect(self) -> sc.Client:
        return sc.connect(str(self.socket))

    def log(self) -> str:
        return self.log_path.read_text()

    def status(self) -> dict:  # type: ignore[type-arg]
        with self.connect() as c:
            return c.status()


@contextmanager
def sidecar(tmp_path: Path, *args: str, env: dict[str, str] | None = None, store: Path | None = None,
            run_dir: Path | None = None) -> Iterator[Sidecar]:
    store = store or tmp_path / "store"
    Store(store)
    sock = (run_dir or tmp_path / "run") / "sidecar.sock"
    log = tmp_path / "sidecar.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(store),
                                 "--socket", str(sock), "--mem-pool-size", "256MiB", *args],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"sidecar exited {proc.returncode}: {log.read_text()}")
            try:
                sc.connect(str(sock)).close()
                break
            except sc.SidecarError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"sidecar did not start: {log.read_text()}") from None
                time.sleep(0.05)
        yield Sidecar(proc, sock, log, store)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_log(sd: Sidecar, text: str, timeout: float = 20) -> str:
    """The log once it holds ``text`` (events are logged as they finish, maybe after a reply)."""
    deadline = time.monotonic() + timeout
    while text not in sd.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return sd.log()


def raw_hello(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    wire.send(s, {"op": "hello", "version": 1})
    assert wire.recv(s)[0]["ok"] is True
    return s


def cached_model(store: Path, hf: Path, name: str, seed: int) -> None:
    """A model saved from a Hugging Face cache snapshot: the disk tier may evict it (it can be saved again)."""
    from safetensors.numpy import save_file

    snap = hf / f"models--org--{name}" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {f"w{i}": rng.standard_normal(65536, dtype=np.float32) for i in range(4)}
    save_file(arrays, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"model_type": "test"}))
    save_model(Store(store), name, snap)
