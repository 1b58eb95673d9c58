"""The variant manifest: what each stored tensor is and where its bytes lie.

Spec: docs/format.md. One JSON file per variant; every manifest carries
``format_version`` and a reader refuses versions it does not know.

Every reader of the store comes through here. ``load_manifest`` is the one
manifest validator: each field's type and range is checked before anything is
built from it, so a tampered manifest is one ``Corrupt`` line naming the model,
the field and the fix, never an exception deep in a reader. ``open_regular``
and ``open_dir`` are how store files are opened: a planted symlink is refused,
never followed, and a FIFO or device is refused before anything waits on it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import stat
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sllmfs.core import dtypes
from sllmfs.core.config import hint_flags
from sllmfs.core.errors import BadInput, Corrupt, FormatVersionError
from sllmfs.store.layout import MODELS, STORE_MARKER, VARIANTS

FORMAT_VERSION = 2  # the newest this sllmfs reads; each layout is written as the oldest version that has it
ALIGNMENT = 4096  # the aligned layout: every tensor starts on a 4 KiB boundary
LAYOUT_ALIGNED = "aligned"  # tensors on `alignment` boundaries in data_N.bin partitions (per-rank variants)
# each partition is one safetensors file of the checkpoint, byte for byte (store/stfiles.py): tensors back
# to back after the file's header, so `alignment` is 1 and a tensor may sit off its element size
LAYOUT_SAFETENSORS = "safetensors"
LAYOUTS = (LAYOUT_ALIGNED, LAYOUT_SAFETENSORS)
# metadata key of a safetensors-layout variant: tied name -> the stored name it is a byte-identical copy of
# (a safetensors file cannot share bytes, so both are stored; loaders share one tensor, as the checkpoint did)
TIED = "tied"
# version 2 brought the safetensors layout: an sllmfs that reads only version 1 refuses it (its clients
# would view a tensor stored off its element size at a shifted offset) and still reads aligned variants
WRITTEN_AS = {LAYOUT_ALIGNED: 1, LAYOUT_SAFETENSORS: 2}
READ_VERSIONS = (1, 2)  # (a version-1 manifest of the safetensors layout: written before the bump, read)
CHUNK_SIZE = 4 << 20  # partitions are checksummed in 4 MiB windows (fill verification)
HUGE_PAGE = 2 << 20  # the memory tier's hugetlb page; ALIGNMENT-sized pages otherwise
PARTITION_TARGET = 4 << 30  # start a new data file past this size (parallel reads, sane files)
CHECKSUM = "xxh3_64"
MANIFEST = "manifest.json"
MAX_JSON = 1 << 30  # far past any manifest we write; a larger (maybe sparse) one is refused unread
MAX_BYTES = 1 << 62  # sizes, offsets, dimensions: past any model, and header + data still fit an off_t
MAX_DIMS = 64
_DIGEST = re.compile(r"[0-9a-f]{16}")  # xxh3_64 as the writer prints it
_TENSOR_FIELDS = {"dtype", "shape", "partition", "offset", "nbytes", "checksum"}
_PARTITION_FIELDS = {"file", "size", "chunks"}
_DIGEST_FIELDS = {"size", "xxh3_64"}
FILE_DIGESTS = "file_digests"  # model.json's and an adapter manifest's field: {name: {size, xxh3_64}}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass
class TensorEntry:
    dtype: str
    shape: list[int]
    partition: int
    offset: int
    nbytes: int
    checksum: str  # xxh3_64 of the tensor's bytes, 16 hex digits


@dataclass
class Partition:
    file: str
    size: int
    chunks: list[str]  # xxh3_64 of each CHUNK_SIZE window of the file (the last may be short)


@dataclass(frozen=True)
class FileDigest:
    """What a metadata file (config.json, tokenizer.json, an adapter's adapter_config.json) was when
    saved: its size and the xxh3_64 of its bytes. Recorded in model.json (the model's files) and in an
    adapter variant's manifest (its own files) under FILE_DIGESTS; every reader checks both."""

    size: int
    xxh3_64: str

    @classmethod
    def of(cls, data: Any) -> FileDigest:
        return cls(len(data), digest(data))


FileDigests = dict[str, FileDigest]  # file name -> what it was when saved


@dataclass
class Manifest:
    variant: str
    tensors: dict[str, TensorEntry]  # in file order
    partitions: list[Partition]
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> stored name
    metadata: dict[str, Any] = field(default_factory=dict)  # source info, safetensors __metadata__
    alignment: int = ALIGNMENT
    chunk_size: int = CHUNK_SIZE
    checksum: str = CHECKSUM
    # an adapter's own files (variants/<key>/files/); None: none, or saved before sllmfs recorded them
    file_digests: FileDigests | None = None
    layout: str = LAYOUT_ALIGNED  # absent from manifests written before the safetensors layout

    @property
    def as_files(self) -> bool:
        """Its partitions are its safetensors files (the mount serves and backs them whole)."""
        return self.layout == LAYOUT_SAFETENSORS

    @cached_property
    def off_element(self) -> bool:
        """A tensor sits off its element size (a safetensors file may): clients older than
        HELLO_OFF_ELEMENT misread it."""
        return any(t.offset % dtypes.by_code(t.dtype).itemsize for t in self.tensors.values())

    @property
    def tied(self) -> dict[str, str]:
        """Tied name -> the name it copies (metadata ``tied``; aliases are the aligned layout's ties)."""
        return dict(self.metadata.get(TIED, {}))

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.partitions)

    def entry(self, name: str) -> TensorEntry:
        return self.tensors[self.aliases.get(name, name)]

    def names(self) -> list[str]:
        """Every tensor name a reader sees, aliases included, in file order."""
        by_target: dict[str, list[str]] = {}
        for alias, target in self.aliases.items():
            by_target.setdefault(target, []).append(alias)
        out: list[str] = []
        for name in self.tensors:
            out.append(name)
            out.extend(by_target.get(name, []))
        return out

    def to_json(self) -> str:
        d = asdict(self)
        if self.file_digests is None:
            del d[FILE_DIGESTS]
        d = {"format": "sllmfs-variant", "format_version": WRITTEN_AS[self.layout], **d}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any, where: str | os.PathLike[str]) -> Manifest:
        """Validate a manifest read from ``where`` (its path); Corrupt names the first bad field."""
        version = d.get("format_version") if isinstance(d, dict) else None
        if not isinstance(d, dict) or d.get("format") != "sllmfs-variant" or type(version) is not int:
            raise corrupt(where, "is not an sllmfs manifest")
        if version not in READ_VERSIONS:
            raise FormatVersionError(
                f"{describe(where)[0]} has format version {version}; this sllmfs reads versions "
                f"{READ_VERSIONS[0]}-{FORMAT_VERSION}: upgrade sllmfs, or save the model again with this one"
            )
        try:
            return _parse(d)
        except _Bad as e:
            raise corrupt(where, str(e)) from None

    def validate(self, where: str) -> None:
        """Check a manifest about to be written exactly as its readers will."""
        try:
            _parse(json.loads(self.to_json()))
        except _Bad as e:
            raise corrupt(where, str(e)) from None


