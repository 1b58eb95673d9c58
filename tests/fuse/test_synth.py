"""Synthesized safetensors layouts, materialized to real files and read back by safetensors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sllmfs.fuse.synth import Extent, SynthFile, layout
from sllmfs.store.format import load_manifest
from sllmfs.store.save import save_model
from sllmfs.store.stfiles import SHARD_LIMIT
from sllmfs.store.store import Store
from tests.support.synth import assert_odd_file, odd_checkpoint, odd_tensors, raw, save_aligned


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
    """A variant in the aligned layout: the mount synthesizes its files."""
    store = Store(tmp_path / "store")
    save_aligned(store, "odd/dtypes", odd_checkpoint(tmp_path / "odd"))
    return store, store.get("odd/dtypes").variant_dir("hf")


@pytest.mark.parametrize("source", ["safetensors", "bin"])
def test_a_variant_stored_as_its_files_is_the_synthesized_file_byte_for_byte(tmp_path: Path, bin_dir: Path,
                                                                              source: str) -> None:
    """The safetensors layout stores what the mount synthesized from the aligned one, and the mount
    serves each such file as one whole partition."""
    src = odd_checkpoint(tmp_path / "odd") if source == "safetensors" else bin_dir
    old, new = Store(tmp_path / "old"), Store(tmp_path / "new")
    save_aligned(old, "m", src)
    m = save_model(new, "m", src, partition_target=40_000 if source == "safetensors" else SHARD_LIMIT)
    old_dir, new_dir = old.get("m").variant_dir("hf"), new.get("m").variant_dir("hf")
    old_m = load_manifest(old_dir)
    assert m.as_files and not old_m.as_files and m.alignment == 1
    lay = layout(m)
    synth = layout(old_m, shard_limit=40_000 if source == "safetensors" else SHARD_LIMIT)
    assert [f.name for f in lay.files] == [p.file for p in m.partitions] == [f.name for f in synth.files]
    assert lay.index == synth.index and (lay.index is None) == (len(lay.files) == 1)
    for i, f in enumerate(lay.files):
        assert f.extents == [Extent(0, m.partitions[i].size, i, 0)] and f.header == b""
        dest = tmp_path / f"synth-{f.name}"
        materialize(synth.files[i], old_dir, [p.file for p in old_m.partitions], dest)
        if not old_m.aliases:  # the same order: the same bytes
            assert (new_dir / f.name).read_bytes() == dest.read_bytes(), f.name
        with safe_open(new_dir / f.name, "pt") as a, safe_open(dest, "pt") as b:  # a tied name: its own tensor,
            assert sorted(a.keys()) == sorted(b.keys())  # in the source's order (the synthesized file: by
            for k in a.keys():  # its target)
                assert raw(a.get_tensor(k)) == raw(b.get_tensor(k)), k


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
    save_aligned(store, "tied", bin_dir)
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
