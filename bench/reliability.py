"""Reliability and security run against real sidecar processes; writes docs/reliability.md.

    python -m bench.reliability [--quick]    (from the repository root)

Scenarios (each starts its own `sllmfs start` daemon): fuzz (hypothesis-generated hostile messages and
connection patterns, then an honest client verifies bytes), load (concurrent client processes under forced
eviction), kills (SIGKILL mid-fill, with a mapped lease, with a FUSE mount up) and security (a second Unix
user). Every scenario function returns a dict of figures; tests/sidecar/test_reliability.py runs them CI-sized.
store_fuzz and tree_fuzz (bench/fuzz_store.py) damage manifests and store trees under a daemon and its mount.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import xxhash

import sllmfs.client.client as sc
from sllmfs.protocol import wire
from tests.support.sidecar import make_model, raw_hello, sidecar, wait_log

ROOT = Path(__file__).resolve().parents[1]

MiB = 1 << 20
OPS = ["hello", "list", "acquire", "release", "files", "status", "pin", "unpin", "evict", "refresh", "register",
       "load_ipc"]
OTHER_USER = "sllmfs-other"
LEASE = "\x00lease-held-on-this-connection"


# -- helpers --------------------------------------------------------------------------------------------------


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (all), RssAnon (heap: what a leak grows) or RssShmem (mapped memfd segments) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def fd_counts(pid: int) -> dict[str, int]:
    total = memfd = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue
        total += 1
        memfd += target.startswith("/memfd:")
    return {"fds": total, "memfds": memfd}


def expected_hashes(tensors: dict[str, bytes]) -> dict[str, str]:
    return {k: xxhash.xxh3_64_hexdigest(v) for k, v in tensors.items()}


def verify_lease(lease: sc.Lease, expected: dict[str, str], names: list[str] | None = None) -> int:
    """Mismatching tensors among ``names`` (default all): xxh3 of the leased bytes against the store's."""
    bad = 0
    for name in names or list(expected):
        t = lease.entries[name]
        data = lease.maps[t.partition][t.offset:t.offset + t.nbytes]
        bad += xxhash.xxh3_64_hexdigest(data) != expected[name]
    return bad


def wait_for(pred: Any, timeout: float = 20, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def lazy_unmount(path: Path) -> None:
    if mounted(path):
        for tool in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
            if subprocess.run([*tool, str(path)], capture_output=True).returncode == 0:
                break


# -- a: fuzz --------------------------------------------------------------------------------------------------


def _strategies() -> dict[str, Any]:
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                        st.floats(), st.text(max_size=40), st.binary(max_size=40))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    bad_names = st.one_of(st.sampled_from(["..", "../etc/passwd", "a/../b", "/abs", "", "m/..", "x" * 400,
                                           "org/m/../../x", "\x00", "a//b", "m"]),
                          st.text(max_size=30).map(lambda s: s + "/.." if s else ".."))
    field = st.one_of(values, bad_names, st.just(LEASE))  # LEASE: replaced by a lease the connection holds
    valid_op = st.builds(lambda op, extra: {"op": op, **extra}, st.sampled_from(OPS),
                         st.dictionaries(st.sampled_from(["model", "variant", "lease", "blocks", "pieces", "timeout",
                                                          "version"]), field, max_size=4))
    unknown_op = st.builds(lambda op, extra: {"op": op, **extra}, st.one_of(values, st.text(max_size=12)),
                           st.dictionaries(st.text(max_size=6), values, max_size=3))

    def pack(v: Any) -> bytes:
        return msgpack.packb(v, use_bin_type=True)

    # dicts are packed at send time (LEASE substituted); bytes are sent as they are
    body = st.one_of(valid_op, unknown_op.map(pack), values.map(pack), st.binary(max_size=200),
                     values.map(pack).map(lambda b: b[: max(0, len(b) - 1)]))  # truncated msgpack in a full frame
    return {"body": body, "batch": st.lists(body, min_size=20, max_size=60)}