def load_manifest(variant_dir: Path, *, dir_fd: int | None = None) -> Manifest:
    """Read and validate a variant's manifest (through ``dir_fd``, the variant directory held open,
    when given). The data files it names must be regular files where they exist."""
    path = Path(variant_dir) / MANIFEST
    try:
        m = Manifest.from_dict(read_json(path, dir_fd=dir_fd), path)
    except FileNotFoundError:
        raise corrupt(path, "is missing (the variant was not stored whole)") from None
    for p in m.partitions:  # refused here, before a reader opens one or the mount lists the model
        check_regular(Path(variant_dir) / p.file, dir_fd=dir_fd, missing_ok=True)
    return m


# -- validation ------------------------------------------------------------------


def _check_tied(tied: Any, tensors: dict[str, TensorEntry]) -> None:
    """A tied name shares its target's tensor on load: both stored, of one dtype, shape and checksum."""
    def same(name: Any, target: Any) -> bool:
        if not isinstance(target, str):  # (names are JSON keys: text); a list here would be unhashable
            return False
        a, b = tensors.get(name), tensors.get(target)
        return (a is not None and b is not None and name != target and target not in tied
                and (a.dtype, a.shape, a.checksum) == (b.dtype, b.shape, b.checksum))

    if not isinstance(tied, dict) or not all(same(n, t) for n, t in tied.items()):
        raise _Bad(f"metadata.{TIED} must map stored tensors to stored tensors of the same dtype, shape and checksum")


