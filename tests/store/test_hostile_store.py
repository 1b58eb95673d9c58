"""A tampered store: each bad entry is refused in one line, and everything else keeps being served.

Every case damages model org/bad beside a good org/good and is checked three ways: the store and the
CLI (`verify`, `ls`), a real daemon's socket, and a real mount served by that daemon. Operations that
the unfixed code hung on (a FIFO in the store) run with timeouts or in child processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.numpy import load_file

import sllmfs.client.client as sc
from bench import fuzz_store
from sllmfs.core.errors import Corrupt, SllmfsError
from sllmfs.store.format import load_manifest
from sllmfs.store.store import Store
from tests.support.cli import one_line_error, sllmfs
from tests.support.fuse import force_unmount, is_mounted
from tests.support.sidecar import make_model, sidecar

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

BAD = "org%2Fbad"
SECRET = b"SECRET-outside-the-store"
STEP = 20.0  # seconds for one request or one mount read; the unfixed daemon hung forever


def _manifest(change: Callable[[dict, dict], None]) -> Callable[[Path, Path], None]:
    """Damage: edit org/bad's hf manifest (``change(manifest, its first tensor)``)."""
    def damage(mdir: Path, outside: Path) -> None:
        path = mdir / "variants" / "hf" / "manifest.json"
        d = json.loads(path.read_text())
        change(d, next(iter(d["tensors"].values())))
        path.write_text(json.dumps(d))
    return damage


def _huge_shape(d: dict, t: dict) -> None:  # coherent, so the old checks passed it: shape, size and room agree
    t.update(dtype="U8", shape=[2**64], nbytes=2**64)
    d["partitions"][t["partition"]]["size"] = 2**64


def _float_offset(d: dict, t: dict) -> None:
    second = list(d["tensors"].values())[1]
    second["offset"] = float(second["offset"])


def _bool_dim(d: dict, t: dict) -> None:
    t.update(shape=[64, True], nbytes=64 * 4)


def _fifo(rel: str) -> Callable[[Path, Path], None]:
    def damage(mdir: Path, outside: Path) -> None:
        os.unlink(mdir / rel)
        os.mkfifo(mdir / rel)
    return damage


def _symlink(rel: str, target: Callable[[Path, Path], Path]) -> Callable[[Path, Path], None]:
    """Damage: replace ``rel`` with a symlink to ``target(mdir, outside)``, a copy outside the store."""
    def damage(mdir: Path, outside: Path) -> None:
        dest = target(mdir, outside)
        if (mdir / rel).is_dir():
            shutil.rmtree(mdir / rel)
        else:
            (mdir / rel).unlink()
        os.symlink(dest, mdir / rel)
    return damage


def _secret_file(mdir: Path, outside: Path) -> Path:
    (outside / "shadow").write_bytes(SECRET)
    return outside / "shadow"


def _secret_dir(mdir: Path, outside: Path) -> Path:
    (outside / "files").mkdir()
    (outside / "files" / "config.json").write_bytes(SECRET)
    return outside / "files"


def _data_copy(mdir: Path, outside: Path) -> Path:
    (outside / "model.safetensors").write_bytes((mdir / "variants" / "hf" / "model.safetensors").read_bytes())
    return outside / "model.safetensors"


def _model_dir_symlink(mdir: Path, outside: Path) -> None:
    os.rename(mdir, outside / BAD)  # the whole model, intact, outside the store
    os.symlink(outside / BAD, mdir)


def _garbage_model_json(mdir: Path, outside: Path) -> None:
    (mdir / "model.json").write_bytes(b"{garbage")


def _no_manifest(mdir: Path, outside: Path) -> None:
    (mdir / "variants" / "hf" / "manifest.json").unlink()


def _odd_dir_name(mdir: Path, outside: Path) -> None:
    odd = mdir.parent / "%2E%2E%2F%2E%2E%2Fetc"  # decodes to ../../etc
    odd.mkdir()
    (odd / "model.json").write_bytes((mdir.parent / "org%2Fgood" / "model.json").read_bytes())


