"""Server-side copies through CUDA IPC: a torch-free "sidecar" copies into a fresh client's tensors.

    python3 bench/bench_ipc_copy.py [--gib-layers 32] [--out DIR]

Process S (this one; never imports torch) builds the same bytes in a 2 MiB
hugetlb memfd (when huge pages can be reserved) and a 4 KiB-page memfd,
registers each with the copy engine once (timed: off the load path), then
serves copy requests on a Unix socket. For each segment kind and each way of
allocating, a fresh process C (imports torch) allocates Llama-shaped bf16
tensors (poisoned), exports their allocations with sllmfs.engine.ipc, sends
handles + plan (msgpack), and times send -> reply. C then checks every tensor
against int64 sums of the source bytes computed by S. A separate fresh process
measures the pinned (cudaHostAlloc) H2D peak in the same run.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_shapes import tensor_shapes  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
POISON = 0xAB
ALIGN = 256  # source offsets in a partition: not page aligned


def layout(layers: int) -> list[tuple[str, list[int], int, int]]:
    """(name, shape, segment offset, nbytes): Llama shapes scaled to ~8.4 GiB bf16, 291 tensors."""
    out, off = [], 0
    for name, shape in tensor_shapes(vocab=32000, hidden=3328, inter=8960, layers=layers):
        n = 2 * int(np.prod(shape))
        out.append((name, shape, off, n))
        off = (off + n + ALIGN - 1) // ALIGN * ALIGN
    return out


# ---------------------------------------------------------------- wire


def send(sock: socket.socket, obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(len(data).to_bytes(8, "little") + data)


def recv(sock: socket.socket) -> Any:
    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("peer closed")
            buf += part
        return bytes(buf)

    return msgpack.unpackb(exact(int.from_bytes(exact(8), "little")), raw=False)


# ---------------------------------------------------------------- S (no torch)


def reserve_hugepages(size: int) -> str:
    need = size // (2 * MiB) + 8
    path = Path("/proc/sys/vm/nr_hugepages")
    try:
        if int(path.read_text()) < need:
            path.write_text(str(need))
        got = int(path.read_text())
    except OSError as e:
        return f"cannot reserve huge pages: {e}"
    return "" if got >= need else f"only {got} of {need} huge pages"


def make_segment(size: int, huge: bool) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("ipc-bench-huge" if huge else "ipc-bench", os.MFD_HUGETLB if huge else 0)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def fill(mm: mmap.mmap, size: int) -> None:
    block = np.random.default_rng(1).integers(0, 256, 256 * MiB, dtype=np.uint8)
    arr = np.frombuffer(mm, dtype=np.uint8)
    for i, o in enumerate(range(0, size, block.size)):
        n = min(block.size, size - o)
        np.bitwise_xor(block[:n], (i * 37) & 0xFF, out=arr[o : o + n])


def sums_of(mm: mmap.mmap, lay: list[tuple[str, list[int], int, int]]) -> list[int]:
    arr = np.frombuffer(mm, dtype=np.uint8)
    return [int(arr[o : o + n].view(np.int64).sum()) for _, _, o, n in lay]


def client(args: list[str]) -> dict[str, Any]:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=240)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return {"case": " ".join(args[:3]), "error": (p.stderr or p.stdout)[-3000:]}


def serve(a: argparse.Namespace) -> None:
    from sllmfs.engine.copy_engine import CopyEngine, Segment
    from sllmfs.engine.cudart import runtime_path

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"cmd": [sys.executable, *sys.argv], "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                      time.gmtime())}
    lay = layout(a.layers)
    size = (lay[-1][2] + lay[-1][3] + 2 * MiB - 1) // (2 * MiB) * (2 * MiB)
    res.update(tensors=len(lay), bytes=sum(n for *_, n in lay), segment_bytes=size,
               tensor_mib=[round(min(n for *_, n in lay) / MiB, 3), round(max(n for *_, n in lay) / MiB, 1)])
    res["peak"] = client(["peak"])
    print("peak", json.dumps(res["peak"]), flush=True)

    t = time.perf_counter()
    segs: dict[str, tuple[int, mmap.mmap]] = {}
    kinds = ["2m", "4k"]
    huge_note = reserve_hugepages(size)
    if huge_note:
        kinds = ["4k"]
    for k in kinds:
        try:
            segs[k] = make_segment(size, k == "2m")
        except OSError as e:
            res["huge_error"] = str(e)
            continue
    first = next(iter(segs.values()))[1]
    fill(first, size)
    for _, mm in segs.values():
        if mm is not first:
            mm[:] = first[:]
    sums = sums_of(first, lay)
    sums_path = out / "sums.json"
    sums_path.write_text(json.dumps(sums))
    res["setup_s"] = time.perf_counter() - t
    res["huge_note"] = huge_note or "ok"

    t = time.perf_counter()
    eng = CopyEngine(target="cuda", device=0, mode="auto")
    res.update(engine_init_s=time.perf_counter() - t, runtime=runtime_path(), bus_id=eng.bus_id)
    seg_objs = {k: Segment.from_buffer(mm) for k, (_, mm) in segs.items()}
    res["register"] = {}
    for k, seg in seg_objs.items():
        r = eng.register(seg)
        r["ms_per_gib"] = r["seconds"] / (size / GiB) * 1e3
        r["again"] = eng.register(seg)  # cached: no second pin
        res["register"][k] = r
    print("register", json.dumps(res["register"]), flush=True)

    sock_path = "/tmp/sllm-ipc-bench.sock"
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)
    srv.settimeout(120)
    res["cases"] = []
    import threading

    for k in seg_objs:
        for alloc in ("per-tensor", "slab"):
            box: dict[str, Any] = {}
            th = threading.Thread(target=lambda b=box, kk=k, al=alloc: b.update(client(
                ["client", kk, al, "--sock", sock_path, "--sums", str(sums_path), "--layers", str(a.layers)])))
            th.start()
            server_side: list[dict[str, Any]] = []
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                th.join()
                box.update(pages=k, alloc=alloc, error=box.get("error", "client never connected"))
                res["cases"].append(box)
                continue
            with conn:
                while True:
                    try:
                        msg = recv(conn)
                    except ConnectionError:
                        break
                    t0 = time.perf_counter()
                    try:
                        st = eng.copy_ipc([seg_objs[k]], msg["blocks"], np.array(msg["pieces"], dtype=np.uint64))
                        reply = {"ok": True, "server_s": time.perf_counter() - t0,
                                 **{x: st[x] for x in ("ipc_opens", "ipc_open_s", "ipc_close_s", "seconds", "gbps",
                                                       "mode", "registered_bytes", "newly_registered_bytes")}}
                    except Exception as e:  # noqa: BLE001 - the client reports it
                        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    server_side.append(reply)
                    send(conn, reply)
            th.join()
            box.update(pages=k, alloc=alloc, server=server_side, open_after=eng.open_ipc_count)
            res["cases"].append(box)
            print("case", json.dumps({x: v for x, v in box.items() if x != "server"}), flush=True)
    res["sidecar_imported_torch"] = "torch" in sys.modules
    eng.close()
    (out / "ipc-copy.json").write_text(json.dumps(res, indent=1, default=str))
    table(res)


def table(res: dict[str, Any]) -> None:
    peak = res["peak"].get("peak_gbps") or 0.0
    print(f"\n{res['tensors']} tensors, {res['bytes'] / GiB:.2f} GiB; sidecar imported torch: "
          f"{res['sidecar_imported_torch']}; runtime {res['runtime']}")
    med = res["peak"].get("median_gbps", 0)
    print(f"pinned H2D peak (torch, cudaHostAlloc, 4 streams): {peak:.1f} GB/s (median {med:.1f})")
    for k, r in res["register"].items():
        print(f"register {k}: {r['seconds']:.3f} s ({r['ms_per_gib']:.1f} ms/GiB), again cached={r['again']['cached']}")
    print("\n| pages | alloc | round | e2e GB/s | x peak | export s | opens | open s | copy GB/s | close s | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in res["cases"]:
        if "error" in c:
            print(f"| {c['pages']} | {c['alloc']} | error: {c['error'][-300:]} |")
            continue
        for i, r in enumerate(c["rounds"]):
            s = r.get("server", {})
            print(f"| {c['pages']} | {c['alloc']} | {i} | {r['e2e_gbps']:.1f} | {r['e2e_gbps'] / peak:.2f} | "
                  f"{c['export_s'] if i == 0 else 0:.3f} | {s.get('ipc_opens')} | {s.get('ipc_open_s', 0):.4f} | "
                  f"{s.get('gbps', 0):.1f} | {s.get('ipc_close_s', 0):.4f} | {r['correct']} |")


# ---------------------------------------------------------------- C (torch)


def run_client(a: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    import torch

    from sllmfs.engine.ipc import export_targets

    torch.cuda.init()
    res: dict[str, Any] = {"case": f"{a.pages} {a.alloc}", "torch_init_s": time.perf_counter() - t}
    lay = layout(a.layers)
    total = sum(n for *_, n in lay)
    tensors: dict[str, Any] = {}
    if a.alloc == "slab":
        slab = torch.empty(total, dtype=torch.uint8, device="cuda")
        o = 0
        for name, shape, _, n in lay:
            tensors[name] = slab[o : o + n].view(torch.bfloat16).view(shape)
            o += n
    else:
        for name, shape, _, _ in lay:
            tensors[name] = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    want = torch.tensor(json.loads(Path(a.sums).read_text()), dtype=torch.int64)

    def poison() -> None:
        for x in tensors.values():
            x.view(torch.uint8).fill_(POISON)
        torch.cuda.synchronize()

    def check() -> bool:
        got = torch.stack([x.view(torch.int64).sum() for x in tensors.values()]).cpu()
        return bool((got == want).all())

    poison()
    t = time.perf_counter()
    blocks, places = export_targets(tensors)
    res["export_s"] = time.perf_counter() - t
    res["blocks"] = len(blocks)
    pieces = [[0, off, places[name][0], places[name][1], n] for name, _, off, n in lay]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(a.sock)
    res["rounds"] = []
    for rnd in range(3):
        if rnd:
            poison()
        t0 = time.perf_counter()
        send(sock, {"op": "copy", "blocks": blocks, "pieces": pieces})
        reply = recv(sock)
        dt = time.perf_counter() - t0
        if not reply.get("ok"):
            res["rounds"].append({"error": reply.get("error"), "e2e_gbps": 0.0, "correct": False, "server": reply})
            break
        res["rounds"].append({"e2e_s": dt, "e2e_gbps": total / dt / 1e9, "correct": check(), "server": reply})
    sock.close()
    res["e2e_with_export_gbps"] = total / (res["export_s"] + res["rounds"][0].get("e2e_s", 1e9)) / 1e9
    res["share_cuda_probe"] = probe_share_cuda(torch)
    return res


def probe_share_cuda(torch: Any) -> dict[str, Any]:
    """What torch 2.11's _share_cuda_ returns, next to our own export of the same pointer."""
    from sllmfs.engine.native import lib

    x = torch.empty(3 * MiB, dtype=torch.uint8, device="cuda")
    y = x[4096:]
    tup = y.untyped_storage()._share_cuda_()
    handle, base, size, dev, bus = lib.ipc_export(y.data_ptr(), "", "")
    h = tup[1]
    return {
        "len": len(tup),
        "types": [type(v).__name__ for v in tup],
        "handle_len": len(h),
        "our_handle_is_suffix": bytes(h).endswith(handle),
        "storage_size": tup[2],
        "storage_offset_bytes": tup[3],
        "ours_offset_of_storage": x.data_ptr() - base,
        "ours_alloc_size": size,
        "bus": bus,
        "props_fields": [f for f in ("pci_bus_id", "pci_device_id", "pci_domain_id", "uuid")
                         if hasattr(torch.cuda.get_device_properties(0), f)],
    }


def run_peak() -> dict[str, Any]:
    import torch

    n = 4 * GiB
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.fill_(7)
    streams = [torch.cuda.Stream() for _ in range(4)]
    step, times = 64 * MiB, []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i, o in enumerate(range(0, n, step)):
            with torch.cuda.stream(streams[i % 4]):
                dst[o : o + step].copy_(src[o : o + step], non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"peak_gbps": n / min(times) / 1e9, "median_gbps": n / sorted(times)[2] / 1e9, "bytes": n}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", nargs="?", default="serve", choices=["serve", "client", "peak"])
    p.add_argument("pages", nargs="?")
    p.add_argument("alloc", nargs="?")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/ipc-bench"))
    p.add_argument("--sock")
    p.add_argument("--sums")
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a)
        return
    r = run_peak() if a.cmd == "peak" else run_client(a)
    print("RESULT " + json.dumps(r, default=str), flush=True)


if __name__ == "__main__":
    main()
