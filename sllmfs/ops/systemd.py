"""systemd: readiness notification (sd_notify) and installing the unit file.

sd_notify is a datagram to ``$NOTIFY_SOCKET``; writing it here avoids a
dependency for ten lines of protocol.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

from sllmfs.core.errors import BadInput

UNIT_NAME = "sllmfs.service"


def notify(*lines: str) -> bool:
    """Send ``READY=1`` / ``STATUS=...`` / ``STOPPING=1`` to systemd; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto("\n".join(lines).encode(), addr)
        except OSError:
            return False
    return True


def unit_dirs() -> list[Path]:
    """Where the unit may be: the source tree (editable installs), then <prefix>/share/sllmfs (wheels)."""
    return [Path(__file__).resolve().parents[2] / "systemd", Path(sys.prefix) / "share" / "sllmfs",
            Path(sysconfig.get_path("data")) / "share" / "sllmfs"]


def unit_template(dirs: list[Path] | None = None) -> Path:
    """The unit shipped with this sllmfs (``systemd/sllmfs.service`` in the source tree)."""
    dirs = unit_dirs() if dirs is None else dirs
    for d in dirs:
        if (d / UNIT_NAME).is_file():
            return d / UNIT_NAME
    raise BadInput(f"cannot find {UNIT_NAME} in {', '.join(map(str, dirs))}; reinstall sllmfs "
                   "or copy systemd/sllmfs.service from its source by hand")


def render_unit(sllmfs_bin: str | None = None) -> str:
    """The unit with ExecStart pointing at this installation's ``sllmfs``."""
    exe = sllmfs_bin or shutil.which("sllmfs")
    if not exe:
        raise BadInput("the `sllmfs` command is not on PATH; install the package first (pip install sllmfs)")
    return unit_template().read_text().replace("/usr/local/bin/sllmfs", exe)


def install(root: Path = Path("/"), *, reload: bool = True) -> list[Path]:
    """Place the unit (and an example settings file if none exists); return what was written."""
    unit_dir = root / "etc/systemd/system"
    env_file = root / "etc/sllmfs/sllmfs.env"
    written = []
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        (unit_dir / UNIT_NAME).write_text(render_unit())
        written.append(unit_dir / UNIT_NAME)
        if not env_file.exists():
            env_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(unit_template().with_name("sllmfs.env"), env_file)
            written.append(env_file)
    except PermissionError as e:
        raise BadInput(f"cannot write {e.filename}: run `sllmfs install-service` as root") from None
    if reload and root == Path("/") and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], check=False, capture_output=True)
    return written
