"""The systemd unit's ExecStart run as systemd would, metrics, and bad starts under systemd."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sllmfs.ops import systemd
from tests.support.cli import one_line_error


def _exec_start(tmp_path: Path) -> list[str]:
    """ExecStart of the installed unit, with its paths moved under tmp_path."""
    line = next(x for x in systemd.render_unit().splitlines() if x.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart="))
    moves = {"/var/lib/sllmfs": str(tmp_path / "store"), "/run/sllmfs/sllmfs.sock": str(tmp_path / "run/s.sock"),
             "/mnt/sllm": str(tmp_path / "mnt")}
    return [moves.get(a, a) for a in argv]


def _recv_until(sock: socket.socket, want: bytes, timeout: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096)
        except TimeoutError:
            break
        got.append(msg)
        if want in msg:
            return got
    raise AssertionError(f"no {want!r} from the sidecar; got {got}")


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


@pytest.mark.skipif(not Path("/dev/fuse").exists() or os.geteuid() != 0, reason="needs root and /dev/fuse")
def test_execstart_notifies_ready_and_unmounts_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    argv = _exec_start(tmp_path)
    argv[0] = str(Path(sys.executable).with_name("sllmfs")) if not os.path.exists(argv[0]) else argv[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            msgs = _recv_until(notify, b"READY=1", 60)
            assert any(b"STATUS=serving" in m for m in msgs)
            assert _mounted(tmp_path / "mnt")
            proc.send_signal(signal.SIGTERM)
            assert b"STOPPING=1" in b"".join(_recv_until(notify, b"STOPPING=1", 20))
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not _mounted(tmp_path / "mnt")
    assert not (tmp_path / "run/s.sock").exists()


def test_metrics_endpoint_serves_tier_counters(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(tmp_path / "store"),
                             "--socket", str(sock), "--metrics-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.2)
        for name in ("sllmfs_tier_bytes", "sllmfs_leases", "sllmfs_hits_total", "sllmfs_bytes_filled_total",
                     "sllmfs_client_errors_total", "sllmfs_models"):
            assert name in body, name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unwritable_store_is_one_line_and_a_status_for_systemd(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        proc = subprocess.run([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(blocker / "store"),
                               "--socket", str(tmp_path / "s.sock")], capture_output=True, text=True,
                              env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}, timeout=60)
        assert "cannot use storage path" in one_line_error(proc)
        notify.settimeout(5)
        assert notify.recv(4096).startswith(b"STATUS=failed to start: cannot use storage path")


@pytest.mark.skipif(not Path("/dev/fuse").exists() or os.geteuid() != 0, reason="needs root and /dev/fuse")
def test_mount_point_in_use_is_one_line(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "busy").write_text("x")
        proc = subprocess.run([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(tmp_path / "store"),
                               "--socket", str(tmp_path / "s.sock"), "--mount", str(mnt)],
                              capture_output=True, text=True, timeout=60)
        err = one_line_error(proc)
        assert str(mnt) in err
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
