"""Deployment artefacts: the systemd unit, the Kubernetes manifests, sd_notify, doctor."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from sllmfs.ops import systemd
from tests.support.cli import sllmfs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    sllmfs("install-service", "--root", str(tmp_path))
    unit = tmp_path / "etc/systemd/system/sllmfs.service"
    assert "Type=notify" in unit.read_text()
    assert (tmp_path / "etc/sllmfs/sllmfs.env").is_file()
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    pytest.importorskip("kubernetes_validate")
    manifests = sorted((ROOT / "sidecar" / "k8s").glob("*.yaml"))
    assert len(manifests) >= 2
    exe = shutil.which("kubernetes-validate")
    assert exe, "kubernetes-validate is installed with the [test] extra"
    proc = subprocess.run([exe, "-k", "1.30.0", "--strict", *map(str, manifests)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") + proc.stderr.count("passed") >= 3


def test_notify_sends_datagrams_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("READY=1", "STATUS=serving 2 models")
        assert srv.recv(4096) == b"READY=1\nSTATUS=serving 2 models"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_doctor_reports_each_check(tmp_path: Path) -> None:
    proc = sllmfs("doctor", "--storage-path", str(tmp_path / "s"), "--socket", str(tmp_path / "x.sock"), check=False)
    for name in ("/dev/fuse", "fusermount3", "hugetlb pages", "GPU", "store", "socket"):
        assert name in proc.stdout + proc.stderr


def test_the_unit_travels_in_wheels_and_is_found_under_the_prefix(tmp_path: Path) -> None:
    """A wheel install has no source tree: the unit and env file go to <prefix>/share/sllmfs."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert sorted(data["share/sllmfs"]) == ["systemd/sllmfs.env", "systemd/sllmfs.service"]
    assert all((ROOT / f).is_file() for f in data["share/sllmfs"])
    share = tmp_path / "share" / "sllmfs"
    share.mkdir(parents=True)
    shutil.copy(ROOT / "systemd" / "sllmfs.service", share)
    assert systemd.unit_template([tmp_path / "no-source-tree", share]) == share / "sllmfs.service"
    with pytest.raises(systemd.BadInput, match="cannot find sllmfs.service in .*no-source-tree"):
        systemd.unit_template([tmp_path / "no-source-tree"])
