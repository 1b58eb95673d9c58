"""Scratch directories that go on every way out, Ctrl-C included.

``tempfile.TemporaryDirectory`` leaves its directory behind when the signal lands between its mkdir and
the finalizer it registers after, or while its cleanup (which detaches that finalizer first) is removing
it; a load interrupted right as it starts hits the first (tests/cli/test_fresh_machine.py).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A new private directory under the temp dir, removed at the end whatever ends it. Its name is
    known before it is made, so an interrupt at any point of the making finds it in ``finally``."""
    while True:
        path = Path(tempfile.gettempdir()) / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)  # an interrupt after the mkdir itself
            raise
    try:
        yield path
    finally:
        interrupted = False
        while True:
            try:
                shutil.rmtree(path, ignore_errors=True)
                break
            except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM) mid-removal: finish removing first
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt
