"""Kernel caches in the store (#21): entries, restore, merge, integrity, and a start's activation."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sllmfs.core.errors import BadInput, Corrupt, NotFound
from sllmfs.integrations import kernel_cache
from sllmfs.store import kernel_key, kernels
from sllmfs.store.kernel_key import KernelKey
from sllmfs.store.store import Store
from tests.support.cli import one_line_error, sllmfs

KEY = KernelKey(gpu="NVIDIA H200", driver="570.86.15", cuda="12.8", torch="2.11.0+cu128",
                triton="3.5.1", framework="sglang 0.5.17", extras=(("flashinfer-python", "0.5.3"),))
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No cache variable or start marker from the outside, a temp dir of the test's own (the working
    dirs' home); whatever activate sets is undone after."""
    for var in [kernel_cache.MARK, kernel_cache.SWITCH, kernels.MAX_ENV] + \
            [v for v, _ in kernel_cache.CACHE_VARS.values()]:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return monkeypatch


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


FIRST = {"triton/ab12/_fwd_kernel.cubin": os.urandom(5000), "triton/ab12/_fwd_kernel.json": b'{"n": 1}',
         "tvm-ffi/libsgl_kernel_ab.so": os.urandom(3000), "flashinfer/90/cached_ops/norm/norm.so": os.urandom(700),
         "flashinfer/90/cached_ops/norm/.ninja_log": b"# ninja log v5\n", "inductor/fxgraph/x/empty": b""}


def test_key_is_readable_and_names_every_fact() -> None:
    assert KEY.name.startswith("sglang-0.5.17-h200-")
    assert kernels.check_key(KEY.name) == KEY.name
    for change in ({"driver": "580.1"}, {"cuda": "12.9"}, {"torch": "2.11.1"}, {"triton": "3.6.0"},
                   {"gpu": "NVIDIA H100 80GB HBM3"}, {"extras": ()}):
        other = KernelKey(**{**KEY.__dict__, **change})
        assert other.name != KEY.name, change
    assert KernelKey("", "", "", "2.11.0", "", "sglang 0.5.17").name.startswith("sglang-0.5.17-cpu-")


