"""O_DIRECT and io_uring readers of a resident file, through a real passthrough mount (issue 20).

fastsafetensors reads the mount with O_DIRECT preads from many threads (the mount is not tmpfs to it),
InstantTensor with io_uring O_DIRECT reads (its URING backend). Both must be served by the kernel from
the backing (no READ reaching the daemon) with the file's exact bytes. The last test pins down where the
kernel runs io_uring reads of a FUSE file (bench/NOTES-mount.md, "O_DIRECT and io_uring readers"): in
the submitting thread, never an io-wq worker, because a FUSE file is pollable and polls readable.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fuse.test_passthrough import Child, served  # noqa: F401  (the fixture: a store, a mount, a flag)
from tests.support import uring

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")
needs_uring = pytest.mark.skipif(not uring.available(), reason="io_uring refused here (seccomp or io_uring_disabled)")

CHUNK = 64 << 10  # several reads in flight on the small test model; O_DIRECT-aligned


def _model(mnt: Path) -> Path:
    return mnt / "org" / "tiny" / "model.safetensors"


def test_o_direct_preads_from_threads_are_served_by_passthrough_with_exact_bytes(served, llama_dir: Path) -> None:  # noqa: F811
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag))
    want = (llama_dir / "model.safetensors").read_bytes()
    fd = os.open(_model(mnt), os.O_RDONLY | os.O_DIRECT)
    assert os.fstat(fd).st_size == len(want)
    got = bytearray(len(want))
    errors: list[BaseException] = []

    def read(i: int, threads: int) -> None:  # fastsafetensors' pattern: chunk i, i + threads, ... per thread
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
        try:
            for at in range(i * CHUNK, len(want), threads * CHUNK):
                n = os.preadv(fd, [buf], at)
                got[at:at + n] = buf[:n]
        except BaseException as e:
            errors.append(e)
        finally:
            buf.close()

    try:
        pool = [threading.Thread(target=read, args=(i, 4)) for i in range(4)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        os.close(fd)
    assert not errors, errors
    assert bytes(got) == want
    assert child.stats() == (0, 1, 0)  # no READ reached the daemon; one backing


@needs_uring
@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("punt", [False, True], ids=["default", "iosqe_async"])
def test_io_uring_reads_are_served_by_passthrough_with_exact_bytes(served, llama_dir: Path, direct: bool,  # noqa: F811
                                                                   punt: bool) -> None:
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag))
    want = (llama_dir / "model.safetensors").read_bytes()
    seen: list[int] = []

    def check(at: int, data: memoryview) -> None:
        assert bytes(data) == want[at:at + len(data)], f"bytes differ at {at}"
        seen.append(at)

    r = uring.read_file(str(_model(mnt)), chunk=CHUNK, depth=8, direct=direct, punt=punt, check=check)
    assert r.nbytes == len(want)
    assert sorted(seen) == list(range(0, len(want), CHUNK))  # every chunk, once
    assert child.stats() == (0, 1, 0)


IO_WQ_PROBE = """
import os, sys
from tests.support import uring
uring.read_file(sys.argv[1], chunk=64 << 10, depth=8, direct=True, punt=sys.argv[2] == "punt")
workers = [t for t in os.listdir("/proc/self/task") if open(f"/proc/self/task/{t}/comm").read().startswith("iou-wrk")]
print(len(workers))
"""


def _io_wq_workers(path: Path, punt: bool) -> int:
    """How many io-wq workers a fresh process had after reading ``path`` once with io_uring (workers
    stay a few seconds after their last job: any read handed to io-wq leaves at least one)."""
    out = subprocess.run([sys.executable, "-c", IO_WQ_PROBE, str(path), "punt" if punt else "default"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    return int(out.stdout.strip())


@needs_uring
def test_io_uring_reads_of_the_mount_run_in_the_submitting_thread_and_tmpfs_reads_in_io_wq(
        served, llama_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """The kernel's behaviour the notes rest on (6.18): a FUSE file has a poll method and, with no poll
    support in the daemon, polls readable, so io_uring issues each read inline with IOCB_NOWAIT; the
    passthrough read of a memfd never returns EAGAIN, so every read is done by the submitting thread, one
    after another, whatever the queue depth. A tmpfs file is neither FMODE_NOWAIT nor pollable: its
    reads go to io-wq workers, in parallel. IOSQE_ASYNC (the reader's choice) sends the mount's there too."""
    store, mnt, flag, children = served
    children.append(child := Child(store.root, mnt, "org/tiny", flag))
    shm = Path("/dev/shm") / f"sllmfs-test-direct-{os.getpid()}"
    shm.write_bytes((llama_dir / "model.safetensors").read_bytes())
    try:
        assert _io_wq_workers(_model(mnt), punt=False) == 0, "io_uring reads of the mount reached io-wq"
        assert _io_wq_workers(_model(mnt), punt=True) >= 1
        assert _io_wq_workers(shm, punt=False) >= 1, "io_uring reads of tmpfs ran inline"
    finally:
        shm.unlink()
    assert child.stats()[0] == 0
