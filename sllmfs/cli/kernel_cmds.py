"""Kernel cache commands: kernels ls, kernels rm."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from sllmfs.cli import app
from sllmfs.cli.progress import console, out
from sllmfs.store.store import open_store

kernels_app = typer.Typer(help="Kernel caches an engine compiled, kept in the store for the next start on any node.",
                          no_args_is_help=True)
app.add_typer(kernels_app, name="kernels")
StorageOpt = typer.Option(None, "--storage-path", help="Store directory (default: $SLLMFS_STORAGE_PATH or config).")


@kernels_app.command("ls", help="One line per entry: key, files, bytes, last update.")
def ls(
    storage_path: Optional[str] = StorageOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output, with what each key stands for."),
) -> None:
    from sllmfs.store import kernels

    store = open_store(storage_path)
    good, bad = kernels.entries(store)
    for name, why in bad:  # one line each; the good entries are listed all the same
        console.print(f"sllmfs: warning: kernel cache {name} is not shown: {why}")
    if as_json:
        print(json.dumps([{"key": e.key, "files": len(e.files), "bytes": e.size, "created": e.created,
                           "updated": e.updated, "facts": e.facts} for e in good], indent=1))
        return
    for e in good:
        updated = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(e.updated))
        print(f"{e.key}\t{len(e.files)}\t{e.size}\t{updated}")  # tab-separated: for cut and awk


@kernels_app.command("rm", help="Remove an entry (the next start compiles its kernels again and stores them).")
def rm(
    key: str = typer.Argument(..., help="The entry's key, as `sllmfs kernels ls` prints it."),
    storage_path: Optional[str] = StorageOpt,
) -> None:
    from sllmfs.store import kernels

    store = open_store(storage_path, write=True)
    kernels.remove(store, key)
    out.print(f"removed kernel cache {key}")
