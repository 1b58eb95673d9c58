"""Find a checkpoint and list its tensors without loading them.

Sources: a local directory or a Hugging Face cache entry (resolved offline),
holding safetensors (single or sharded), PyTorch ``.bin`` files, or a
ServerlessLLM sllm-store directory (``tensor_index.json`` + ``tensor.data_N``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllmfs.core import dtypes
from sllmfs.core.errors import BadInput

WEIGHT_EXTS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot"}
MAX_HEADER = 100 << 20  # safetensors' own limit


@dataclass
class SourceTensor:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    ranges: list[tuple[Path, int, int]] = field(default_factory=list)  # file, offset, nbytes
    load: Callable[[], memoryview] | None = None  # in-memory source (.bin)
    alias_of: str | None = None  # the same bytes as this earlier tensor (tied weights)


@dataclass
class Checkpoint:
    root: Path
    kind: str  # safetensors | bin | sllm-store
    tensors: list[SourceTensor]
    files: list[str]  # metadata files copied verbatim (relative to root)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """What a save writes: a tied name is a tensor of its own in a safetensors file."""
        return sum(t.nbytes for t in self.tensors)


def resolve(model: str, local_path: str | None) -> Path:
    """The directory holding ``model``: ``local_path``, or its offline HF cache entry."""
    if local_path:
        p = Path(local_path).expanduser()
        if not p.is_dir():
            raise BadInput(f"--local-model-path {p} is not a directory; point it at the model's folder")
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise BadInput(
            f"model {model!r} is not in the Hugging Face cache ({_hf_cache()}); "
            "download it first or pass --local-model-path DIR"
        ) from None


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def scan(root: Path) -> Checkpoint:
    if (root / "tensor_index.json").is_file():
        return _scan_sllm_store(root)
    st = _weight_files(root, ".safetensors")
    if st:
        return _scan_safetensors(root, st)
    bins = _weight_files(root, ".bin")
    if bins:
        return _scan_bin(root, bins)
    raise BadInput(
        f"no weights in {root}: expected *.safetensors, pytorch_model*.bin or an sllm-store "
        "tensor_index.json; point --local-model-path at the model's folder"
    )


def _bounds(root: Path) -> Path:
    """Where links under ``root`` may point: the folder itself, or for a Hugging Face cache
    snapshot (``models--org--name/snapshots/<rev>``, whose files link to ``../../blobs``) its repo."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def checked_file(root: Path, path: Path) -> Path:
    """``path`` if it is a regular file inside ``root`` (links allowed only within its bounds): a
    save run as root must never copy /etc/shadow into a world-readable store, nor block on a FIFO."""
    if not path.is_symlink() and not path.exists():
        return path  # the caller reports a missing file in its own words
    target = path.resolve()
    bounds = _bounds(root)
    if target != bounds and bounds not in target.parents:
        raise BadInput(f"{path} links to {target}, outside {root}; copy the file into the folder or remove "
                       "the link, then save again")
    if not target.is_file():
        raise BadInput(f"{path} is not a regular file; remove it from {root} or replace it with the file")
    return path


def metadata_files(root: Path) -> list[str]:
    """Config, tokenizer, chat template, ...: every top-level non-weight file."""
    out = []
    for p in sorted(root.iterdir()):
        name = p.name
        if name.startswith(".") or p.is_dir():
            continue
        checked_file(root, p)
        if p.suffix in WEIGHT_EXTS or name.endswith(".index.json") or name == "tensor_index.json":
            continue
        if name.startswith("tensor.data"):
            continue
        out.append(name)
    return out


def _weight_files(root: Path, ext: str) -> list[Path]:
    index = sorted(root.glob(f"*{ext}.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_bytes())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{index[0]} is not a valid weight index ({e})") from None
        files = sorted(set(weight_map.values()))
        if any(not isinstance(f, str) or "/" in f or f in ("", ".", "..") for f in files):
            raise BadInput(f"{index[0]} names a weight file outside {root}; fix the index")
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise BadInput(f"{index[0]} names {missing[0]}, which is not in {root}; the download is incomplete")
        return [checked_file(root, root / f) for f in files]
    files = sorted(root.glob(f"*{ext}"))
    if ext == ".bin":
        files = [f for f in files if f.name.startswith(("pytorch_model", "adapter_model", "model"))]
    return [checked_file(root, f) for f in files]


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, data start) after checking every entry lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadInput(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise BadInput(f"{path} has a corrupt safetensors header (length {n}); re-download the file")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise BadInput(f"{path} has a corrupt safetensors header (not JSON); re-download the file") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path} has a corrupt safetensors header (not an object)")
    data_len = size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = dtypes.by_code(e["dtype"], f"{path} tensor {name!r}")
            shape = [int(s) for s in e["shape"]]
            begin, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{path}: tensor {name!r} has a corrupt header entry; re-download the file") from None
        if not (0 <= begin <= end <= data_len) or end - begin != dtypes.nbytes(dt, shape):
            raise BadInput(f"{path}: tensor {name!r} lies outside the file or has the wrong size; "
                           "the file is truncated or corrupt")
    return header, 8 + n


