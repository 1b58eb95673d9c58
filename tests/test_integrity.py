"""Never a wrong byte, never a lost model (issue 16): sealed segments, atomic replace, the lock
gap, stable mount inodes, verify = the sidecar's checks, adapters kept across save --force."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_sidecar import make_model, sidecar

# Run as the client: every way to write a segment it was handed must fail, as it must for root.
_ATTACK = r"""
import ctypes, errno, json, mmap, os, sys
import sllmfs.client as sc
uid = int(sys.argv[2])
if uid:
    os.setgid(uid); os.setuid(uid)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
out = {}
with sc.connect(sys.argv[1]) as c, c.acquire("m") as lease:
    lease.wait(timeout=30)
    segs = []
    for n in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{n}").startswith("/memfd:sllmfs"):
                segs.append(int(n))
        except OSError:
            pass  # the listing's own fd
    out["segments"] = len(segs)
    for f in segs:
        try:
            rw = os.open(f"/proc/self/fd/{f}", os.O_RDWR)
            out.setdefault("reopen_rw", []).append("opened")
            try:
                os.pwrite(rw, b"\0" * 4096, 0)
                out.setdefault("pwrite", []).append("wrote")
            except OSError as e:
                out.setdefault("pwrite", []).append(errno.errorcode[e.errno])
            try:
                mmap.mmap(rw, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                out.setdefault("mmap_rw", []).append("mapped")
            except OSError as e:
                out.setdefault("mmap_rw", []).append(errno.errorcode[e.errno])
        except OSError as e:
            out.setdefault("reopen_rw", []).append(errno.errorcode[e.errno])
        p = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, f, 0)
        r = libc.mprotect(p, 4096, mmap.PROT_READ | mmap.PROT_WRITE)
        out.setdefault("mprotect", []).append("ok" if r == 0 else errno.errorcode[ctypes.get_errno()])
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_clients_cannot_write_shared_segments(tmp_path: Path) -> None:
    import json

    outer = Path(tempfile.mkdtemp(prefix="sllmfs-test-"))  # reachable by uid 65534
    os.chmod(outer, 0o755)
    try:
        with sidecar(tmp_path, run_dir=outer / "run", env={"SLLMFS_ALLOW_UIDS": "65534"}) as sd:
            original = make_model(sd.store, "m")
            os.chmod(sd.socket.parent, 0o755)
            for uid in (65534, 0):  # an allowed client, and one with the daemon's own uid
                proc = subprocess.run([sys.executable, "-c", _ATTACK, str(sd.socket), str(uid)],
                                      capture_output=True, text=True, timeout=60)
                assert proc.returncode == 0, proc.stderr
                got = json.loads(proc.stdout)
                assert got["segments"] >= 2  # a partition and the readiness map
                assert set(got["mprotect"]) == {"EACCES"}
                if uid:
                    assert set(got["reopen_rw"]) == {"EACCES"}  # mode 0400: not even opened
                else:  # root opens anything; the seal still refuses every write
                    assert set(got["pwrite"]) == {"EPERM"} and set(got["mmap_rw"]) == {"EPERM"}
            with sd.connect() as c, c.acquire("m") as lease:
                views = lease.tensors(timeout=30)
                assert {k: v.numpy().tobytes() for k, v in views.items()} == original
    finally:
        shutil.rmtree(outer, ignore_errors=True)
