"""The FUSE view on real mounts: any tool reads stored models as HF folders."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import trio
from safetensors import safe_open

from sllmfs.core.errors import BadInput
from sllmfs.fuse.main import serve
from sllmfs.store.save import save_adapter, save_model
from sllmfs.store.store import Store
from tests.support.fuse import SOCKET, Runner, force_unmount, is_mounted
from tests.support.synth import assert_odd_file, odd_checkpoint, raw

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

@pytest.fixture
def mount_runner(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    runners: list[Runner] = []

    def start(store: Path) -> Path:
        mnt = tmp_path / f"mnt{len(runners)}"
        runners.append(Runner(store, mnt))
        return mnt

    yield start
    for r in runners:
        r.stop()
        force_unmount(r.mountpoint)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, bin_dir: Path,
           lora_dir: Path) -> Iterator[tuple[Path, Path]]:
    """One store with several models, mounted once for the read-only tests."""
    base = tmp_path_factory.mktemp("fuse")
    store = Store(base / "store")
    save_model(store, "org/tiny", llama_dir)
    save_model(store, "tied", bin_dir)
    save_model(store, "odd/dtypes", odd_checkpoint(base / "odd"))
    save_adapter(store, "org/tiny", "mine", lora_dir)
    runner = Runner(store.root, base / "mnt")
    try:
        yield store.root, base / "mnt"
    finally:
        runner.stop()
        force_unmount(base / "mnt")


def test_from_pretrained_through_the_mount_equals_the_original(shared: tuple[Path, Path], llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, mnt = shared
    want = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    got = AutoModelForCausalLM.from_pretrained(mnt / "org" / "tiny").state_dict()
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert torch.equal(got[k], t), k
    tok = AutoTokenizer.from_pretrained(mnt / "org" / "tiny")
    assert tok("sllmfs makes cold starts fast.")["input_ids"]


def test_metadata_files_are_byte_identical(shared: tuple[Path, Path], llama_dir: Path) -> None:
    _, mnt = shared
    model = mnt / "org" / "tiny"
    names = sorted(os.listdir(model))
    assert "model.safetensors" in names and "adapters" in names
    copied = [n for n in names if n not in ("model.safetensors", "adapters")]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(copied)
    for n in copied:
        assert (model / n).read_bytes() == (llama_dir / n).read_bytes(), n
        assert (model / n).stat().st_size == (llama_dir / n).stat().st_size


def test_safe_open_gives_every_odd_dtype_byte_identical(shared: tuple[Path, Path]) -> None:
    _, mnt = shared
    path = mnt / "odd" / "dtypes" / "model.safetensors"
    assert_odd_file(path)
    assert path.stat().st_size == len(path.read_bytes())


def test_tied_weights_appear_under_both_names(shared: tuple[Path, Path], bin_dir: Path) -> None:
    _, mnt = shared
    sd = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    with safe_open(mnt / "tied" / "model.safetensors", "pt") as sf:
        assert sorted(sf.keys()) == sorted(sd)
        for name, t in sd.items():
            assert raw(sf.get_tensor(name)) == raw(t), name


def test_lora_adapter_appears_under_adapters(shared: tuple[Path, Path], lora_dir: Path) -> None:
    from safetensors.torch import load_file

    _, mnt = shared
    adapter = mnt / "org" / "tiny" / "adapters" / "mine"
    assert (adapter / "adapter_config.json").read_bytes() == (lora_dir / "adapter_config.json").read_bytes()
    want = load_file(lora_dir / "adapter_model.safetensors")
    got = load_file(adapter / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert raw(got[k]) == raw(t), k


def test_writes_fail_with_erofs(shared: tuple[Path, Path]) -> None:
    _, mnt = shared
    model = mnt / "org" / "tiny"
    attempts: list[Callable[[], object]] = [
        lambda: open(model / "config.json", "r+b"),
        lambda: open(model / "config.json", "ab"),
        lambda: open(model / "new.txt", "wb"),
        lambda: os.mkdir(mnt / "newdir"),
        lambda: os.unlink(model / "config.json"),
        lambda: os.rename(model / "config.json", model / "c.json"),
        lambda: os.setxattr(model / "config.json", "user.x", b"1"),
        lambda: os.chmod(model / "config.json", 0o777),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS


def test_unknown_names_give_enoent(shared: tuple[Path, Path]) -> None:
    _, mnt = shared
    for p in [mnt / "nope", mnt / "org" / "nope", mnt / "org" / "tiny" / "nope.json",
              mnt / "org" / "tiny" / "adapters" / "nope", mnt / "org" / "tiny" / "config.json" / "x"]:
        with pytest.raises(OSError) as e:
            os.stat(p)
        assert e.value.errno in (errno.ENOENT, errno.ENOTDIR), p
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / "org", "user.nothing")
    assert e.value.errno == errno.ENODATA


def test_socket_is_advertised_by_xattr_and_marker_file(shared: tuple[Path, Path]) -> None:
    _, mnt = shared
    for p in [mnt, mnt / "org", mnt / "org" / "tiny", mnt / "org" / "tiny" / "model.safetensors",
              mnt / "org" / "tiny" / "config.json", mnt / "org" / "tiny" / "adapters" / "mine"]:
        assert os.getxattr(p, "user.sllmfs.socket") == SOCKET.encode(), p
        assert "user.sllmfs.socket" in os.listxattr(p)
    marker = json.loads((mnt / ".sllmfs.json").read_bytes())
    assert marker["socket"] == SOCKET and marker["version"] == 1
    assert (Path(marker["storage_path"]) / "store.json").is_file()  # where SGLang writes its per-rank state


def test_stat_sizes_inodes_and_statfs(shared: tuple[Path, Path]) -> None:
    _, mnt = shared
    model = mnt / "org" / "tiny"
    st = (model / "model.safetensors").stat()
    assert st.st_size == len((model / "model.safetensors").read_bytes())
    assert (model / "model.safetensors").stat().st_ino == st.st_ino  # stable while mounted
    assert os.path.isdir(mnt / "org") and os.path.isdir(model)
    assert st.st_mode & 0o777 == 0o444
    vfs = os.statvfs(mnt)
    assert vfs.f_bavail == 0 and vfs.f_namemax == 255


def test_store_changes_show_in_the_mount(tmp_path: Path, mount_runner: Callable[[Path], Path],
                                         llama_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "org/a", llama_dir)
    mnt = mount_runner(store.root)
    with open(mnt / "org" / "a" / "model.safetensors", "rb") as held:
        first = held.read(4096)
        save_model(store, "org/b", llama_dir)
        assert sorted(os.listdir(mnt / "org")) == ["a", "b"]
        store.remove("org/a")
        assert sorted(os.listdir(mnt / "org")) == ["b"]
        assert not os.path.exists(mnt / "org" / "a")
        assert not os.path.exists(mnt / "org" / "a" / "config.json")
        held.seek(0)
        assert held.read(4096) == first  # an open reader keeps its bytes
    store.remove("org/b")
    assert os.listdir(mnt) == [".sllmfs.json"]


def test_a_model_and_its_namesake_folder_share_a_directory(tmp_path: Path, mount_runner: Callable[[Path], Path],
                                                           llama_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "org", llama_dir)
    save_model(store, "org/sub/deep", llama_dir)
    mnt = mount_runner(store.root)
    listing = os.listdir(mnt / "org")
    assert "sub" in listing and "config.json" in listing and "model.safetensors" in listing
    assert os.listdir(mnt / "org" / "sub") == ["deep"]
    assert (mnt / "org" / "sub" / "deep" / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()
    assert (mnt / "org" / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()


def test_a_damaged_model_hides_and_the_rest_keeps_serving(tmp_path: Path, mount_runner: Callable[[Path], Path],
                                                          llama_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "good", llama_dir)
    save_model(store, "bad", llama_dir)
    (store.get("bad").variant_dir("hf") / "manifest.json").write_text("{not json")
    mnt = mount_runner(store.root)
    assert sorted(os.listdir(mnt)) == [".sllmfs.json", "bad", "good"]
    assert os.listdir(mnt / "bad") == []
    assert (mnt / "good" / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()
    assert (mnt / "good" / "model.safetensors").stat().st_size > 0


def test_replaced_model_gets_new_inodes_and_bytes(tmp_path: Path, mount_runner: Callable[[Path], Path],
                                                  models_dir: Path) -> None:
    from sllmfs.ops.demo import build_model

    store = Store(tmp_path / "store")
    one = build_model(models_dir / "replace-1", "llama", seed=1)
    two = build_model(models_dir / "replace-2", "llama", seed=2)
    save_model(store, "m", one)
    mnt = mount_runner(store.root)
    path = mnt / "m" / "model.safetensors"
    before = path.stat().st_ino, path.read_bytes()
    save_model(store, "m", two, force=True)
    after = path.stat().st_ino, path.read_bytes()
    assert after[0] != before[0]
    assert after[1] != before[1]
    with safe_open(path, "pt") as sf, safe_open(two / "model.safetensors", "pt") as ref:
        for k in ref.keys():
            assert raw(sf.get_tensor(k)) == raw(ref.get_tensor(k)), k


# The daemon runs serve() in its own process; a reader in the same process could deadlock
# (a page fault on an mmap of the mount holds the GIL the server needs). So this runs the
# way the daemon does, in a child: serve() with a memory tier of real in-memory segments.
RESIDENT_SERVER = """
import signal, sys, trio
from pathlib import Path
from sllmfs.fuse.main import serve
from sllmfs.store.store import Store

