"""The ``sllmfs`` command. Each group of commands lives in its own module."""

from __future__ import annotations

import sys

import typer

from sllmfs.errors import SllmfsError

app = typer.Typer(
    name="sllmfs",
    help="Model cache for fast LLM cold starts: store, sidecar, FUSE view and GPU loaders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Registration happens on import; keep this list in help order.
from sllmfs.cli import store_cmds  # noqa: E402,F401,I001
from sllmfs.cli import sidecar_cmds  # noqa: E402,F401
from sllmfs.cli import ops_cmds  # noqa: E402,F401
from sllmfs.cli import sglang_cmds  # noqa: E402,F401
from sllmfs.cli import demo_cmd  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except SllmfsError as e:
        print(f"sllmfs: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sllmfs: interrupted", file=sys.stderr)
        sys.exit(130)