class _Bad(Exception):
    """One failed check of a manifest field: the field and what it must be."""


def _parse(d: dict[str, Any]) -> Manifest:
    alignment = _int(*_need(d, "alignment"), lo=1)
    if alignment & (alignment - 1):
        raise _Bad(f"alignment must be a power of two (got {alignment})")
    chunk_size, _ = _need(d, "chunk_size")
    if type(chunk_size) is not int or chunk_size != CHUNK_SIZE:  # readers check fixed 4 MiB windows
        raise _Bad(f"chunk_size must be {CHUNK_SIZE} (got {_show(chunk_size)})")
    if _need(d, "checksum")[0] != CHECKSUM:
        raise _Bad(f"checksum must be {CHECKSUM!r} (got {_show(d['checksum'])})")
    variant, _ = _need(d, "variant")
    if not _text(variant):
        raise _Bad(f"variant must be a string (got {_show(variant)})")
    parts = [_partition(p, f"partitions[{i}]") for i, p in enumerate(_typed(d, "partitions", list))]
    if len({p.file for p in parts}) < len(parts):
        raise _Bad("partitions name one file twice")
    tensors = {name: _tensor(t, f"tensors[{name!r}]", parts, alignment)
               for name, t in _typed(d, "tensors", dict).items()}
    aliases = _typed(d, "aliases", dict, {})
    for alias, target in aliases.items():
        if not _text(target) or target not in tensors or alias in tensors:
            raise _Bad(f"aliases[{alias!r}] must name a stored tensor (got {_show(target)})")
    if not all(_text(n) and n != "__metadata__" for n in [*tensors, *aliases]):  # names become JSON keys
        raise _Bad("tensor names must be UTF-8 text other than '__metadata__'")
    metadata = _typed(d, "metadata", dict, {})
    if not _plain(metadata, 0):
        raise _Bad("metadata must hold plain JSON values (integers within 64 bits, at most 32 levels deep)")
    _check_tied(metadata.get(TIED, {}), tensors)
    layout = d.get("layout", LAYOUT_ALIGNED)
    if layout not in LAYOUTS:
        raise _Bad(f"layout must be one of {', '.join(LAYOUTS)} (got {_show(layout)})")
    if layout == LAYOUT_SAFETENSORS:
        _check_files(tensors, parts, aliases)
    return Manifest(variant, tensors, parts, dict(aliases), metadata, alignment, CHUNK_SIZE, CHECKSUM,
                    file_digests=parse_file_digests(d), layout=layout)