def _connection_pattern(path: Path, kind: int, rng: random.Random) -> str:
    """One hostile connection: returns what the daemon did ("reply", "closed")."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    try:
        s.connect(str(path))
        if kind == 0:  # connect/close storm: say nothing
            return "closed"
        if kind == 1:  # unframed garbage
            s.sendall(rng.randbytes(rng.randrange(1, 300)))
            s.shutdown(socket.SHUT_WR)
        elif kind == 2:  # absurd length prefix
            s.sendall(struct.pack(">I", rng.randrange(16 * MiB + 1, 2**32)) + b"xyz")
        elif kind == 3:  # truncated frame, then half-close
            s.sendall(struct.pack(">I", rng.randrange(10, 5000)) + rng.randbytes(rng.randrange(0, 9)))
            s.shutdown(socket.SHUT_WR)
        elif kind == 4:  # no hello
            wire.send(s, {"op": rng.choice(OPS), "model": "m"})
        elif kind == 5:  # wrong version
            wire.send(s, {"op": "hello", "version": rng.choice([0, 2, -1, "1", None, 2**40])})
        elif kind == 6:  # file descriptors sent with a valid hello (must be discarded)
            r, w = os.pipe()
            try:
                body = msgpack.packb({"op": "hello", "version": 1})
                socket.send_fds(s, [struct.pack(">I", len(body)) + body], [r, w])
            finally:
                os.close(r)
                os.close(w)
        elif kind == 7:  # greeted, then abrupt close mid-message
            wire.send(s, {"op": "hello", "version": 1})
            s.sendall(struct.pack(">I", 100) + b"\x81")
            return "closed"
        try:
            data = s.recv(1 << 16)
        except (ConnectionResetError, TimeoutError):
            data = b""
        return "reply" if data else "closed"
    finally:
        s.close()


def scenario_fuzz(base: Path, messages: int = 10_000, seed: int = 0) -> dict[str, Any]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as seed_

    strategies = _strategies()
    counts = {"framed_messages": 0, "connection_patterns": 0, "error_replies": 0, "ok_replies": 0,
              "unexpected_closes": 0, "fds_received": 0}
    rng = random.Random(seed)
    with sidecar(base) as sd:
        expected = expected_hashes(make_model(sd.store, "m", tensors=4))
        honest = sd.connect()
        lease = honest.acquire("m")
        lease.wait(timeout=60)
        rss_before = rss_kib(sd.proc.pid)
        anon_before = rss_kib(sd.proc.pid, "RssAnon")
        fds_before = fd_counts(sd.proc.pid)
        n_patterns = messages // 5
        n_framed = messages - n_patterns
        batch_size = 40
        t0 = time.monotonic()

        def open_fuzz_connection() -> tuple[socket.socket, int]:
            s = raw_hello(sd.socket)
            s.settimeout(30)
            wire.send(s, {"op": "acquire", "model": "m"})  # a real lease, so fuzzed fields reach deeper code
            reply, fds = wire.recv(s)
            for fd in fds:
                os.close(fd)
            return s, reply["lease"]

        def fuzz_batch(bodies: list[Any]) -> None:
            s, held = open_fuzz_connection()
            try:
                for body in bodies:
                    if isinstance(body, dict):
                        body = msgpack.packb({k: held if v == LEASE else v for k, v in body.items()},
                                             use_bin_type=True)
                    try:
                        s.sendall(struct.pack(">I", len(body)) + body)
                        reply, fds = wire.recv(s)
                    except (OSError, wire.ProtocolError):
                        counts["unexpected_closes"] += 1
                        s.close()
                        s, held = open_fuzz_connection()
                        continue
                    for fd in fds:
                        os.close(fd)
                    counts["fds_received"] += len(fds)
                    counts["framed_messages"] += 1
                    counts["ok_replies" if reply.get("ok") else "error_replies"] += 1
            finally:
                s.close()

        run = 0
        while counts["framed_messages"] < n_framed:  # hypothesis may stop a run early: go on with the next seed
            left = (n_framed - counts["framed_messages"]) // batch_size + 1
            seed_(seed * 1000 + run)(settings(max_examples=left, deadline=None, database=None,
                                              suppress_health_check=list(HealthCheck))(
                given(strategies["batch"])(fuzz_batch)))()
            run += 1
        rss_mid = rss_kib(sd.proc.pid)
        outcomes = {"reply": 0, "closed": 0}
        for i in range(n_patterns):
            outcomes[_connection_pattern(sd.socket, i % 8, rng)] += 1
            counts["connection_patterns"] += 1
        fuzz_s = time.monotonic() - t0
        # every hostile connection goes away; the honest one is still there with its lease
        wait_for(lambda: sd.status()["connections"] <= 2, timeout=30)
        alive = sd.proc.poll() is None
        first_lease_ok = lease.ready() and verify_lease(lease, expected) == 0
        with sd.connect() as c2, c2.acquire("m") as l2:
            l2.wait(timeout=60)
            mismatches = verify_lease(l2, expected)
            st = c2.status()
        lease.release()
        honest.close()
        wait_for(lambda: sd.status()["connections"] <= 1, timeout=30)
        rss_after = rss_kib(sd.proc.pid)
        anon_after = rss_kib(sd.proc.pid, "RssAnon")
        fds_after = fd_counts(sd.proc.pid)
        log = sd.log()
    internal = []  # "function: exception" of each distinct internal error the daemon logged
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "internal error on" in line:
            tb = lines[i + 1:i + 40]
            end = next((j for j, t in enumerate(tb) if t and not t.startswith((" ", "Traceback"))), len(tb) - 1)
            where = [t.split(" in ")[-1] for t in tb[:end] if t.strip().startswith("File ")]
            sample = f"{where[-1] if where else '?'}: {tb[end] if tb else '?'}"
            if sample not in internal:
                internal.append(sample)
    return {"messages_total": counts["framed_messages"] + counts["connection_patterns"], **counts,
            "pattern_outcomes": outcomes, "seconds": round(fuzz_s, 1), "daemon_alive": alive,
            "honest_lease_intact": first_lease_ok, "byte_mismatches_after": mismatches,
            "client_errors_counted": st["counters"]["client_errors"],
            "internal_errors_logged": log.count("internal error on"), "internal_error_samples": internal,
            "rss_kib": {"before": rss_before, "after_framed": rss_mid, "after": rss_after},
            "rss_anon_kib": {"before": anon_before, "after": anon_after},
            "fds_before": fds_before, "fds_after": fds_after}


# -- b: load --------------------------------------------------------------------------------------------------


def load_client(sock: str, spec_path: str, rounds: int, seed: int) -> None:
    """One client process: rounds of acquire -> verify a few tensors -> release; prints a JSON summary."""
    spec = json.loads(Path(spec_path).read_text())
    rng = random.Random(seed)
    out = {"rounds": 0, "mismatches": 0, "errors": 0, "busy_retries": 0, "error_samples": []}
    c = sc.connect(sock)
    for _ in range(rounds):
        model = rng.choice(sorted(spec))
        for _attempt in range(2000):
            try:
                lease = c.acquire(model)
                break
            except sc.SllmfsError as e:
                if "memory pool full" not in str(e):
                    raise
                out["busy_retries"] += 1
                time.sleep(rng.uniform(0.001, 0.02))
        else:
            out["errors"] += 1
            continue
        try:
            lease.wait(timeout=120)
            names = rng.sample(sorted(spec[model]), 3)
            out["mismatches"] += verify_lease(lease, spec[model], names)
            out["rounds"] += 1
        except Exception as e:  # counted, not hidden: the summary carries a sample
            out["errors"] += 1
            if len(out["error_samples"]) < 3:
                out["error_samples"].append(f"{type(e).__name__}: {e}")
        finally:
            lease.release()
    c.close()
    print(json.dumps(out), flush=True)


def scenario_load(base: Path, clients: int = 32, rounds: int = 100, model_mib: int = 16) -> dict[str, Any]:
    tensors = 8
    per = model_mib * MiB // tensors
    pool = f"{model_mib * 5 // 2}MiB"  # two of the three models fit: the third always evicts one
    with sidecar(base, "--mem-pool-size", pool) as sd:
        memfd_baseline = fd_counts(sd.proc.pid)["memfds"]
        spec = {f"org/load{i}": expected_hashes(make_model(sd.store, f"org/load{i}", tensors=tensors, nbytes=per,
                                                           seed=10 + i)) for i in range(3)}
        spec_path = base / "load-spec.json"
        spec_path.write_text(json.dumps(spec))
        rss_before = rss_kib(sd.proc.pid)
        anon_before = rss_kib(sd.proc.pid, "RssAnon")
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "bench.reliability", "_load-client", str(sd.socket),
                                   str(spec_path), str(rounds), str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for i in range(clients)]
        results, crashed, crash_samples = [], 0, []
        try:
            for p in procs:
                out, err = p.communicate(timeout=900)
                if p.returncode == 0 and out.strip():
                    results.append(json.loads(out.strip().splitlines()[-1]))
                else:
                    crashed += 1
                    if len(crash_samples) < 3:
                        crash_samples.append(err.strip().splitlines()[-1] if err.strip() else f"rc {p.returncode}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        seconds = time.monotonic() - t0
        leases_left_ok = wait_for(lambda: sd.status()["leases"] == [], timeout=20)
        st = sd.status()
        resident = [m["name"] for m in st["models"] if m["tier"] == "memory"]
        memfds_resident = fd_counts(sd.proc.pid)["memfds"]
        rss_after = rss_kib(sd.proc.pid)
        shmem_after = rss_kib(sd.proc.pid, "RssShmem")
        anon_after = rss_kib(sd.proc.pid, "RssAnon")
        with sd.connect() as c:
            for name in spec:
                c.evict(name)
            used_after_evict = c.status()["memory"]["used"]
        wait_for(lambda: fd_counts(sd.proc.pid)["memfds"] <= memfd_baseline, timeout=10)
        memfds_after_evict = fd_counts(sd.proc.pid)["memfds"]
        rss_evicted = rss_kib(sd.proc.pid)
        alive = sd.proc.poll() is None
    total = {k: sum(r[k] for r in results) for k in ("rounds", "mismatches", "errors", "busy_retries")}
    return {"clients": clients, "rounds_per_client": rounds, "model_mib": model_mib, "mem_pool": pool,
            "rounds_run": total["rounds"], "byte_mismatches": total["mismatches"], "errors": total["errors"],
            "error_samples": [s for r in results for s in r["error_samples"]][:3],
            "busy_retries": total["busy_retries"], "clients_crashed": crashed, "crash_samples": crash_samples,
            "seconds": round(seconds, 1), "evictions": st["counters"]["evictions"], "fills": st["counters"]["fills"],
            "leases_left": len(st["leases"]), "leases_drained": leases_left_ok, "resident_after": resident,
            "memfds": {"baseline": memfd_baseline, "with_resident_models": memfds_resident,
                       "after_evicting_all": memfds_after_evict},
            "memory_used_after_evicting_all": used_after_evict, "daemon_alive": alive,
            "rss_kib": {"before": rss_before, "after": rss_after, "after_evicting_all": rss_evicted},
            "rss_shmem_kib_after": shmem_after, "rss_anon_kib": {"before": anon_before, "after": anon_after}}


# -- c: kills -------------------------------------------------------------------------------------------------

WAITER = """
import sys, time, sllmfs.client.client as sc
c = sc.connect(sys.argv[1])
lease = c.acquire(sys.argv[2])
print("acquired", flush=True)
sys.stdin.readline()
try:
    lease.wait(timeout=None if sys.argv[3] == 'none' else float(sys.argv[3]))
    print("READY", flush=True)
