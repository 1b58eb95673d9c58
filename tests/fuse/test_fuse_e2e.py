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

from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.hugepages import shmem_thp_mode
from tests.support.synth import raw

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")


def _is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


def _wait_served(proc: subprocess.Popen[bytes], mnt: Path, sock: Path) -> None:
    """Until `sllmfs start` is ready: the mount and the socket (it must not exit meanwhile)."""
    deadline = time.monotonic() + 60
    while not (_is_mounted(mnt) and sock.exists()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize("thp", ["advise", "never"])
def test_sllmfs_start_mounts_serves_and_unmounts(tmp_path: Path, llama_dir: Path, thp: str) -> None:
    """With shmem THP (advise: the unit's setting) the memory tier's copy of the stored file backs the
    mount's file (no copy); without, a copy of it does."""
    with shmem_thp_mode(thp):
        _start_mount_serve_unmount(tmp_path, llama_dir, own_file=thp == "advise")


def _start_mount_serve_unmount(tmp_path: Path, llama_dir: Path, own_file: bool) -> None:
    from sllmfs.client.client import connect

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
            mem = client.status()["memory"]  # the closed file's backing lingers (a loader opens it again)
            size = (model / "model.safetensors").stat().st_size
            assert (mem["mount_files"], mem["mount_copies"]) == ((size, 0) if own_file else (0, size)), mem
            lease.release()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not _is_mounted(mnt)
        assert proc.stdout is not None
        log = proc.stdout.read()  # resident: opened in passthrough on the memory tier's file or a copy of it
        if own_file:
            assert "passthrough: model.safetensors (" in log and "is the memory tier's own file, no copy" in log, log
            assert "copied from the memory tier" not in log, log
        else:
            assert "passthrough: org/tiny model.safetensors" in log, log
            assert "(2 MiB pages " in log, log  # whether the copy got huge pages (NOTES-mount.md)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if _is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_a_file_open_through_the_mount_keeps_its_evicted_variant_counted(tmp_path: Path, llama_dir: Path) -> None:
    """The mount's backing of a resident file is the tier's own memory: evicting the variant while a
    reader has the file open frees nothing, so it stays in ``used`` until the file closes; a backing
    no reader has open goes with the variant at once."""
    from sllmfs.client.client import connect

    store = Store(tmp_path / "store")
    save_model(store, "org/tiny", llama_dir)
    sock, mnt = tmp_path / "run" / "s.sock", tmp_path / "mnt"
    with shmem_thp_mode("advise"):
        proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(store.root),
                                 "--socket", str(sock), "--mount", str(mnt), "--mem-pool-size", "256MB"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_served(proc, mnt, sock)
            weights = mnt / "org" / "tiny" / "model.safetensors"
            size = weights.stat().st_size
            with connect(str(sock)) as client:
                for reader_open in (True, False):
                    with client.acquire("org/tiny") as lease:
                        lease.wait(timeout=60)
                    f = open(weights, "rb")
                    assert f.read() == (llama_dir / "model.safetensors").read_bytes()
                    if not reader_open:
                        f.close()  # its backing lingers for the next open, but no reader has it
                    assert client.status()["memory"]["mount_files"] == size
                    assert client.evict("org/tiny") == ["hf"]
                    mem = client.status()["memory"]
                    if reader_open:  # its pages are alive: counted, retired, until the reader closes
                        assert mem["used"] >= size and mem["retired"] == 1 and mem["mount_files"] == size, mem
                        f.close()
                        deadline = time.monotonic() + 30  # the mount drops an unopened backing in seconds
                        while client.status()["memory"]["retired"]:
                            assert time.monotonic() < deadline, client.status()["memory"]
                            time.sleep(0.2)
                        mem = client.status()["memory"]
                    assert (mem["used"], mem["retired"], mem["mount_files"]) == (0, 0, 0), mem
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _read_as(path: Path, uid: int, gid: int) -> str:
    """Try to read ``path`` as another uid/gid (no supplementary groups); 'ok' or the errno name."""
    code = ("import os, sys, errno\n"
            f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
            "try:\n    open(sys.argv[1], 'rb').read(16); print('ok')\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno])\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def test_a_group_keeps_other_users_out_of_the_mount(tmp_path: Path, llama_dir: Path) -> None:
    import grp

    group = grp.getgrgid(65534).gr_name  # nogroup: present on Debian and Ubuntu
    store = Store(tmp_path / "store")
    save_model(store, "org/tiny", llama_dir)
    import tempfile

    mnt = Path(tempfile.mkdtemp(prefix="sllmfs-grp-"))  # pytest's tmp dirs are private: the mount's modes must decide
    os.chmod(mnt, 0o755)
    sock = tmp_path / "run" / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(store.root),
                             "--socket", str(sock), "--mount", str(mnt)], env={**os.environ, "SLLMFS_GROUP": group},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_served(proc, mnt, sock)
        weights = mnt / "org" / "tiny" / "model.safetensors"
        st = weights.stat()
        assert (st.st_mode & 0o777, st.st_gid) == (0o440, 65534)
        assert _read_as(weights, 65534, 65534) == "ok"  # in the group
        assert _read_as(weights, 65534, 12345) == "EACCES"  # not in it
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        os.rmdir(mnt)