def _check_files(tensors: dict[str, TensorEntry], parts: list[Partition], aliases: dict[str, str]) -> None:
    """The safetensors layout: each partition a ``*.safetensors`` file, its tensors back to back from
    past its header to its very end (what its own header says too: the writer made both from one plan)."""
    if aliases:
        raise _Bad("aliases cannot be stored in the safetensors layout (a tied name is its own tensor there)")
    ends: dict[int, list[TensorEntry]] = {}
    for t in tensors.values():
        ends.setdefault(t.partition, []).append(t)
    for i, p in enumerate(parts):
        if not p.file.endswith(".safetensors"):
            raise _Bad(f"partitions[{i}].file must be a .safetensors file in the safetensors layout")
        pos = None
        for t in sorted(ends.get(i, []), key=lambda t: (t.offset, t.nbytes)):
            if pos is None:
                if t.offset < 16:  # 8 bytes of length, at least "{}" padded to 8
                    raise _Bad(f"partitions[{i}]: a tensor starts inside the file's header (offset {t.offset})")
            elif t.offset != pos:
                raise _Bad(f"partitions[{i}]: tensors are not back to back at offset {t.offset} "
                           f"(the previous one ends at {pos})")
            pos = t.offset + t.nbytes
        if pos is not None and pos != p.size:
            raise _Bad(f"partitions[{i}]: its tensors end at {pos}, not at its end ({p.size} bytes)")


def parse_file_digests(d: dict[str, Any]) -> FileDigests | None:
    """The FILE_DIGESTS field of model.json or a manifest; None where it is absent (an older sllmfs
    saved it: its files are served unverified, docs/format.md)."""
    if FILE_DIGESTS not in d:
        return None
    raw = d[FILE_DIGESTS]
    if not isinstance(raw, dict):
        raise _Bad(f"{FILE_DIGESTS} must be a JSON object (got {_show(raw)})")
    out: FileDigests = {}
    for name, e in raw.items():
        at = f"{FILE_DIGESTS}[{_show(name)}]"
        if not plain_name(name):
            raise _Bad(f"{at} must be a plain file name (no '/', no leading '.')")
        _exact(e, _DIGEST_FIELDS, at)
        size = _int(*_need(e, "size", at))
        value, label = _need(e, "xxh3_64", at)
        if not isinstance(value, str) or not _DIGEST.fullmatch(value):
            raise _Bad(f"{label} must be 16 lowercase hex digits (got {_show(value)})")
        out[name] = FileDigest(size, value)
    return out


def file_digests_json(digests: FileDigests) -> dict[str, dict[str, Any]]:
    return {name: {"size": d.size, "xxh3_64": d.xxh3_64} for name, d in sorted(digests.items())}


def _tensor(t: Any, at: str, parts: list[Partition], alignment: int) -> TensorEntry:
    _exact(t, _TENSOR_FIELDS, at)
    code, label = _need(t, "dtype", at)
    try:
        dt = dtypes.by_code(code) if isinstance(code, str) else None
    except BadInput:
        dt = None
    if dt is None:
        raise _Bad(f"{label} must be a dtype code sllmfs knows (got {_show(code)})")
    shape, label = _need(t, "shape", at)
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
            not all(type(s) is int and 0 <= s <= MAX_BYTES for s in shape):
        raise _Bad(f"{label} must be a list of at most {MAX_DIMS} non-negative integers (got {_show(shape)})")
    if not parts:
        raise _Bad(f"{at}.partition points into a variant without partitions")
    part = _int(*_need(t, "partition", at), hi=len(parts) - 1)
    offset = _int(*_need(t, "offset", at))
    nbytes = _int(*_need(t, "nbytes", at))
    if nbytes != dtypes.nbytes(dt, shape):
        raise _Bad(f"{at}.nbytes is {nbytes} but shape {_show(shape)} of {code} holds "
                   f"{_show(dtypes.nbytes(dt, shape))} bytes")
    if offset % alignment:
        raise _Bad(f"{at}.offset {offset} is not a multiple of the alignment {alignment}")
    p = parts[part]
    if offset + nbytes > p.size:
        raise _Bad(f"{at} has an impossible place: bytes {offset}..{offset + nbytes} lie past the end of "
                   f"{p.file} ({p.size} bytes)")
    digest, label = _need(t, "checksum", at)
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise _Bad(f"{label} must be 16 lowercase hex digits (got {_show(digest)})")
    return TensorEntry(code, list(shape), part, offset, nbytes, digest)


