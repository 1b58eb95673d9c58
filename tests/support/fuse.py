"""The FUSE view as a real process (``python -m sllmfs.fuse.main``), and mount checks for cleanups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

SOCKET = "/run/sllmfs/test.sock"
# which driver the runner's mount uses: auto (ours as root: passthrough), kernel, pyfuse3; the
# suite runs with auto, and once with TEST_FUSE_DRIVER=pyfuse3 for the non-root path
DRIVER = os.environ.get("TEST_FUSE_DRIVER", "auto")


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.absolute())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


class Runner:
    """``python -m sllmfs.fuse.main`` as a real process; always unmounted at the end."""

    def __init__(self, store: Path, mountpoint: Path):
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen([sys.executable, "-m", "sllmfs.fuse.main", str(store), str(mountpoint),
                                      "--socket", SOCKET, "--driver", DRIVER],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once the mount answers
        if "serving" not in line:
            self.proc.wait(timeout=30)
            raise AssertionError(f"runner did not mount: {line} {self.proc.stderr.read() if self.proc.stderr else ''}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if sig != signal.SIGKILL:
                force_unmount(self.mountpoint)