def test_gpu_facts_come_from_the_drivers_proc_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key's GPU facts from /proc/driver/nvidia (NVML's init cost a start 30-40 ms on the H200s):
    every GPU's model, sorted and joined, and the driver; NVML and torch are not asked where the files
    answer. (No GPU here: a tree shaped like the H200 machines' stands in for the driver's.)"""
    proc = tmp_path / "nvidia"
    for bus, model in (("0000:00:07.0", "NVIDIA H200"), ("0000:00:06.0", "NVIDIA H100 80GB HBM3"),
                       ("0000:00:08.0", "NVIDIA H200")):
        (proc / "gpus" / bus).mkdir(parents=True)
        (proc / "gpus" / bus / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 41\nBus Type: \t PCIe\nBus Location: \t {bus}\n")
    (proc / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  "
                                  "Release Build  (nixbld@)  \nGCC version:  gcc version 15.3.0 (GCC) \n")
    (proc / "gpus" / "0000:00:09.0").mkdir()  # excluded from use: NVML does not list it either
    (proc / "gpus" / "0000:00:09.0" / "information").write_text("Model: \t\t NVIDIA A100\nGPU Excluded:\t Yes\n")
    assert kernel_key.node_gpus(proc) == "NVIDIA H100 80GB HBM3+NVIDIA H200"
    assert kernel_key.proc_driver(proc) == "580.159.04"
    assert (kernel_key.node_gpus(tmp_path / "none"), kernel_key.proc_driver(tmp_path / "none")) == ("", "")

    def asked() -> tuple[str, str]:
        raise AssertionError("NVML or torch asked although the driver's files answer")

    monkeypatch.setattr(kernel_key, "PROC", proc)
    monkeypatch.setattr(kernel_key, "_asked_gpu_facts", asked)
    key = kernel_key.current("sglang")
    assert (key.gpu, key.driver) == ("NVIDIA H100 80GB HBM3+NVIDIA H200", "580.159.04")
    assert key.name.startswith("sglang-h100-80gb-hbm3-")  # the slug keeps 24 characters of the models
    monkeypatch.setattr(kernel_key, "_asked_gpu_facts", lambda: ("NVIDIA H200", "580.159.04"))
    (proc / "version").unlink()  # no driver files: NVML (here its stand-in) answers
    assert (kernel_key.current("sglang").gpu, kernel_key.current("sglang").driver) == ("NVIDIA H200", "580.159.04")


def test_publish_then_restore_is_byte_identical(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, FIRST)
    os.chmod(src / "tvm-ffi/libsgl_kernel_ab.so", 0o755)
    entry = kernels.publish(store, KEY, src)
    assert (entry.key, len(entry.files), entry.size) == (KEY.name, len(FIRST), sum(map(len, FIRST.values())))
    assert entry.facts["framework"] == "sglang 0.5.17"
    dest = tmp_path / "dest"
    assert kernels.restore(store, KEY.name, dest) == len(FIRST)
    assert read_tree(dest) == FIRST
    for rel in FIRST:  # times kept: ninja compares a build's files with each other
        assert (dest / rel).stat().st_mtime_ns == (src / rel).stat().st_mtime_ns
    assert os.access(dest / "tvm-ffi/libsgl_kernel_ab.so", os.X_OK)
    good, bad = kernels.entries(store)
    assert bad == [] and [(e.key, len(e.files), e.size) for e in good] == [(entry.key, len(FIRST), entry.size)]
    assert not list(store.tmp_dir.iterdir())  # the work dir went with the publish


def test_a_second_publish_keeps_the_union(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    second = {"triton/cd34/_decode.cubin": b"decode kernel", "triton/ab12/_fwd_kernel.json": b'{"n": 2}'}
    write_tree(tmp_path / "b", second)
    entry = kernels.publish(store, KEY, tmp_path / "b")
    assert len(entry.files) == len(FIRST) + 1
    kernels.restore(store, KEY.name, tmp_path / "dest")
    assert read_tree(tmp_path / "dest") == {**FIRST, **second}  # a path in both: the newer bytes
    assert entry.created < entry.updated


def test_restored_files_are_not_copied_again(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    work = tmp_path / "work"
    kernels.restore(store, KEY.name, work)
    write_tree(work, {"triton/ef56/new.cubin": b"new"})
    kernels.publish(store, KEY, work)
    base = kernels.entry_dir(store, KEY.name)
    inode = (base / "triton/ab12/_fwd_kernel.cubin").stat()
    assert inode.st_nlink == 1  # the old entry is gone; its file lives on, linked, in the new one
    assert read_tree(base / "triton") == {k[7:]: v for k, v in {**FIRST, "triton/ef56/new.cubin": b"new"}.items()
                                         if k.startswith("triton/")}


def test_a_corrupted_file_is_not_restored_and_the_next_publish_repairs_it(
        store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    bad = kernels.entry_dir(store, KEY.name) / "triton/ab12/_fwd_kernel.cubin"
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF  # same size, one bit flipped
    bad.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    assert kernels.restore(store, KEY.name, dest) == len(FIRST) - 1
    assert not (dest / "triton/ab12/_fwd_kernel.cubin").exists()
    assert "_fwd_kernel.cubin not restored" in caplog.text
    write_tree(dest, {"triton/ab12/_fwd_kernel.cubin": FIRST["triton/ab12/_fwd_kernel.cubin"]})  # compiled again
    kernels.publish(store, KEY, dest)
    kernels.restore(store, KEY.name, tmp_path / "again")
    assert read_tree(tmp_path / "again") == FIRST


def test_concurrent_publishes_leave_one_valid_entry_with_every_file(store: Store, tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from sllmfs.store import kernels
        from sllmfs.store.store import Store
        kernels.publish(Store(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
    """)
    procs, want = [], {}
    for i in range(4):
        files = {f"triton/k{i}/kernel.cubin": os.urandom(20000 + i), "tvm-ffi/shared.so": b"same bytes everywhere"}
        write_tree(tmp_path / f"src{i}", files)
        want.update(files)
        argv = [sys.executable, "-c", code, str(store.root), KEY.name, str(tmp_path / f"src{i}")]
        procs.append(subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE))
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    kernels.restore(store, KEY.name, tmp_path / "dest")
    assert read_tree(tmp_path / "dest") == want
    assert [e.key for e in kernels.entries(store)[0]] == [KEY.name]


@pytest.mark.parametrize("rel", ["/etc/passwd", "triton/../../../escape", "triton/./x", "unknown/x", "triton",
                                 "triton//x", "triton/a\0b"])
def test_unsafe_manifest_paths_are_refused(rel: str, store: Store, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(BadInput):
        kernels.check_path(rel)
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    manifest = kernels.entry_dir(store, KEY.name) / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["files"][0]["path"] = rel
    manifest.write_text(json.dumps(raw))
    with pytest.raises(Corrupt, match="kernels rm"):
        kernels.load_entry(store, KEY.name)
    assert kernels.restore(store, KEY.name, tmp_path / "dest") == 0  # the whole entry refused, one warning
    assert not (tmp_path / "dest").exists() and "not a kernel cache manifest" in caplog.text
    assert [name for name, _ in kernels.entries(store)[1]] == [KEY.name]
    kernels.publish(store, KEY, tmp_path / "a")  # the next start's publish replaces the damaged entry
    assert kernels.load_entry(store, KEY.name).files


def test_symlinks_are_neither_served_nor_stored(store: Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(FIRST["triton/ab12/_fwd_kernel.json"])  # same bytes: only the symlink check can refuse it
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    stored = kernels.entry_dir(store, KEY.name) / "triton/ab12/_fwd_kernel.json"
    stored.unlink()
    stored.symlink_to(secret)
    kernels.restore(store, KEY.name, tmp_path / "dest")
    assert not (tmp_path / "dest/triton/ab12/_fwd_kernel.json").exists()
    assert (tmp_path / "dest/triton/ab12/_fwd_kernel.cubin").exists()
    # in a start's cache dir: a symlinked file or folder, a FIFO and a lock file are not published
    src = tmp_path / "src"
    write_tree(src, {"triton/real/k.cubin": b"k", "triton/x.lock": b"", "triton/tmp.pid_1_2/half": b"h"})
    (src / "triton/link.cubin").symlink_to(secret)
    (src / "triton/linked-dir").symlink_to(tmp_path / "a/triton")
    os.mkfifo(src / "triton/fifo")
    assert sorted(kernels.scan(src)) == ["triton/real/k.cubin"]


def test_size_bound_refuses_the_publish_and_keeps_the_entry(store: Store, tmp_path: Path,
                                                            clean_env: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path / "a", {"triton/k/a.cubin": b"x" * 600})
    kernels.publish(store, KEY, tmp_path / "a")
    clean_env.setenv(kernels.MAX_ENV, "1000")
    write_tree(tmp_path / "b", {"triton/k/b.cubin": b"y" * 600})
    with pytest.raises(BadInput, match=kernels.MAX_ENV):
        kernels.publish(store, KEY, tmp_path / "b")
    assert [f.path for f in kernels.load_entry(store, KEY.name).files] == ["triton/k/a.cubin"]


def test_remove(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    kernels.remove(store, KEY.name)
    assert kernels.entries(store) == ([], [])
    with pytest.raises(NotFound):
        kernels.remove(store, KEY.name)
    with pytest.raises(BadInput):
        kernels.remove(store, "../models")


def test_cli_ls_and_rm(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "a", FIRST)
    entry = kernels.publish(store, KEY, tmp_path / "a")
    key, files, size, _updated = sllmfs("kernels", "ls", store=store.root).stdout.strip().split("\t")
    assert (key, int(files), int(size)) == (KEY.name, len(FIRST), entry.size)
    assert json.loads(sllmfs("kernels", "ls", "--json", store=store.root).stdout)[0]["facts"]["driver"] == "570.86.15"
    sllmfs("kernels", "rm", KEY.name, store=store.root)
    assert sllmfs("kernels", "ls", store=store.root).stdout == ""
    assert "no kernel cache" in one_line_error(sllmfs("kernels", "rm", KEY.name, store=store.root, check=False))


# -- a start's activation -----------------------------------------------------------------------


def test_switch_off_leaves_the_environment_alone(store: Store, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(kernel_cache.SWITCH, "0")
    assert kernel_cache.activate(store, key=KEY) is None
    assert not any(os.environ.get(v) for v, _ in kernel_cache.CACHE_VARS.values())


def test_a_cache_dir_the_user_set_is_respected(store: Store, tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    clean_env.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    act = kernel_cache.activate(store, key=KEY)
    assert act is not None
    try:
        assert act.wait_restored(30) == sum(not k.startswith("triton/") for k in FIRST)  # beside the start
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine") and "triton" not in act.dirs
        assert not (tmp_path / "mine").exists()  # nothing restored into the user's own cache
        assert os.environ[kernel_cache.MARK] == str(act.work)
        base = Path(os.environ["FLASHINFER_WORKSPACE_BASE"])
        assert read_tree(base / ".cache/flashinfer") == {k[11:]: v for k, v in FIRST.items()
                                                          if k.startswith("flashinfer/")}
        assert kernel_cache.activate(store, key=KEY) is None  # once per start: the marker is set
    finally:
        act.close()
    assert act.work == kernel_cache.work_root() / KEY.name  # the same path on every start and node
    assert act.work.is_dir()  # kept: the next start on this node only tops it up


LAUNCHER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)  # what RestoreMark.make holds while the restore runs
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
os.unlink(sys.argv[1])
os.close(fd)
time.sleep(30)
"""


def test_a_worker_waits_for_the_restore_of_a_live_start_only(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """A worker of the start (MARK set) returns from activate() once the launcher's restore is over;
    a mark nobody holds (its launcher killed mid-restore, whatever its pid became) is removed, not
    waited for."""
    work = tmp_path / "work"
    work.mkdir()
    clean_env.setenv(kernel_cache.MARK, str(work))
    stale = work / f"{kernel_cache.RESTORING}1"  # pid 1 lives; the mark's lock does not
    stale.touch()
    t = time.monotonic()
    assert kernel_cache.activate() is None
    assert time.monotonic() - t < kernel_cache.RESTORE_WAIT_S / 2 and not stale.exists()
    live = work / f"{kernel_cache.RESTORING}2"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(live), "0.3"], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None and launcher.stdout.readline().strip() == "locked"
        t = time.monotonic()
        assert kernel_cache.activate() is None
        waited = time.monotonic() - t
        assert not live.exists()  # it returned after the restore ended, not before
        assert waited < kernel_cache.RESTORE_WAIT_S / 2  # and not by running into the bound
    finally:
        launcher.kill()
        launcher.wait()


def test_the_restore_runs_beside_the_start_and_a_fork_waits_for_it(
        store: Store, tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """activate() returns with the restore still running (made slow here); a child forked then, as vLLM
    forks its engine core, finds every file restored; the mark is gone once the restore ends."""
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    real = kernels.restore

    def slow(*args: object, **kw: object) -> int:
        time.sleep(0.5)
        return real(*args, **kw)  # type: ignore[arg-type]

    clean_env.setattr(kernels, "restore", slow)
    act = kernel_cache.activate(store, key=KEY)
    assert act is not None
    try:
        assert not act.keeper.restore_done.is_set()  # the start goes on meanwhile
        marks = [p.name for p in act.work.glob(f"{kernel_cache.RESTORING}*")]
        assert marks == [f"{kernel_cache.RESTORING}{os.getpid()}"]
        pid = os.fork()
        if pid == 0:  # the child: the at-fork hook waited; everything must be there now
            ok = sorted(len(p.read_bytes()) for p in act.work.rglob("*") if p.is_file()) == \
                sorted(map(len, FIRST.values()))  # and no mark left
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert act.wait_restored(30) == len(FIRST)
        assert not list(act.work.glob(f"{kernel_cache.RESTORING}*"))
    finally:
        act.close()


def test_a_failed_restore_is_one_warning_and_the_start_still_publishes(
        store: Store, tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: object, **kw: object) -> int:
        raise OSError(5, "Input/output error")

    clean_env.setattr(kernels, "restore", broken)
    clean_env.setenv(kernel_cache.QUIET, "0.1")  # the exit publish takes files quiet for that long
    act = kernel_cache.activate(store, key=KEY)
    assert act is not None
    assert act.wait_restored(30) == 0 and not list(act.work.glob(f"{kernel_cache.RESTORING}*"))
    (act.dirs["triton"] / "k.cubin").write_bytes(b"compiled by this start")
    time.sleep(0.3)
    act.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sllmfs: warning: kernel caches not restored")
    assert kernels.recorded(store, KEY.name).keys() == {"triton/k.cubin"}


def test_a_working_dir_root_of_someone_else_is_refused(store: Store, clean_env: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    kernel_cache.work_root().mkdir(mode=0o777)
    os.chmod(kernel_cache.work_root(), 0o777)  # anyone could plant kernels in it
    assert kernel_cache.activate(store, key=KEY) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a private directory" in err[0]
    assert os.environ.get("TRITON_CACHE_DIR") is None


def test_working_dirs_of_other_keys_are_swept_unless_in_use(store: Store, clean_env: pytest.MonkeyPatch) -> None:
    root = kernel_cache.work_root()
    write_tree(root, {"old-key/triton/k.cubin": b"old", "busy-key/triton/k.cubin": b"busy"})
    os.chmod(root, 0o700)
    busy = os.open(root / "busy-key.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(busy, fcntl.LOCK_SH)  # a live start of that key
    try:
        act = kernel_cache.activate(store, key=KEY)
        assert act is not None
        act.close()
    finally:
        os.close(busy)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["busy-key", KEY.name]


def test_a_failure_is_one_warning_and_the_engine_keeps_its_caches(
        tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("SLLMFS_CONFIG", str(tmp_path / "bad.toml"))
    (tmp_path / "bad.toml").write_text("storage_path = ")
    assert kernel_cache.activate(key=KEY) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sllmfs: warning: kernel caches not served")
    assert not any(os.environ.get(v) for v, _ in kernel_cache.CACHE_VARS.values())
    assert os.environ[kernel_cache.MARK] == "-"  # the workers do not try again


ENGINE = """
import os, subprocess, sys, time
from pathlib import Path
from sllmfs.integrations.kernel_cache import MARK, activate
act = activate(framework="sglang")
assert act is not None and os.environ[MARK] == str(act.work)
print("restored", act.wait_restored(30))
triton = Path(os.environ["TRITON_CACHE_DIR"])
for rel, data in {files!r}.items():
    p = triton / rel if rel.startswith("t-") else Path(os.environ["TVM_FFI_CACHE_DIR"]) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
# a worker process: inherits the directories, does not activate again, writes into the same cache
worker = "import os; from sllmfs.integrations.kernel_cache import activate; assert activate() is None; " \\
         "open(os.path.join(os.environ['TRITON_CACHE_DIR'], 'worker.cubin'), 'wb').write(b'from the worker')"
subprocess.run([sys.executable, "-c", worker], check=True)
if {wait_quiet!r}:  # the quiet-period publish, while the engine still runs
    from sllmfs.store import kernels
    deadline = time.monotonic() + 30
    while act.keeper.publishes == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    print("published while running", act.keeper.publishes)
else:  # settle: the exit publish leaves files changed in the last moments (maybe half-written)
    time.sleep(0.5)
print("work", act.work)
"""


def _engine(store: Store, node: Path, files: dict[str, bytes], *, wait_quiet: bool = False) -> str:
    """One engine start on ``node`` (its temp dir: what a machine keeps between starts)."""
    node.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in
           {kernel_cache.MARK, kernel_cache.SWITCH} | {v for v, _ in kernel_cache.CACHE_VARS.values()}}
    env.update(PYTHONPATH=str(REPO), SLLMFS_STORAGE_PATH=str(store.root), SLLMFS_KERNEL_CACHE_QUIET="0.3",
               TMPDIR=str(node))
    proc = subprocess.run([sys.executable, "-c", ENGINE.format(files=files, wait_quiet=wait_quiet)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr, proc.stderr
    return proc.stdout


def test_an_engine_start_publishes_and_the_next_start_restores(store: Store, tmp_path: Path) -> None:
    first = {"t-ab/k.cubin": os.urandom(4096), "t-ab/k.json": b"{}", "lib_a.so": os.urandom(999)}
    out = _engine(store, tmp_path / "node1", first, wait_quiet=True)
    assert "restored 0" in out and "published while running 1" in out
    [entry], _ = kernels.entries(store)
    assert {f.path for f in entry.files} == {"triton/t-ab/k.cubin", "triton/t-ab/k.json", "tvm-ffi/lib_a.so",
                                             "triton/worker.cubin"}
    out = _engine(store, tmp_path / "node2", {"t-cd/new.cubin": b"second start"})  # a new node; at exit only
    assert "restored 4" in out
    work2 = Path(out.split("work ")[1].strip())
    assert work2.relative_to(tmp_path / "node2").as_posix() == f"sllmfs-kernels-{os.getuid()}/{entry.key}"
    assert (work2 / "triton/t-ab/k.cubin").read_bytes() == first["t-ab/k.cubin"]
    [entry], _ = kernels.entries(store)
    assert len(entry.files) == 5
    out = _engine(store, tmp_path / "node1", {})  # back on the first node: only the second node's kernel is new
    assert "restored 1" in out


def test_store_ls_shows_kernel_caches_and_rm_removes_them(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "a", FIRST)
    kernels.publish(store, KEY, tmp_path / "a")
    assert KEY.name in sllmfs("ls", store=store.root).stdout  # beside the models (none here)
    assert "either --model" in one_line_error(sllmfs("rm", "-y", store=store.root, check=False))
    assert "either --model" in one_line_error(sllmfs("rm", "-y", "--model", "m", "--kernels", KEY.name,
                                                     store=store.root, check=False))
    assert sllmfs("rm", "--kernels", KEY.name, store=store.root).stdout.startswith(f"removed kernel cache {KEY.name}")
    assert KEY.name not in sllmfs("ls", store=store.root).stdout


def test_files_still_changing_are_left_for_a_later_publish(store: Store, tmp_path: Path) -> None:
    """At exit a compile may have been cut short: files changed in the last moments are not stored."""
    write_tree(tmp_path / "a", FIRST)
    assert kernels.publish(store, KEY, tmp_path / "a", settle_s=60).files == []
    old = time.time() - 120
    for p in (tmp_path / "a").rglob("*"):
        os.utime(p, (old, old))
    assert len(kernels.publish(store, KEY, tmp_path / "a", settle_s=60).files) == len(FIRST)


def test_a_quiet_published_dir_is_looked_at_less_and_a_later_kernel_still_goes_out(
        store: Store, clean_env: pytest.MonkeyPatch) -> None:
    """The keeper's scans back off once everything is published (the launching process serves requests
    for hours; each scan holds the GIL), and reset when a file appears, which is then published."""
    clean_env.setattr(kernel_cache, "SCAN_MAX_S", 0.4)
    clean_env.setenv(kernel_cache.QUIET, "0.1")  # scans every 25 ms while files change
    act = kernel_cache.activate(store, key=KEY)
    assert act is not None
    try:
        assert act.wait_restored(30) == 0
        (act.dirs["triton"] / "a.cubin").write_bytes(b"compiled at start")
        deadline = time.monotonic() + 10
        while act.keeper.publishes < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        before = act.keeper.scans
        time.sleep(2.0)  # quiet: 25, 50, ... 400 ms apart, ~7 scans (80 at the start's pace)
        quiet_scans = act.keeper.scans - before
        assert 1 <= quiet_scans <= 12, quiet_scans
        (act.dirs["triton"] / "b.cubin").write_bytes(b"a new shape, an hour in")
        deadline = time.monotonic() + 0.4 + 0.1 + 5  # the longest look, the quiet, slack for a busy host
        while act.keeper.publishes < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert kernels.recorded(store, KEY.name).keys() == {"triton/a.cubin", "triton/b.cubin"}
    finally:
        act.close()
