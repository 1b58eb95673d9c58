"""The ``sllmfs`` command. Each group of commands lives in its own module."""

from __future__ import annotations

import signal
import sys
from typing import Optional

import typer

from sllmfs.core.errors import SllmfsError, user_error

app = typer.Typer(
    name="sllmfs",
    help="Model cache for fast LLM cold starts: store, sidecar, FUSE view and GPU loaders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"sllmfs {version('sllmfs')}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")) -> None:
    pass


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temp dirs, leases, children


# Registration happens on import; keep this list in help order.
from sllmfs.cli import store_cmds  # noqa: E402,F401,I001
from sllmfs.cli import origin_cmds  # noqa: E402,F401
from sllmfs.cli import sidecar_cmds  # noqa: E402,F401
from sllmfs.cli import ops_cmds  # noqa: E402,F401
from sllmfs.cli import kernel_cmds  # noqa: E402,F401
from sllmfs.cli import sglang_cmds  # noqa: E402,F401
from sllmfs.cli import demo_cmd  # noqa: E402,F401


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except SllmfsError as e:
        print(f"sllmfs: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside a command (typer answers one inside: exit 130, no line)
        print("sllmfs: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as e:
        if e.code == 130:  # Ctrl-C or SIGTERM in a command: say so, the exit status alone is easy to miss
            print("sllmfs: interrupted", file=sys.stderr)
        raise
    except BaseExceptionGroup as group:  # an error raised inside a trio nursery
        err = user_error(group)
        if err is None:
            raise
        print(f"sllmfs: error: {err}", file=sys.stderr)
        sys.exit(2)
