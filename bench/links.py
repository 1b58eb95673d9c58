"""Several GPUs, each over its own PCIe link: the limits a multi-GPU load is measured against (each
link's pinned peak, all links at once, host memory's read bandwidth) and when each copy ran.

Used by bench_sglang.py (--sizes with --tp 2, --links). The timing helpers read the sidecar's log
(millisecond timestamps, one ``gpu copy`` line per finished copy) and SGLang's per-rank log lines.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime

from limits import measured

GIB = 1 << 30


def pinned_peak_each(devices: list[int], gib: int = 4, reps: int = 5) -> dict[int, float]:
    """Each GPU's pinned host-to-device peak on its own (median of ``reps``), GB/s by device."""
    return {d: _together([d], gib, reps) for d in devices}


def pinned_peak_together(devices: list[int], gib: int = 4, reps: int = 5) -> float:
    """Aggregate pinned host-to-device GB/s with every GPU copying at once (each from its own pinned
    buffer): what both links can take together, host memory and root complex included."""
    return _together(devices, gib, reps)


def _together(devices: list[int], gib: int, reps: int) -> float:
    import torch

    n = gib * GIB
    bufs = []
    for d in devices:
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        src.fill_(7)
        bufs.append((d, src, torch.empty(n, dtype=torch.uint8, device=f"cuda:{d}")))
    start = threading.Barrier(len(devices) + 1)
    done = threading.Barrier(len(devices) + 1)

    def copier(d: int, src: object, dst: object) -> None:
        import torch

        with torch.cuda.device(d):
            stream = torch.cuda.Stream(d)
            for _ in range(reps + 1):  # the first round warms up
                start.wait()
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)  # type: ignore[attr-defined]
                stream.synchronize()
                done.wait()

    threads = [threading.Thread(target=copier, args=b) for b in bufs]
    for t in threads:
        t.start()
    times = []
    for rep in range(reps + 1):
        start.wait()
        t0 = time.perf_counter()
        done.wait()
        if rep:
            times.append(time.perf_counter() - t0)
    for t in threads:
        t.join()
    what = f"the pinned H2D peak of GPU(s) {devices}"
    return measured(what, n * len(devices) / sorted(times)[len(times) // 2] / 1e9)


def host_read_bw(gib: int = 8, reps: int = 3) -> float:
    """Host memory read GB/s: torch sums a buffer far larger than the caches on every core (the
    copies to the GPUs only read host memory, so this is the cap they share)."""
    import torch

    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
    buf = torch.ones(gib * GIB // 8, dtype=torch.int64)
    buf.sum()  # touch and warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return measured("host memory read bandwidth", gib * GIB / min(times) / 1e9)


# -- when each copy ran ------------------------------------------------------------------------

SIDECAR_COPY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) sllmfs INFO gpu copy model=(\S+) variant=(\S+) "
                          r"pid=(\d+) bytes=(\d+) seconds=([0-9.]+) \(wall ([0-9.]+)\)")


def sidecar_copies(log: str) -> list[dict[str, object]]:
    """The sidecar's finished GPU copies in ``log``: pid, variant, bytes, start and end (epoch seconds)."""
    out = []
    for line in log.splitlines():
        m = SIDECAR_COPY.match(line)
        if not m:
            continue
        end = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        wall = float(m[7])
        out.append({"pid": int(m[4]), "variant": m[3], "bytes": int(m[5]), "start": end - wall, "end": end})
    return out


def overlap(windows: list[tuple[float, float, int]]) -> dict[str, float]:
    """(start, end, bytes) per link's copy → aggregate GB/s over their union, and how much of the
    union all of them ran at once (1.0: fully side by side; 0: one after the other)."""
    if not windows:
        return {}
    first, last = min(w[0] for w in windows), max(w[1] for w in windows)
    together = max(0.0, min(w[1] for w in windows) - max(w[0] for w in windows))
    span = last - first
    total = sum(w[2] for w in windows)
    return {"span_s": span, "bytes": total, "aggregate_gbps": total / span / 1e9 if span > 0 else 0.0,
            "all_at_once_fraction": together / span if span > 0 else 0.0}


def per_pid(copies: list[dict[str, object]]) -> list[tuple[float, float, int]]:
    """One window per client process (a rank may send several copies): first start, last end, bytes."""
    by: dict[int, list[dict[str, object]]] = {}
    for c in copies:
        by.setdefault(int(c["pid"]), []).append(c)  # type: ignore[call-overload]
    return [(min(float(c["start"]) for c in cs), max(float(c["end"]) for c in cs),  # type: ignore[arg-type]
             sum(int(c["bytes"]) for c in cs)) for cs in by.values()]  # type: ignore[call-overload]


# SGLang's per-rank lines, "[2026-11-30 17:16:46.123 TP1] ..." (milliseconds with SGLANG_LOG_MS=1)
_PREFIX = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{3})?)[^\]]*?TP(\d+)[^\]]*\] "
RANK_LOADED = re.compile(_PREFIX + r"sllmfs: loaded \S+ rank \d+/\d+ by the ([a-z-]+) path in ([0-9.]+) s")
RANK_COPIED = re.compile(_PREFIX + r"sllmfs: copied \d+ (?:ranges|tensors) \(([0-9.]+) GB\) in ([0-9.]+) s "
                         r"by the (\w+)")
RANK_LOAD_END = re.compile(_PREFIX + r"Load weight end\. elapsed=([0-9.]+) s")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S").timestamp()


def ranks(log: str) -> dict[int, dict[str, object]]:
    """Each TP rank's load phase from SGLang's log: SGLang's "Load weight end" time, the path sllmfs
    took and its time, and the copy's bytes, seconds, GB/s and window (start/end, epoch seconds)."""
    out: dict[int, dict[str, object]] = {}
    for line in log.splitlines():
        if m := RANK_LOAD_END.match(line):
            out.setdefault(int(m[2]), {})["load_weight_s"] = float(m[3])
        elif m := RANK_LOADED.match(line):
            out.setdefault(int(m[2]), {}).update(sllm_path=m[3], sllm_load_s=float(m[4]))
        elif m := RANK_COPIED.match(line):
            r = out.setdefault(int(m[2]), {})
            gb, s, end = float(m[3]), float(m[4]), _stamp(m[1])
            r["copy_gb"] = float(r.get("copy_gb", 0.0)) + gb  # type: ignore[arg-type]
            r["copy_s"] = float(r.get("copy_s", 0.0)) + s  # type: ignore[arg-type]
            r["copy_by"] = m[5]
            r["copy_start"] = min(float(r.get("copy_start", end - s)), end - s)  # type: ignore[arg-type]
            r["copy_end"] = end
    for r in out.values():
        if r.get("copy_s"):
            r["copy_gbps"] = float(r["copy_gb"]) / float(r["copy_s"])  # type: ignore[arg-type]
    return dict(sorted(out.items()))
