"""The sidecar as a real process: start-up, ops, tiers, faults and shutdown.

The daemon and model helpers (``Sidecar``, ``make_model``) live in tests/support/sidecar.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

import sllmfs.client.client as sc
from sllmfs.client.client import FillFailed
from sllmfs.core.errors import BadInput, Corrupt, NotFound
from sllmfs.protocol import wire
from sllmfs.protocol.messages import FailCause
from sllmfs.store.store import Store
from tests.support.sidecar import Sidecar, cached_model, make_model, raw_hello, sidecar, wait_log

MiB = 1 << 20


# -- basics -------------------------------------------------------------------


def test_unknown_model_and_bad_names_get_error_replies(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd, sd.connect() as c:
        with pytest.raises(NotFound, match="'no/such-model'"):
            c.acquire("no/such-model")
        for bad in ("../etc", "a/../b", "/abs", "", "x" * 300):
            with pytest.raises(BadInput, match="bad model name"):
                c.acquire(bad)
        with pytest.raises(BadInput, match="bad variant"):
            c.acquire("m", variant="../hf")
        make_model(sd.store, "org/m")
        with pytest.raises(NotFound, match="no variant 'tp2'"):
            c.acquire("org/m", variant="tp2")
        assert c.acquire("org/m").model == "org/m"  # the same connection still serves
        longest = "/".join(["x" * 75 + str(i) for i in range(3)])  # past the 249-byte memfd name limit
        make_model(sd.store, longest)
        c.acquire(longest).wait(timeout=30)


def test_list_status_and_counters(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/a")
        make_model(sd.store, "org/b", seed=1)
        with sd.connect() as c:
            assert [m["name"] for m in c.list()] == ["org/a", "org/b"]
            with c.acquire("org/a") as lease:
                lease.wait(timeout=30)
            with c.acquire("org/a") as lease:
                st = c.status()
                assert st["leases"] == [{"id": lease.id, "model": "org/a", "variant": "hf", "pid": os.getpid(),
                                         "uid": os.getuid()}]
        assert st["counters"]["misses"] == 1 and st["counters"]["hits"] == 1
        stored = Store(sd.store).get("org/a").manifest("hf").total_bytes  # 6 x 256 KiB and the file's header
        assert st["counters"]["bytes_filled"] == stored and 6 * (256 << 10) < stored < 6 * (256 << 10) + 4096
        tiers = {m["name"]: m["tier"] for m in st["models"]}
        assert tiers == {"org/a": "memory", "org/b": "disk"}
        assert 0 < st["memory"]["used"] <= st["memory"]["budget"] == 256 * MiB
        assert "lease taken" in sd.log() and "filled model=org/a" in wait_log(sd, "filled model=org/a")


# -- tiers --------------------------------------------------------------------


def test_lru_evicts_idle_models_never_leased_or_pinned(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--mem-pool-size", "3.5MiB") as sd:
        for i, name in enumerate("abcd"):
            make_model(sd.store, name, seed=i, tensors=4)  # 1 MiB each: three fit

        def resident(c: sc.Client) -> set[str]:
            return {m["name"] for m in c.status()["models"] if m["tier"] == "memory"}

        with sd.connect() as c:
            held_a = c.acquire("a")
            c.pin("b")
            with c.acquire("c") as lease:
                lease.wait(timeout=30)
            # every byte is ready a moment before the fill task marks c "ready" (till then it is busy)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(
                    m["name"] == "c" and m["variants"][0]["state"] == "ready" for m in c.status()["models"]):
                time.sleep(0.02)
            held_d = c.acquire("d")  # evicts idle c, never leased a or pinned b
            held_d.wait(timeout=30)
            assert resident(c) == {"a", "b", "d"}
            with pytest.raises(BadInput, match="memory pool full"):  # a, b, d all busy
                c.acquire("c")
            held_a.release()
            c.acquire("c").wait(timeout=30)  # now a can go
            assert resident(c) == {"b", "c", "d"}
            assert held_d.ready()
        assert "evicted model=c variant=hf" in sd.log() and "reason=lru" in sd.log()


def test_model_bigger_than_pool_is_a_clear_error(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--mem-pool-size", "1MiB") as sd:
        make_model(sd.store, "big", tensors=8)
        pattern = r"model 'big' \[hf\] needs \d+ bytes but the memory pool"
        with sd.connect() as c, pytest.raises(BadInput, match=pattern):
            c.acquire("big")
        assert sd.proc.poll() is None


def test_pin_unpin_evict(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "m")
        with sd.connect() as c:
            c.pin("m")
            with pytest.raises(BadInput, match="pinned"):
                c.evict("m")
            assert c.unpin("m") is True
            with c.acquire("m"), pytest.raises(BadInput, match="leased by 1"):
                c.evict("m")
            assert c.evict("m") == ["hf"]
            assert c.evict("m") == []
            # evicted while its fill may still run: the memory comes back once the fill ends
            deadline = time.monotonic() + 20
            while c.status()["memory"]["used"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.status()["memory"]["used"] == 0


def test_disk_budget_removes_least_recently_used_unleased(tmp_path: Path) -> None:
    store, hf = tmp_path / "store", tmp_path / "hf"
    env = {"HF_HUB_CACHE": str(hf)}
    os.environ["HF_HUB_CACHE"] = str(hf)  # this process saves them: the same cache
    try:
        make_model(store, "mine", seed=7, tensors=4)  # saved from a local folder: the only copy
        os.utime(store / "models" / "mine" / "model.json", (900, 900))  # the least recently used of all
        for i, name in enumerate(["old", "mid", "new"]):
            cached_model(store, hf, name, i)
            os.utime(store / "models" / name / "model.json", (1000 + i, 1000 + i))
        with sidecar(tmp_path, "--disk-size", "3.5MiB", store=store, env=env) as sd, sd.connect() as c:
            deadline = time.monotonic() + 20  # start-up enforces the budget: the least recently used goes
            while len(c.list()) == 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sorted(m["name"] for m in c.list()) == ["mid", "mine", "new"]  # never the only copy
            evictable = {m["name"]: m["disk_evictable"] for m in c.status()["models"]}
            assert evictable == {"mid": True, "mine": False, "new": True}
            with c.acquire("mid"):  # leased (and touched: most recent)
                cached_model(store, hf, "extra", 9)
                assert c.refresh()["removed"] == ["new"]
            assert sorted(m["name"] for m in c.list()) == ["extra", "mid", "mine"]
            assert "evicted from disk model=old" in wait_log(sd, "evicted from disk model=old")
    finally:
        del os.environ["HF_HUB_CACHE"]


def test_store_changes_are_noticed(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd, sd.connect() as c:
        first = make_model(sd.store, "m", seed=1)  # saved after start: found on the miss
        with c.acquire("m") as lease:
            got = {k: bytes(v.tobytes()) for k, v in lease.numpy().items()}
        assert got == first
        second = make_model(sd.store, "m", seed=2, force=True)
        with c.acquire("m") as lease:  # one stat per hit notices the replaced manifest
            assert {k: v.tobytes() for k, v in lease.numpy().items()} == second
        Store(sd.store).remove("m")
        assert c.refresh()["dropped"] == [{"model": "m", "variant": "hf"}]
        with pytest.raises(NotFound, match="'m'"):
            c.acquire("m")


def test_corrupt_partition_is_refused_and_logged(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd, sd.connect() as c:
        make_model(sd.store, "org/bad")
        data = sd.store / "models" / "org%2Fbad" / "variants" / "hf" / "model.safetensors"
        with open(data, "r+b") as f:
            f.seek(5000)
            byte = f.read(1)
            f.seek(5000)
            f.write(bytes([byte[0] ^ 0xFF]))
        lease = c.acquire("org/bad")
        with pytest.raises(FillFailed) as failed:  # a Corrupt: the client is told why, as the sidecar says it
            lease.wait(timeout=30)
        lease.release()
        assert failed.value.cause == FailCause.DAMAGED
        line = str(failed.value)
        assert "model.safetensors window 0 fails its" in line and "sllmfs verify --model org/bad" in line, line
        with pytest.raises(Corrupt, match="failed verification") as refused:  # the next acquire: the same line
            c.acquire("org/bad")
        assert str(refused.value) == line
        assert "fill failed model=org/bad" in wait_log(sd, "fill failed model=org/bad")


def test_registration_required(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--registration-required") as sd, sd.connect() as c:
        make_model(sd.store, "m")
        with pytest.raises(NotFound, match="not registered"):
            c.acquire("m")
        with pytest.raises(NotFound, match="'ghost'"):
            c.register("ghost")
        c.register("m")
        with c.acquire("m") as lease:
            lease.wait(timeout=30)
    with sidecar(tmp_path, "--registration-required") as sd, sd.connect() as c:  # a restart keeps it
        assert [m["name"] for m in c.list() if m["registered"]] == ["m"]
        with c.acquire("m") as lease:
            lease.wait(timeout=30)


def test_settings_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('num_thread = 2\nchunk_size = "5MiB"\n')
    env = {"SLLMFS_CONFIG": str(cfg), "SLLMFS_DISK_SIZE": "3GB"}
    with sidecar(tmp_path, env=env) as sd:
        st = sd.status()
        assert st["disk"]["budget"] == 3 * 10**9
        assert "threads=2 chunk=8388608" in wait_log(sd, "threads=2")  # rounded up to whole 4 MiB windows


# -- faults -------------------------------------------------------------------


def test_hostile_input_gets_errors_and_others_keep_being_served(tmp_path: Path) -> None:
    rng = random.Random(0)
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "m")
        good = sd.connect()
        lease = good.acquire("m")
        lease.wait(timeout=30)
        sent = 0
        # framed garbage on greeted connections: each gets an error reply and the connection stays
        s = raw_hello(sd.socket)
        bodies = [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"op": "nope"}), msgpack.packb({"op": 7}),
                  msgpack.packb({"op": "acquire", "model": 5}), msgpack.packb({"op": "acquire", "model": "../x"}),
                  msgpack.packb({"op": "release", "lease": "x"}), msgpack.packb({1: 2})]
        for i in range(2000):
            body = bodies[i % len(bodies)] if i % 2 else rng.randbytes(rng.randrange(0, 64))
            s.sendall(struct.pack(">I", len(body)) + body)
            reply, fds = wire.recv(s)
            assert fds == []
            if reply["ok"] is not False:  # random bytes can happen to be valid msgpack of a harmless op
                assert "op" not in reply
            sent += 1
        s.close()
        # unframed garbage, absurd lengths, truncated messages and no hello, each on a fresh connection
        for i in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sd.socket))
            kind = i % 4
            if kind == 0:
                s.sendall(rng.randbytes(rng.randrange(1, 200)))
                s.shutdown(socket.SHUT_WR)  # a short prefix would otherwise wait for its body
            elif kind == 1:
                s.sendall(struct.pack(">I", 0xFFFFFFF0) + b"x")
            elif kind == 2:
                s.sendall(struct.pack(">I", 1000) + b"short")
                s.shutdown(socket.SHUT_WR)
            else:
                wire.send(s, {"op": "acquire", "model": "m"})
            s.settimeout(10)
            try:
                data = s.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if data:
                assert msgpack.unpackb(data[4:])["ok"] is False
            s.close()
            sent += 1
        assert sent == 2300
        # the first client's lease and views are untouched, and new work still goes through
        assert lease.ready() and good.status()["connections"] == 1
        with sd.connect() as c2, c2.acquire("m") as l2:
            assert l2.ready()
        assert sd.proc.poll() is None
        assert "client error" in sd.log() and "internal error" not in sd.log()


CLIENT = """
import os, sys, sllmfs.client.client as sc
c = sc.connect(sys.argv[1])
lease = c.acquire(sys.argv[2])
lease.wait(timeout=30)
print("held", flush=True)
sys.stdin.read()
"""


def test_killed_client_leaks_no_lease(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "m")
        p = subprocess.Popen([sys.executable, "-c", CLIENT, str(sd.socket), "m"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"held\n"
        assert len(sd.status()["leases"]) == 1
        fd_dir = Path(f"/proc/{sd.proc.pid}/fd")
        baseline = len(os.listdir(fd_dir))
        p.kill()
        p.wait()
        # a client that asks and vanishes before reading its reply (fds in flight)
        for _ in range(20):
            s = raw_hello(sd.socket)
            wire.send(s, {"op": "acquire", "model": "m"})
            s.close()
        deadline = time.monotonic() + 20
        while sd.status()["leases"] and time.monotonic() < deadline:
            time.sleep(0.05)
        with sd.connect() as c:
            assert c.status()["leases"] == []
            assert c.evict("m") == ["hf"]  # nothing holds it any more
            assert c.status()["memory"]["used"] == 0
        # no fd left behind: the killed client's connection and every vanished acquire are closed
        deadline = time.monotonic() + 20
        while len(os.listdir(fd_dir)) >= baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir(fd_dir)) < baseline  # its connection and the two segment fds are gone
        assert "connection closed" in sd.log()


def test_socket_is_private_and_peers_are_checked(tmp_path: Path) -> None:
    import tempfile

    outer = Path(tempfile.mkdtemp(prefix="sllmfs-test-"))  # pytest's tmp root is 0700: no other uid gets in
    with sidecar(tmp_path, run_dir=outer / "run") as sd:
        assert sd.socket.stat().st_mode & 0o777 == 0o660
        assert sd.socket.parent.stat().st_mode & 0o777 == 0o750
        if os.geteuid() != 0:
            pytest.skip("needs root to connect as another uid")
        # open the path up so the SO_PEERCRED check itself is what refuses uid 65534
        os.chmod(outer, 0o755)
        os.chmod(sd.socket.parent, 0o755)
        os.chmod(sd.socket, 0o666)
        code = ("import os, sllmfs.client.client as sc\nos.setgid(65534)\nos.setuid(65534)\n"
                f"try:\n sc.connect({str(sd.socket)!r})\nexcept Exception as e:\n print(type(e).__name__, e)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "uid 65534 may not use this sidecar" in out.stdout, out.stderr
        assert "not allowed to use this sidecar" in sd.log()
    import shutil

    shutil.rmtree(outer, ignore_errors=True)


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "m")
        c = sd.connect()
        c.acquire("m").wait(timeout=30)
        sd.proc.send_signal(signal.SIGTERM)
        assert sd.proc.wait(timeout=10) == 0
        assert not sd.socket.exists()
        assert "got SIGTERM: draining" in sd.log()
        with pytest.raises(sc.SidecarError):
            c.status()


def test_second_sidecar_on_same_socket_is_refused(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        out = subprocess.run([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(sd.store),
                              "--socket", str(sd.socket)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "already serves" in out.stderr
        assert sd.proc.poll() is None


def test_mount_serves_the_view_and_unmounts_on_sigterm(tmp_path: Path) -> None:
    import importlib.util

    mnt = tmp_path / "mnt"
    if importlib.util.find_spec("sllmfs.fuse.main") is None:
        out = subprocess.run([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(tmp_path / "s"),
                              "--socket", str(tmp_path / "s.sock"), "--mount", str(mnt)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "FUSE view" in out.stderr
        return
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root to mount")
    with sidecar(tmp_path, "--mount", str(mnt)) as sd:
        make_model(sd.store, "org/m")
        assert wait_log(sd, "mounted").count("mounted") == 1
        with sd.connect() as c, c.acquire("org/m") as lease:
            lease.wait(timeout=30)  # resident: the view may read from the memory tier
            assert json.loads((mnt / "org" / "m" / "config.json").read_text()) == {"model_type": "test"}
        sd.proc.send_signal(signal.SIGTERM)
        assert sd.proc.wait(timeout=15) == 0
    assert str(mnt) not in Path("/proc/mounts").read_text()


# -- CLI ----------------------------------------------------------------------


def _cli(sd: Sidecar, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sllmfs", *args, "--socket", str(sd.socket)],
                          capture_output=True, text=True, timeout=60)


def test_cli_commands(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/m")
        out = _cli(sd, "load", "--model", "org/m", "--warm")
        assert out.returncode == 0 and "is in memory" in out.stdout, out.stderr
        st = json.loads(_cli(sd, "status", "--json").stdout)
        assert st["models"][0]["tier"] == "memory" and st["models"][0]["variants"][0]["state"] == "ready"
        assert _cli(sd, "pin", "--model", "org/m").returncode == 0
        out = _cli(sd, "evict", "--model", "org/m")
        assert out.returncode == 2 and out.stderr.startswith("sllmfs: error:") and "pinned" in out.stderr
        assert _cli(sd, "unpin", "--model", "org/m").returncode == 0
        assert "evicted org/m" in _cli(sd, "evict", "--model", "org/m").stdout
        human = _cli(sd, "status")
        assert human.returncode == 0 and "memory tier" in human.stdout
        out = _cli(sd, "load", "--model", "org/none", "--warm")
        assert out.returncode == 2 and "'org/none'" in out.stderr and "Traceback" not in out.stderr

