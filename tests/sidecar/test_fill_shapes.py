"""A fill read in another shape (O_DIRECT, small reads) lands the same verified bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sllmfs.core.errors import Corrupt
from tests.support.sidecar import make_model, sidecar, wait_log

# Past the page cache: 12 KiB reads within 4 MiB pieces (the Python reads), or the native queued reads
# (512 KiB, 4 in flight, a window per call) within 8 MiB pieces; tensors of 100,096 bytes leave every
# partition file with a tail that is not a whole 4 KiB block (read buffered).
SHAPES = {"python-12KiB": ("--fill-direct", "--fill-read-size", "12KiB", "--chunk-size", "4MiB"),
          "native-queued": ("--fill-direct", "--chunk-size", "8MiB")}


@pytest.mark.parametrize("shape", SHAPES)
def test_direct_small_reads_fill_the_same_bytes(tmp_path: Path, shape: str) -> None:
    with sidecar(tmp_path, *SHAPES[shape]) as sd, sd.connect() as c:
        # 160 tensors of 100,096 bytes: 16 MB, four windows and two pieces past the first
        want = make_model(sd.store, "org/m", tensors=160, nbytes=100_096, seed=3)
        sizes = [p.stat().st_size for p in (sd.store / "models").rglob("*.safetensors")]
        assert any(n % 4096 for n in sizes) and max(sizes) > 3 * (4 << 20)
        with c.acquire("org/m") as lease:
            got = {k: v.tobytes() for k, v in lease.numpy().items()}
        assert got == want
        wait_log(sd, "filled model=org/m")
        assert f"direct_native={shape == 'native-queued'}" in sd.log()


@pytest.mark.parametrize("where", ["tail", "block"])
@pytest.mark.parametrize("shape", SHAPES)
def test_direct_fill_still_refuses_a_flipped_byte(tmp_path: Path, shape: str, where: str) -> None:
    with sidecar(tmp_path, *SHAPES[shape]) as sd, sd.connect() as c:
        make_model(sd.store, "org/bad", tensors=8, nbytes=100_096, seed=4)
        data = next((sd.store / "models").rglob("model.safetensors"))
        size = data.stat().st_size
        at = size - 3 if where == "tail" else 4096 * 3 + 11  # the buffered tail past the last whole block, or not
        with open(data, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x40]))
        lease = c.acquire("org/bad")
        with pytest.raises(Corrupt, match="org/bad"):
            lease.wait(timeout=30)
        lease.release()


def test_a_read_size_off_the_block_is_one_line(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(tmp_path / "s"),
                        "--socket", str(tmp_path / "s.sock"), "--fill-read-size", "1000"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].count("--fill-read-size 1000 must be a multiple of 4 KiB") == 1


@pytest.mark.parametrize("flag,value,says", [
    ("--copy-read-depth", "0", "must be 1-64"),
    ("--copy-read-overlap", "1000", "must be a multiple of 4 KiB, at most 1 MiB")])
def test_a_bad_copy_read_shape_is_one_line(tmp_path: Path, flag: str, value: str, says: str) -> None:
    p = subprocess.run([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(tmp_path / "s"),
                        "--socket", str(tmp_path / "s.sock"), flag, value], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].count(f"{flag} {value} {says}") == 1, p.stderr
