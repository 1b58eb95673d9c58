"""sllmfs.client.client against a real sidecar: zero-copy views, readiness, sharing between processes."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sllmfs.client.client as sc
from sllmfs.core.errors import NotFound
from sllmfs.protocol import wire
from sllmfs.store.reader import VariantReader
from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.sidecar import make_model, raw_hello, sidecar


def _map_range(m: mmap.mmap) -> tuple[int, int]:
    addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
    return addr, addr + len(m)


def test_tensors_are_views_into_the_mapped_segments(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        expected = make_model(sd.store, "org/m", tensors=5)
        with sd.connect() as c, c.acquire("org/m") as lease:
            tensors = lease.tensors(timeout=30)
            ranges = [_map_range(m) for m in lease.maps]
            assert set(tensors) == set(expected)
            for name, t in tensors.items():
                start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
                part = lease.entries[name].partition
                assert ranges[part][0] <= start and end <= ranges[part][1], name  # inside the mapping: no copy
                assert t.numpy().tobytes() == expected[name]
            for name, a in lease.numpy().items():
                assert ranges[lease.entries[name].partition][0] <= a.ctypes.data < ranges[0][1]
                assert a.tobytes() == expected[name] and not a.flags.writeable
            assert all(isinstance(b, memoryview) and b.readonly for b in lease.buffers())


def test_every_dtype_and_tied_names_come_back_exactly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    sd_in = {
        "bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "fp8": torch.randn(64, generator=g).to(torch.float8_e4m3fn),
        "flag": torch.rand(9, generator=g) > 0.5,
        "i64": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    save_file(sd_in, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "test"}))
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "dt", src)
        with sd.connect() as c, c.acquire("dt") as lease:
            out = lease.tensors(timeout=30)
            for name, t in sd_in.items():
                assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
                assert out[name].reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist()
            assert lease.numpy()["bf16"].dtype == np.uint16  # numpy lacks bf16: raw bits


def test_tied_model_aliases(tmp_path: Path, qwen_tied_dir: Path) -> None:
    with sidecar(tmp_path) as sd:
        m = save_model(Store(sd.store), "qwen", qwen_tied_dir)
        with sd.connect() as c, c.acquire("qwen") as lease:
            out = lease.tensors(timeout=30)
            assert set(out) == set(m.names())
            for alias, target in m.aliases.items():
                assert out[alias].data_ptr() == out[target].data_ptr()
            with VariantReader(Store(sd.store).get("qwen").variant_dir("hf")) as r:
                for name in m.tensors:
                    assert out[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes() == r.read_tensor(name)


def test_files_come_as_fds(tmp_path: Path, llama_dir: Path) -> None:
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        with sd.connect() as c:
            files = c.files("org/llama")
            assert files["config.json"] == (llama_dir / "config.json").read_bytes()
            assert files["tokenizer.json"] == (llama_dir / "tokenizer.json").read_bytes()
            assert not any(name.endswith(".safetensors") for name in files)
            with pytest.raises(NotFound, match="no variant 'tp9'"):
                c.files("org/llama", "tp9")


def test_readiness_api(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--chunk-size", "4MiB", "--num-thread", "2") as sd:
        make_model(sd.store, "m", tensors=6, nbytes=3 << 20)  # 18 MiB: several windows
        with sd.connect() as c, c.acquire("m") as lease:
            first = lease.entries["layer.0.weight"]
            lease.wait(first.partition, first.offset, first.nbytes, timeout=30)
            assert lease.ready(first.partition, first.offset, first.nbytes)
            lease.wait(timeout=30)
            assert lease.ready() and lease.progress() == (sum(lease.sizes), sum(lease.sizes))
            assert lease.ready(0, 0, 0)  # an empty range is always ready


def test_lease_release_and_views_outliving_it(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        expected = make_model(sd.store, "m")
        with sd.connect() as c:
            lease = c.acquire("m")
            t = lease.tensors(timeout=30)
            lease.release()
            lease.release()  # idempotent
            assert c.status()["leases"] == []
            assert c.evict("m") == ["hf"]
            assert t["layer.0.weight"].numpy().tobytes() == expected["layer.0.weight"]  # our mapping still holds it


def test_tensors_stored_off_their_element_size_are_copied_right(tmp_path: Path) -> None:
    """A safetensors file keeps tensors back to back: after 7 bool bytes a float32 sits off its element
    size, which torch cannot view; tensors() copies that one, numpy() views it unaligned."""
    src = tmp_path / "src"
    src.mkdir()
    sd_ = {"flags": torch.tensor([True, False, True, True, False, True, False]),
           "w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "h": torch.arange(5, dtype=torch.float16)}
    torch.save(sd_, src / "pytorch_model.bin")
    with sidecar(tmp_path) as sd:
        m = save_model(Store(sd.store), "org/odd", src)
        assert m.tensors["w"].offset % 4 and m.tensors["h"].offset % 2  # off their element sizes
        with sd.connect() as c, c.acquire("org/odd") as lease:
            tensors, arrays = lease.tensors(timeout=30), lease.numpy()
            for name, want in sd_.items():
                assert tensors[name].dtype == want.dtype and torch.equal(tensors[name], want), name
                assert arrays[name].tobytes() == want.numpy().tobytes(), name
        # a client from before the safetensors layout (its hello lacks the field) would view "w" at a
        # shifted offset: it is refused the variant with one line, and the sidecar serves on
        with raw_hello(sd.socket) as old:
            wire.send(old, {"op": "acquire", "model": "org/odd"})
            reply = wire.recv(old)[0]
            assert reply["ok"] is False and "off their element size" in reply["error"], reply
            assert "upgrade sllmfs" in reply["error"], reply
        # the same on a miss: refused before a fill starts, so the old client costs the tier nothing
        save_model(Store(sd.store), "org/odd2", src)
        with raw_hello(sd.socket) as old:
            wire.send(old, {"op": "acquire", "model": "org/odd2"})
            reply = wire.recv(old)[0]
            assert reply["ok"] is False and "off their element size" in reply["error"], reply
        with sd.connect() as c:
            st = c.status()
            assert st["leases"] == []
            odd2 = next(m for m in st["models"] if m["name"] == "org/odd2")
            assert odd2["tier"] == "disk" and odd2["variants"] == [], odd2


def test_warm_reports_progress(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "m", tensors=4, nbytes=4 << 20)
        seen: list[tuple[int, int]] = []
        total = sc.warm("m", socket=str(sd.socket), progress=lambda d, t: seen.append((d, t)))
        stored = Store(sd.store).get("m").manifest("hf").total_bytes  # the tensors' 16 MiB and the file's header
        assert total == stored and 16 << 20 < stored < (16 << 20) + 4096 and seen[-1] == (total, total)
        st = sd.status()
        assert st["models"][0]["variants"][0]["state"] == "ready" and st["leases"] == []


def test_connect_uses_configured_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with sidecar(tmp_path) as sd:
        monkeypatch.setenv("SLLMFS_SOCKET", str(sd.socket))
        with sc.connect() as c:
            assert c.server_pid == sd.proc.pid
    with pytest.raises(sc.SidecarError, match="cannot reach the sidecar"):
        sc.connect(str(tmp_path / "nothing.sock"))


SHARER = """
import json, sys, numpy as np, sllmfs.client.client as sc
c = sc.connect(sys.argv[1])
lease = c.acquire("shared")
t = lease.numpy(timeout=60)  # numpy, not torch: four torch imports would dominate the test
lo = np.frombuffer(lease.maps[0], dtype=np.uint8).ctypes.data
inside = all(lo <= v.ctypes.data < lo + len(lease.maps[0]) for v in t.values())
print(json.dumps({"inside": inside, "sum": float(sum(v.astype(np.float64).sum() for v in t.values()))}), flush=True)
sys.stdin.read()
"""


def test_four_processes_share_one_copy(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "shared", tensors=8, nbytes=1 << 20)
        procs = [subprocess.Popen([sys.executable, "-c", SHARER, str(sd.socket)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE) for _ in range(4)]
        try:
            reports = [json.loads(p.stdout.readline()) for p in procs if p.stdout]
            st = sd.status()
        finally:
            for p in procs:
                p.kill()
                p.wait()
        assert len(reports) == 4 and all(r["inside"] for r in reports)
        assert len({r["sum"] for r in reports}) == 1
        assert len(st["leases"]) == 4
        assert st["counters"]["misses"] == 1 and st["counters"]["hits"] == 3
        one_copy = st["models"][0]["variants"][0]["bytes"]
        assert st["memory"]["used"] == one_copy < 2 * (8 << 20)  # the tier grew once, not four times


def _free_huge_pages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(_free_huge_pages() < 40, reason="needs 40 free 2 MiB huge pages (vm.nr_hugepages)")
def test_big_segments_use_hugetlb_pages(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        expected = make_model(sd.store, "h", tensors=1, nbytes=64 << 20)
        with sd.connect() as c, c.acquire("h") as lease:
            assert lease.huge_pages and len(lease.maps[0]) % (2 << 20) == 0
            assert lease.numpy(timeout=60)["layer.0.weight"].tobytes() == expected["layer.0.weight"]
            assert c.status()["models"][0]["variants"][0]["huge_pages"] is True


def test_shares_name_the_stored_tensor_at_the_end_of_a_chain() -> None:
    """An alias of a tied name (a hand-made aligned manifest may hold both kinds) shares the stored name
    the tie ends at, so a loader never looks up a name it left out."""
    from sllmfs.client.client import _roots

    assert _roots({"a": "b", "b": "c", "d": "c"}) == {"a": "c", "b": "c", "d": "c"}
    assert set(_roots({"x": "y", "y": "x"})) == {"x", "y"}  # a cycle (refused by the checks) does not hang
