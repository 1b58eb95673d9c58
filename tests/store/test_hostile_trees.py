"""Hostile store trees: files and directories of stored models swapped for links, FIFOs, sockets, junk,
under a real daemon and its real mount (bench/fuzz_store.py --trees), and the defects that fuzzing found,
each pinned by its own case. Also: a listing re-reads only the models that changed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import sllmfs.store.format as fmt
import sllmfs.store.store as store_mod
from bench import fuzz_store
from sllmfs.core.errors import Corrupt, SllmfsError
from sllmfs.store.store import Store
from tests.support.cli import sllmfs
from tests.support.fuse import force_unmount
from tests.support.sidecar import make_model, sidecar

ROOTED = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root")


@ROOTED
def test_fuzzed_store_trees_never_stop_the_daemon_nor_leak_outside_bytes(tmp_path: Path) -> None:
    r = fuzz_store.fuzz_trees(tmp_path, rounds=40, seed=0)
    print({k: v for k, v in r.items() if k != "refusal_samples"})
    assert r["rounds"] == 40 and r["ls_runs"] == 40 and r["mutations"] >= 40, r
    assert r["problems"] == [] and r["daemon_alive"] and r["tracebacks"] == 0, r
    assert r["victim_refused"] > 0 and r["untouched_reads"] >= 40 * (fuzz_store.TREE_MODELS - 2), r
    assert r["metadata_refused"] > 0, r  # changed metadata files are refused (their digests), not served


def _store_with(tmp_path: Path, *models: str) -> Store:
    store = Store(tmp_path / "store")
    for i, m in enumerate(models):
        make_model(store.root, m, tensors=2, nbytes=64 << 10, seed=i)
    return store


@ROOTED
def test_odd_names_under_models_keep_list_answering_and_ls_to_one_line_each(tmp_path: Path) -> None:
    """Found by the fuzz: a directory named with undecodable bytes made the socket's `list` an internal
    error (its name could not be sent), and a newline in a name under models/ or variants/ split
    `sllmfs ls`'s warning in two."""
    store = _store_with(tmp_path, "org/good", "org/odd")
    os.mkdir(store.models_dir / "a\nb")
    os.mkdir(os.path.join(os.fsencode(store.models_dir), b"\xff\xfe"))
    os.mkdir(store.model_path("org/odd") / "variants" / "x\ny")
    with sidecar(tmp_path, store=store.root) as sd, sd.connect() as c:
        assert [m["name"] for m in c.list()] == ["org/good"]
        assert sd.log().count("Traceback") == 0
    proc = sllmfs("ls", "--json", store=store.root)
    assert [m["name"] for m in json.loads(proc.stdout)] == ["org/good"]
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("sllmfs: warning: ") for line in lines), proc.stderr
    assert any("a\\nb" in line for line in lines) and any("\\udcff\\udcfe" in line for line in lines), lines
    assert any("model 'org/odd' [x\\ny]: its directory is not a variant" in line for line in lines), lines


@ROOTED
@pytest.mark.parametrize("rel", ["model.json", "files/config.json", "variants/hf/manifest.json",
                                 "variants/hf/model.safetensors"])
def test_a_socket_in_the_store_is_refused_in_one_line(rel: str, tmp_path: Path) -> None:
    """Found by the fuzz: opening a socket file fails with ENXIO before any type check, which reached
    the daemon as an internal error with a traceback."""
    store = _store_with(tmp_path, "org/good", "org/bad")
    path = store.model_path("org/bad") / rel
    path.unlink()
    os.mknod(path, stat.S_IFSOCK | 0o600)
    mnt = tmp_path / "mnt"
    try:
        with sidecar(tmp_path, "--mount", str(mnt), store=store.root) as sd, sd.connect() as c:
            with pytest.raises(SllmfsError) as e:
                with c.acquire("org/bad") as lease:
                    lease.wait(timeout=20)
            assert f"{rel.rsplit('/', 1)[-1]} is a socket, not a regular file" in str(e.value), e.value
            assert "\n" not in str(e.value)
            assert (mnt / "org" / "good" / "config.json").read_bytes() == b'{"model_type": "test"}'
            assert "org/good" in [m["name"] for m in c.list()]
            assert sd.log().count("Traceback") == 0
    finally:
        force_unmount(mnt)


def _bytes_read() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def test_a_huge_sparse_model_json_is_refused_unread(tmp_path: Path) -> None:
    """Found by the fuzz: a sparse model.json past the 1 GiB limit was read (a GiB of zeros, in memory) by
    every listing before being refused, so `status` took seconds."""
    store = _store_with(tmp_path, "org/good", "org/bad")
    with open(store.model_path("org/bad") / "model.json", "wb") as f:
        f.truncate(fmt.MAX_JSON + 1)
    before = _bytes_read()
    with pytest.raises(Corrupt, match=r"model 'org/bad': model.json is larger than"):
        store.get("org/bad")
    assert _bytes_read() - before < 1 << 20
    good, bad = store.listing()
    assert [m.name for m in good] == ["org/good"] and [entry for entry, _ in bad] == ["org%2Fbad"]


def test_a_listing_rereads_only_the_models_that_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store_with(tmp_path, "a/one", "a/two", "a/three")
    monkeypatch.setattr(store_mod, "RECENT_NS", 0)  # just saved: otherwise each listing checks them afresh
    parsed: list[Path] = []
    real = store_mod.read_json

    def counted(path: Path, **kw: object) -> object:
        parsed.append(path)
        return real(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod, "read_json", counted)
    names = [m.name for m in store.listing()[0]]
    assert names == ["a/one", "a/three", "a/two"] and len(parsed) == 3
    assert [m.name for m in store.listing()[0]] == names and len(parsed) == 3  # nothing changed: nothing read
    make_model(store.root, "a/two", tensors=2, nbytes=64 << 10, seed=9, force=True)  # replaced
    saved = len(parsed)  # save itself reads the old copy's record
    assert [m.name for m in store.listing()[0]] == names
    assert [p.parent.name for p in parsed[saved:]] == ["a%2Ftwo"]
    cfg = store.model_path("a/one") / "files" / "config.json"  # damaged in place: files/ changes
    cfg.unlink()
    os.symlink("/etc/hostname", cfg)
    good, bad = store.listing()
    assert [m.name for m in good] == ["a/three", "a/two"]
    assert bad == [("a%2Fone", bad[0][1])] and "files/config.json is a symlink" in bad[0][1]
    store.remove("a/three")
    assert [m.name for m in store.listing()[0]] == ["a/two"] and set(store._listed) == {"a%2Fone", "a%2Ftwo"}
