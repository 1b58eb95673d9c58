"""Metadata files (config.json, tokenizer.json, an adapter's adapter_config.json) are recorded with
size and xxh3_64 when saved, and no reader hands out a byte of one that does not match.

Real stores on disk, the real ``sllmfs`` command. The mount, the sidecar's ``files`` op and the origin
have their own tests (tests/fuse/test_fuse_metafiles.py, tests/sidecar/test_sidecar_metafiles.py,
tests/origin/test_origin.py); the damage kinds are shared from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.numpy import save_file

from sllmfs.core.errors import Corrupt
from sllmfs.store.format import FILE_DIGESTS, FileDigest, load_manifest
from sllmfs.store.save import record_file_digests, save_adapter, save_model
from sllmfs.store.store import Store
from tests.support.cli import sllmfs

CONFIG = b'{"model_type": "llama", "hidden_size": 64}\n'
TOKENIZER = json.dumps({"model": {"vocab": {f"t{i}": i for i in range(2000)}}}).encode()
ADAPTER_CONFIG = b'{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}'


def checkpoint(root: Path) -> Path:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(4096, dtype=np.float32)}, str(root / "model.safetensors"))
    (root / "config.json").write_bytes(CONFIG)
    (root / "tokenizer.json").write_bytes(TOKENIZER)
    return root


def adapter(root: Path) -> Path:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    save_file({"base_model.model.q_proj.lora_A.weight": np.ones((4, 8), dtype=np.float32)},
              str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_bytes(ADAPTER_CONFIG)
    return root


def saved(tmp_path: Path, name: str = "org/m", *, with_adapter: bool = False) -> Store:
    store = Store(tmp_path / "store")
    save_model(store, name, checkpoint(tmp_path / "src"))
    if with_adapter:
        save_adapter(store, name, "chat", adapter(tmp_path / "lora"))
    return store


# -- damage, as a disk or a hand does it ------------------------------------------


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def extend(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b" ")


def same_size_swap(path: Path) -> None:
    """Replaced by another file of the same size (a wrong restore): only the digest can tell."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[::-1])


def symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to("/etc/passwd")


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {  # how, and what the one line says
    "flip": (flip, "fails its xxh3_64 checksum"),
    "truncate": (truncate, "bytes when saved"),
    "extend": (extend, "bytes when saved"),
    "swap": (same_size_swap, "fails its xxh3_64 checksum"),
}


# -- the record -----------------------------------------------------------------


def test_save_records_each_metadata_file_and_readers_get_exactly_those_bytes(tmp_path: Path) -> None:
    store = saved(tmp_path, with_adapter=True)
    info = store.get("org/m")
    assert info.file_digests == {"config.json": FileDigest.of(CONFIG), "tokenizer.json": FileDigest.of(TOKENIZER)}
    raw = json.loads((info.path / "model.json").read_text())
    assert raw[FILE_DIGESTS]["config.json"] == {"size": len(CONFIG), "xxh3_64": FileDigest.of(CONFIG).xxh3_64}
    meta = info.meta_files()
    assert meta.verified and meta.data == {"config.json": CONFIG, "tokenizer.json": TOKENIZER}
    assert load_manifest(info.variant_dir("lora.chat")).file_digests == {
        "adapter_config.json": FileDigest.of(ADAPTER_CONFIG)}
    assert info.meta_files("lora.chat").data == {"adapter_config.json": ADAPTER_CONFIG}
    assert load_manifest(info.variant_dir("hf")).file_digests is None  # no files of its own
    out = meta.write_to(tmp_path / "copy")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == meta.data


@pytest.mark.parametrize("kind", sorted(DAMAGE))
@pytest.mark.parametrize("where", ["model", "adapter"])
def test_a_damaged_file_is_refused_in_one_line_naming_model_and_file(tmp_path: Path, kind: str, where: str) -> None:
    store = saved(tmp_path, with_adapter=True)
    info = store.get("org/m")
    path = info.files_dir / "tokenizer.json" if where == "model" else \
        info.variant_files_dir("lora.chat") / "adapter_config.json"
    how, says = DAMAGE[kind]
    how(path)
    with pytest.raises(Corrupt) as e:
        store.get("org/m").meta_files(None if where == "model" else "lora.chat")
    line = str(e.value)
    assert "\n" not in line and says in line and "model 'org/m'" in line and path.name in line
    assert "sllmfs verify --model org/m" in line
    # the other owner's files are untouched and still read
    other = store.get("org/m").meta_files("lora.chat" if where == "model" else None)
    assert other.verified and other.data


def test_a_planted_file_in_an_adapter_is_refused(tmp_path: Path) -> None:
    store = saved(tmp_path, with_adapter=True)
    (store.get("org/m").variant_files_dir("lora.chat") / "extra.json").write_text("{}")
    with pytest.raises(Corrupt, match="extra.json is not a file this adapter was saved with"):
        store.get("org/m").meta_files("lora.chat")


def test_a_symlink_in_place_of_a_file_refuses_the_model_before_any_read(tmp_path: Path) -> None:
    store = saved(tmp_path)
    symlink(store.get("org/m").files_dir / "config.json")
    with pytest.raises(Corrupt, match="config.json is a symlink, not a regular file"):
        store.get("org/m")
    assert store.listing()[0] == [] and "symlink" in store.listing()[1][0][1]


def test_a_record_that_does_not_match_its_files_list_is_refused(tmp_path: Path) -> None:
    store = saved(tmp_path)
    path = store.model_path("org/m") / "model.json"
    meta = json.loads(path.read_text())
    del meta[FILE_DIGESTS]["tokenizer.json"]
    path.write_text(json.dumps(meta))
    with pytest.raises(Corrupt, match="must name exactly the files"):
        store.get("org/m")
    meta[FILE_DIGESTS]["tokenizer.json"] = {"size": -1, "xxh3_64": "zz"}
    path.write_text(json.dumps(meta))
    with pytest.raises(Corrupt, match="size must be an integer"):
        store.get("org/m")


# -- stores written before digests -------------------------------------------------


def make_legacy(store: Store, name: str = "org/m") -> None:
    """What an older sllmfs wrote: model.json and adapter manifests without file_digests."""
    info = store.get(name)
    path = info.path / "model.json"
    meta = json.loads(path.read_text())
    del meta[FILE_DIGESTS]
    path.write_text(json.dumps(meta))
    for key in info.variants:
        mpath = info.variant_dir(key) / "manifest.json"
        m = json.loads(mpath.read_text())
        if m.pop(FILE_DIGESTS, None) is not None:
            mpath.write_text(json.dumps(m))


def test_a_legacy_store_is_served_unverified_and_repair_records_digests_in_place(tmp_path: Path) -> None:
    store = saved(tmp_path, with_adapter=True)
    make_legacy(store)
    info = store.get("org/m")
    assert info.file_digests is None
    meta = info.meta_files()
    assert not meta.verified and meta.data == {"config.json": CONFIG, "tokenizer.json": TOKENIZER}
    assert info.meta_files("lora.chat").data == {"adapter_config.json": ADAPTER_CONFIG}
    hf_identity = store.identity("org/m", "hf")

    assert record_file_digests(store, "org/m") == ["files", "lora.chat"]
    info = store.get("org/m")
    assert info.meta_files().verified and info.meta_files("lora.chat").verified
    assert store.identity("org/m", "hf") == hf_identity  # hard-linked: the memory tier's copy stays valid
    assert record_file_digests(store, "org/m") == []
    assert list(store.tmp_dir.iterdir()) == []
    flip(info.files_dir / "config.json")  # from now on damage is caught
    with pytest.raises(Corrupt):
        store.get("org/m").meta_files()


def test_verify_names_each_damaged_metadata_file_and_exits_non_zero(tmp_path: Path) -> None:
    store = saved(tmp_path, with_adapter=True)
    ok = sllmfs("verify", "--model", "org/m", store=store.root)
    assert "ok org/m files: 2 metadata files" in ok.stdout and "ok org/m [lora.chat] files" in ok.stdout
    info = store.get("org/m")
    flip(info.files_dir / "config.json")
    truncate(info.variant_files_dir("lora.chat") / "adapter_config.json")
    bad = sllmfs("verify", "--model", "org/m", store=store.root, check=False)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 3, bad.stderr  # one per damaged file, then the error
    assert "files/config.json fails its xxh3_64 checksum" in lines[0]
    assert "[lora.chat]: files/adapter_config.json is" in lines[1]
    assert lines[2].startswith("sllmfs: error: model 'org/m': 2 metadata file(s) damaged")
    assert "ok org/m [hf]" in bad.stdout  # the tensors were still checked, and are fine


def test_verify_of_a_legacy_model_says_how_to_record_digests_and_repair_does(tmp_path: Path) -> None:
    store = saved(tmp_path)
    make_legacy(store)
    out = sllmfs("verify", "--model", "org/m", store=store.root)
    assert "unverified org/m files: 2 metadata files carry no checksums" in out.stdout
    assert "--repair" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    fixed = sllmfs("verify", "--model", "org/m", "--repair", store=store.root)
    assert "recorded checksums for files of org/m" in fixed.stderr and "ok org/m files" in fixed.stdout
    flip(store.get("org/m").files_dir / "tokenizer.json")
    bad = sllmfs("verify", "--model", "org/m", "--variant", "hf", store=store.root, check=False)
    assert bad.returncode != 0 and "files/tokenizer.json fails its xxh3_64 checksum" in bad.stderr
