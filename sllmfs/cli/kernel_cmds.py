"""Kernel cache commands: kernels ls, rm, push, pull."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from sllmfs.cli import app
from sllmfs.cli.origin_cmds import EndpointOpt, origin_of
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
    origin: Optional[str] = typer.Option(None, "--origin", help="List the entries an S3 origin holds instead."),
    endpoint_url: Optional[str] = EndpointOpt,
) -> None:
    from sllmfs.store import kernels

    if origin is not None:
        from sllmfs.origin import kernels as origin_kernels
        from sllmfs.origin.client import connect

        o = origin_of(origin, endpoint_url)
        client = connect(o, 2)
        good = [e for k in origin_kernels.remote_keys(client, o) if (e := origin_kernels.remote_entry(client, o, k))]
        bad: list[tuple[str, str]] = []
    else:
        good, bad = kernels.entries(open_store(storage_path))
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


@kernels_app.command("push", help="Upload kernel cache entries to an S3 origin (only files it lacks; the "
                     "origin's entry becomes the union).")
def push(
    keys: Optional[list[str]] = typer.Argument(None, help="Entries to push (default: every entry in the store)."),
    to: str = typer.Option(..., "--to", help="Origin, s3://bucket/prefix."),
    endpoint_url: Optional[str] = EndpointOpt,
    storage_path: Optional[str] = StorageOpt,
) -> None:
    from sllmfs.origin import kernels as origin_kernels
    from sllmfs.origin.client import connect
    from sllmfs.store import kernels

    store = open_store(storage_path)
    o = origin_of(to, endpoint_url)
    client = connect(o, 2)
    for key in keys or [e.key for e in kernels.entries(store)[0]]:
        n = origin_kernels.push(store, kernels.check_key(key), o, client)
        out.print(f"pushed kernel cache {key} to {o}: {n} files sent")


@kernels_app.command("pull", help="Bring kernel cache entries from an S3 origin into the store (every file "
                     "checked; merged into the local entry).")
def pull(
    keys: list[str] = typer.Argument(..., help="Entries to pull (see `sllmfs kernels ls --origin URL`)."),
    origin: str = typer.Option(..., "--from", help="Origin, s3://bucket/prefix."),
    endpoint_url: Optional[str] = EndpointOpt,
    storage_path: Optional[str] = StorageOpt,
) -> None:
    from sllmfs.origin import kernels as origin_kernels
    from sllmfs.origin.client import connect
    from sllmfs.store import kernels

    store = open_store(storage_path, write=True)
    o = origin_of(origin, endpoint_url)
    client = connect(o, 2)
    for key in keys:
        n = origin_kernels.pull(store, kernels.check_key(key), o, client)
        out.print(f"pulled kernel cache {key} from {o}: {n} files")
