"""Run the real ``sllmfs`` command in a subprocess, as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def sllmfs(*args: str, store: Path | None = None, check: bool = True, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    if store is not None:
        full_env["SLLMFS_STORAGE_PATH"] = str(store)
    proc = subprocess.run([sys.executable, "-m", "sllmfs", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"sllmfs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """A failed command must print exactly one line, no traceback, and exit non-zero."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sllmfs: error:"), proc.stderr
    return lines[0]
