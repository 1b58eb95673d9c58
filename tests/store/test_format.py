"""Store format round trips: every dtype, odd shapes, ties, offsets past 4 GiB, versions."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sllmfs.core import dtypes
from sllmfs.core.errors import BadInput, Corrupt, FormatVersionError
from sllmfs.store.format import ALIGNMENT, load_manifest
from sllmfs.store.reader import VariantReader, verify_variant
from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from sllmfs.store.writer import VariantWriter


def _random(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bits of any dtype (float8, bool, uint64 ... included)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


ALL_DTYPES = [dtypes.to_torch(d) for d in dtypes.BY_CODE.values()]


def test_every_dtype_round_trips_through_the_writer(tmp_path: Path) -> None:
    w = VariantWriter(tmp_path / "v", "hf")
    originals = {}
    for i, dt in enumerate(ALL_DTYPES):
        for shape in [(3, 5), (), (0,), (0, 7), (1,)]:
            name = f"t{i}.{dt}.{len(shape)}.{shape[0] if shape else 's'}"
            t = _random(dt, shape)
            originals[name] = t
            d = dtypes.from_torch(dt)
            w.add_bytes(name, d.code, list(shape), memoryview(t.reshape(-1).view(torch.uint8).numpy())
                        if t.numel() else memoryview(b""))
    m = w.finish()
    assert all(e.offset % ALIGNMENT == 0 for e in m.tensors.values())
    r = VariantReader(tmp_path / "v")
    for name, t in originals.items():
        assert _same_bits(r.tensor(name), t), name
    assert verify_variant(r) is None


def test_safetensors_checkpoint_with_odd_dtypes_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    kinds = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bool, torch.bfloat16, torch.float64,
             torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.float16]
    tensors = {f"w.{i}": _random(dt, (4, 3)) for i, dt in enumerate(kinds)}
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    tensors["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text('{"a": 1}')
    store = Store(tmp_path / "store")
    m = save_model(store, "org/odd", src)
    assert m.metadata["safetensors_metadata"] == {"format": "pt"}
    info = store.get("org/odd")
    assert info.files == ["config.json"]
    assert info.file_path("config.json").read_bytes() == b'{"a": 1}'
    r = VariantReader(info.variant_dir("hf"))
    for name, t in tensors.items():
        assert _same_bits(r.tensor(name), t), name


def test_tied_tensors_are_tensors_of_their_own_in_the_safetensors_files(tmp_path: Path) -> None:
    """A safetensors file cannot share bytes between names: a tied name is stored as its own tensor
    (what the mount showed of it before), in the source's order."""
    emb = torch.randn(64, 16)
    sd = {"embed.weight": emb, "lm_head.weight": emb, "other": torch.randn(4)}
    src = tmp_path / "src"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    store = Store(tmp_path / "store")
    m = save_model(store, "tied", src)
    assert m.aliases == {} and m.as_files
    assert m.names() == ["embed.weight", "lm_head.weight", "other"]
    r = VariantReader(store.get("tied").variant_dir("hf"))
    assert torch.equal(r.tensor("lm_head.weight"), emb) and torch.equal(r.tensor("embed.weight"), emb)


def test_aligned_writer_stores_tied_tensors_once(tmp_path: Path) -> None:
    w = VariantWriter(tmp_path / "v", "sglang.tp1")
    emb = torch.randn(8, 4)
    w.add_bytes("embed.weight", "F32", [8, 4], memoryview(emb.view(-1).view(torch.uint8).numpy()))
    w.add_alias("lm_head.weight", "embed.weight")
    m = w.finish()
    assert m.aliases == {"lm_head.weight": "embed.weight"} and not m.as_files
    assert torch.equal(VariantReader(tmp_path / "v").tensor("lm_head.weight"), emb)


