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

from tests.support.sidecar import make_model, sidecar

# Run as the client: every way to write a segment it was handed must fail, as it must for root.
_ATTACK = r"""
import ctypes, errno, json, mmap, os, sys
import sllmfs.client.client as sc
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


# -- the store: replace in one step, one writer per name, the lock gap, stable inodes, verify ----


def _ckpt(root: Path, name: str, seed: int, *, tensors: int = 24, numel: int = 1 << 20) -> dict[str, bytes]:
    """A float32 checkpoint (~4 MB a tensor) under root/name; returns tensor name -> bytes."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    arrays = {f"w{i}": rng.standard_normal(numel, dtype=np.float32) for i in range(tensors)}
    src = root / name
    src.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "test", "seed": seed}))
    return {k: v.tobytes() for k, v in arrays.items()}


def _stored(store: Path, name: str) -> dict[str, bytes]:
    from sllmfs.store.reader import VariantReader, verify_variant
    from sllmfs.store.store import Store

    with VariantReader(Store(store, create=False, cleanup=False).get(name).variant_dir("hf")) as r:
        assert verify_variant(r) is None
        return {n: r.read_tensor(n) for n in r.manifest.names()}


def test_kill_9_during_save_force_or_rm_leaves_old_or_new_complete(tmp_path: Path) -> None:
    import signal
    import time

    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store

    old, new = _ckpt(tmp_path, "old", 1), _ckpt(tmp_path, "new", 2)
    store = tmp_path / "store"
    env = {**os.environ, "SLLMFS_STORAGE_PATH": str(store)}
    seen = set()
    for delay in (0.05, 0.3, 0.6, 0.9, 1.2, 1.5, 2.0, 3.0):
        save_model(Store(store), "m", tmp_path / "old", force=True)
        proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "save", "--model", "m", "--force",
                                 "--local-model-path", str(tmp_path / "new")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = _stored(store, "m")  # always there, always whole
        assert got in (old, new)
        seen.add("new" if got == new else "old")
        proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "rm", "--model", "m", "-y"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay / 4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if Store(store, create=False, cleanup=False).has("m"):
            assert _stored(store, "m") in (old, new)
    assert "old" in seen  # some kills landed mid-save
    Store(store)  # the next writer clears what the killed commands left
    assert not [p for p in (store / "tmp").iterdir()]


