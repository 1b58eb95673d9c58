"""Store commands: save, import-sllm-store, ls, rm, verify."""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from sllmfs.cli import app
from sllmfs.cli.progress import byte_bar, console, human, out
from sllmfs.core import names
from sllmfs.core.config import hint_flags
from sllmfs.core.errors import BadInput, Corrupt, NotFound
from sllmfs.store import sources
from sllmfs.store.metafiles import read_meta_files, unverified_line
from sllmfs.store.reader import VariantReader, verify_variant
from sllmfs.store.save import record_file_digests, save_adapter, save_model
from sllmfs.store.store import ModelInfo, open_store

StorageOpt = typer.Option(None, "--storage-path", help="Store directory (default: $SLLMFS_STORAGE_PATH or config).")


@app.command(help="Convert a checkpoint (local dir or HF cache, offline) into the store.")
def save(
    model: str = typer.Option(..., "--model", help="Model name, kept as given (org/name)."),
    local_model_path: Optional[str] = typer.Option(
        None, "--local-model-path", help="Checkpoint folder; default: the HF cache entry."),
    backend: str = typer.Option("transformers", "--backend",
                                help="transformers (any framework, any TP size) | sglang | vllm (also its "
                                     "per-rank state)"),
    adapter_name: Optional[str] = typer.Option(None, "--adapter-name", help="Save a LoRA adapter beside the model."),
    adapter_path: Optional[str] = typer.Option(None, "--adapter-path", help="The adapter's folder."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", min=1,
                                             help="With --backend sglang or vllm: the TP size whose per-rank state "
                                                  "to store."),
    storage_path: Optional[str] = StorageOpt,
    force: bool = typer.Option(False, "--force", help="Replace what is stored under this name."),
) -> None:
    names.check_model_name(model)
    if backend not in ("transformers", "sglang", "vllm"):
        raise BadInput(f"--backend {backend!r} is not one of transformers, sglang, vllm")
    if tensor_parallel_size != 1 and backend == "transformers":
        raise BadInput(f"--tensor-parallel-size {tensor_parallel_size} needs --backend sglang or vllm "
                       "(per-rank state); the transformers variant serves every TP size: drop the flag")
    if (adapter_name is None) != (adapter_path is None):
        raise BadInput("--adapter-name and --adapter-path go together; give both or neither")
    if backend == "vllm":
        from sllmfs.integrations.vllm.save import require_vllm

        require_vllm()
    store = open_store(storage_path, write=True)
    if adapter_name and adapter_path:
        src = Path(adapter_path).expanduser()
        if not src.is_dir():
            raise BadInput(f"--adapter-path {src} is not a directory")
        t0 = time.perf_counter()
        with byte_bar(f"save adapter {adapter_name}", None) as advance:
            m = save_adapter(store, model, adapter_name, src, force=force, progress=advance,
                             on_scan=_total_into(advance))
        _report(f"{model} + adapter {adapter_name}", m.total_bytes, time.perf_counter() - t0)
        return
    if backend == "sglang":
        _save_sglang(model, local_model_path, tensor_parallel_size, store, force)
        return
    if backend == "vllm":  # runs vLLM (one GPU per rank) with --load-format sllm and synchronous write-back
        from sllmfs.integrations.vllm.save import save_vllm

        save_vllm(store, model, local_model_path, tensor_parallel_size, force=force)
        return
    src = sources.resolve(model, local_model_path)
    t0 = time.perf_counter()
    with byte_bar(f"save {model}", None) as advance:
        m = save_model(store, model, src, force=force, progress=advance, on_scan=_total_into(advance))
    _report(model, m.total_bytes, time.perf_counter() - t0)


def _save_sglang(model: str, local_model_path: str | None, tp: int, store, force: bool) -> None:  # type: ignore[no-untyped-def]
    try:
        from sllmfs.integrations.sglang.save import save_sglang
    except ImportError:
        raise BadInput(
            "--backend sglang runs SGLang on a GPU per rank to build its per-rank state; "
            "this build has no SGLang support yet: save with --backend transformers (SGLang "
            "loads that any-TP variant and writes its per-rank state back on first load)"
        ) from None
    save_sglang(store, model, local_model_path, tp, force=force)