except Exception as e:
    print(f"wait: {type(e).__name__}: {e}", flush=True)
try:
    c.status()
    print("status: ok", flush=True)
except Exception as e:
    print(f"status: {type(e).__name__}: {e}", flush=True)
"""


def scenario_kill_during_fill(base: Path, model_mib: int = 128, wait_timeout: float = 5,
                              no_timeout_waiter: bool = False) -> dict[str, Any]:
    store = base / "store"
    run_dir = base / "run"
    expected = expected_hashes(make_model(store, "big", tensors=8, nbytes=model_mib * MiB // 8))
    args = ("--mem-pool-size", f"{2 * model_mib}MiB", "--num-thread", "1", "--chunk-size", "4MiB")
    with sidecar(base, *args, store=store, run_dir=run_dir) as sd:
        waiters = [subprocess.Popen([sys.executable, "-c", WAITER, str(sd.socket), "big", t],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for t in ([str(wait_timeout), "none"] if no_timeout_waiter else [str(wait_timeout)])]
        p = waiters[0]
        try:
            for w in waiters:
                assert w.stdout is not None and w.stdin is not None
                assert w.stdout.readline().strip() == "acquired", w.stderr.read() if w.stderr else ""
            sd.proc.send_signal(signal.SIGKILL)
            sd.proc.wait()
            for w in waiters:
                assert w.stdin is not None
                w.stdin.write("go\n")
                w.stdin.flush()
            t0 = time.monotonic()
            out, err = p.communicate(timeout=wait_timeout + 60)
            client_s = time.monotonic() - t0
            hung = None
            if no_timeout_waiter:  # wait() without a timeout, same situation: still waiting well after the first
                time.sleep(5)
                hung = waiters[1].poll() is None
        finally:
            for w in waiters:
                if w.poll() is None:
                    w.kill()
                    w.wait()
    lines = out.strip().splitlines()
    mid_fill = "READY" not in lines
    with sidecar(base, *args, store=store, run_dir=run_dir) as sd, sd.connect() as c, c.acquire("big") as lease:
        lease.wait(timeout=120)
        mismatches = verify_lease(lease, expected)
    verify = subprocess.run([sys.executable, "-m", "sllmfs", "verify", "--model", "big", "--storage-path", str(store)],
                            capture_output=True, text=True, timeout=300)
    return {"model_mib": model_mib, "killed_mid_fill": mid_fill, "client_lines": lines,
            "client_exit_s": round(client_s, 1), "client_timeout_s": wait_timeout,
            "no_timeout_waiter_still_waiting": hung,
            "no_timeout_waiter_waited_s": round(client_s + 5, 1) if no_timeout_waiter else None,
            "restart_byte_mismatches": mismatches, "verify_rc": verify.returncode,
            "verify_out": (verify.stdout + verify.stderr).strip().splitlines()[-1:]}


def scenario_kill_with_mapped_lease(base: Path) -> dict[str, Any]:
    with sidecar(base) as sd:
        tensors = make_model(sd.store, "m", tensors=6)
        expected = expected_hashes(tensors)
        c = sd.connect()
        lease = c.acquire("m")
        lease.wait(timeout=60)
        views = lease.numpy()
        sd.proc.send_signal(signal.SIGKILL)
        sd.proc.wait()
        mismatches = verify_lease(lease, expected)
        view_mismatch = sum(views[k].tobytes() != v for k, v in tensors.items())
        try:
            c.status()
            after = "status answered (unexpected)"
        except sc.SidecarError as e:
            after = f"SidecarError: {e}"
        c.close()
    return {"tensors_checked": len(tensors), "byte_mismatches_after_kill": mismatches + view_mismatch,
            "client_call_after_kill": after}


def scenario_kill_with_mount(base: Path) -> dict[str, Any]:
    mnt = base / "mnt"
    store = base / "store"
    try:
        with sidecar(base, "--mount", str(mnt), store=store) as sd:
            make_model(sd.store, "org/m")
            wait_log(sd, "mounted")
            first = json.loads((mnt / "org" / "m" / "config.json").read_text())
            sd.proc.send_signal(signal.SIGKILL)
            sd.proc.wait()
        stale = mounted(mnt)
        try:
            os.listdir(mnt)
            stale_access = "listable"
        except OSError as e:
            stale_access = f"{type(e).__name__} errno {e.errno} ({e.strerror})"
        with sidecar(base, "--mount", str(mnt), store=store) as sd:
            log = wait_log(sd, "mounted")
            second = json.loads((mnt / "org" / "m" / "config.json").read_text())
            cleaned = "stale mount" in log
            sd.proc.send_signal(signal.SIGTERM)
            rc = sd.proc.wait(timeout=20)
        return {"read_before_kill": first == {"model_type": "test"}, "stale_mount_left": stale,
                "stale_mount_access": stale_access, "restart_logged_stale_cleanup": cleaned,
                "read_after_restart": second == {"model_type": "test"}, "sigterm_rc": rc,
                "unmounted_after_sigterm": not mounted(mnt)}
    finally:
        lazy_unmount(mnt)


# -- d: security ----------------------------------------------------------------------------------------------

AS_OTHER = """
import os, sys, json, socket
import sllmfs.client.client as sc  # imported as root: the interpreter lives under /root; then drop to the other user
os.setgroups([])
os.setgid(int(sys.argv[4]))
os.setuid(int(sys.argv[3]))
out = {"uid": os.getuid()}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    out["raw_connect"] = "connected"
except OSError as e:
    out["raw_connect"] = f"{type(e).__name__} errno {e.errno}"
