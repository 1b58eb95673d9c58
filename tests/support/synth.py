"""A checkpoint of every odd dtype and shape safetensors allows, and the check that a file holds it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sllmfs.store.format import MANIFEST, Manifest
from sllmfs.store.save import save_model
from sllmfs.store.sources import fd_ranges, scan
from sllmfs.store.store import Store
from sllmfs.store.writer import VariantWriter


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


def save_aligned(store: Store, name: str, src: Path) -> Manifest:
    """``src`` stored the way sllmfs stored an hf variant before the safetensors layout (tensors 4 KiB-
    aligned in data_N.bin, a tied name an alias): stores made then hold these, and the mount
    synthesizes their safetensors files."""
    save_model(store, name, src)
    vdir = store.get(name).variant_dir("hf")
    for f in vdir.iterdir():
        if f.name.endswith(".safetensors") or f.name == MANIFEST:
            f.unlink()
    ckpt = scan(src)
    w = VariantWriter(vdir, "hf")
    w.metadata = {"source_kind": ckpt.kind, "safetensors_metadata": ckpt.metadata}
    fds: dict[Path, int] = {}
    try:
        for t in ckpt.tensors:
            if t.alias_of is not None:
                w.add_alias(t.name, t.alias_of)
            elif t.load is not None:
                w.add_bytes(t.name, t.dtype, t.shape, t.load())
            else:
                w.add_from_file(t.name, t.dtype, t.shape, fd_ranges(t.ranges, fds))
        return w.finish()
    finally:
        for fd in fds.values():
            os.close(fd)
