"""Synthesized safetensors layouts, materialized to real files and read back by safetensors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sllmfs.fuse.synth import SynthFile, layout
from sllmfs.store.format import load_manifest
from sllmfs.store.save import save_model
from sllmfs.store.store import Store


def odd_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g)
    return {
        "f8_e4m3": f.to(torch.float8_e4m3fn),
        "f8_e5m2": f.to(torch.float8_e5m2),
        "bool": torch.rand(7, generator=g) > 0.5,
        "scalar": torch.tensor(3.25, dtype=torch.float32),
        "empty": torch.empty(0, 4, dtype=torch.float16),
        "bf16": f.to(torch.bfloat16),
        "f64": f.to(torch.float64),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "i16": torch.randint(-1000, 1000, (4, 2), dtype=torch.int16, generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (5,), dtype=torch.int32, generator=g),
        "i64": torch.randint(-(2**62), 2**62, (3,), dtype=torch.int64, generator=g),
        "u8": torch.randint(0, 255, (6,), dtype=torch.uint8, generator=g),
        "u16": torch.randint(0, 60000, (6,), dtype=torch.int32, generator=g).to(torch.uint16),
        "u32": torch.randint(0, 2**31, (6,), dtype=torch.int64, generator=g).to(torch.uint32),
        "u64": torch.randint(0, 2**62, (6,), dtype=torch.int64, generator=g).to(torch.uint64),
        "big": torch.randn(300, 70, generator=g),  # spans several 4 KiB pages
    }


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def odd_checkpoint(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file(odd_tensors(), out / "model.safetensors", metadata={"format": "pt", "note": "odd"})
    (out / "config.json").write_text('{"model_type": "odd"}\n')
    return out


def materialize(f: SynthFile, variant_dir: Path, partitions: list[str], dest: Path, step: int = 4093) -> None:
    """Write the synthesized file by resolving odd-sized reads, as the FUSE view does."""
    fds = [os.open(variant_dir / p, os.O_RDONLY) for p in partitions]
    try:
        with open(dest, "wb") as out:
            for off in range(0, f.size, step):
                for p in f.resolve(off, step):
                    if p.partition < 0:
                        out.write(f.header[p.source_offset:p.source_offset + p.length])
                    else:
                        out.write(os.pread(fds[p.partition], p.length, p.source_offset))
    finally:
        for fd in fds:
            os.close(fd)
    assert dest.stat().st_size == f.size


@pytest.fixture
def odd_store(tmp_path: Path) -> tuple[Store, Path]:
    store = Store(tmp_path / "store")
    save_model(store, "odd/dtypes", odd_checkpoint(tmp_path / "odd"))
    return store, store.get("odd/dtypes").variant_dir("hf")


def test_single_file_layout_has_every_tensor_byte_identical(odd_store: tuple[Store, Path], tmp_path: Path) -> None:
    _, vdir = odd_store
    m = load_manifest(vdir)
    lay = layout(m)
    assert [f.name for f in lay.files] == ["model.safetensors"] and lay.index is None
    f = lay.files[0]
    (n,) = struct.unpack("<Q", f.header[:8])
    assert (8 + n) % 8 == 0 and len(f.header) == 8 + n
    dest = tmp_path / "model.safetensors"
    materialize(f, vdir, [p.file for p in m.partitions], dest)
    assert_odd_file(dest)


def test_sharded_layout_with_index_loads_every_tensor(odd_store: tuple[Store, Path], tmp_path: Path) -> None:
    _, vdir = odd_store
    m = load_manifest(vdir)
    lay = layout(m, shard_limit=40_000)  # "big" alone is 84 000 bytes: it gets a shard of its own
    assert len(lay.files) >= 2 and lay.index is not None
    count = len(lay.files)
    assert [f.name for f in lay.files] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads(lay.index)
    want = odd_tensors()
    assert index["metadata"]["total_size"] == sum(len(raw(t)) for t in want.values())
    assert sorted(index["weight_map"]) == sorted(want)
    # tensors stay in manifest order across shards
    assert [t for f in lay.files for t in f.tensors] == m.names()
    for f in lay.files:
        materialize(f, vdir, [p.file for p in m.partitions], tmp_path / f.name)
    for name, t in want.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as sf:
            assert raw(sf.get_tensor(name)) == raw(t), name


def test_aliases_are_entries_over_the_same_stored_bytes(tmp_path: Path, bin_dir: Path) -> None:
    store = Store(tmp_path / "store")
    save_model(store, "tied", bin_dir)
    vdir = store.get("tied").variant_dir("hf")
    m = load_manifest(vdir)
    assert m.aliases, "the tied .bin checkpoint should store its tied weight once"
    lay = layout(m)
    dest = tmp_path / "model.safetensors"
    materialize(lay.files[0], vdir, [p.file for p in m.partitions], dest, step=1 << 20)
    sd = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    with safe_open(dest, "pt") as sf:
        assert sorted(sf.keys()) == sorted(sd)
        for name, t in sd.items():
            assert raw(sf.get_tensor(name)) == raw(t), name


def test_resolve_covers_reads_across_extent_edges(odd_store: tuple[Store, Path]) -> None:
    _, vdir = odd_store
    f = layout(load_manifest(vdir)).files[0]
    for off in [0, 7, 8, len(f.header) - 1, len(f.header), f.size - 3]:
        for size in [1, 5, 4096, 1 << 20]:
            pieces = f.resolve(off, size)
            assert sum(p.length for p in pieces) == min(size, f.size - off)
    assert f.resolve(f.size, 10) == [] and f.resolve(f.size + 5, 10) == []


def assert_odd_file(path: Path) -> None:
    """``path`` is a safetensors file holding exactly odd_tensors(), byte for byte, with its metadata."""
    want = odd_tensors()
    with safe_open(path, "pt") as sf:
        assert sf.metadata() == {"format": "pt", "note": "odd"}
        assert sorted(sf.keys()) == sorted(want)
        for name, t in want.items():
            got = sf.get_tensor(name)
            assert got.dtype == t.dtype and list(got.shape) == list(t.shape), name
            assert raw(got) == raw(t), name
