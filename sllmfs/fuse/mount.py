"""Mount point lifecycle: clean a stale mount, refuse a busy one, mount, unmount.

A sidecar killed with SIGKILL leaves its FUSE mount behind with no server;
every access then fails with ENOTCONN. The next start lazily unmounts it.
A live mount or a non-empty folder is someone else's: we refuse, in one line.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

from sllmfs.core.errors import BadInput

log = logging.getLogger(__name__)

READ_AHEAD_KB = 16 << 10  # kernel read-ahead on the mount (default 128 KiB): large, parallel requests
# Past congestion_threshold queued requests the kernel drops FUSE read-ahead (default 9 of 12),
# which with 1 MiB requests and a 16 MiB window throws most of it away.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
FUSECTL = "/sys/fs/fuse/connections"
_STALE = (errno.ENOTCONN, errno.ECONNABORTED)


def mount_entry(mountpoint: Path) -> tuple[str, str] | None:
    """(major:minor, fstype) of what is mounted exactly at ``mountpoint``, from /proc (no stat)."""
    target = os.fsencode(os.path.abspath(mountpoint))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == target:
                found = (fields[2].decode(), right.split()[0].decode())  # the last mount on top wins
    return found


def _unescape(path: bytes) -> bytes:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    for code in (b"\\040", b"\\011", b"\\012", b"\\134"):
        path = path.replace(code, bytes([int(code[1:], 8)]))
    return path


def lazy_unmount(mountpoint: Path) -> None:
    tools = [["fusermount3", "-u", "-z"], ["fusermount", "-u", "-z"], ["umount", "-l"]]
    errors = []
    for tool in tools:
        if shutil.which(tool[0]) is None:
            continue
        r = subprocess.run([*tool, str(mountpoint)], capture_output=True, text=True)
        if r.returncode == 0:
            return
        errors.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"{tool[0]} failed")
    raise BadInput(f"stale mount at {mountpoint} could not be removed ({'; '.join(errors) or 'no unmount tool'}); "
                   f"run `umount -l {mountpoint}` as root")


def prepare(mountpoint: Path) -> None:
    """Make ``mountpoint`` an empty directory we may mount on, or raise a one-line error."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        try:
            mountpoint.mkdir(parents=True)
        except OSError as e:
            raise BadInput(f"cannot create mount point {mountpoint}: {e.strerror}") from None
        return
    except OSError as e:
        if e.errno not in _STALE:
            raise BadInput(f"cannot use mount point {mountpoint}: {e.strerror}") from None
        log.warning("removing stale mount at %s (its server died)", mountpoint)
        lazy_unmount(mountpoint)
        os.stat(mountpoint)
    entry = mount_entry(mountpoint)
    if entry is not None:
        raise BadInput(f"mount point {mountpoint} is busy: a {entry[1]} filesystem is mounted there; "
                       "stop whatever serves it (another sllmfs?) or pick another --mount")
    if not mountpoint.is_dir():
        raise BadInput(f"mount point {mountpoint} is not a directory; pick another --mount")
    with os.scandir(mountpoint) as it:
        if next(it, None) is not None:
            raise BadInput(f"mount point {mountpoint} is not empty; empty it or pick another --mount")


def tune(mountpoint: Path) -> None:
    """Large, deep read-ahead on our mount so sequential readers are fast (root only; best effort).

    Call after the kernel's INIT is answered: INIT resets both settings.
    """
    entry = mount_entry(mountpoint)
    if entry is None:
        return
    _write(f"/sys/class/bdi/{entry[0]}/read_ahead_kb", READ_AHEAD_KB)
    if not os.path.ismount(FUSECTL) and os.geteuid() == 0:
        # systemd mounts fusectl on most hosts; containers often lack it
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    conn = f"{FUSECTL}/{entry[0].split(':')[1]}"
    if os.path.isdir(conn):
        _write(f"{conn}/max_background", MAX_BACKGROUND)
        _write(f"{conn}/congestion_threshold", CONGESTION_THRESHOLD)
    else:
        log.info("no %s (fusectl not mounted): read-ahead stays shallow, sequential reads are slower", conn)


def _write(path: str, value: int) -> None:
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as e:
        log.info("cannot set %s (%s); sequential reads will be slower", path, e.strerror)
