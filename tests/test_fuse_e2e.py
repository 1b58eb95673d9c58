"""`sllmfs start --mount`: the daemon serves the FUSE view beside its socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from test_synth import raw

from sllmfs.save import save_model
from sllmfs.store import Store

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")


def _is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


def test_sllmfs_start_mounts_serves_and_unmounts(tmp_path: Path, llama_dir: Path) -> None:
    from sllmfs.client import connect

    store = Store(tmp_path / "store")
    save_model(store, "org/tiny", llama_dir)
    sock, mnt = tmp_path / "run" / "s.sock", tmp_path / "mnt"
    proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(store.root),
                             "--socket", str(sock), "--mount", str(mnt), "--mem-pool-size", "256MB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (_is_mounted(mnt) and sock.exists()):  # readiness: the mount and the socket
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "sllmfs start did not mount within 60 s"
            time.sleep(0.1)
        assert json.loads((mnt / ".sllmfs.json").read_bytes())["socket"] == str(sock)
        assert os.getxattr(mnt / "org" / "tiny", "user.sllmfs.socket") == str(sock).encode()
        model = mnt / "org" / "tiny"
        assert (model / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()
        with connect(str(sock)) as client:  # make the model resident: reads then come from memory
            lease = client.acquire("org/tiny")
            lease.wait(timeout=60)
            with safe_open(model / "model.safetensors", "pt") as sf, \
                    safe_open(llama_dir / "model.safetensors", "pt") as ref:
                assert sorted(sf.keys()) == sorted(ref.keys())
                for k in ref.keys():
                    assert raw(sf.get_tensor(k)) == raw(ref.get_tensor(k)), k
            lease.release()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not _is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if _is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
