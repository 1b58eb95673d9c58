"""Sidecar commands: placeholders until the sidecar lands (issue 3)."""

from __future__ import annotations

import typer

from sllmfs.cli import app
from sllmfs.errors import SllmfsError


def _not_yet(what: str) -> None:
    raise SllmfsError(f"`sllmfs {what}` needs the sidecar, which this build does not have yet")


@app.command(help="Run the sidecar: store, memory tier, socket and FUSE mount.")
def start() -> None:
    _not_yet("start")


@app.command(help="Show tiers, models, leases and hit rates.")
def status() -> None:
    _not_yet("status")


@app.command(help="Keep a model in memory: never evicted.")
def pin(model: str = typer.Option(..., "--model")) -> None:
    _not_yet("pin")


@app.command(help="Let a pinned model be evicted again.")
def unpin(model: str = typer.Option(..., "--model")) -> None:
    _not_yet("unpin")


@app.command(help="Drop a model from the memory tier.")
def evict(model: str = typer.Option(..., "--model")) -> None:
    _not_yet("evict")


@app.command(help="Load a model through the sidecar (warm the memory tier, or into a framework).")
def load(model: str = typer.Option(..., "--model")) -> None:
    _not_yet("load")
