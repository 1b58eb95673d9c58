"""The tier-empty page-cache load, phase by phase (issue 18: `bench_cold_stages.py --part warm-load`).

The case `bench/peers.py --part main` calls "sllmfs warm": the model evicted from the memory tier
(`sllmfs evict`), its stored data files in the page cache, then a fresh process calls
``sllmfs.integrations.torch.load_dict(model, device_map={"": device})``. Every step's time comes from
one clock (CLOCK_MONOTONIC: Python's time.monotonic and the engine's steady_clock) in three
processes: the child's call and return, the sidecar's tier timeline (`status` -> the variant's
``timeline``: reserve, fill start, first/last window READY, fill end, the after-fill pin) and, on a
GPU, the sidecar's copy (the load_ipc reply: when the copy was asked for and started, the engine's
first/last ready block, its pins' span and summed seconds, its last block queued, its end). Printed
as one table per load, in ms from the child's call; each tensor is then checked against the file
(bench/peers.py's checksums): a figure from wrong bytes is not a figure.

Reference rows in the same run: the memory-tier hit (the copy alone, segments pinned), the page
cache -> faulted-in map copy (the fill's limit), the pinned H2D peak and InstantTensor from the page
cache (when its wheel is importable), both through bench/peers.py's own children.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
POOL = "48GB"  # as bench/peers.py: 8 blanks of 4 GiB on 16384 hugetlb pages, 4 per load of 13.48 GB
# the daemon as it is (a tier-empty load copies from the stored files, the tier filled after the copy) and
# as it was before NOTES-cold run 15 (the fill on the load's path: bench/fill_first.py); run 13's pair
# (bench/eager_cut.py), run 9's (bench/unpinned_blanks.py) and run 12's (bench/fill_python_reads.py) are settled
DAEMONS = (("gpu first", ("-m", "sllmfs")), ("fill first (before run 15)", (str(HERE / "fill_first.py"),)))


def child(socket: str, model: str, device: str, ref: str) -> dict[str, Any]:
    """One load in this (fresh) process: the timeline's client side and the sidecar's copy stats."""
    import peers
    import torch

    from sllmfs.integrations.torch import load_dict

    if device != "cpu":
        torch.empty(1, device=device)  # the CUDA context exists before the timer starts
        torch.cuda.synchronize()
    t0 = time.monotonic()
    tensors, stats = load_dict(model, device_map={"": device}, socket=socket, timeout=600, return_stats=True)
    if device != "cpu":
        torch.cuda.synchronize()
    t1 = time.monotonic()
    scalar = (int, float, str, bool)
    out: dict[str, Any] = {
        "t0": t0, "t1": t1, "seconds": t1 - t0, "bytes": stats.bytes, "gbps": stats.bytes / (t1 - t0) / 1e9,
        "engine": {k: v for k, v in stats.engine.items() if isinstance(v, scalar)},
        "links": {n: {k: v for k, v in s.items() if isinstance(v, scalar)} for n, s in stats.links.items()},
    }
    out.update(peers.verify(tensors, ref))
    return out


def run(store: Path, work: Path, src_file: Path, model: str, device: str, threads: int, reps: int,
        pool: str = POOL, daemons: int = len(DAEMONS)) -> dict[str, Any]:
    import peers
    from limits import read_files, stored_files

    ref = work / "reference.json"
    if not ref.exists() or ref.stat().st_mtime < src_file.stat().st_mtime:
        ref.write_text(json.dumps(peers.reference(src_file)))
    files = stored_files(store)
    found: dict[str, Any] = {"bench": "cold-stages", "part": "warm-load", "device": device, "threads": threads,
                             "pool": pool, "limits": {}, "loads": []}
    limits = found["limits"]
    read_files(files, threads, 32 << 20, direct=False)
    from bench_cold_stages import copy_into_map

    limits["page_cache_to_map_gbps"] = copy_into_map(files, threads, 32 << 20)
    if device != "cpu":
        limits["pinned_h2d_peak_gbps"] = _peers_child("pinned-peak", "-", device).get("gbps")
        it = _peers_child("instanttensor", str(src_file), device, "--placement", "warm", "--ref", str(ref))
        limits["instanttensor_page_cache"] = {k: it.get(k) for k in ("seconds", "gbps", "ok", "mismatches",
                                                                     "skipped", "error")}
    for label, program in DAEMONS[:daemons]:
        found["loads"] += _one_sidecar(label, program, store, work, files, model, device, threads, reps, pool, ref)
    _summary(found)
    bad = [x["name"] for x in found["loads"] if x.get("ok") is False or "error" in x]
    if bad:
        raise SystemExit(f"bench: load(s) failed or read wrong bytes: {bad}; see {work}/warmload-*.log")
    return found


def _one_sidecar(label: str, program: tuple[str, ...], store: Path, work: Path, files: list[Path], model: str,
                 device: str, threads: int, reps: int, pool: str, ref: Path) -> list[dict[str, Any]]:
    """A sidecar (``program``: which daemon): its blanks made, the model filled once, then ``reps`` times
    evicted and loaded with the files in the page cache, then once from the memory tier."""
    from limits import read_files, sh, start_sidecar, stop

    from sllmfs.client.client import connect

    tag = label.split()[0]
    sock, log = work / f"warmload-{tag}.sock", work / f"warmload-{tag}.log"
    proc = start_sidecar(store, sock, log, ["--mem-pool-size", pool, "--num-thread", str(threads),
                                            "--chunk-size", "64MiB"], program=program)
    rows = []
    try:
        _wait_blanks(log)  # the start-time blanks (and, on a GPU, their pins), as in a long-lived sidecar
        if device != "cpu":  # both daemons pin their blanks at start
            _wait_pinned_blanks(sock)
        pins = _pinned(log)
        sh(sys.executable, "-m", "sllmfs", "load", "--model", model, "--warm", "--socket", str(sock))
        for rep in range(1, reps + 1):
            _wait_pins(log, pins, device)
            sh(sys.executable, "-m", "sllmfs", "evict", "--model", model, "--socket", str(sock))
            read_files(files, threads, 32 << 20, direct=False)  # every stored byte in the page cache
            _wait_blank_pass(sock)
            pins = _pinned(log)
            rows.append(_one(f"{label}: tier empty, page cache #{rep}", sock, model, device, ref, connect))
        _wait_pins(log, pins, device)
        rows.append(_one(f"{label}: memory-tier hit", sock, model, device, ref, connect))
    finally:
        stop(proc)
        for r in rows:
            r["sidecar"] = label
        rows.append({"name": f"{label}: sidecar log", "log": [
            ln for ln in log.read_text(errors="replace").splitlines()
            if re.search(r"filled|pinned|gpu copy|lease taken|blank|evicted", ln)][-40:]})
    return rows


def _peers_child(task: str, path: str, device: str, *extra: str) -> dict[str, Any]:
    import peers

    return peers.run_child([sys.executable, str(HERE / "peers.py"), "--child", task, path, "--device", device,
                            *extra], 600)


def _pinned(log: Path) -> int:
    """The after-fill pins so far (`pinned model=... for GPU copies`; blank lines say "for GPU copies" too)."""
    return log.read_text(errors="replace").count("pinned model=")


def _wait_pins(log: Path, before: int, device: str) -> None:
    """On a GPU the sidecar pins a fill's segments once it ends (re-pinning what the copy or its blanks
    pinned in pieces): wait for that, so the next load does not run beside it."""
    if device == "cpu":
        return
    deadline = time.monotonic() + 120
    while _pinned(log) <= before and time.monotonic() < deadline:
        time.sleep(0.1)


def _wait_blank_pass(sock: Path, seconds: float = 60) -> None:
    """After an eviction the sidecar makes blanks of the memory it gave back (and pins them): wait until
    the blanks stop growing, as a load a while after an eviction would find them."""
    from sllmfs.client.client import connect

    last, steady, deadline = -1, 0, time.monotonic() + seconds
    while time.monotonic() < deadline and steady < 5:
        with connect(str(sock)) as c:
            mem = c.status()["memory"]
        now = (mem["blanks"], mem.get("blanks_pinned", 0))
        steady = steady + 1 if now == last else 0
        last = now
        time.sleep(0.1)


def _wait_pinned_blanks(sock: Path, seconds: float = 120) -> None:
    """Until every blank is pinned for GPU copies (status), as in a sidecar up for a while."""
    from sllmfs.client.client import connect

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with connect(str(sock)) as c:
            mem = c.status()["memory"]
        if mem["blanks"] and mem.get("blanks_pinned", 0) >= mem["blanks"]:
            return
        time.sleep(0.1)
    print(f"bench: blanks not all pinned after {seconds:.0f} s: {mem}", flush=True)


def _wait_blanks(log: Path, seconds: float = 300) -> None:
    """Until the start-time pass has made its blanks (its log line), or the hugetlb pool has no room for one."""
    from sllmfs.sidecar import prefault

    deadline = time.monotonic() + seconds
    while "as blank segments" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        free, page = prefault.hugepages_free()
        if free * page < prefault.MIN_BLANK:
            return  # no hugetlb pool (left): no blanks will come
        time.sleep(0.1)


def _one(name: str, sock: Path, model: str, device: str, ref: Path, connect: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "bench_cold_stages.py"), "--child-load", str(sock), model, device, str(ref)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    got = next((json.loads(ln[7:]) for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if got is None:
        return {"name": name, "error": (proc.stdout + proc.stderr).splitlines()[-15:]}
    with connect(str(sock)) as c:
        st = c.status()
    tl = next((v["timeline"] for m in st["models"] for v in m["variants"] if m["name"] == model), {})
    row = {"name": name, **got, "timeline": tl, "phases_ms": phases(got, tl)}
    print(f"\n{name}: {got['seconds']:.3f} s, {got['gbps']:.2f} GB/s, checked {got.get('checked')} tensors, "
          f"{got.get('mismatches')} mismatches", flush=True)
    for label, ms in row["phases_ms"].items():
        print(f"  {label:<58}{ms:>9.1f}", flush=True)
    return row


def phases(got: dict[str, Any], tl: dict[str, Any]) -> dict[str, float]:
    """Each step in ms from the child's call (a duration where the label says so)."""
    t0 = got["t0"]
    e = got["engine"]
    out: dict[str, float] = {}

    def at(label: str, t: float | None) -> None:
        if t:
            out[label] = (t - t0) * 1e3

    miss = tl.get("reserved", 0) >= t0  # reserved by this load: the tier was empty
    if miss:
        at("acquire reaches the tier (reserve starts)", tl["reserved"])
        blanks = f"{tl.get('from_blanks', 0)}/{tl.get('partitions', 0)}, pinned {tl.get('pinned_blanks', 0)}"
        out[f"  reserve's own ms (partitions from blanks {blanks})"] = tl["alloc_s"] * 1e3
        out["    of which cutting blanks to size (the shrink; eager: unpins first), ms"] = tl.get("cut_s", 0.0) * 1e3
        at("fill threads start", tl.get("fill_start"))
        at("first window READY", tl.get("first_ready"))
        at("last window READY", tl.get("last_ready"))
        at("fill threads end", tl.get("fill_end"))
        span = tl.get("last_ready", 0) - tl.get("fill_start", 0)
        if span > 0:
            out["  fill rate GB/s (bytes / fill start..last READY)"] = got["bytes"] / span / 1e9
    if "copy_started_at" in e:  # the sidecar copied (CUDA IPC)
        at("load_ipc reaches the sidecar", e["copy_asked_at"])
        start = e["copy_started_at"]
        at("sidecar copy starts", start)
        for key, label in (("first_ready_seconds", "copy: first block ready"),
                           ("pin_start_seconds", "copy: first pin starts"),
                           ("pin_end_seconds", "copy: last pin ends"),
                           ("last_ready_seconds", "copy: last block ready"),
                           ("last_queued_seconds", "copy: last block queued"),
                           ("seconds", "copy: every byte landed")):
            if e.get(key, -1) >= 0:
                at(label, start + e[key])
        out["  pins: summed seconds of the copy's threads, ms"] = e.get("register_seconds", 0) * 1e3
        out["  pins: calls"] = e.get("register_calls", 0)
        out["  pins: GB pinned by this copy"] = e.get("newly_registered_bytes", 0) / 1e9
        at("reply sent (copy_ended_at)", e.get("copy_ended_at"))
    else:  # the client copied itself
        for link, s in got["links"].items():
            at(f"client copy ({link}) starts", s.get("start"))
            if "first_ready_seconds" in s:
                at(f"client copy ({link}): first block ready", s["start"] + s["first_ready_seconds"])
                at(f"client copy ({link}): last block ready", s["start"] + s.get("last_ready_seconds", 0))
            at(f"client copy ({link}) ends", s.get("end"))
    at("load_dict returns (synchronized)", got["t1"])
    if tl.get("pin_s"):
        out["after-fill pin of the segments (off the load), ms"] = tl["pin_s"] * 1e3
    return out