def _partition(p: Any, at: str) -> Partition:
    _exact(p, _PARTITION_FIELDS, at)
    file, label = _need(p, "file", at)
    if not plain_name(file):
        raise _Bad(f"{label} must be a file name inside the variant's folder (got {_show(file)})")
    size = _int(*_need(p, "size", at))
    chunks, label = _need(p, "chunks", at)
    want = -(-size // CHUNK_SIZE)
    if not isinstance(chunks, list) or len(chunks) != want or \
            not all(isinstance(c, str) and _DIGEST.fullmatch(c) for c in chunks):
        raise _Bad(f"{label} must be {want} xxh3_64 digests, one per 4 MiB of its {size} bytes")
    return Partition(file, size, list(chunks))


def _need(d: dict[str, Any], key: str, at: str = "") -> tuple[Any, str]:
    label = f"{at}.{key}" if at else key
    if key not in d:
        raise _Bad(f"{label} is missing")
    return d[key], label


def _typed(d: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = d.get(key, default) if default is not None else _need(d, key)[0]
    if not isinstance(value, kind):
        raise _Bad(f"{key} must be a JSON {'object' if kind is dict else 'array'} (got {_show(value)})")
    return value


def _exact(d: Any, fields: set[str], at: str) -> None:
    if not isinstance(d, dict):
        raise _Bad(f"{at} must be a JSON object (got {_show(d)})")
    extra = sorted(set(d) - fields)
    if extra:
        raise _Bad(f"{at} has an unknown field {extra[0]!r}")


def _int(value: Any, label: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
    if type(value) is not int or not lo <= value <= hi:  # bool and float are not ints here
        raise _Bad(f"{label} must be an integer from {lo} to {'2**62' if hi == MAX_BYTES else hi} (got {_show(value)})")
    return value


def _text(value: Any) -> bool:
    """A string that encodes (JSON allows lone surrogates; file names, msgpack and headers do not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _plain(value: Any, depth: int) -> bool:
    """What msgpack carries to clients and a safetensors header holds."""
    if isinstance(value, dict):
        return depth < 32 and all(_text(k) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return depth < 32 and all(_plain(v, depth + 1) for v in value)
    if type(value) is int:
        return -(2**63) <= value < 2**64
    return value is None or isinstance(value, (bool, float)) or _text(value)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def plain_name(name: Any) -> bool:
    """A file name that stays inside its folder: no '/', no NUL, no leading '.', at most 255 bytes."""
    return _text(name) and 0 < len(name.encode()) <= 255 and "/" not in name and "\0" not in name \
        and not name.startswith(".")


# -- opening store files -----------------------------------------------------------


def digest(data: Any) -> str:
    """The store's checksum of some bytes, as manifests write it (windows and tensors): xxh3_64, hex."""
    import xxhash

    return hex_digest(xxhash.xxh3_64_intdigest(data))


def hex_digest(value: int) -> str:
    """An xxh3_64 value as manifests write it (store/hashed_read.py's native digests too)."""
    return f"{value:016x}"


def corrupt(path: str | os.PathLike[str], why: str) -> Corrupt:
    """One line for a damaged or tampered store entry: the model (else the path), what is wrong, the fix."""
    where, fix = describe(path)
    return Corrupt(f"{where} {why}; {fix}")


def describe(path: str | os.PathLike[str]) -> tuple[str, str]:
    """How users see a store path ("model 'org/m' [hf]: data_0.bin", else the path) and the fix for it."""
    found = locate(path)
    if found is None:
        return _printable(os.path.abspath(path)), "save the model again"
    root, name, rest = found
    label = f"model {name!r}"
    if rest[:1] == (VARIANTS,) and len(rest) > 1:
        label, rest = f"{label} [{rest[1]}]", rest[2:]
    rm = f"sllmfs rm --model {shlex.quote(name)}{hint_flags(storage_path=str(root))}"
    return _printable(f"{label}: {'/'.join(rest) or 'its directory'}"), f"run `{rm}` and save it again"


def locate(path: str | os.PathLike[str]) -> tuple[Path, str, tuple[str, ...]] | None:
    """A store path as (store root, model name, path parts inside the model's directory); None outside a store."""
    p = Path(os.path.abspath(path))
    if p.parts[1:4] == ("proc", "self", "fd") and len(p.parts) > 4:  # a directory the server pinned by fd
        try:
            p = Path(os.readlink(Path(*p.parts[:5])), *p.parts[5:])
        except OSError:
            pass
    parts = p.parts
    for i in range(len(parts) - 2, 0, -1):  # the innermost models/ of a store (a model may be called models)
        root = Path(*parts[:i])
        if parts[i] == MODELS and (root / STORE_MARKER).is_file():
            return root, unquote(parts[i + 1]), parts[i + 2:]
    return None


def _printable(text: str) -> str:
    """``text`` with newlines, control characters and undecodable bytes escaped: an error stays one line."""
    return text if text.isprintable() else repr(text)[1:-1]


def open_dir(path: str | os.PathLike[str], *, below: Path | None = None, dir_fd: int | None = None) -> int:
    """Open a store directory. Its last component (with ``below``: every component under that trusted
    directory) must be a real directory; a symlink is refused, never followed. With ``dir_fd``,
    ``path``'s parent is that open directory."""
    path = Path(path)
    if below is None:
        return _open_at(path, dir_fd, _DIR_FLAGS, "a directory")
    fd = os.open(below, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    at = Path(below)
    for part in path.relative_to(below).parts:
        at = at / part
        try:
            sub = _open_at(at, fd, _DIR_FLAGS, "a directory")
        finally:
            os.close(fd)
        fd = sub
    return fd


def open_regular(path: str | os.PathLike[str], *, below: Path | None = None, dir_fd: int | None = None,
                 flags: int = 0) -> int:
    """Open a regular file of the store read-only (``below`` and ``dir_fd`` as for ``open_dir``). No
    symlink is followed, and a FIFO or device is refused before anything can wait on it."""
    path = Path(path)
    if below is not None:
        parent = open_dir(path.parent, below=below)
        try:
            fd = _open_at(path, parent, _FILE_FLAGS | flags, "a regular file")
        finally:
            os.close(parent)
    else:
        fd = _open_at(path, dir_fd, _FILE_FLAGS | flags, "a regular file")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise corrupt(path, f"is {_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)  # O_NONBLOCK was for the open only (a FIFO would have waited for a writer)
    return fd


def check_regular(path: Path, *, dir_fd: int | None = None, missing_ok: bool = False) -> None:
    """Without opening it: ``path`` is a regular file (or absent, with ``missing_ok``), else Corrupt."""
    try:
        mode = os.stat(path.name if dir_fd is not None else path, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        if missing_ok:
            return
        raise corrupt(path, "is missing") from None
    if not stat.S_ISREG(mode):
        raise corrupt(path, f"is {_kind(mode)}, not a regular file")


def read_json(path: Path, *, below: Path | None = None, dir_fd: int | None = None) -> Any:
    """A store JSON file (manifest, model record), opened as ``open_regular`` opens and parsed."""
    with open(open_regular(path, below=below, dir_fd=dir_fd), "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_JSON:  # refused unread: a sparse huge file costs no read
            raise corrupt(path, f"is larger than {MAX_JSON} bytes")
        raw = f.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise corrupt(path, f"is larger than {MAX_JSON} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested past what the parser follows
        raise corrupt(path, f"is not valid JSON ({e})") from None


def _open_at(path: Path, dir_fd: int | None, flags: int, want: str) -> int:
    name = path.name if dir_fd is not None else path
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        # ELOOP, ENOTDIR: what O_NOFOLLOW (| O_DIRECTORY) says of a symlink; ENXIO, ENODEV: of a socket or device
        if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.ENODEV):
            raise
        try:
            kind = _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            raise e from None
        raise corrupt(path, f"is {kind}, not {want}") from None


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return what
    return "not a regular file"