def _scan_safetensors(root: Path, files: list[Path]) -> Checkpoint:
    tensors: list[SourceTensor] = []
    meta: dict[str, str] = {}
    seen: dict[tuple[Path, int, int], str] = {}
    for path in files:
        header, start = read_safetensors_header(path)
        meta.update(header.pop("__metadata__", None) or {})
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            b, end = e["data_offsets"]
            key = (path, b, end)
            t = SourceTensor(name, dtypes.by_code(e["dtype"]).code, list(e["shape"]), end - b,
                             ranges=[(path, start + b, end - b)])
            if end > b and key in seen:
                t.alias_of = seen[key]
            seen.setdefault(key, name)
            tensors.append(t)
    return Checkpoint(root, "safetensors", tensors, metadata_files(root), meta)


def _scan_bin(root: Path, files: list[Path]) -> Checkpoint:
    import torch

    tensors: list[SourceTensor] = []
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], str], str] = {}
    for path in files:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many kinds here
            raise BadInput(f"{path} is not a loadable PyTorch checkpoint ({type(e).__name__})") from None
        if not isinstance(sd, dict):
            raise BadInput(f"{path} holds a {type(sd).__name__}, not a state dict")
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                continue
            dt = dtypes.from_torch(t.dtype)
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), dt.code)
            st = SourceTensor(name, dt.code, list(t.shape), t.numel() * dt.itemsize,
                              load=_tensor_bytes(t))
            if st.nbytes and key in seen:
                st.alias_of = seen[key]
            seen.setdefault(key, name)
            tensors.append(st)
    return Checkpoint(root, "bin", tensors, metadata_files(root))


def _tensor_bytes(t: Any) -> Callable[[], memoryview]:
    def load() -> memoryview:
        c = t.contiguous()
        if c.numel() == 0:
            return memoryview(b"")
        return memoryview(c.view(-1).view(__import__("torch").uint8).numpy())

    return load


def _scan_sllm_store(root: Path) -> Checkpoint:
    try:
        index = json.loads(checked_file(root, root / "tensor_index.json").read_bytes())
    except ValueError as e:
        raise BadInput(f"{root / 'tensor_index.json'} is not valid JSON ({e})") from None
    parts: list[tuple[Path, int, int]] = []  # path, global start, size
    pos = 0
    for i in range(1 << 16):
        p = root / f"tensor.data_{i}"
        if not p.is_file():
            break
        size = checked_file(root, p).stat().st_size
        parts.append((p, pos, size))
        pos += size
    if not parts:
        raise BadInput(f"{root} has tensor_index.json but no tensor.data_0; the sllm-store model is incomplete")
    tensors = []
    for name, entry in sorted(index.items(), key=lambda kv: kv[1][0]):
        try:
            offset, _storage_size, shape, stride, torch_dtype = entry[:5]
            dt = dtypes.from_torch(torch_dtype)
        except (ValueError, TypeError):
            raise BadInput(f"{root / 'tensor_index.json'}: entry {name!r} is malformed") from None
        shape = [int(s) for s in shape]
        if list(stride) != _contiguous_strides(shape) and 0 not in shape:
            raise BadInput(f"sllm-store tensor {name!r} is not contiguous (stride {stride}); re-save it contiguous")
        nbytes = dtypes.nbytes(dt, shape)
        tensors.append(SourceTensor(name, dt.code, shape, nbytes, ranges=_split(parts, int(offset), nbytes, name)))
    return Checkpoint(root, "sllm-store", tensors, metadata_files(root))


def _contiguous_strides(shape: list[int]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


def _split(parts: list[tuple[Path, int, int]], offset: int, nbytes: int, name: str) -> list[tuple[Path, int, int]]:
    """Global sllm-store offsets run across tensor.data_N files laid end to end."""
    out = []
    for path, start, size in parts:
        if nbytes == 0:
            break
        if start <= offset < start + size:
            take = min(nbytes, start + size - offset)
            out.append((path, offset - start, take))
            offset += take
            nbytes -= take
    if nbytes:
        raise BadInput(f"sllm-store tensor {name!r} lies past the end of its tensor.data files")
    return out


def fd_ranges(ranges: list[tuple[Path, int, int]], fds: dict[Path, int]) -> list[tuple[int, int, int]]:
    out = []
    for path, off, n in ranges:
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        out.append((fds[path], off, n))
    return out