@dataclass
class Case:
    damage: Callable[[Path, Path], None]
    says: str  # in the one-line error of `sllmfs verify --model org/bad`
    daemon_says: str  # in the socket's error for acquiring org/bad
    listed_bad: str | None = BAD  # the entry Store.listing reports (None: org/bad still lists)


CASES = {
    "shape-2**64": Case(_manifest(_huge_shape), "manifest.json partitions[0].size", "partitions[0].size", None),
    "float-offset": Case(_manifest(_float_offset), "manifest.json tensors['layer.1.weight'].offset", ".offset", None),
    "shape-64-True": Case(_manifest(_bool_dim), "manifest.json tensors['layer.0.weight'].shape", ".shape", None),
    "alignment-0": Case(_manifest(lambda d, t: d.update(alignment=0)), "manifest.json alignment", "alignment", None),
    "no-manifest": Case(_no_manifest, "[hf]: manifest.json is missing", "manifest.json is missing"),
    "fifo-data": Case(_fifo("variants/hf/model.safetensors"), "[hf]: model.safetensors is a FIFO",
                      "model.safetensors is a FIFO", None),
    "fifo-config": Case(_fifo("files/config.json"), "files/config.json is a FIFO", "files/config.json is a FIFO"),
    "symlink-config": Case(_symlink("files/config.json", _secret_file), "files/config.json is a symlink",
                           "files/config.json is a symlink"),
    "symlink-files-dir": Case(_symlink("files", _secret_dir), "files is a symlink", "files is a symlink"),
    "symlink-data": Case(_symlink("variants/hf/model.safetensors", _data_copy), "[hf]: model.safetensors is a symlink",
                         "model.safetensors is a symlink", None),
    "symlink-model-dir": Case(_model_dir_symlink, "its directory is a symlink", "symlink"),
    "garbage-model.json": Case(_garbage_model_json, "model.json is not valid JSON", "model.json is not valid JSON"),
    "odd-dir-name": Case(_odd_dir_name, "", "", "%2E%2E%2F%2E%2E%2Fetc"),
}


