"""Several devices at once against a real sidecar: each device's copy runs beside the others, further
GPUs copy through sibling leases of the same memory, and TP ranks reading the hf variant share one fill.

The GPU half (two H200s, both links busy) is bench/bench_sglang.py --links; here the same code runs
with host targets (a copy engine each), and the sibling leases and the shared fill against the real
daemon.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from sllmfs.client import transfer
from sllmfs.core.errors import BadInput
from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.sidecar import make_model, sidecar


def test_each_device_copies_at_once_and_every_byte_lands(tmp_path: Path) -> None:
    """Two links' jobs must be inside their copies together: a barrier both reach only if they overlap."""
    with sidecar(tmp_path) as sd:
        expected = make_model(sd.store, "org/m", tensors=6, nbytes=1 << 20)
        names = sorted(expected)
        with sd.connect() as c, c.acquire("org/m") as lease:
            halves = {("host", 0): names[:3], ("host", 1): names[3:]}  # two links as two GPUs would be
            targets = {link: {n: torch.empty(lease.entries[n].shape, dtype=torch.float32) for n in group}
                       for link, group in halves.items()}
            both_in = threading.Barrier(2, timeout=20)
            threads: dict[tuple[str, int], int] = {}

            def job(link: tuple[str, int]) -> transfer.Job:
                def copy(held: object, engines: transfer._Engines) -> transfer.LoadStats:
                    threads[link] = threading.get_ident()
                    both_in.wait()  # times out (BrokenBarrierError) if the links ran one after the other
                    return transfer._copy_to_device(held, targets[link], "host", 0, 30.0, "auto", engines)
                return copy

            stats = transfer._all_links(lease, {link: job(link) for link in halves})
        assert len(set(threads.values())) == 2
        assert stats.bytes == sum(len(b) for b in expected.values())
        for group in targets.values():
            for name, t in group.items():
                assert t.numpy().tobytes() == expected[name], name
        (a0, a1), (b0, b1) = [(s["start"], s["end"]) for s in stats.links.values()]
        assert a0 < b1 and b0 < a1  # the windows each link reports overlap


@pytest.mark.parametrize(("copies", "siblings", "together"), [
    ("client", True, True),  # this process copies: each GPU on its own thread (the engines share pins)
    ("auto", True, True),  # the sidecar copies: each further GPU through a sibling lease of its own
    ("auto", False, False),  # no sibling to be had: one connection answers one request, so in turn
])
def test_gpu_links_copy_at_once_unless_they_share_a_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               copies: str, siblings: bool, together: bool) -> None:
    monkeypatch.setenv("SLLMFS_GPU_COPY", copies)
    if not siblings:
        monkeypatch.setattr(transfer, "_sibling", lambda lease: None)
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/m", tensors=2, nbytes=1 << 16)
        with sd.connect() as c, c.acquire("org/m") as lease:
            both_in = threading.Barrier(2, timeout=5)
            ran: dict[tuple[str, int], tuple[int, bool]] = {}

            def job(link: tuple[str, int]) -> transfer.Job:
                def copy(held: object, engines: transfer._Engines) -> transfer.LoadStats:
                    ran[link] = (threading.get_ident(), held is lease)
                    if together:
                        both_in.wait()  # BrokenBarrierError if the two GPUs' jobs ran one after the other
                    return transfer.LoadStats()
                return copy

            gpus = [("cuda", 0), ("cuda", 1)]
            transfer._all_links(lease, {link: job(link) for link in gpus})
    assert len({t for t, _ in ran.values()}) == (2 if together else 1)
    # the second GPU asks through a lease of its own when the sidecar copies; this process needs none
    assert ran[("cuda", 1)][1] is (copies == "client" or not siblings)


def test_a_failed_device_copy_stops_the_others_and_its_error_is_raised(tmp_path: Path) -> None:
    """The load fails when one device's copy fails: the other devices are told to stop (their engines'
    progress check raises), and the caller gets the first device's own error, not a cancellation."""
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/m", tensors=2, nbytes=1 << 16)
        with sd.connect() as c, c.acquire("org/m") as lease:
            told: list[bool] = []

            def broken(held: object, engines: transfer._Engines) -> transfer.LoadStats:
                raise BadInput("tensor 'x': stored shape [2], target [3]")

            def waiting(held: object, engines: transfer._Engines) -> transfer.LoadStats:
                told.append(engines.stop.wait(10))
                with pytest.raises(transfer.Cancelled):
                    engines.check(0, 1)  # what its copy engine calls between blocks
                raise transfer.Cancelled("stopped")

            with pytest.raises(BadInput, match="stored shape"):
                transfer._all_links(lease, {("host", 0): broken, ("host", 1): waiting})
    assert told == [True]


def test_a_sibling_lease_maps_the_same_memory_or_none(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/m", tensors=2)
        with sd.connect() as c, c.acquire("org/m") as lease:
            sibling = transfer._sibling(lease)
            assert sibling is not None and sibling.client is not lease.client
            assert sibling.segment_ids == lease.segment_ids
            assert [bytes(m[:64]) for m in sibling.maps] == [bytes(m[:64]) for m in lease.maps]
            transfer._close_sibling(sibling)
            assert len(sd.status()["leases"]) == 1  # the sibling's lease ended with it
            # the model replaced meanwhile: the sidecar fills new memory, never handed out as the same bytes
            make_model(sd.store, "org/m", tensors=2, seed=1, force=True)
            with sd.connect() as c2:
                c2.refresh()
            assert transfer._sibling(lease) is None


RANK = """
import json, sys
from sllmfs.integrations.common.source import SidecarSource
rank, size = int(sys.argv[2]), int(sys.argv[3])
with SidecarSource("org/llama", sys.argv[1]).open("hf") as lease:  # what the any-TP path opens
    shard = {n: t.chunk(size)[min(rank, len(t.chunk(size)) - 1)].float().sum().item()
             for n, t in lease.tensors().items() if t.dim()}
    print(json.dumps({"rank": rank, "tensors": len(shard)}), flush=True)
    sys.stdin.readline()  # hold the lease while the test reads status
"""


def test_tp_ranks_reading_hf_share_one_fill(tmp_path: Path, llama_dir: Path) -> None:
    """#22 item 3: the hf variant both ranks read on the any-TP path is filled once; status shows one copy."""
    store = tmp_path / "store"
    save_model(Store(store), "org/llama", llama_dir)
    with sidecar(tmp_path, store=store) as sd:
        ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(sd.socket), str(r), "2"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for r in range(2)]
        try:
            reports = [json.loads(p.stdout.readline()) for p in ranks if p.stdout]
            st = sd.status()
            cli = subprocess.run([sys.executable, "-m", "sllmfs", "status", "--socket", str(sd.socket)],
                                 capture_output=True, text=True, timeout=60)
        finally:
            for p in ranks:
                p.communicate("\n", timeout=30)
        assert [r["rank"] for r in reports] == [0, 1] and reports[0]["tensors"] == reports[1]["tensors"] > 0
        (model,) = [m for m in st["models"] if m["name"] == "org/llama"]
        (hf,) = model["variants"]
        assert hf["variant"] == "hf" and hf["leases"] == 2
        assert st["memory"]["used"] == hf["bytes"]  # one copy in the memory tier, however many ranks
        assert st["counters"]["misses"] == 1 and st["counters"]["hits"] == 1
        assert cli.returncode == 0, cli.stderr
        rows = [line for line in cli.stdout.splitlines() if "org/llama" in line]
        assert len(rows) == 1 and " hf " in rows[0], cli.stdout
