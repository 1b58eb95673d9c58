"""Operations: doctor, install-service."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sllmfs.cli import app
from sllmfs.cli.progress import out
from sllmfs.core.config import load_settings


@app.command(help="Check FUSE, big pages, the GPU, the store and the socket; say what to fix.")
def doctor(
    storage_path: Optional[str] = typer.Option(None, "--storage-path", help="Store to check (default: as `start`)."),
    socket: Optional[str] = typer.Option(None, "--socket", help="Sidecar socket to check (default: as `start`)."),
) -> None:
    from sllmfs.ops.doctor import run_checks

    checks = run_checks(load_settings(storage_path=storage_path, socket=socket))
    table = Table("check", "", "detail", "fix")
    marks = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
    for c in checks:
        table.add_row(c.name, marks[c.level], c.detail, c.fix)
    out.print(table)
    if any(c.level == "fail" for c in checks):
        raise typer.Exit(1)


@app.command("install-service", help="Install systemd/sllmfs.service (and /etc/sllmfs/sllmfs.env if absent).")
def install_service(
    root: str = typer.Option("/", "--root", help="Install under this root (packaging, tests)."),
    print_only: bool = typer.Option(False, "--print", help="Print the unit instead of installing it."),
) -> None:
    from sllmfs.ops import systemd

    if print_only:
        print(systemd.render_unit(), end="")
        return
    for path in systemd.install(Path(root)):
        out.print(f"wrote {path}")
    if root == "/":
        out.print("next: systemctl enable --now sllmfs")