def _store(tmp_path: Path, case: Case) -> tuple[Path, dict[str, bytes]]:
    store = tmp_path / "store"
    Store(store)
    good = make_model(store, "org/good", tensors=3, nbytes=64 << 10)
    make_model(store, "org/bad", tensors=3, nbytes=64 << 10, seed=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    case.damage(store / "models" / BAD, outside)
    return store, good


def _child(code: str, *args: str) -> str:
    """``code`` in a fresh interpreter: a mount that hangs costs a timeout, not the test run."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=STEP)
    except subprocess.TimeoutExpired:
        proc.kill()  # not waited for: a FUSE request can hold it until the daemon is gone
        raise AssertionError(f"the mount did not answer within {STEP} s") from None
    assert proc.returncode == 0, err
    return out


READ_ALL = """
import os, sys
for dirpath, dirs, files in os.walk(sys.argv[1]):
    for f in files:
        try:
            data = open(os.path.join(dirpath, f), 'rb').read()
            print(f, len(data), 'SECRET' if b'SECRET' in data else '')
        except OSError as e:
            print(f, e.strerror)
"""


# -- the store and the CLI ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_the_cli_refuses_the_bad_model_in_one_line_and_lists_the_good(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    store, _ = _store(tmp_path, case)
    if case.says:
        err = one_line_error(sllmfs("verify", "--model", "org/bad", store=store, check=False, timeout=STEP))
        for part in (case.says, "model 'org/bad'", f"sllmfs rm --model org/bad --storage-path {store}"):
            assert part in err, (part, err)
    assert "ok org/good [hf]" in sllmfs("verify", "--model", "org/good", store=store, timeout=STEP).stdout
    listed = [m["name"] for m in json.loads(sllmfs("ls", "--json", store=store, timeout=STEP).stdout)]
    assert "org/good" in listed and ("org/bad" in listed) == (case.listed_bad != BAD)
    good, bad = Store(store, create=False, cleanup=False).listing()
    assert "org/good" in [m.name for m in good]
    if case.listed_bad:
        assert [entry for entry, _ in bad] == [case.listed_bad]
        assert "\n" not in bad[0][1] and (case.says or "remove it by hand") in bad[0][1]


MUTANTS = {  # one field each: (change, the field the error names)
    "shape huge": (lambda d, t: t.update(shape=[2**64]), ".shape"),
    "shape bool": (lambda d, t: t.update(shape=[64, True]), ".shape"),
    "shape negative": (lambda d, t: t.update(shape=[-1, 64]), ".shape"),
    "shape not a list": (lambda d, t: t.update(shape="256,64"), ".shape"),
    "offset float": (lambda d, t: t.update(offset=0.0), ".offset"),
    "offset bool": (lambda d, t: t.update(offset=False), ".offset"),
    "offset misaligned (aligned layout)": (lambda d, t: (d.update(layout="aligned", alignment=4096),
                                                       t.update(offset=8)), ".offset"),
    "offset inside the header": (lambda d, t: t.update(offset=8), "inside the file's header"),
    "offset leaves a gap": (lambda d, t: t.update(offset=t["offset"] + 8), "back to back"),
    "layout unknown": (lambda d, t: d.update(layout="packed"), "layout must be one of"),
    "alias in the files layout": (lambda d, t: d.update(aliases={"x": next(iter(d["tensors"]))}), "aliases cannot"),
    "file not safetensors": (lambda d, t: d["partitions"][0].update(file="data_0.bin"), "a .safetensors file"),
    "offset past the end": (lambda d, t: t.update(offset=1 << 40), "impossible place"),
    "nbytes disagrees": (lambda d, t: t.update(nbytes=4), ".nbytes"),
    "partition out of range": (lambda d, t: t.update(partition=1), ".partition"),
    "partition bool": (lambda d, t: t.update(partition=True), ".partition"),
    "dtype unknown": (lambda d, t: t.update(dtype="F12"), ".dtype"),
    "checksum not hex": (lambda d, t: t.update(checksum=7), ".checksum"),
    "tensor field missing": (lambda d, t: t.pop("offset"), ".offset is missing"),
    "tensor field extra": (lambda d, t: t.update(stride=[1]), "unknown field 'stride'"),
    "alignment zero": (lambda d, t: d.update(alignment=0), "alignment"),
    "alignment not a power of two": (lambda d, t: d.update(alignment=3000), "alignment"),
    "alignment float": (lambda d, t: d.update(alignment=4096.0), "alignment"),
    "chunk size": (lambda d, t: d.update(chunk_size=1 << 20), "chunk_size"),
    "partition size float": (lambda d, t: d["partitions"][0].update(size=1e6), "partitions[0].size"),
    "chunks too few": (lambda d, t: d["partitions"][0].update(chunks=[]), "partitions[0].chunks"),
    "file outside": (lambda d, t: d["partitions"][0].update(file="../../model.json"), "partitions[0].file"),
    "alias to nothing": (lambda d, t: d.update(aliases={"lm_head.weight": "nothing"}), "aliases['lm_head.weight']"),
    "tensors a list": (lambda d, t: d.update(tensors=[]), "tensors must be a JSON object"),
    "metadata huge int": (lambda d, t: d.update(metadata={"n": 2**70}), "metadata"),
    "variant not text": (lambda d, t: d.update(variant=None), "variant"),
}


@pytest.mark.parametrize("name", MUTANTS)
def test_every_manifest_field_is_checked_by_the_one_loader(name: str, tmp_path: Path) -> None:
    change, field = MUTANTS[name]
    store, _ = _store(tmp_path, Case(_manifest(change), "", "", None))
    info = Store(store, create=False, cleanup=False).get("org/bad")
    with pytest.raises(Corrupt) as e:
        info.manifest("hf")
    line = str(e.value)
    assert "\n" not in line and line.startswith("model 'org/bad' [hf]: manifest.json ") and field in line, line
    assert line.endswith(f"run `sllmfs rm --model org/bad --storage-path {store}` and save it again"), line
    load_manifest(store / "models" / "org%2Fgood" / "variants" / "hf")  # the good one still loads


# -- a real daemon and its mount ------------------------------------------------------------------


def _refusal(client: sc.Client, model: str) -> str:
    """The one error for acquiring ``model`` (its lease never becomes ready)."""
    try:
        with client.acquire(model) as lease:
            lease.wait(timeout=STEP)
    except SllmfsError as e:
        return str(e)
    raise AssertionError(f"{model} was served")


@pytest.mark.parametrize("name", CASES)
def test_the_daemon_and_its_mount_refuse_the_bad_model_and_keep_serving(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    store, good = _store(tmp_path, case)
    mnt = tmp_path / "mnt"
    try:
        with sidecar(tmp_path, "--mount", str(mnt), store=store) as sd:
            _wait_mounted(mnt, sd.proc)
            # the mount: listings answer, the bad model shows nothing (and no secret), the good one reads
            assert "org" in _child("import os, sys; print(os.listdir(sys.argv[1]))", str(mnt))
            assert "good" in _child("import os, sys; print(os.listdir(sys.argv[1]))", str(mnt / "org"))
            seen = _child(READ_ALL, str(mnt / "org" / "bad"))
            assert "SECRET" not in seen and ("model.safetensors" in seen) == (not case.daemon_says), seen
            copy = "import shutil, sys; shutil.copyfile(*sys.argv[1:])"
            _child(copy, str(mnt / "org" / "good" / "model.safetensors"), str(tmp_path / "good.safetensors"))
            assert {k: v.tobytes() for k, v in load_file(tmp_path / "good.safetensors").items()} == good
            assert sd.proc.poll() is None
            # the socket: one error for the bad model, the good one loads, list answers
            with sd.connect() as c:
                c._sock.settimeout(STEP)  # a hung daemon fails the test instead of hanging it
                if case.daemon_says:
                    err = _refusal(c, "org/bad")
                    assert case.daemon_says in err and "org/bad" in err and "\n" not in err, err
                with c.acquire("org/good") as lease:
                    lease.wait(timeout=STEP)
                    assert {k: v.tobytes() for k, v in lease.numpy().items()} == good
                assert "org/good" in [m["name"] for m in c.list()]
            assert sd.proc.poll() is None
            sd.proc.send_signal(signal.SIGTERM)
            assert sd.proc.wait(timeout=15) == 0
    finally:
        force_unmount(mnt)
    if case.daemon_says:  # hidden from the mount: logged once, however often it was listed
        assert (tmp_path / "sidecar.log").read_text().count("model org/bad is hidden from the mount") == 1


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not is_mounted(mnt):
        assert proc.poll() is None and time.monotonic() < deadline, "the mount did not come up"
        time.sleep(0.05)


def test_fuzzed_manifests_never_stop_the_daemon(tmp_path: Path) -> None:
    r = fuzz_store.fuzz(tmp_path, mutations=200)
    print(r)
    assert r["mutations"] == 200 and r["refused"] + r["served"] == 200
    assert r["refused"] > 100 and r["served"] > 0  # mostly refused; harmless changes still load
    assert r["daemon_alive"] and r["good_intact"], r
    assert r["mount_list_errors"] == 0 and r["tracebacks"] == 0, r


def test_ls_lists_the_good_models_and_one_line_per_bad_entry(tmp_path: Path, llama_dir: Path) -> None:
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store
    from tests.support.cli import sllmfs

    store = Store(tmp_path / "store")
    save_model(store, "org/good", llama_dir)
    (store.models_dir / "%2E%2E%2F%2E%2E%2Fetc").mkdir()
    out = sllmfs("ls", store=store.root)
    assert "org/good" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "is not shown" in line]
    assert len(warnings) == 1 and "%2E%2E%2F%2E%2E%2Fetc" in warnings[0]


def test_save_force_replaces_a_damaged_model(tmp_path: Path, llama_dir: Path) -> None:
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store
    from tests.support.cli import sllmfs

    store = Store(tmp_path / "store")
    save_model(store, "m", llama_dir)
    (store.get("m").path / "model.json").write_text("{garbage")
    sllmfs("save", "--model", "m", "--force", "--local-model-path", str(llama_dir), store=store.root)
    assert "ok m [hf]" in sllmfs("verify", "--model", "m", store=store.root).stdout


def test_store_is_private_to_the_daemons_user_and_group(tmp_path: Path, llama_dir: Path) -> None:
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store

    root = tmp_path / "store"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)  # as a careless admin made it
    store = Store(root)
    save_model(store, "m", llama_dir)
    assert root.stat().st_mode & 0o777 == 0o750  # nobody else gets in, whatever lies below
    info = store.get("m")
    assert (info.variant_dir("hf") / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (info.path / "files" / "config.json").stat().st_mode & 0o777 == 0o640


def test_registration_covers_the_mount_and_survives_restarts(tmp_path: Path) -> None:
    from tests.support.sidecar import make_model, sidecar

    mnt = tmp_path / "mnt"
    with sidecar(tmp_path, "--registration-required", "--mount", str(mnt)) as sd:
        make_model(sd.store, "org/m")
        time.sleep(0.2)
        assert not (mnt / "org").exists()  # not registered: not on the mount either
        with sd.connect() as c:
            c.register("org/m")
        assert (mnt / "org" / "m" / "config.json").read_bytes()
    with sidecar(tmp_path, "--registration-required", "--mount", str(mnt)) as sd:
        assert (mnt / "org" / "m" / "config.json").read_bytes()  # kept in the store across the restart


def test_a_model_read_through_the_mount_is_never_evicted_from_disk(tmp_path: Path) -> None:
    from tests.support.sidecar import cached_model, sidecar

    store, hf, mnt = tmp_path / "store", tmp_path / "hf", tmp_path / "mnt"
    os.environ["HF_HUB_CACHE"] = str(hf)  # models saved from a cache entry: the budget may evict them
    try:
        cached_model(store, hf, "a", 1)  # ~1 MB each; the budget holds one
        with sidecar(tmp_path, "--mount", str(mnt), "--disk-size", "1.5MB", store=store,
                     env={"HF_HUB_CACHE": str(hf)}) as sd, sd.connect() as c:
            with open(mnt / "a" / "model.safetensors", "rb") as reader:
                assert reader.read(8)
                cached_model(store, hf, "b", 2)
                assert c._op("refresh")["removed"] == ["b"]  # a is older, but open through the mount
            cached_model(store, hf, "c", 3)
            assert c._op("refresh")["removed"] == ["a"]  # closed: now the least recently used goes
    finally:
        del os.environ["HF_HUB_CACHE"]


def test_list_op_names_bad_entries_beside_the_good_models(tmp_path: Path) -> None:
    from tests.support.sidecar import make_model, sidecar

    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/good")
        (sd.store / "models" / "%2E%2E%2F%2E%2E%2Fetc").mkdir()
        with sd.connect() as c:
            reply = c._op("list")
        assert [m["name"] for m in reply["models"]] == ["org/good"]
        assert [name for name, _why in reply["bad"]] == ["%2E%2E%2F%2E%2E%2Fetc"]


def test_rm_removes_a_damaged_model_and_long_names_save(tmp_path: Path, llama_dir: Path) -> None:
    """The fix every damage message names (`sllmfs rm`) works on the damaged model; a name at the
    length limit saves (its lock file name is hashed)."""
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store
    from tests.support.cli import sllmfs

    store = Store(tmp_path / "store")
    save_model(store, "a/b", llama_dir)
    cfg = store.get("a/b").path / "files" / "config.json"
    cfg.unlink()
    cfg.symlink_to("/etc/hostname")
    sllmfs("rm", "--model", "a/b", "-y", store=store.root)
    assert not store.has("a/b")
    long_name = "a" * 125 + "/" + "b" * 125  # 253 bytes on disk: the limit, with no room for ".lock"
    save_model(store, long_name, llama_dir)
    assert store.has(long_name)
