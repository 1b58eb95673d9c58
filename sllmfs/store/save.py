"""``sllmfs save``: convert a checkpoint into the store, atomically."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from sllmfs.core import names
from sllmfs.core.errors import BadInput, SllmfsError
from sllmfs.store.format import MANIFEST, TIED, FileDigests, Manifest, plain_name
from sllmfs.store.layout import model_files, model_variant, model_variants, variant_files
from sllmfs.store.metafiles import record_files, write_model_json
from sllmfs.store.sources import Checkpoint, fd_ranges, scan
from sllmfs.store.stfiles import SHARD_LIMIT, TensorSpec, header_metadata, plan
from sllmfs.store.store import Store
from sllmfs.store.writer import VariantWriter


def save_model(store: Store, name: str, source: Path, *, force: bool = False,
               progress: Callable[[int], None] | None = None,
               on_scan: Callable[[Checkpoint], None] | None = None,
               partition_target: int = SHARD_LIMIT) -> Manifest:
    """Store ``source`` as model ``name`` with its ``hf`` variant, as safetensors files of at most
    ``partition_target`` bytes of tensors (a larger tensor alone). ``on_scan`` hears of the checkpoint
    once it is scanned, before any byte is copied (a progress bar learns its total there).

    Replacing a model (``force``) keeps its LoRA adapters (they are the user's, saved on their
    own) and drops its framework variants (post-processed from the old weights: stale)."""
    names.check_model_name(name)
    with store.writing(name):
        if store.has(name) and not force:
            raise BadInput(f"model {name!r} is already in the store; pass --force to replace it")
        ckpt = scan(source)
        if on_scan:
            on_scan(ckpt)
        with store.staging() as work, _disk_errors(store):
            model_dir = work / "model"
            model_files(model_dir).mkdir(parents=True)
            for rel in ckpt.files:
                _copy_file(source / rel, model_files(model_dir) / rel)
            manifest = write_variant(ckpt, model_variant(model_dir, names.HF_VARIANT), names.HF_VARIANT, progress,
                                     partition_target)
            # digests of the copies as written (read back), so a copy that went wrong is never recorded good
            write_model_json(model_dir, name, record_files(model_files(model_dir), ckpt.files),
                             {"path": str(source), "kind": ckpt.kind})
            if store.has(name):
                _keep_adapters(store, name, model_variants(model_dir))
            store.commit_model(model_dir, name, force=force)
    return manifest


def _keep_adapters(store: Store, name: str, variants_dir: Path) -> None:
    """Hard-link the stored model's adapters into its replacement (same filesystem: no copy). A
    damaged model is replaced whole: what cannot be read of it is not kept."""
    try:
        old = store.get(name)
    except SllmfsError as e:
        print(f"sllmfs: replacing damaged model {name!r} ({e}); none of its adapters are kept", file=sys.stderr)
        return
    for key in old.variants:
        if not key.startswith(names.ADAPTER_PREFIX):
            continue
        src = old.variant_dir(key)
        shutil.copytree(src, variants_dir / key, copy_function=_link_or_copy)


def save_adapter(store: Store, base: str, adapter_name: str, source: Path, *, force: bool = False,
                 progress: Callable[[int], None] | None = None,
                 on_scan: Callable[[Checkpoint], None] | None = None) -> Manifest:
    """Store a LoRA adapter beside its base model as variant ``lora.<name>`` (``on_scan`` as for
    ``save_model``)."""
    key = names.adapter_variant(adapter_name)
    if not (source / "adapter_config.json").is_file():
        raise BadInput(f"--adapter-path {source} has no adapter_config.json; point it at a PEFT adapter folder")
    with store.writing(base):
        info = store.get(base)
        if key in info.variants and not force:
            raise BadInput(f"model {base!r} already has adapter {adapter_name!r}; pass --force to replace it")
        ckpt = scan(source)
        if on_scan:
            on_scan(ckpt)
        with store.staging() as work, _disk_errors(store):
            vdir = work / key
            variant_files(vdir).mkdir(parents=True)
            for rel in ckpt.files:
                _copy_file(source / rel, variant_files(vdir) / rel)
            # the manifest records the adapter's own files: it is written last, after them
            manifest = write_variant(ckpt, vdir, key, progress, stem="adapter_model",
                                     file_digests=record_files(variant_files(vdir), ckpt.files))
            store.commit_variant(vdir, base, key, force=force)
    return manifest


def record_file_digests(store: Store, name: str) -> list[str]:
    """``sllmfs verify --repair``: give a model saved by an older sllmfs the metadata file digests it
    lacks (model.json's, each adapter manifest's), recorded from the files as they are now. Like a save,
    the model is rebuilt in a work dir (every other file hard-linked: no copy, and the variants keep
    their identities, so nothing resident is dropped) and swapped in by one exchange. Returns what got
    digests: "files" and/or adapter keys; [] when there was nothing to do."""
    with store.writing(name):
        info = store.get(name)
        adapters = [k for k in info.variants if k.startswith(names.ADAPTER_PREFIX)
                    and info.manifest(k).file_digests is None and os.path.lexists(info.variant_files_dir(k))]
        todo = (["files"] if info.file_digests is None else []) + adapters
        if not todo:
            return []
        with store.staging() as work, _disk_errors(store):
            model_dir = work / "model"
            shutil.copytree(info.path, model_dir, symlinks=True, copy_function=_link_or_copy)
            if info.file_digests is None:
                write_model_json(model_dir, name, record_files(model_files(model_dir), info.files), info.source,
                                 created=info.created)
            for key in adapters:
                vdir = model_variant(model_dir, key)
                manifest = info.manifest(key)
                files = sorted(f for f in os.listdir(variant_files(vdir)) if plain_name(f))
                manifest.file_digests = record_files(variant_files(vdir), files)
                manifest.validate(str(vdir))
                (vdir / MANIFEST).unlink()  # a hard link to the live manifest: never written through
                (vdir / MANIFEST).write_text(manifest.to_json())
                os.chmod(vdir / MANIFEST, 0o640)
            store.commit_model(model_dir, name, force=True)
    return todo


def _copy_file(src: Path, dst: Path) -> None:
    """A metadata file into the store: owner and group only, whatever the source's mode or the umask."""
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o640)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_variant(ckpt: Checkpoint, out_dir: Path, variant: str,
                  progress: Callable[[int], None] | None = None, partition_target: int = SHARD_LIMIT,
                  file_digests: FileDigests | None = None, stem: str = "model") -> Manifest:
    """The checkpoint's tensors as the safetensors files ``<stem>*.safetensors`` the mount shows (the
    store's files are the checkpoint: the memory tier's copy of one backs the mount's file)."""
    files = plan([TensorSpec(t.name, t.dtype, t.shape, t.nbytes) for t in ckpt.tensors],
                 header_metadata(ckpt.metadata), stem=stem, shard_limit=partition_target)
    writer = VariantWriter(out_dir, variant, progress=progress, files=files)
    writer.metadata = {"source_kind": ckpt.kind, "safetensors_metadata": ckpt.metadata}
    tied = {t.name: t.alias_of for t in ckpt.tensors if t.alias_of is not None}
    if tied:  # each stored in its file; a loader shares them again
        writer.metadata[TIED] = tied
    writer.file_digests = file_digests
    by_name = {t.name: t for t in ckpt.tensors}
    fds: dict[Path, int] = {}
    try:
        for t in ckpt.tensors:
            src = by_name[t.alias_of] if t.alias_of is not None else t  # a tied name: its own copy in the file
            if src.load is not None:
                writer.add_bytes(t.name, t.dtype, t.shape, src.load())
            else:
                writer.add_from_file(t.name, t.dtype, t.shape, fd_ranges(src.ranges, fds),
                                     where=str(src.ranges[0][0]) if src.ranges else "")
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        for fd in fds.values():
            os.close(fd)


class _disk_errors:
    """Turn a full disk into one line; the staging directory is removed on the way out."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BadInput(f"disk full under {self.store.root}: the save was rolled back and nothing was "
                           "stored; free space or pick another --storage-path") from None
