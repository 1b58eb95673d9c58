"""SGLang commands: patch-sglang."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sllmfs.cli import app
from sllmfs.core.errors import BadInput


@app.command("patch-sglang")
def patch_sglang(
    check: bool = typer.Option(False, "--check", help="Only report whether the patch is applied (exit 1 if not)."),
    revert: bool = typer.Option(False, "--revert", help="Undo the patch."),
    site_packages: Optional[Path] = typer.Option(
        None, "--site-packages", help="Directory holding the sglang package (default: the one Python imports)."),
) -> None:
    """Make `sllm` a built-in load format of the installed SGLang release (optional: the plugin works without it)."""
    from sllmfs.integrations.sglang import patch

    if check and revert:
        raise BadInput("pass --check or --revert, not both")
    root = site_packages.expanduser().absolute() if site_packages else None
    report = patch.check(root) if check else patch.apply(root, reverse=revert)
    for path, state in report.files.items():
        typer.echo(f"{state:12} {report.root / path}")
    version = report.version or "unknown version"
    typer.echo(f"SGLang {version} at {report.root}: patch {report.state}")
    if check and report.state != patch.APPLIED:
        raise typer.Exit(1)
