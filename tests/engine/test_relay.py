"""Peer relays (issue 26) against the stand-in runtime: GPUs with peers, asynchronous streams.

Each case runs in a fresh interpreter (the engine opens one CUDA runtime per process)
with tests.support.cudart.FAKE_PEER_CUDART: streams run their copies later, in order,
with random delays, and freed device memory is poisoned, so a staging slot reused too
early or a copy returning before the peer's streams drained gives wrong bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the stand-in runtime")

# A checkpoint-like segment: tensors from a few bytes to several slots, odd sizes, 4 KiB aligned.
PRELUDE = """
import ctypes, json, threading, time
import numpy as np
from sllmfs.engine import copy_engine as ce
from sllmfs.store.format import digest
MiB = 1 << 20
fake = ctypes.CDLL(LIB)
for f in ("fake_peer_bytes", "fake_h2d_bytes", "fake_device_peak", "fake_device_now"):
    getattr(fake, f).restype = ctypes.c_longlong
rng = np.random.default_rng(5)
sizes = [int(x) for x in rng.choice([7, 4096, 100_003, MiB, 3 * MiB + 5, 5 * MiB], 40)]
offs, at = [], 0
for n in sizes:
    offs.append(at)
    at += -(-n // 4096) * 4096
src = rng.integers(0, 256, at, dtype=np.uint8)
seg = ce.Segment(src.ctypes.data, src.size, owners=(src,))

def pieces_into(dst):
    dst[:] = 0xEE  # poison
    return np.array([[0, o, dst.ctypes.data + o, n] for o, n in zip(offs, sizes)], dtype=np.uint64)

def same(dst):  # every tensor checksummed as the store checks it
    return all(digest(memoryview(dst[o:o + n])) == digest(memoryview(src[o:o + n])) for o, n in zip(offs, sizes))

def engine(**kw):
    return ce.CopyEngine(target="cuda", device=0, chunk_bytes=2 * MiB, register_threads=2, **kw)
"""


def run(lib: Path, code: str, **env: str) -> dict:
    script = f"LIB = {str(lib)!r}\n" + PRELUDE + textwrap.dedent(code)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SLLMFS_CUDART": str(lib), **env})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_relayed_share_and_direct_share_land_every_byte(fake_lib):
    out = run(fake_lib, """
        eng = engine()
        eng.register(seg)
        r = {}
        for label in ("first", "again"):  # the second copy reuses the engine, with fresh staging
            dst = np.empty(src.size, np.uint8)
            st = eng.copy([seg], pieces_into(dst), relay=ce.Relay(peers=(1,), slot_bytes=MiB, slots=3,
                                                                   direct_window=2 * MiB))
            r[label] = dict(ok=same(dst), mode=st["mode"], relays=st["relays"], direct=st["direct_bytes"],
                            total=st["bytes"], peer_out=fake.fake_peer_bytes(1), up1=fake.fake_h2d_bytes(1),
                            peak1=fake.fake_device_peak(1), now1=fake.fake_device_now(1))
        eng.close()
        print(json.dumps(r))
    """)
    first, again = out["first"], out["again"]
    for r in (first, again):
        assert r["ok"] and r["mode"] == "register"
        (rel,) = r["relays"]
        assert rel["peer"] == 1 and rel["skipped"] == "" and rel["staging_bytes"] == 3 << 20
        assert rel["bytes"] > 0 and r["direct"] > 0 and rel["bytes"] + r["direct"] == r["total"]
        assert rel["busy_seconds"] > 0 and 0 < rel["share"] < 1
        assert r["peak1"] == 3 << 20 and r["now1"] == 0  # staging held only while the copy ran
    # what the peer carried went up its own link and across to GPU 0, byte for byte
    assert first["peer_out"] == first["up1"] == first["relays"][0]["bytes"]
    assert again["peer_out"] == first["peer_out"] + again["relays"][0]["bytes"]


def test_two_peers_each_carry_a_share_into_ipc_destinations(fake_lib):
    # as the sidecar copies: into another process's allocations (IPC handles), three GPUs
    out = run(fake_lib, """
        eng = ce.CopyEngine(target="cuda", device="0000:00:06.0", chunk_bytes=2 * MiB, register_threads=2)
        eng.register(seg)
        dst = np.empty(src.size, np.uint8)
        dst[:] = 0xEE
        blocks = [{"handle": int(dst.ctypes.data).to_bytes(8, "little") + bytes(56), "size": dst.size,
                   "device": "0000:00:06.0"}]
        rows = [[0, o, 0, o, n] for o, n in zip(offs, sizes)]
        st = eng.copy_ipc([seg], blocks, rows, relay=ce.Relay(peers=(1, 2), slot_bytes=MiB, slots=2,
                                                              direct_window=2 * MiB))
        print(json.dumps(dict(ok=same(dst), relays=st["relays"], direct=st["direct_bytes"], total=st["bytes"],
                              out1=fake.fake_peer_bytes(1), out2=fake.fake_peer_bytes(2))))
    """, FAKE_CUDA_DEVICES="3")
    assert out["ok"]
    by_peer = {r["peer"]: r for r in out["relays"]}
    assert by_peer[1]["bytes"] > 0 and by_peer[2]["bytes"] > 0 and out["direct"] > 0
    assert by_peer[1]["bytes"] == out["out1"] and by_peer[2]["bytes"] == out["out2"]
    assert sum(r["bytes"] for r in out["relays"]) + out["direct"] == out["total"]


@pytest.mark.parametrize(("peers", "env", "mode", "why"), [
    ((1,), {"FAKE_CUDA_NO_PEER": "0-1"}, "register", "no peer access between GPU 0 and GPU 1"),
    ((1,), {"FAKE_CUDA_MALLOC_LIMIT": "1000"}, "register", "no staging memory on the peer: cudaMalloc"),
    ((1,), {}, "stage", "relays copy from pinned segments"),
    ((0,), {}, "register", "it is the GPU being loaded"),
    ((5,), {}, "register", "CUDA device 5 does not exist (2 visible)"),
])
def test_a_peer_that_cannot_relay_is_skipped_with_the_reason(fake_lib, peers, env, mode, why):
    out = run(fake_lib, f"""
        eng = engine(mode={mode!r})
        eng.register(seg)
        dst = np.empty(src.size, np.uint8)
        st = eng.copy([seg], pieces_into(dst), relay=ce.Relay(peers={peers!r}, slot_bytes=MiB, slots=2))
        print(json.dumps(dict(ok=same(dst), relays=st["relays"], direct=st["direct_bytes"], total=st["bytes"],
                              out=[fake.fake_peer_bytes(d) for d in range(2)], now1=fake.fake_device_now(1))))
    """, **env)
    assert out["ok"] and out["direct"] == out["total"] and out["out"] == [0, 0] and out["now1"] == 0
    (rel,) = out["relays"]
    assert rel["bytes"] == 0 and why in rel["skipped"] and "\n" not in rel["skipped"]


def test_stop_relays_hands_the_rest_to_the_direct_path(fake_lib):
    # Chunks become ready one by one (a fill in progress); another load wants GPU 1 part way.
    out = run(fake_lib, """
        chunk = 2 * MiB
        ready = np.zeros(-(-src.size // chunk), np.uint8)
        seg2 = ce.Segment(src.ctypes.data, src.size, ready.ctypes.data, chunk, owners=(src, ready))
        eng = engine()
        eng.register(seg2)
        dst = np.empty(src.size, np.uint8)
        rows = pieces_into(dst)
        res = {}
        t = threading.Thread(target=lambda: res.update(st=eng.copy([seg2], rows, relay=ce.Relay(
            peers=(1,), slot_bytes=MiB, slots=2, direct_window=2 * MiB))))
        t.start()
        half = len(ready) // 2
        for i in range(half):
            ready[i] = 1
            time.sleep(0.02)
        time.sleep(0.3)
        eng.stop_relays()
        carried = fake.fake_peer_bytes(1)
        for i in range(half, len(ready)):
            ready[i] = 1
        t.join()
        st = res["st"]
        print(json.dumps(dict(ok=same(dst), relays=st["relays"], carried_at_stop=carried,
                              out=fake.fake_peer_bytes(1), now1=fake.fake_device_now(1))))
    """)
    assert out["ok"] and out["now1"] == 0
    (rel,) = out["relays"]
    assert rel["skipped"].startswith("stopped") and rel["bytes"] > 0
    # after the stop it finishes at most the block it held (2 MiB here), then nothing more
    assert out["out"] - out["carried_at_stop"] <= 2 * (1 << 20)


def test_a_peer_link_that_fails_part_way_leaves_the_rest_to_the_direct_path(fake_lib):
    out = run(fake_lib, """
        eng = engine()
        eng.register(seg)
        dst = np.empty(src.size, np.uint8)
        st = eng.copy([seg], pieces_into(dst), relay=ce.Relay(peers=(1,), slot_bytes=MiB, slots=2,
                                                               direct_window=2 * MiB))
        print(json.dumps(dict(ok=same(dst), relays=st["relays"], direct=st["direct_bytes"], total=st["bytes"],
                              now1=fake.fake_device_now(1))))
    """, FAKE_CUDA_PEER_FAIL_AFTER="3")
    assert out["ok"] and out["now1"] == 0
    (rel,) = out["relays"]
    assert rel["skipped"].startswith("failed, the rest went direct: cudaMemcpyPeerAsync: cudaErrorInvalidValue")
    assert rel["bytes"] + out["direct"] == out["total"] and out["direct"] > 0


def test_a_stop_asked_just_before_the_copy_holds_for_it_and_not_the_next(fake_lib):
    # the sidecar may ask between choosing the peers and the copy's start
    out = run(fake_lib, """
        eng = engine()
        eng.register(seg)
        r = []
        for _ in range(2):
            if not r:
                eng.stop_relays()
            dst = np.empty(src.size, np.uint8)
            st = eng.copy([seg], pieces_into(dst), relay=ce.Relay(peers=(1,), slot_bytes=MiB, slots=2,
                                                                   direct_window=2 * MiB))
            r.append(dict(ok=same(dst), rel=st["relays"][0]))
        print(json.dumps(r))
    """)
    stopped, after = out
    assert stopped["ok"] and stopped["rel"]["bytes"] == 0 and stopped["rel"]["skipped"].startswith("stopped")
    assert after["ok"] and after["rel"]["bytes"] > 0 and after["rel"]["skipped"] == ""