def _total_into(advance: Callable[..., None]) -> Callable[[sources.Checkpoint], None]:
    """The bar learns its total from the save's own scan: the checkpoint is read once."""
    return lambda ckpt: advance(0, total=ckpt.total_bytes)


def _report(what: str, nbytes: int, seconds: float) -> None:  # the save summary is data: stdout
    rate = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    out.print(f"saved {what}: {human(nbytes)} in {seconds:.2f} s ({rate:.2f} GB/s)")


def _resave_command(info, storage_path: str | None) -> str:  # type: ignore[no-untyped-def]
    """The save that stores ``info`` again, with the flags the user needs to paste it as it is."""
    cmd = f"sllmfs save --model {shlex.quote(info.name)} --force"
    source = info.source.get("path")
    cmd += f" --local-model-path {shlex.quote(source)}" if source else " --local-model-path <checkpoint>"
    return cmd + hint_flags(storage_path=storage_path)


@app.command("import-sllm-store",
             help="Import a ServerlessLLM sllm-store model folder (tensor.data_N + tensor_index.json).")
def import_sllm_store(
    directory: str = typer.Argument(..., help="The sllm-store model folder."),
    model: Optional[str] = typer.Option(None, "--model", help="Name in sllmfs (default: the folder's name)."),
    storage_path: Optional[str] = StorageOpt,
    force: bool = typer.Option(False, "--force", help="Replace what is stored under this name."),
) -> None:
    src = Path(directory).expanduser()
    if not (src / "tensor_index.json").is_file():
        raise BadInput(f"{src} has no tensor_index.json; it is not an sllm-store model folder")
    name = model or src.name
    store = open_store(storage_path, write=True)
    t0 = time.perf_counter()
    with byte_bar(f"import {name}", None) as advance:
        m = save_model(store, name, src, force=force, progress=advance, on_scan=_total_into(advance))
    _report(name, m.total_bytes, time.perf_counter() - t0)


@app.command("ls", help="List stored models and their variants.")
def ls(
    storage_path: Optional[str] = StorageOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    store = open_store(storage_path)
    rows: list[dict[str, Any]] = []
    models, bad = store.listing()
    for dirname, why in bad:  # one line each; the good models are listed all the same
        console.print(f"sllmfs: warning: {store.models_dir / dirname} is not shown: {why}")
    for info in models:
        rows.append({"name": info.name, "variants": info.variants, "bytes": info.bytes_on_disk(),
                     "created": info.created})
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        out.print(f"no models in {store.root}")
        _ls_kernels(store)
        return
    from rich.table import Table

    table = Table("model", "variants", "size", "saved")
    for r in rows:
        table.add_row(r["name"], ", ".join(r["variants"]), human(r["bytes"]),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])))
    out.print(table)
    _ls_kernels(store)


def _ls_kernels(store) -> None:  # type: ignore[no-untyped-def]
    """The kernel caches kept beside the models (`sllmfs kernels ls` has the details)."""
    from rich.table import Table

    from sllmfs.store import kernels

    good, _bad = kernels.entries(store)
    if not good:
        return
    table = Table("kernel cache", "files", "size", "updated")
    for e in good:
        updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.updated))
        table.add_row(e.key, str(len(e.files)), human(e.size), updated)
    out.print(table)