store = Store(sys.argv[1], create=False, cleanup=False)
info = store.get(sys.argv[3])
manifest = info.manifest("hf")
segments = [memoryview(bytearray((info.variant_dir("hf") / p.file).read_bytes())) for p in manifest.partitions]
asked = []

def resident_view(model, variant, identity):
    asked.append((model, variant))
    return segments if (model, variant) == (sys.argv[3], "hf") else None

async def main():
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, Path(sys.argv[2]), store, resident_view, "/run/sllmfs/test.sock")
            print("serving", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
    print("asked", len(asked), flush=True)

trio.run(main)
"""


def test_reads_come_from_the_memory_tier_when_resident(tmp_path: Path, llama_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "org/tiny", llama_dir)
    info = store.get("org/tiny")
    mnt = tmp_path / "mnt"
    proc = subprocess.Popen([sys.executable, "-c", RESIDENT_SERVER, str(store.root), str(mnt), "org/tiny"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
        for p in info.manifest("hf").partitions:  # the store can no longer serve these bytes: only memory can
            os.unlink(info.variant_dir("hf") / p.file)
        with safe_open(mnt / "org" / "tiny" / "model.safetensors", "pt") as sf, \
                safe_open(llama_dir / "model.safetensors", "pt") as ref:
            for k in ref.keys():
                assert raw(sf.get_tensor(k)) == raw(ref.get_tensor(k)), k
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and int(out.split()[-1]) > 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)


def test_sigterm_unmounts(tmp_path: Path, llama_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "m", llama_dir)
    runner = Runner(store.root, tmp_path / "mnt")
    assert is_mounted(tmp_path / "mnt")
    assert runner.stop(signal.SIGTERM) == 0
    assert not is_mounted(tmp_path / "mnt")
    runner = Runner(store.root, tmp_path / "mnt")
    assert runner.stop(signal.SIGINT) == 0
    assert not is_mounted(tmp_path / "mnt")


def test_stale_mount_of_a_killed_server_is_cleaned_at_next_start(tmp_path: Path, llama_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "m", llama_dir)
    mnt = tmp_path / "mnt"
    killed = Runner(store.root, mnt)
    try:
        killed.stop(signal.SIGKILL)
        assert is_mounted(mnt)
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno == errno.ENOTCONN
        again = Runner(store.root, mnt)
        try:
            assert "m" in os.listdir(mnt)
            assert (mnt / "m" / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()
        finally:
            assert again.stop() == 0
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)


def test_busy_or_non_empty_mount_point_is_a_clear_error(tmp_path: Path, llama_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "m", llama_dir)
    mnt = tmp_path / "mnt"
    first = Runner(store.root, mnt)
    try:
        r = subprocess.run([sys.executable, "-m", "sllmfs.fuse.main", str(store.root), str(mnt)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "is busy" in r.stderr and "Traceback" not in r.stderr
        assert "m" in os.listdir(mnt)  # the live mount is untouched
    finally:
        first.stop()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="not empty"):
        trio.run(serve, full, store, None, SOCKET)
    assert (full / "keep.txt").read_text() == "mine"


def test_cp_copies_a_whole_model_folder(shared: tuple[Path, Path], tmp_path: Path, llama_dir: Path) -> None:
    _, mnt = shared
    shutil.copytree(mnt / "org" / "tiny", tmp_path / "copy")
    with safe_open(tmp_path / "copy" / "model.safetensors", "pt") as sf, \
            safe_open(llama_dir / "model.safetensors", "pt") as ref:
        assert sorted(sf.keys()) == sorted(ref.keys())
        for k in ref.keys():
            assert raw(sf.get_tensor(k)) == raw(ref.get_tensor(k)), k