s.close()
try:
    with sc.connect(sys.argv[1]) as c:
        out["client"] = "served: %d models" % len(c.list())
except Exception as e:
    out["client"] = f"{type(e).__name__}: {e}"
if sys.argv[2]:
    try:
        with open(sys.argv[2], "rb") as f:
            out["fuse_read"] = f"read {len(f.read())} bytes"
        folder = os.path.dirname(sys.argv[2])
        out["fuse_listing"] = sorted(os.listdir(folder))
        weights = [n for n in out["fuse_listing"] if n.endswith(".safetensors")]
        if weights:
            with open(os.path.join(folder, weights[0]), "rb") as f:
                out["fuse_weights_read"] = f"read {len(f.read())} bytes of {weights[0]}"
    except OSError as e:
        out["fuse_read"] = out.get("fuse_read", "") + f" then {type(e).__name__} errno {e.errno}"
print(json.dumps(out))
"""


# -- kills of writers: save --force, rm, the framework write-back ---------------------------------------------

_WRITE_BACK = (
    "import sys, torch\n"
    "from sllmfs.integrations.common import writeback\nfrom sllmfs.integrations.sglang import variants\n"
    "from sllmfs.store.store import Store\n"
    "key = variants.make(tp_size=1, tp_rank=0, dtype='float32', quant=None, sglang_version='0.5.17')\n"
    "g = torch.Generator().manual_seed(int(sys.argv[2]))\n"
    "state = {f'w{i}': torch.randn(1 << 20, generator=g) for i in range(16)}\n"
    "writeback.write_rank_state(Store(sys.argv[1]), 'm', key, state, replace=True)\n"
)


def _checkpoint(src: Path, seed: int, tensors: int = 16) -> dict[str, str]:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    arrays = {f"w{i}": rng.standard_normal(1 << 20, dtype=np.float32) for i in range(tensors)}
    src.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "test", "seed": seed}))
    return {k: xxhash.xxh3_64_hexdigest(v.tobytes()) for k, v in arrays.items()}


def _stored_hashes(store: Path, variant: str) -> dict[str, str] | None:
    """The variant's tensors as stored (every window and tensor checksum verified), or None when absent."""
    from sllmfs.core.errors import NotFound
    from sllmfs.store.reader import VariantReader, verify_variant
    from sllmfs.store.store import Store

    try:
        info = Store(store, create=False, cleanup=False).get("m")
        with VariantReader(info.variant_dir(variant)) as r:
            if verify_variant(r) is not None:
                return {"corrupt": "verify failed"}
            return {n: xxhash.xxh3_64_hexdigest(r.read_tensor(n)) for n in r.manifest.names()}
    except NotFound:
        return None


def scenario_kill_writers(base: Path, kills: int = 12) -> dict[str, Any]:
    """SIGKILL `save --force`, `rm` and a write-back at `kills` instants spread over each one's own duration:
    the stored model (or variant) must be the old or the new one, complete, every time."""
    from sllmfs.integrations.sglang import variants
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store

    store = base / "store"
    old, new = _checkpoint(base / "old", 1), _checkpoint(base / "new", 2)
    env = {**os.environ, "SLLMFS_STORAGE_PATH": str(store)}
    wb_key = variants.make(tp_size=1, tp_rank=0, dtype="float32", quant=None, sglang_version="0.5.17").key
    cmds = {
        "save --force": [sys.executable, "-m", "sllmfs", "save", "--model", "m", "--force", "--local-model-path",
                         str(base / "new")],
        "rm": [sys.executable, "-m", "sllmfs", "rm", "--model", "m", "-y"],
        "write-back": [sys.executable, "-c", _WRITE_BACK, str(store), "7"],
    }

    def reset() -> None:
        save_model(Store(store), "m", base / "old", force=True)
        subprocess.run([sys.executable, "-c", _WRITE_BACK, str(store), "6"], check=True, env=env)

    reset()
    wb_old = _stored_hashes(store, wb_key)
    subprocess.run(cmds["write-back"], check=True, env=env)
    wb_new = _stored_hashes(store, wb_key)
    out: dict[str, Any] = {"kills_per_op": kills, "checkpoint_mib": 64}
    for op, cmd in cmds.items():
        reset()
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        duration = time.monotonic() - t0
        outcomes: dict[str, int] = {}
        for i in range(kills):
            reset()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(duration * (i + 0.5) / kills)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            got = _stored_hashes(store, wb_key if op == "write-back" else "hf")
            ref_old, ref_new = (wb_old, wb_new) if op == "write-back" else (old, new)
            if got is None:
                kind = "gone" if op in ("rm",) else "lost"
            elif got == ref_old:
                kind = "old"
            elif got == ref_new:
                kind = "new"
            else:
                kind = "mixed or corrupt"
            outcomes[kind] = outcomes.get(kind, 0) + 1
        Store(store)  # the next writer removes what the killed ones left
        out[op] = {"duration_s": round(duration, 2), "outcomes": outcomes,
                   "tmp_left_after_next_writer": len(list((store / "tmp").iterdir()))}
    out["bad"] = sum(n for op in cmds for k, n in out[op]["outcomes"].items() if k in ("lost", "mixed or corrupt"))
    return out