def _summary(found: dict[str, Any]) -> None:
    lim = found["limits"]
    print(f"\nlimits: page cache -> map {lim['page_cache_to_map_gbps']:.1f} GB/s, pinned H2D peak "
          f"{lim.get('pinned_h2d_peak_gbps')}, InstantTensor page cache {lim.get('instanttensor_page_cache')}")
    print(f"{'load':<58}{'s':>7}{'GB/s':>7}{'blanks':>8}{'pinned GB':>10}{'last READY':>11}{'landed':>8}")
    for x in found["loads"]:
        if "seconds" not in x:
            continue
        tl, e, ph = x.get("timeline", {}), x.get("engine", {}), x.get("phases_ms", {})
        blanks = (f"{tl.get('from_blanks', 0)}/{tl.get('partitions', 0)}"
                  f"{'p' if tl.get('pinned_blanks') else ''}" if tl.get("reserved", 0) >= x["t0"] else "-")
        pinned = f"{e['newly_registered_bytes'] / 1e9:.2f}" if "copy_started_at" in e else "-"  # the sidecar's copy
        print(f"{x['name']:<58}{x['seconds']:>7.3f}{x['gbps']:>7.1f}{blanks:>8}"
              f"{pinned:>10}{ph.get('last window READY', 0):>11.0f}"
              f"{ph.get('copy: every byte landed', ph.get('load_dict returns (synchronized)', 0)):>8.0f}")