def test_concurrent_saves_of_one_name_one_wins_other_gets_one_line(tmp_path: Path) -> None:
    from tests.support.cli import one_line_error

    a, b = _ckpt(tmp_path, "a", 1), _ckpt(tmp_path, "b", 2)
    store = tmp_path / "store"
    env = {**os.environ, "SLLMFS_STORAGE_PATH": str(store)}
    procs = [subprocess.Popen([sys.executable, "-m", "sllmfs", "save", "--model", "m", "--force",
                               "--local-model-path", str(tmp_path / src)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for src in ("a", "b")]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    ok = [r for r in results if r.returncode == 0]
    lost = [r for r in results if r.returncode != 0]
    assert ok, [r.stderr for r in results]
    for r in lost:
        assert "being written by another command" in one_line_error(r)
    assert _stored(store, "m") in (a, b)
    import json

    listed = json.loads(subprocess.run([sys.executable, "-m", "sllmfs", "ls", "--json"], env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert [m["name"] for m in listed] == ["m"]


def test_adapters_survive_save_force_of_their_base(tmp_path: Path, llama_dir: Path, lora_dir: Path) -> None:
    from sllmfs.integrations.common import writeback
    from sllmfs.integrations.sglang import variants
    from sllmfs.store.save import save_adapter, save_model
    from sllmfs.store.store import Store

    store = Store(tmp_path / "store")
    save_model(store, "base", llama_dir)
    save_adapter(store, "base", "chat", lora_dir)
    key = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant=None, sglang_version="0.5.17")
    import torch

    writeback.write_rank_state(store, "base", key, {"w": torch.ones(4)})
    before = (store.get("base").variant_dir("lora.chat") / "manifest.json").read_bytes()
    save_model(store, "base", llama_dir, force=True)
    info = store.get("base")
    assert info.variants == ["hf", "lora.chat"]  # the adapter stays; the per-rank state was stale
    assert (info.variant_dir("lora.chat") / "manifest.json").read_bytes() == before
    from sllmfs.store.reader import VariantReader, verify_variant

    with VariantReader(info.variant_dir("lora.chat")) as r:
        assert verify_variant(r) is None


def test_cleanup_in_a_saves_lock_gap_never_breaks_it(tmp_path: Path, llama_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A cleanup run by another command in the instant between a save creating its lock file and
    locking it (widened here) must neither fail the save nor remove its work."""
    import fcntl
    import threading

    import sllmfs.store.store as store_mod
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store

    root = tmp_path / "store"
    Store(root)
    real_flock = fcntl.flock
    ran = []

    def flock(fd: int, op: int) -> None:
        if op == fcntl.LOCK_EX and not ran and os.readlink(f"/proc/self/fd/{fd}").endswith(".lock") \
                and "/tmp/" in os.readlink(f"/proc/self/fd/{fd}"):
            ran.append(1)
            t = threading.Thread(target=lambda: Store(root))  # another command opening the store
            t.start()
            t.join(timeout=1.0)  # it either ran in the gap, or waits for the writer
        real_flock(fd, op)

    monkeypatch.setattr(store_mod.fcntl, "flock", flock)
    save_model(Store(root, cleanup=False), "m", llama_dir)
    monkeypatch.setattr(store_mod.fcntl, "flock", real_flock)
    assert ran and Store(root).has("m")
    from sllmfs.store.reader import VariantReader, verify_variant

    with VariantReader(Store(root).get("m").variant_dir("hf")) as r:
        assert verify_variant(r) is None


def test_acquires_never_change_what_the_mount_shows(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--mount", str(tmp_path / "mnt")) as sd:
        make_model(sd.store, "org/m")
        mnt = tmp_path / "mnt"
        folder = mnt / "org" / "m"
        import time

        deadline = time.monotonic() + 20
        while not (folder / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        before = (folder.stat().st_ino, (folder / "model.safetensors").stat().st_ino)
        mj = (sd.store / "models").glob("*/model.json")
        mtimes = {p: p.stat().st_mtime_ns for p in mj}
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # a shell sitting in the folder
        try:
            for _ in range(20):
                with sd.connect() as c, c.acquire("org/m"):
                    pass
                assert "model.safetensors" in os.listdir(fd)
                assert (folder / "config.json").read_bytes()
        finally:
            os.close(fd)
        assert (folder.stat().st_ino, (folder / "model.safetensors").stat().st_ino) == before
        assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_verify_checks_the_windows_the_sidecar_checks(tmp_path: Path) -> None:
    """A flipped byte in no tensor (a file's header) fails the sidecar's window check: verify must agree."""
    from sllmfs.core.errors import Corrupt
    from sllmfs.store.format import load_manifest
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store
    from tests.support.cli import one_line_error, sllmfs

    _ckpt(tmp_path, "odd", 3, tensors=3, numel=1001)
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/p", tmp_path / "odd")
        vdir = next((sd.store / "models").glob("*/variants/hf"))
        m = load_manifest(vdir)
        assert m.as_files and min(t.offset for t in m.tensors.values()) > 12
        with open(vdir / m.partitions[0].file, "r+b") as f:  # byte 12: inside the header's JSON
            f.seek(12)
            b = f.read(1)
            f.seek(12)
            f.write(bytes([b[0] ^ 0xFF]))
        err = one_line_error(sllmfs("verify", "--model", "org/p", store=sd.store, check=False))
        assert "bytes in no tensor" in err and "window 0" in err, err
        with sd.connect() as c, pytest.raises(Corrupt), c.acquire("org/p") as lease:
            lease.tensors(timeout=30)


def test_store_reads_without_the_sidecar_check_windows(tmp_path: Path, llama_dir: Path) -> None:
    """`save --backend sglang` reads the store directly (StoreSource): a flipped byte is refused there too."""
    from sllmfs.core.errors import Corrupt
    from sllmfs.integrations.common.source import StoreSource
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store

    store = Store(tmp_path / "store")
    save_model(store, "m", llama_dir)
    with StoreSource("m", str(store.root)).open("hf") as lease:
        assert lease.tensors()  # intact: served
    part = store.get("m").variant_dir("hf") / "model.safetensors"
    with open(part, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(Corrupt, match="model.safetensors window 0 fails its checksum"), \
            StoreSource("m", str(store.root)).open("hf") as lease:
        lease.tensors()


def test_tensors_without_an_ipc_handle_are_copied_by_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """VMM allocations (expandable_segments) have no legacy IPC handle: the load goes on in the client
    (proven on an H200 in bench/NOTES-cold.md; here the export's refusal stands in for CUDA's)."""
    import sllmfs.client.transfer as transfer
    from sllmfs.engine.copy_engine import CudaUnavailable

    def refuse(wanted: object) -> object:
        raise CudaUnavailable("cudaIpcGetMemHandle: cudaErrorInvalidValue (1): invalid argument")

    monkeypatch.setattr(transfer, "export_targets", refuse)
    monkeypatch.delenv("SLLMFS_GPU_COPY", raising=False)

    class NoLease:
        def copy_to_gpu(self, *a: object) -> None:
            raise AssertionError("must not ask the sidecar")

    import torch

    t = torch.zeros(4)
    assert transfer._sidecar_copy(NoLease(), {"w": t}, [(0, 0, t.data_ptr(), 16)], 5.0) is None  # type: ignore[arg-type]
    monkeypatch.setenv("SLLMFS_GPU_COPY", "sidecar")  # forced: the refusal is the answer
    with pytest.raises(CudaUnavailable):
        transfer._sidecar_copy(NoLease(), {"w": t}, [(0, 0, t.data_ptr(), 16)], 5.0)  # type: ignore[arg-type]
