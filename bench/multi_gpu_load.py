"""The child process of bench_sglang.py --sizes (--links): the limits, and load_dict / transformers
load_model with a device map over every GPU, from the memory tier, bytes checked against the lease.

A fresh process: its CUDA memory is gone when it ends, before the SGLang engines start.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from links import host_read_bw, overlap, pinned_peak_each, pinned_peak_together

GB = 1e9


def links_child(arg: str) -> None:
    """A fresh process (its CUDA memory gone when it ends, before the engines start)."""
    import torch

    a = json.loads(arg)
    tp, model, socket = int(a["tp"]), a.get("model"), a.get("socket")
    gpus = list(range(min(tp, torch.cuda.device_count())))
    lim: dict[str, object] = {"host_read_gbps": host_read_bw()}
    if gpus:
        each = pinned_peak_each(gpus)
        lim.update(pinned_each_gbps={str(d): g for d, g in each.items()},
                   pinned_together_gbps=pinned_peak_together(gpus),
                   twice_single_gbps=len(gpus) * statistics.mean(each.values()))  # N x one GPU's peak
        torch.cuda.empty_cache()
    out: dict[str, object] = {"limits": lim}
    if model:
        out.update(load_dicts(model, socket, gpus))
    print("RESULT " + json.dumps(out), flush=True)


def _halves(names: list[str], devices: list[object]) -> dict[str, object]:
    """A device map giving each device an equal run of layers (embeddings first, head last)."""
    layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
    per = -(-len(layers) // len(devices))
    dm: dict[str, object] = {"": devices[-1], "model.embed_tokens": devices[0]}
    for i in layers:
        dm[f"model.layers.{i}"] = devices[min(i // per, len(devices) - 1)]
    return dm


def load_dicts(model: str, socket: str, gpus: list[int]) -> dict[str, object]:
    import torch

    from sllmfs.client.client import connect
    from sllmfs.integrations.torch import load_dict

    subprocess.run([sys.executable, "-m", "sllmfs", "load", "--model", model, "--warm", "--socket", socket],
                   check=True, capture_output=True)
    with connect(socket) as c, c.acquire(model) as lease:
        names = list(lease.entries)
    devices: list[object] = list(gpus) if gpus else ["cpu"]
    maps: dict[str, object] = {f"one GPU ({d})": {"": d} for d in devices}
    if len(devices) > 1:
        maps["every GPU (layers split)"] = _halves(names, devices)
    runs: dict[str, object] = {}
    for label, dm in maps.items():
        for path in ("sidecar", "client") if gpus else ("client",):
            os.environ["SLLMFS_GPU_COPY"] = path
            times = []
            try:
                for rep in range(3):  # the median of three: fresh allocations each time
                    t0 = time.perf_counter()
                    last, stats = load_dict(model, device_map=dm, socket=socket, return_stats=True)
                    times.append(time.perf_counter() - t0)
                    if rep < 2:
                        del last
                        if gpus:
                            torch.cuda.empty_cache()
            except Exception as e:  # one failed way in is a result, not the end of the run
                runs[f"load_dict {label}, {path} copies"] = {"error": f"{type(e).__name__}: {e}"[:400]}
                print(f"  load_dict {label} {path}: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            windows = [(w["start"], w["end"], 0) for w in stats.links.values()]
            ov = overlap(windows)
            runs[f"load_dict {label}, {path} copies"] = {
                "seconds": statistics.median(times), "gbps": stats.bytes / statistics.median(times) / GB,
                "bytes": stats.bytes, "links": {k: {kk: v for kk, v in w.items() if isinstance(v, (int, float, str))}
                                                for k, w in stats.links.items()},
                "copy_span_s": ov.get("span_s"),
                "copy_gbps": stats.bytes / ov["span_s"] / GB if ov.get("span_s") else None,
                "all_at_once_fraction": ov.get("all_at_once_fraction"),
                "placed": sorted({str(t.device) for t in last.values()}),
                "bytes_identical": _same_bytes(last, model, socket) if label.startswith("every") or not gpus
                else None}
            print(f"  load_dict {label:<24} {path:<8} {runs[f'load_dict {label}, {path} copies']['gbps']:.1f} GB/s "
                  f"at once {ov.get('all_at_once_fraction')}", flush=True)
            del last
            if gpus:
                torch.cuda.empty_cache()
    os.environ.pop("SLLMFS_GPU_COPY", None)
    out: dict[str, object] = {"load_dict": runs}
    if len(devices) > 1:
        try:
            out["load_model"] = load_models(model, socket, _halves(names, devices))
        except Exception as e:  # e.g. no accelerate in the image: the load_dict figures stand
            out["load_model"] = {"error": f"{type(e).__name__}: {e}"[:400]}
            print(f"  load_model: {type(e).__name__}: {e}"[:300], flush=True)
    return out


def _same_bytes(sd: dict[str, object], model: str, socket: str) -> bool:
    import torch

    from sllmfs.client.client import connect

    with connect(socket) as c, c.acquire(model) as lease:
        views = lease.tensors()
        return all(torch.equal(t.cpu().view(torch.uint8), views[n].view(torch.uint8))  # type: ignore[attr-defined]
                   for n, t in sd.items())


def load_models(model: str, socket: str, dm: dict[str, object]) -> dict[str, object]:
    """transformers load_model with the same split: each GPU's parameters copied at once."""
    import torch

    from sllmfs.client.client import connect
    from sllmfs.integrations.transformers import load_model

    out: dict[str, object] = {}
    m, stats = load_model(model, device_map=dm, socket=socket, return_stats=True)
    ov = overlap([(w["start"], w["end"], 0) for w in stats.links.values()])
    with connect(socket) as c, c.acquire(model) as lease:
        views = lease.tensors()
        params = dict(m.named_parameters())
        same = all(torch.equal(params[n].detach().cpu().view(torch.uint8), views[n].view(torch.uint8))
                   for n in views if n in params)
    out = {"seconds": stats.seconds, "bytes": stats.bytes, "gbps": stats.bytes / stats.seconds / GB,
           "copy_gbps": stats.bytes / ov["span_s"] / GB if ov.get("span_s") else None,
           "all_at_once_fraction": ov.get("all_at_once_fraction"),
           "placed": sorted({str(p.device) for p in params.values()}), "bytes_identical": same}
    print(f"  load_model every GPU: {out['gbps']:.1f} GB/s (copy {out['copy_gbps']}), at once "
          f"{out['all_at_once_fraction']}, bytes identical {same}", flush=True)
    return out
