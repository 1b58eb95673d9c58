"""The passthrough backing copy: both ways of writing the memfd give the synthesized file, sealed."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from sllmfs.core.pages import shmem_thp, thp_file_counts
from sllmfs.fuse import backing
from sllmfs.fuse.synth import Extent, SynthFile


def _synth() -> tuple[SynthFile, list[memoryview], bytes]:
    """A header and extents from three partitions, out of order, some longer than a copy piece."""
    rng = os.urandom
    parts = [memoryview(bytearray(rng(n))) for n in (50_000, 12_345, 70_001)]
    header = rng(777)
    extents, want, at = [Extent(0, len(header), -1, 0)], [header], len(header)
    for part, src, n in ((2, 1, 60_000), (0, 0, 50_000), (1, 345, 12_000), (2, 0, 1)):
        extents.append(Extent(at, n, part, src))
        want.append(bytes(parts[part][src:src + n]))
        at += n
    return SynthFile("model.safetensors", at, header, extents), parts, b"".join(want)


@pytest.mark.parametrize("mapped", [False, True])
def test_the_backing_holds_the_file_byte_for_byte_and_is_sealed(mapped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backing, "COPY_PIECE", 4096)  # many pieces per extent: every offset inside one is used
    synth, parts, want = _synth()
    fd = backing.build(synth, parts, mapped=mapped)
    try:
        assert os.fstat(fd).st_size == synth.size
        assert os.pread(fd, synth.size + 1, 0) == want
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & backing.SEALS == backing.SEALS
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


def test_an_empty_file_is_built_either_way() -> None:
    synth = SynthFile("empty.safetensors", 0, b"", [])
    for mapped in (False, True):
        fd = backing.build(synth, [], mapped=mapped)
        assert os.fstat(fd).st_size == 0
        os.close(fd)


def test_a_failed_mapped_copy_leaves_no_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that fails mid-way closes its memfd and unmaps it while the error is still held."""
    synth, parts, _ = _synth()
    broken = SynthFile(synth.name, synth.size, synth.header,
                       [*synth.extents[:-1], Extent(synth.size - 1, 2, 2, 0)])  # runs past the file's end
    before = _maps()
    with pytest.raises(ValueError) as failed:
        backing.build(broken, parts, mapped=True)
    assert failed.value is not None and _maps() == before  # the traceback alive, the mapping gone


def _maps() -> int:
    return sum("sllmfs:model.safetensors" in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.parametrize(("mode", "size", "on"), [
    ("always within_size advise [never] deny force", "always [inherit] within_size advise never", False),
    ("always within_size advise never [deny] force", None, False),
    ("always within_size [advise] never deny force", "always [inherit] within_size advise never", True),
    ("always within_size [advise] never deny force", "always inherit within_size advise [never]", False),
    ("always within_size advise never deny [force]", None, True),
    ("[always] within_size advise never deny force", "always inherit [within_size] advise never", True),
    (None, None, False),
])
def test_shmem_thp_reads_the_global_and_the_2mib_settings(tmp_path: Path, mode: str | None, size: str | None,
                                                         on: bool) -> None:
    files = []
    for name, text in (("global", mode), ("2m", size)):
        f = tmp_path / name
        if text is not None:
            f.write_text(text + "\n")
        files.append(str(f))
    assert shmem_thp(*files) is on


def test_thp_file_counts_reads_vmstat(tmp_path: Path) -> None:
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("nr_free_pages 10\nthp_file_alloc 19962\nthp_file_fallback 3\nthp_file_fallback_charge 7\n")
    assert thp_file_counts(str(vmstat)) == (19962, 3)
    assert thp_file_counts(str(tmp_path / "absent")) == (0, 0)
