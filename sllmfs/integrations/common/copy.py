"""The one place the fast path moves bytes host → device.

A sidecar lease goes through the native copy engine (sllmfs.client.transfer: pipelined
cudaMemcpyAsync from the mapped segments, starting while the sidecar still
fills later chunks); tensors the engine cannot take (non-contiguous ones) and
leases without mapped segments (the store read directly) are copied by torch.
Whole byte ranges (``copy_spans``) go the same two ways.
"""

from __future__ import annotations

import logging
from typing import Any

_log = logging.getLogger("sllmfs.integrations")


def copy_into(lease: Any, targets: dict[str, Any], *, log: logging.Logger = _log) -> int:
    """Fill ``targets`` (name → pre-allocated tensor) from ``lease``; return bytes moved (``log``:
    the integration's logger, which its users configure)."""
    import torch

    rest = targets
    moved = 0
    if getattr(lease, "maps", None) is not None:  # an sllmfs.client.client.Lease
        from sllmfs.client.transfer import copy_into as engine_copy

        plain = {n: t for n, t in targets.items() if t.is_contiguous()}
        rest = {n: t for n, t in targets.items() if n not in plain}
        if plain:
            stats = engine_copy(lease, plain, strict=False)
            moved += stats.bytes
            e = stats.engine
            log.info("sllmfs: copied %d tensors (%.2f GB) in %.3f s by the %s, %s GPU allocation(s) opened",
                     stats.tensors, stats.bytes / 1e9, stats.seconds, e.get("path", "client"), e.get("ipc_opens", "-"))
    if rest:
        views = lease.tensors()
        for name, dst in rest.items():
            dst.copy_(views[name], non_blocking=True)
            moved += dst.numel() * dst.element_size()
        for dev in {t.device for t in rest.values() if t.device.type == "cuda"}:
            torch.cuda.synchronize(dev)  # the views may be unmapped once we return
    return moved


def copy_spans(lease: Any, spans: list[tuple[int, int, Any]], *, log: logging.Logger = _log) -> int:
    """Copy whole stored byte ranges: (partition, offset, contiguous uint8 destination); bytes moved."""
    import torch

    if getattr(lease, "maps", None) is not None:
        from sllmfs.client.transfer import copy_spans as engine_spans

        stats = engine_spans(lease, spans)
        e = stats.engine
        log.info("sllmfs: copied %d ranges (%.2f GB) in %.3f s by the %s, %s GPU allocation(s) opened "
                 "(export %.4f s, handles opened in %.4f s)", stats.tensors, stats.bytes / 1e9, stats.seconds,
                 e.get("path", "client"), e.get("ipc_opens", "-"), e.get("export_s", 0.0), e.get("ipc_open_s", 0.0))
        return stats.bytes
    moved = 0
    for partition, offset, dst in spans:
        dst.copy_(lease.raw(partition, offset, dst.numel()), non_blocking=True)
        moved += dst.numel()
    for dev in {dst.device for _p, _o, dst in spans if dst.device.type == "cuda"}:
        torch.cuda.synchronize(dev)  # the store's pages may be unmapped once we return
    return moved