def test_offsets_past_4_gib(tmp_path: Path) -> None:
    """A sparse 4.5 GiB tensor pushes the next one past 2**32; holes cost no disk."""
    big = (4 << 30) + (512 << 20)
    header = {"big": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]},
              "after": {"dtype": "F32", "shape": [4], "data_offsets": [big, big + 16]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + big)
        f.seek(8 + len(raw) + big)
        f.write(struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    store = Store(tmp_path / "store")
    m = save_model(store, "sparse", src, partition_target=8 << 30)
    after = m.tensors["after"]
    assert after.offset > 1 << 32
    part = store.get("sparse").variant_dir("hf") / m.partitions[after.partition].file
    assert os.stat(part).st_blocks * 512 < 64 << 20  # still sparse
    r = VariantReader(store.get("sparse").variant_dir("hf"))
    assert r.tensor("after").tolist() == [1.0, 2.0, 3.0, 4.0]


def test_unknown_format_version_is_a_clear_error(tmp_path: Path) -> None:
    w = VariantWriter(tmp_path / "v", "hf")
    w.add_bytes("a", "F32", [1], memoryview(b"\0\0\x80?"))
    w.finish()
    path = tmp_path / "v" / "manifest.json"
    d = json.loads(path.read_text())
    d["format_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(FormatVersionError, match="format version 99"):
        load_manifest(tmp_path / "v")


def test_manifest_pointing_outside_its_data_is_refused(tmp_path: Path) -> None:
    w = VariantWriter(tmp_path / "v", "hf")
    w.add_bytes("a", "F32", [1], memoryview(b"\0\0\x80?"))
    w.finish()
    path = tmp_path / "v" / "manifest.json"
    d = json.loads(path.read_text())
    d["tensors"]["a"]["offset"] = 1 << 40
    path.write_text(json.dumps(d))
    with pytest.raises(Corrupt, match="impossible place"):
        load_manifest(tmp_path / "v")


def test_shape_and_size_disagreeing_is_refused(tmp_path: Path) -> None:
    w = VariantWriter(tmp_path / "v", "hf")
    with pytest.raises(BadInput, match="needs 8 bytes"):
        w.add_bytes("a", "F32", [2], memoryview(b"\0\0\x80?"))
    with pytest.raises(BadInput, match="unknown dtype"):
        w.add_bytes("b", "F12", [1], memoryview(b"\0"))


def test_model_names_map_inside_the_store() -> None:
    from sllmfs.core.names import check_model_name, model_dirname

    assert model_dirname("Qwen/Qwen2.5-7B") == "Qwen%2FQwen2.5-7B"
    for bad in ["../x", "/a", "a/../b", "a//b", "", "a/b/c/d/e", "x" * 100 + "/" + "y" * 100 + "/" + "z" * 100]:
        with pytest.raises(BadInput):
            check_model_name(bad)


def test_each_layout_is_written_as_the_oldest_version_that_has_it(tmp_path: Path) -> None:
    """An sllmfs that reads only version 1 must refuse the safetensors layout (a tensor may sit off its
    element size there) and may still read an aligned variant; a version-1 manifest of the safetensors
    layout (written before the bump) is read."""
    w = VariantWriter(tmp_path / "v", "sglang.tp1")
    w.add_bytes("a", "F32", [1], memoryview(b"\0\0\x80?"))
    w.finish()
    assert json.loads((tmp_path / "v" / "manifest.json").read_text())["format_version"] == 1
    src = tmp_path / "src"
    src.mkdir()
    save_file({"a": torch.ones(3)}, str(src / "model.safetensors"))
    store = Store(tmp_path / "store")
    save_model(store, "org/m", src)
    vdir = store.get("org/m").variant_dir("hf")
    path = vdir / "manifest.json"
    d = json.loads(path.read_text())
    assert (d["format_version"], d["layout"]) == (2, "safetensors")
    os.chmod(path, 0o644)
    d["format_version"] = 1
    path.write_text(json.dumps(d))
    assert load_manifest(vdir).as_files


def test_an_aborted_write_closes_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition closed when the next one began is not closed again by abort(): its fd number may
    belong to a file opened since (a source being read), whose close would mask the real error."""
    w = VariantWriter(tmp_path / "v", "sglang.tp1", partition_target=8)
    w.add_bytes("a", "F32", [4], memoryview(bytes(16)))
    w.add_bytes("b", "F32", [4], memoryview(bytes(16)))  # data_0.bin closed, data_1.bin begun
    closed: list[int] = []
    real_close = os.close

    def close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "close", close)
    w.abort()
    assert len(closed) == 1, closed  # data_1.bin's only
