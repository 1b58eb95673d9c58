"""How the disk's read rate grows with parallel O_DIRECT requests (issue 18: cold fill vs fastsafetensors).

    python3 bench/disk_depth.py FILE [--gb 4] [--out DIR]

Reads the first --gb of FILE with O_DIRECT (page cache bypassed) at each (threads, block) pair, every
thread taking the next block from a shared counter, and prints GB/s per pair. The single-thread 64 MiB
row is the "disk read" limit that bench/peers.py uses; the others show what a deeper queue gets.
"""
import argparse
import json
import mmap
import os
import sys
import threading
import time


def run(path: str, nbytes: int, threads: int, block: int) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    nblocks = nbytes // block
    lock = threading.Lock()
    nxt = [0]

    def worker() -> None:
        buf = mmap.mmap(-1, block)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= nblocks:
                return
            os.preadv(fd, [buf], i * block)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    os.close(fd)
    return nblocks * block / dt / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    size = os.path.getsize(a.file)
    nbytes = min(size, int(a.gb * 1e9)) // (64 << 20) * (64 << 20)
    rows = []
    for threads, block in [(1, 64 << 20), (2, 16 << 20), (4, 16 << 20), (8, 16 << 20), (16, 16 << 20),
                           (8, 4 << 20), (16, 4 << 20), (32, 4 << 20), (4, 64 << 20), (1, 64 << 20)]:
        gbps = run(a.file, nbytes, threads, block)
        rows.append({"threads": threads, "block_mib": block >> 20, "gbps": gbps})
        print(f"threads {threads:3d} block {block >> 20:3d} MiB  {gbps:6.2f} GB/s", flush=True)
    if a.out:
        with open(os.path.join(a.out, "disk-depth.json"), "w") as f:
            json.dump({"file": a.file, "bytes": nbytes, "rows": rows, "command": " ".join(sys.argv)}, f, indent=1)


if __name__ == "__main__":
    main()