@app.command(help="Remove a model (all its variants), one framework variant, or a kernel cache from the store.")
def rm(
    model: Optional[str] = typer.Option(None, "--model", help="Model name as stored (see `sllmfs ls`)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Only this framework variant, e.g. a stale "
                                          "sglang.tp… state (the next start writes it again)."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help="Instead of a model: this kernel cache "
                                          "(a key from `sllmfs ls`; the next start compiles and stores it again)."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask."),
    storage_path: Optional[str] = StorageOpt,
) -> None:
    if (model is None) == (kernels is None) or (kernels is not None and variant is not None):
        raise BadInput("rm needs either --model NAME [--variant KEY] or --kernels KEY; see `sllmfs ls`")
    store = open_store(storage_path, write=True)
    if kernels is not None:
        from sllmfs.store import kernels as kernel_store

        kernel_store.remove(store, kernels)
        out.print(f"removed kernel cache {kernels}")
        return
    assert model is not None
    what = f"{model} [{variant}]" if variant else model
    try:
        info = store.get(model)
        size = human(info.manifest(variant).total_bytes if variant and variant in info.variants
                      else info.bytes_on_disk())
    except Corrupt:  # a damaged model must still go: that is the fix its error message names
        if variant:
            raise
        size = "damaged"
    if not yes and not typer.confirm(f"remove {what} ({size})?"):
        raise typer.Exit(1)
    if variant:
        store.remove_variant(model, variant)
    else:
        store.remove(model)
    out.print(f"removed {what}; a running sidecar frees its memory copy as soon as no client holds it")


@app.command(help="Re-read every stored byte (tensors and metadata files) and check it against its checksum.")
def verify(
    model: str = typer.Option(..., "--model", help="Model name as stored (see `sllmfs ls`)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Only this variant (default: all)."),
    repair: bool = typer.Option(False, "--repair", help="First record checksums for metadata files saved by an "
                                "older sllmfs, from the files as they are now (saving again from the source is "
                                "safer when you have it)."),
    storage_path: Optional[str] = StorageOpt,
) -> None:
    store = open_store(storage_path, write=repair)
    if repair:
        added = record_file_digests(store, model)
        console.print(f"sllmfs: recorded checksums for {', '.join(added)} of {model}" if added
                      else f"sllmfs: {model} already has checksums for every metadata file; nothing to repair")
    info = store.get(model)
    damaged = _verify_metadata(info, variant, store.root)
    for key in [variant] if variant else info.variants:
        m = info.manifest(key)
        with VariantReader(info.variant_dir(key), m) as reader:
            t0 = time.perf_counter()
            with byte_bar(f"verify {model} [{key}]", m.total_bytes) as advance:
                bad = verify_variant(reader, advance)
            if bad:
                raise Corrupt(f"model {model!r} variant {key!r}: {bad.describe()}; "
                              f"run `{_resave_command(info, storage_path)}` to store it again")
        out.print(f"ok {model} [{key}]: {len(m.tensors)} tensors, {human(m.total_bytes)} "
                      f"in {time.perf_counter() - t0:.2f} s")
    if damaged:
        raise Corrupt(f"model {model!r}: {damaged} metadata file(s) damaged (named above); "
                      f"run `{_resave_command(info, storage_path)}` to store it again")


def _verify_metadata(info: ModelInfo, variant: str | None, root: Path) -> int:
    """Check the model's metadata files (and each adapter's own) against their recorded digests: one
    line per damaged file on stderr, ``ok``/``unverified`` on stdout; returns how many are damaged."""
    owners: list[str | None] = [None] if variant is None or not variant.startswith(names.ADAPTER_PREFIX) else []
    owners += [k for k in ([variant] if variant else info.variants)
               if k is not None and k.startswith(names.ADAPTER_PREFIX)]
    damaged = 0
    for owner in owners:
        label = f"{info.name} [{owner}] files" if owner else f"{info.name} files"
        try:
            meta = info.meta_files(owner)
        except Corrupt:  # name every damaged file, not just the first
            damaged += _each_file(info, owner)
            continue
        if meta.verified:
            out.print(f"ok {label}: {len(meta.data)} metadata files, {human(sum(map(len, meta.data.values())))}")
        else:
            out.print(f"unverified {label}: {len(meta.data)} metadata files carry no checksums")
            console.print(f"sllmfs: {unverified_line(info.name, owner, root)}")
    return damaged


def _each_file(info: ModelInfo, owner: str | None) -> int:
    vdir = info.variant_dir(owner) if owner else None
    try:
        rels = info.files if owner is None else sorted(os.listdir(info.variant_files_dir(owner)))
    except OSError:
        rels = []
    bad = 0
    for rel in rels:
        try:
            read_meta_files(info.path, below=info.path.parent, variant=owner, only=rel)
        except (Corrupt, NotFound, OSError) as e:
            console.print(f"sllmfs: {e}")
            bad += 1
    if not bad and vdir is not None:  # the adapter's record itself (a file too many, or one missing)
        try:
            info.meta_files(owner)
        except Corrupt as e:
            console.print(f"sllmfs: {e}")
            bad += 1
    return bad
