"""Kernel caches through the origin (origin/kernels.py): a real S3 server (moto) on localhost, real
stores, the CLI and the sidecar as real processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from sllmfs.core.errors import BadInput  # noqa: E402
from sllmfs.origin import kernels as origin_kernels  # noqa: E402
from sllmfs.origin.client import connect  # noqa: E402
from sllmfs.origin.url import Origin  # noqa: E402
from sllmfs.store import kernels  # noqa: E402
from sllmfs.store.kernel_key import KernelKey  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402
from tests.origin import test_origin as base  # noqa: E402
from tests.support.cli import sllmfs  # noqa: E402
from tests.support.sidecar import sidecar, wait_log  # noqa: E402

server, env, origin = base.server, base.env, base.origin  # the origin tests' moto server and bucket

# what this CPU node is (no NVIDIA GPU), and a key made on an H200 node
HERE = KernelKey(gpu="", driver="", cuda="", torch="2.13.0", triton="", framework="sglang 0.5.17")
H200 = KernelKey(gpu="NVIDIA H200", driver="570.86.15", cuda="12.8", torch="2.11.0+cu128",
                 triton="3.5.1", framework="sglang 0.5.17")
FILES = {"triton/ab12/_fwd_kernel.cubin": os.urandom(5000), "triton/ab12/_fwd_kernel.json": b'{"n": 1}',
         "tvm-ffi/libsgl_kernel_ab.so": os.urandom(3000), "flashinfer/90/cached_ops/norm/norm.so": os.urandom(700)}


def publish(store: Store, key: KernelKey, files: dict[str, bytes], tmp: Path) -> kernels.KernelEntry:
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    if "tvm-ffi/libsgl_kernel_ab.so" in files:
        os.chmod(tmp / "tvm-ffi/libsgl_kernel_ab.so", 0o755)  # a mode the entry keeps
    return kernels.publish(store, key, tmp)


def restored(store: Store, key: str, tmp: Path) -> dict[str, bytes]:
    kernels.restore(store, key, tmp)
    return {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}


def test_push_then_pull_gives_the_same_files(origin: Origin, env: dict[str, str], tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    entry = publish(a, H200, FILES, tmp_path / "src")
    p = sllmfs("kernels", "push", "--to", str(origin), "--storage-path", str(a.root), env=env)
    assert p.returncode == 0 and f"pushed kernel cache {H200.name}" in p.stdout and "4 files sent" in p.stdout
    again = sllmfs("kernels", "push", "--to", str(origin), "--storage-path", str(a.root), env=env)
    assert "0 files sent" in again.stdout  # the origin has them
    listed = sllmfs("kernels", "ls", "--origin", str(origin), env=env)
    assert listed.returncode == 0 and H200.name in listed.stdout
    p = sllmfs("kernels", "pull", H200.name, "--from", str(origin), "--storage-path", str(b.root), env=env)
    assert p.returncode == 0 and "4 files" in p.stdout, p.stderr
    got = kernels.load_entry(b, H200.name)
    assert [(f.path, f.size, f.checksum, f.mtime_ns, f.mode) for f in got.files] == \
        [(f.path, f.size, f.checksum, f.mtime_ns, f.mode) for f in entry.files]
    assert got.facts == kernels.load_entry(a, H200.name).facts and got.facts["gpu"] == "NVIDIA H200"
    assert restored(b, H200.name, tmp_path / "out") == FILES


def test_origin_entry_is_the_union_of_what_nodes_push(origin: Origin, env: dict[str, str], tmp_path: Path) -> None:
    a, b, c = Store(tmp_path / "a"), Store(tmp_path / "b"), Store(tmp_path / "c")
    first = dict(list(FILES.items())[:2])
    second = {"triton/cd34/_bwd_kernel.cubin": os.urandom(4000), **dict(list(FILES.items())[:1])}
    publish(a, H200, first, tmp_path / "sa")
    publish(b, H200, second, tmp_path / "sb")
    client = connect(origin, 2)
    assert origin_kernels.push(a, H200.name, origin, client) == 2
    assert origin_kernels.push(b, H200.name, origin, client) == 1  # the shared file is there already
    assert origin_kernels.pull(c, H200.name, origin, client) == 3
    assert restored(c, H200.name, tmp_path / "out") == {**first, **second}


def test_a_damaged_object_is_left_out_never_restored(origin: Origin, env: dict[str, str], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish(a, H200, FILES, tmp_path / "src")
    client = connect(origin, 2)
    origin_kernels.push(a, H200.name, origin, client)
    bad = "triton/ab12/_fwd_kernel.cubin"
    obj = origin_kernels.object_key(origin, H200.name, bad)
    data = bytearray(client.get_object(Bucket=origin.bucket, Key=obj)["Body"].read())
    data[100] ^= 0x01
    client.put_object(Bucket=origin.bucket, Key=obj, Body=bytes(data))
    with caplog.at_level("WARNING"):
        assert origin_kernels.pull(b, H200.name, origin, client) == 3
    assert f"{bad} from {origin} left out: fails its checksum" in caplog.text
    assert restored(b, H200.name, tmp_path / "out") == {k: v for k, v in FILES.items() if k != bad}


def test_a_new_nodes_sidecar_gets_the_fleets_kernels_for_its_gpus(origin: Origin, env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    a = Store(tmp_path / "a" / "store")
    publish(a, HERE, FILES, tmp_path / "s1")
    publish(a, H200, FILES, tmp_path / "s2")
    with sidecar(tmp_path / "a", "--origin", str(origin), env=env, store=a.root) as sd:  # pushes at start
        assert "kernel cache" in wait_log(sd, f"kernel cache {H200.name}: pushed")
    client = connect(origin, 2)
    assert sorted(origin_kernels.remote_keys(client, origin)) == sorted([HERE.name, H200.name])
    b = Store(tmp_path / "b" / "store")
    with sidecar(tmp_path / "b", "--origin", str(origin), env=env, store=b.root) as sd:  # a new node
        wait_log(sd, f"kernel cache {HERE.name}: pulled")
        deadline = time.monotonic() + 30
        while not kernels.entries(b)[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        # this node has no H200: only the entry made for what it is comes over
        assert [e.key for e in kernels.entries(b)[0]] == [HERE.name]
        assert f"kernel cache {HERE.name}: pushed" not in sd.log()  # what came from the origin is not sent back
    assert restored(b, HERE.name, tmp_path / "out") == FILES


def test_a_round_goes_on_past_a_damaged_key_and_does_not_fetch_a_bad_file_twice(
        origin: Origin, env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish(a, HERE, FILES, tmp_path / "src")
    client = connect(origin, 2)
    origin_kernels.push(a, HERE.name, origin, client)
    junk = KernelKey("", "", "", "0.0", "", "other 1.0").name  # sorts before HERE's key
    client.put_object(Bucket=origin.bucket, Key=origin_kernels.object_key(origin, junk, "manifest.json"), Body=b"{}")
    bad = "tvm-ffi/libsgl_kernel_ab.so"
    obj = origin_kernels.object_key(origin, HERE.name, bad)
    client.put_object(Bucket=origin.bucket, Key=obj, Body=b"not the kernel")
    state = origin_kernels.SyncState(node=("", ""))
    with caplog.at_level("WARNING"):
        origin_kernels.sync(b, origin, client, state)
        origin_kernels.sync(b, origin, client, state)  # a second round: nothing new to say or fetch
    assert caplog.text.count(f"{junk} not pulled") == 1  # that key's one line, once
    assert caplog.text.count(f"{bad} from {origin} left out") == 1
    assert restored(b, HERE.name, tmp_path / "out") == {k: v for k, v in FILES.items() if k != bad}


def test_an_entry_over_the_size_limit_is_neither_pushed_nor_pulled(origin: Origin, env: dict[str, str],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    publish(a, HERE, FILES, tmp_path / "src")
    client = connect(origin, 2)
    origin_kernels.push(a, HERE.name, origin, client)
    publish(a, HERE, {"triton/zz/new.cubin": os.urandom(100)}, tmp_path / "more")  # one more to push
    monkeypatch.setenv(kernels.MAX_ENV, "4KiB")  # nodes that allow less than the entry holds
    with pytest.raises(BadInput, match="would hold more than 4096 bytes"):
        origin_kernels.pull(b, HERE.name, origin, client)
    assert kernels.entries(b)[0] == []
    with pytest.raises(BadInput, match="not pushed"):
        origin_kernels.push(a, HERE.name, origin, client)


def test_a_node_takes_entries_of_its_gpus_and_driver_made_by_this_key_format() -> None:
    node = ("NVIDIA H200", "580.159.04")
    assert origin_kernels.for_node({"gpu": "NVIDIA H200", "driver": "580.159.04"}, node)
    assert origin_kernels.for_node({"gpu": "NVIDIA H200", "driver": ""}, node)  # driver unknown there
    assert not origin_kernels.for_node({"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04"}, node)
    assert not origin_kernels.for_node({"gpu": "NVIDIA H200", "driver": "570.86.15"}, node)
    # keyed with the compute capability (before it left the key): no start asks for it any more
    assert not origin_kernels.for_node({"gpu": "NVIDIA H200", "capability": "9.0", "driver": "580.159.04"}, node)
