"""Origin commands: push, pull (docs/origin.md)."""

from __future__ import annotations

import time
from typing import Optional

import typer

from sllmfs.cli import app
from sllmfs.cli.progress import byte_bar, human, out
from sllmfs.core import names
from sllmfs.core.config import load_settings
from sllmfs.core.errors import BadInput
from sllmfs.store.store import open_store

EndpointOpt = typer.Option(None, "--endpoint-url", help="S3 endpoint, e.g. http://minio:9000 (default: "
                           "$SLLMFS_ORIGIN_ENDPOINT, then what the AWS SDK reads: $AWS_ENDPOINT_URL, profile).")
ThreadsOpt = typer.Option(16, "--num-thread", help="Parallel transfers (ranged GETs, multipart parts).")
StorageOpt = typer.Option(None, "--storage-path", help="Store directory (default: $SLLMFS_STORAGE_PATH or config).")


def origin_of(url: str, endpoint_url: str | None):  # type: ignore[no-untyped-def]
    from sllmfs.origin.url import parse

    return parse(url, load_settings(origin_endpoint=endpoint_url).origin_endpoint)


def _threads(n: int) -> int:
    if not 1 <= n <= 256:
        raise BadInput(f"--num-thread {n} must be from 1 to 256")
    return n


@app.command(help="Upload a stored model to an S3 origin (resumable: a re-run sends only what is missing).")
def push(
    model: str = typer.Option(..., "--model", help="Model name as stored (see `sllmfs ls`)."),
    to: str = typer.Option(..., "--to", help="Origin, s3://bucket/prefix."),
    endpoint_url: Optional[str] = EndpointOpt,
    num_thread: int = ThreadsOpt,
    storage_path: Optional[str] = StorageOpt,
    force: bool = typer.Option(False, "--force", help="Send every object again, even those the origin has "
                               "(repairs a damaged origin copy)."),
) -> None:
    from sllmfs.origin.push import push_model

    names.check_model_name(model)
    origin = origin_of(to, endpoint_url)
    store = open_store(storage_path)
    t0 = time.perf_counter()
    with byte_bar(f"push {model}", None) as advance:
        result = push_model(store, model, origin, threads=_threads(num_thread), progress=advance,
                            on_total=lambda total: advance(0, total), force=force)
    seconds = time.perf_counter() - t0
    rate = result.bytes_sent / seconds / 1e9 if seconds > 0 else 0.0
    out.print(f"pushed {model} to {origin}: {result.objects} objects, {result.skipped} already there; sent "
              f"{human(result.bytes_sent)} of {human(result.bytes_total)} in {seconds:.2f} s ({rate:.2f} GB/s)")


@app.command(help="Bring a model from an S3 origin into the store: parallel ranged GETs, every byte verified, "
             "committed atomically (a killed pull resumes).")
def pull(
    model: str = typer.Option(..., "--model", help="Model name (as pushed)."),
    from_: str = typer.Option(..., "--from", help="Origin, s3://bucket/prefix."),
    endpoint_url: Optional[str] = EndpointOpt,
    num_thread: int = ThreadsOpt,
    storage_path: Optional[str] = StorageOpt,
    force: bool = typer.Option(False, "--force", help="Replace the model if the store has it."),
) -> None:
    from sllmfs.origin.client import connect
    from sllmfs.origin.pull import plan_pull, run_pull

    names.check_model_name(model)
    origin = origin_of(from_, endpoint_url)
    threads = _threads(num_thread)
    store = open_store(storage_path, write=True)
    if store.has(model) and not force:  # before any transfer; run_pull checks again under the lock
        raise BadInput(f"model {model!r} is already in the store at {store.root}; pass --force to replace it "
                       "with the origin's copy")
    t0 = time.perf_counter()
    client = connect(origin, threads)
    plan = plan_pull(client, origin, model, threads)
    with byte_bar(f"pull {model}", plan.total_bytes) as advance:
        result = run_pull(store, plan, client, force=force, threads=threads, progress=advance)
    seconds = time.perf_counter() - t0
    rate = result.bytes_fetched / seconds / 1e9 if seconds > 0 else 0.0
    resumed = f", {human(result.bytes_resumed)} resumed from an earlier pull" if result.bytes_resumed else ""
    out.print(f"pulled {model} from {origin}: {human(result.bytes_total)} verified{resumed}; fetched "
              f"{human(result.bytes_fetched)} in {seconds:.2f} s ({rate:.2f} GB/s)")