# -- a connection flood: caps per process and in all, idle timeouts, bodies paid as they arrive -------------

FLOOD = r"""
import resource, socket, struct, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for i in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
        if i % 2:  # announce a 16 MiB message, send one byte of it, stall
            s.sendall(struct.pack(">I", (16 << 20) - 1) + b"x")
    except OSError:
        s.close()
        continue
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""


def scenario_flood(base: Path, processes: int = 4, per_process: int = 5000, probes: int = 50) -> dict[str, Any]:
    """Hostile processes open ``processes * per_process`` connections (half stalled mid-message) and
    hold them; meanwhile a normal client connects and asks for status, the mount is listed and a model
    is acquired. A connection that never says hello is closed by the hello timeout."""
    import statistics

    with sidecar(base, "--mount", str(base / "mnt")) as sd:
        make_model(sd.store, "org/m")
        rss_before = rss_kib(sd.proc.pid)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(sd.socket))
        t_silent = time.monotonic()
        floods = [subprocess.Popen([sys.executable, "-c", FLOOD, str(sd.socket), str(per_process)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                  for _ in range(processes)]
        try:
            opened = sum(int(f.stdout.readline()) for f in floods)  # type: ignore[union-attr]
            times, mount_times = [], []
            for _ in range(probes):
                t0 = time.perf_counter()
                with sd.connect() as c:
                    st = c.status()
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                listed = "m" in os.listdir(base / "mnt" / "org")
                mount_times.append(time.perf_counter() - t0)
            with sd.connect() as c, c.acquire("org/m") as lease:
                acquired = len(lease.tensors(timeout=30))
            rss_during = rss_kib(sd.proc.pid)
        finally:
            for f in floods:
                f.stdin.close()  # type: ignore[union-attr]
                f.wait(timeout=60)
        silent.settimeout(30)
        closed = silent.recv(1) == b""
        silent_s = time.monotonic() - t_silent
        silent.close()
        with sd.connect() as c:
            after = c.status()
    return {"hostile_processes": processes, "hostile_connections_opened": opened,
            "daemon_connections_during": st["connections"], "refused": st["counters"]["connections_refused"],
            "status_median_ms": round(statistics.median(times) * 1e3, 2), "status_max_ms": round(max(times) * 1e3, 2),
            "mount_listing_ok": listed, "mount_median_ms": round(statistics.median(mount_times) * 1e3, 2),
            "acquired_tensors": acquired, "rss_kib": {"before": rss_before, "during": rss_during},
            "silent_closed": closed, "silent_closed_after_s": round(silent_s, 1),
            "connections_after": after["connections"]}


def _can_add_user() -> bool:
    return os.geteuid() == 0 and shutil.which("useradd") is not None and shutil.which("userdel") is not None


def _as_user(uid: int, gid: int, *args: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", AS_OTHER, *args, str(uid), str(gid)], capture_output=True,
                         text=True, timeout=60, cwd="/")
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout)


def scenario_security(base: Path, with_mount: bool = True) -> dict[str, Any]:
    if not _can_add_user():
        return {"skipped": "needs root and useradd"}
    created = False
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", OTHER_USER], check=True,
                       capture_output=True)
        created = True
    outer = Path(tempfile.mkdtemp(prefix="sllmfs-sec-"))
    try:
        os.chmod(outer, 0o755)  # the scenario's own root: reachable by anyone, so the daemon's modes decide
        ent = pwd.getpwnam(OTHER_USER)
        uid, gid = ent.pw_uid, ent.pw_gid
        res: dict[str, Any] = {"user": OTHER_USER, "uid": uid}
        mnt = outer / "mnt"
        mount_args = ("--mount", str(mnt)) if with_mount and os.path.exists("/dev/fuse") else ()
        store = outer / "store"
        with sidecar(outer, *mount_args, store=store, run_dir=outer / "run") as sd:
            make_model(sd.store, "org/m")
            fuse_file = ""
            if mount_args:
                wait_log(sd, "mounted")
                fuse_file = str(mnt / "org" / "m" / "config.json")
                st = os.stat(fuse_file)
                res["fuse_mount_options"] = next((line.split()[5] + " " + line.split()[-1]
                                                  for line in open("/proc/self/mountinfo")
                                                  if line.split()[4] == str(mnt)), "")
                res["fuse_file_mode"] = oct(st.st_mode & 0o777)
            res["socket_mode"] = oct(sd.socket.stat().st_mode & 0o777)
            res["socket_dir_mode"] = oct(sd.socket.parent.stat().st_mode & 0o777)
            res["as_other_default"] = _as_user(uid, gid, str(sd.socket), fuse_file)
            os.chmod(sd.socket.parent, 0o755)  # open the path: now only SO_PEERCRED stands in the way
            os.chmod(sd.socket, 0o666)
            res["as_other_path_opened"] = _as_user(uid, gid, str(sd.socket), "")
            res["refusal_logged"] = "not allowed to use this sidecar" in sd.log()
        with sidecar(outer, *mount_args, store=store, run_dir=outer / "run",
                     env={"SLLMFS_ALLOW_UIDS": str(uid)}) as sd:
            res["as_other_allowed_default_modes"] = _as_user(uid, gid, str(sd.socket), "")
            os.chmod(sd.socket.parent, 0o755)
            os.chmod(sd.socket, 0o666)
            res["as_other_allowed_path_opened"] = _as_user(uid, gid, str(sd.socket), "")
        return res
    finally:
        lazy_unmount(outer / "mnt")
        shutil.rmtree(outer, ignore_errors=True)
        if created:
            subprocess.run(["userdel", OTHER_USER], capture_output=True)


# -- report ---------------------------------------------------------------------------------------------------


def _md(results: dict[str, Any]) -> str:
    f, ld = results["fuzz"], results["load"]
    kf, km, kmount = results["kill_during_fill"], results["kill_with_lease"], results.get("kill_with_mount", {})
    sec = results["security"]
    lines = [
        "# Reliability and security",
        "",
        f"Measured by `python -m bench.reliability{' --quick' if results['quick'] else ''}` on {results['host']} "
        f"({results['cpus']} CPUs), {results['date']}, {results['total_s']} s in all. JSON: "
        f"`bench/results/reliability-{results['host']}.json`. Every figure below comes from that run; rerun the "
        "command to reproduce. CI-sized versions: `tests/sidecar/test_reliability.py`.",
        "",
        "## a. Fuzz (hostile protocol input)",
        "",
        f"- {f['messages_total']:,} hostile messages: {f['framed_messages']:,} hypothesis-generated framed bodies "
        f"on greeted connections (ops with wrong types, unknown ops, names with `..`, random msgpack, truncated "
        f"msgpack, random bytes) and {f['connection_patterns']:,} connection patterns (connect/close storms, "
        f"unframed garbage, absurd length prefixes, truncated frames, no hello, wrong versions, fds sent to the "
        f"daemon, abrupt close mid-frame) in {f['seconds']} s.",
        f"- Replies: {f['error_replies']:,} errors, {f['ok_replies']:,} ok (generated messages that happened to be "
        f"valid, e.g. `list`), {f['unexpected_closes']} unexpected connection closes; "
        f"{f['internal_errors_logged']} internal errors logged (see Findings); daemon alive: {f['daemon_alive']}.",
        f"- Afterwards: the honest client's lease taken before the fuzz is intact ({f['honest_lease_intact']}); a "
        f"fresh acquire verifies byte for byte ({f['byte_mismatches_after']} mismatches).",
        f"- Daemon VmRSS: {f['rss_kib']['before']:,} KiB before, {f['rss_kib']['after_framed']:,} KiB after the "
        f"framed messages, {f['rss_kib']['after']:,} KiB at the end (heap, RssAnon: "
        f"{f['rss_anon_kib']['before']:,} -> {f['rss_anon_kib']['after']:,} KiB). Open fds: "
        f"{f['fds_before']['fds']} before ({f['fds_before']['memfds']} memfds), {f['fds_after']['fds']} after "
        f"({f['fds_after']['memfds']} memfds).",
        "",
        "## b. Load (concurrent clients, forced eviction)",
        "",
        f"- {ld['clients']} client processes x {ld['rounds_per_client']} rounds of acquire -> wait -> xxh3 of 3 "
        f"random tensors against the store -> release, over 3 models of {ld['model_mib']} MiB with "
        f"`--mem-pool-size {ld['mem_pool']}` (two fit, never three) in {ld['seconds']} s.",
        f"- Rounds run: {ld['rounds_run']:,}; byte mismatches: {ld['byte_mismatches']}; errors: {ld['errors']}; "
        f"clients crashed: {ld['clients_crashed']}; fills: {ld['fills']}, evictions: {ld['evictions']}; "
        f"`memory pool full` refusals retried: {ld['busy_retries']:,} (the documented answer when every resident "
        "model is leased).",
        f"- After: leases left {ld['leases_left']}; memfds in the daemon {ld['memfds']['baseline']} before, "
        f"{ld['memfds']['with_resident_models']} with {len(ld['resident_after'])} models resident, "
        f"{ld['memfds']['after_evicting_all']} after evicting all (memory used "
        f"{ld['memory_used_after_evicting_all']}).",
        f"- Daemon VmRSS {ld['rss_kib']['before']:,} KiB before, {ld['rss_kib']['after']:,} KiB after, of which "
        f"{ld['rss_shmem_kib_after']:,} KiB are the resident models' memfd pages (RssShmem); heap (RssAnon) "
        f"{ld['rss_anon_kib']['before']:,} -> {ld['rss_anon_kib']['after']:,} KiB; "
        f"{ld['rss_kib']['after_evicting_all']:,} KiB once every model is evicted.",
        "",
        "## c. Kills",
        "",
        f"- SIGKILL during a fill ({kf['model_mib']} MiB, one fill thread; killed mid-fill: {kf['killed_mid_fill']}): "
        f"the waiting client got `{kf['client_lines'][0] if kf['client_lines'] else '?'}` and then "
        f"`{kf['client_lines'][1] if len(kf['client_lines']) > 1 else '?'}`, exiting {kf['client_exit_s']} s after "
        "the kill. A second client in the same spot calling `wait()` without a timeout was still waiting "
        f"{kf['no_timeout_waiter_waited_s']} s after the kill: {kf['no_timeout_waiter_still_waiting']}. "
        "After restart the model loads with "
        f"{kf['restart_byte_mismatches']} mismatches and `sllmfs verify` exits {kf['verify_rc']} "
        f"(`{' '.join(kf['verify_out'])}`).",
        f"- SIGKILL while a client holds a mapped lease: {km['tensors_checked']} tensors still readable with "
        f"{km['byte_mismatches_after_kill']} mismatches; its next call: `{km['client_call_after_kill']}`.",
    ]
    if kmount.get("skipped") or not kmount:
        lines.append(f"- SIGKILL with a FUSE mount: skipped ({kmount.get('skipped', 'not run')}).")
    else:
        lines.append(
            f"- SIGKILL with a FUSE mount up: the mount stays behind ({kmount['stale_mount_left']}; access gives "
            f"{kmount['stale_mount_access']}); the next `start` with the same `--mount` cleans it (logged: "
            f"{kmount['restart_logged_stale_cleanup']}) and serves (read ok: {kmount['read_after_restart']}); "
            f"SIGTERM then exits {kmount['sigterm_rc']} and unmounts ({kmount['unmounted_after_sigterm']}).")
    kw = results.get("kill_writers")
    if kw:
        lines += ["", "## c2. Kills of writers (one step to publish: `renameat2(RENAME_EXCHANGE)`)", "",
                  f"SIGKILL at {kw['kills_per_op']} instants spread evenly over each command's own duration, "
                  f"{kw['checkpoint_mib']} MiB checkpoints, the old copy restored before each kill; after each, "
                  "the stored model (or variant) is read back with every window and tensor checksum checked.", ""]
        for op in ("save --force", "rm", "write-back"):
            r = kw[op]
            seen = ", ".join(f"{k} {n}" for k, n in sorted(r["outcomes"].items()))
            lines.append(f"- `{op}` ({r['duration_s']} s uninterrupted): {seen}; `tmp/` entries left after the "
                         f"next writing command: {r['tmp_left_after_next_writer']}.")
        lines.append(f"- Lost, mixed or corrupt results: {kw['bad']}.")
    sf = results.get("store_fuzz")
    if sf:
        lines += ["", "## a2. Hostile stores (mutated manifests under a running daemon and mount)", "",
                  f"- {sf['mutations']:,} mutated manifests (types, huge and negative ints, floats, NaN, bools, "
                  "missing and extra keys, deep nesting, truncated JSON), each swapped in as a new version of a "
                  f"model, then read through the mount and acquired through the socket, in {sf['seconds']} s: "
                  f"{sf['refused']:,} refused with one line, {sf['served']:,} served (valid after all), "
                  f"{sf['mount_read_errors']:,} mount reads failed with EIO, {sf['mount_list_errors']} mount "
                  f"listing errors, {sf['tracebacks']} tracebacks in the daemon's log.",
                  f"- At the end: daemon alive {sf['daemon_alive']}; the good model read byte for byte through "
                  f"the socket and the mount: {sf['good_intact']}."]
    tf = results.get("tree_fuzz")
    if tf:
        lines += ["", "## a3. Hostile store trees (files and directories swapped under a running daemon and mount)",
                  "", f"- {tf['rounds']} rounds (seed {tf['seed']}, `python -m bench.fuzz_store --trees --rounds "
                  f"{tf['rounds']} --seed {tf['seed']}`), {tf['mutations']} damages to one or two of 6 models per "
                  "round: partitions, metadata files, model.json and manifests replaced by symlinks (to /etc/shadow, "
                  "to another model, dangling, loops), FIFOs, sockets, directories, junk or sparse 1 TiB files, "
                  "truncated, extended or removed; variant, variants/ and files/ directories and whole model "
                  "directories swapped for symlinks or files; modes set to 0000; odd entries (newlines, 255-byte "
                  f"names, undecodable bytes) under models/, variants/ and files/; in {tf['seconds']} s.",
                  f"- After each round: {tf['untouched_reads']:,} reads of untouched models through the socket and "
                  f"the mount, all byte for byte; damaged models served {tf['victim_served']} times (their own bytes) "
                  f"and refused {tf['victim_refused']} times with one line; `status` answered within "
                  f"{tf['status_max_ms']} ms at worst; `sllmfs ls` ran {tf['ls_runs']} times, listing the good "
                  "models and one line per bad entry; no byte of /etc/shadow or of a planted file outside the store "
                  f"was served. Problems: {len(tf['problems'])}; daemon alive {tf['daemon_alive']}; "
                  f"{tf['tracebacks']} tracebacks in its log."]
    fl = results.get("flood")
    if fl:
        lines += ["", "## c3. A connection flood (caps: 64 connections per client process, 4,096 in all; hello "
                  "timeout 10 s; idle timeout 600 s without a lease; bodies take memory as they arrive)", "",
                  f"- {fl['hostile_processes']} hostile processes opened {fl['hostile_connections_opened']:,} "
                  "connections (half announcing a 16 MiB message and stalling after one byte) and held them; "
                  f"the daemon kept {fl['daemon_connections_during']} and refused {fl['refused']:,}.",
                  f"- Meanwhile a normal client's connect + hello + status: median {fl['status_median_ms']} ms, "
                  f"max {fl['status_max_ms']} ms; the mount listed the model ({fl['mount_listing_ok']}, median "
                  f"{fl['mount_median_ms']} ms); a model acquired and read ({fl['acquired_tensors']} tensors).",
                  f"- Daemon VmRSS {fl['rss_kib']['before']:,} KiB before, {fl['rss_kib']['during']:,} KiB during.",
                  f"- A connection that never said hello was closed after {fl['silent_closed_after_s']} s "
                  f"({fl['silent_closed']}); connections left after the flood: {fl['connections_after']}."]
    lines += ["", "## d. Security (a second Unix user)", ""]
    if sec.get("skipped"):
        lines.append(f"Skipped: {sec['skipped']}.")
    else:
        lines += [
            f"User `{sec['user']}` (uid {sec['uid']}, created with `useradd -M -r` and removed afterwards); the socket "
            f"is mode {sec['socket_mode']} in a directory of mode {sec['socket_dir_mode']}, both root-owned.",
            "",
            f"- Default modes: raw connect `{sec['as_other_default'].get('raw_connect')}`, client "
            f"`{sec['as_other_default'].get('client')}`.",
            f"- Path opened up (dir 0755, socket 0666) so only `SO_PEERCRED` decides: raw connect "
            f"`{sec['as_other_path_opened'].get('raw_connect')}`, client `{sec['as_other_path_opened'].get('client')}`"
            f" (refusal logged: {sec['refusal_logged']}).",
            f"- With `SLLMFS_ALLOW_UIDS={sec['uid']}` (there is no `--allow-uids` flag; the environment variable or "
            f"the TOML key sets it), default modes: client `{sec['as_other_allowed_default_modes'].get('client')}`; "
            f"path opened up: client `{sec['as_other_allowed_path_opened'].get('client')}`.",
        ]
        if "fuse_file_mode" in sec:
            lines.append(
                f"- FUSE view: mount options `{sec['fuse_mount_options']}`, file mode {sec['fuse_file_mode']}; the "
                f"other user reading `org/m/config.json` through the mount: "
                f"`{sec['as_other_default'].get('fuse_read')}`; it lists "
                f"`{sec['as_other_default'].get('fuse_listing')}` and reads the weights: "
                f"`{sec['as_other_default'].get('fuse_weights_read', 'no')}`.")
    lines += ["", "Shared segments: memfds of mode 0400 sealed with `F_SEAL_FUTURE_WRITE` before any client sees "
              "them; `tests/store/test_integrity.py::test_clients_cannot_write_shared_segments` proves that an allowed "
              "uid cannot reopen its segment fd read-write (`EACCES`) and that even a root client gets `EPERM` "
              "on `pwrite` and on a writable map, and `EACCES` on `mprotect` to writable."]
    lines += ["", "## Findings", ""] + [f"- {x}" for x in results["findings"]] + [""]
    return "\n".join(lines)


def findings(results: dict[str, Any]) -> list[str]:
    out = []
    kf = results["kill_during_fill"]
    if kf["killed_mid_fill"] and kf.get("no_timeout_waiter_still_waiting"):
        out.append("`Lease.wait()` does not notice a dead sidecar: a client waiting on a fill when the daemon is "
                   "SIGKILLed sees readiness bytes stuck at 0 and only leaves through its `timeout` "
                   "(`SidecarError ... not ready after N s`); with `timeout=None` (the default of `wait()` and "
                   "`tensors()`) it hangs forever. Reproduce: `acquire` a model large enough to be mid-fill, SIGKILL "
                   "the daemon, call `lease.wait()` (scenario_kill_during_fill's second waiter in "
                   "bench/reliability.py shows it still waiting). A fix would poll the connection "
                   "(e.g. `recv(MSG_PEEK | MSG_DONTWAIT)` returning b'') while waiting.")
    sec = results["security"]
    if not sec.get("skipped"):
        allowed = sec["as_other_allowed_default_modes"].get("client", "")
        if "served" not in allowed:
            out.append("`allow_uids` alone does not let that uid in: the socket directory is created 0750 and the "
                       "socket 0660 (owner root), so an allowed uid that is not in the socket's group cannot reach "
                       f"the path (`{allowed}`). It works only with `group` set (or modes changed by hand).")
        fuse = sec["as_other_default"].get("fuse_read", "")
        if fuse.startswith("read"):
            out.append(f"The FUSE view is readable by any local user (`{sec.get('fuse_mount_options')}`, files "
                       f"{sec.get('fuse_file_mode')}): the socket's peer-credential check does not protect the model "
                       "bytes served through the mount when no group is configured. Setting `group` (SLLMFS_GROUP) "
                       "serves files root:group 0440 and keeps other users out "
                       "(tests/fuse/test_fuse_e2e.py::test_a_group_keeps_other_users_out_of_the_mount).")
    f, ld = results["fuzz"], results["load"]
    if f["internal_error_samples"]:
        out.append(f"Fuzzing hit {f['internal_errors_logged']} internal errors in the daemon "
                   f"({'; '.join(f['internal_error_samples'])}): `op_load_ipc` (sllmfs/sidecar/server.py) does "
                   "`conn.leases.get(msg.get('lease'))` before checking the type, so a dict or list `lease` raises "
                   "TypeError, and `float(msg.get('timeout', 120.0))` raises on a non-number `timeout` once the lease "
                   "is valid. The daemon survives (one `SidecarError: internal error` reply, connection kept), but "
                   "docs/protocol.md promises `BadInput` for bad argument types. Reproduce: on a greeted connection "
                   "send `{op: load_ipc, lease: {}, blocks: [], pieces: []}`, or acquire then send "
                   "`{op: load_ipc, lease: <id>, blocks: [], pieces: [], timeout: 'x'}`. "
                   "tests/sidecar/test_reliability.py::test_load_ipc_with_wrong_types_is_bad_input "
                   "is a strict xfail for it.")
    tf = results.get("tree_fuzz")
    if tf and (tf["problems"] or tf["tracebacks"] or not tf["daemon_alive"]):
        out.append(f"Store-tree fuzzing found {len(tf['problems'])} problems: {'; '.join(tf['problems'][:5])}")
    if f["unexpected_closes"] or ld["errors"] or ld["byte_mismatches"]:
        out.append("Fuzz or load saw errors: see the figures above and the JSON.")
    return out or ["None beyond the figures above."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts (minutes, not tens of minutes)")
    ap.add_argument("--no-write", action="store_true", help="print the JSON only")
    a = ap.parse_args()
    q = a.quick
    host = platform.node() or "host"
    t0 = time.monotonic()
    results: dict[str, Any] = {"host": host, "cpus": os.cpu_count(), "quick": q,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="sllmfs-rel-") as tmp:
        base = Path(tmp)

        def step(name: str, fn: Any, *args: Any, **kw: Any) -> None:
            d = base / name
            d.mkdir()
            s = time.monotonic()
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            results[name] = fn(d, *args, **kw)
            print(f"[{name}] {time.monotonic() - s:.1f} s: {json.dumps(results[name])[:400]}", file=sys.stderr,
                  flush=True)

        step("fuzz", scenario_fuzz, messages=10_000)
        step("load", scenario_load, clients=8 if q else 32, rounds=20 if q else 100, model_mib=4 if q else 16)
        step("kill_during_fill", scenario_kill_during_fill, model_mib=64 if q else 128, no_timeout_waiter=True)
        step("kill_with_lease", scenario_kill_with_mapped_lease)
        if os.geteuid() == 0 and os.path.exists("/dev/fuse"):
            step("kill_with_mount", scenario_kill_with_mount)
        else:
            results["kill_with_mount"] = {"skipped": "needs root and /dev/fuse"}
        step("kill_writers", scenario_kill_writers, kills=6 if q else 12)
        from bench.fuzz_store import fuzz as fuzz_store

        step("store_fuzz", fuzz_store, mutations=500 if q else 5000)
        from bench.fuzz_store import fuzz_trees

        step("tree_fuzz", fuzz_trees, rounds=20 if q else 100)
        step("flood", scenario_flood, processes=2 if q else 4, per_process=2000 if q else 5000)
        step("security", scenario_security)
    results["total_s"] = round(time.monotonic() - t0, 1)
    results["findings"] = findings(results)
    text = json.dumps(results, indent=1)
    if a.no_write:
        print(text)
        return
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"reliability-{host}.json").write_text(text + "\n")
    (ROOT / "docs" / "reliability.md").write_text(_md(results))
    print(f"wrote docs/reliability.md and bench/results/reliability-{host}.json ({results['total_s']} s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_load-client":
        load_client(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
