"""The sidecar's status: one dict for the ``status`` op (`sllmfs status --json`) and the metrics endpoint."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import trio

from sllmfs.sidecar import disktier
from sllmfs.sidecar.cache import Cache
from sllmfs.sidecar.ops import Conn
from sllmfs.store import kernels


async def status(cache: Cache, conns: Iterable[Conn]) -> dict[str, Any]:
    """Tiers, models, leases and counters now (reads the store's sizes in a worker thread)."""
    store, tier = cache.store, cache.tier
    # one listing (it re-reads only models changed since the last one) for the sizes and what can be refetched
    sizes, refetch = await trio.to_thread.run_sync(disktier.disk_models, store)
    held = {n: cache.origin_holds(n) for n in sizes}  # what the origin loop last learned: no I/O
    kernel_entries, _bad = await trio.to_thread.run_sync(kernels.entries, store)
    conns = list(conns)  # as they are once the disk is read
    leased = {(r.model, r.variant) for c in conns for r in c.leases.values()}
    models = []
    for name, size in sorted(sizes.items()):
        resident = [r for (m, _), r in tier.entries.items() if m == name]
        models.append({
            "name": name, "disk_bytes": size, "tier": "memory" if resident else "disk",
            # the disk budget evicts only models it can store again; others only `sllmfs rm` removes
            "disk_evictable": refetch.get(name, False) or held.get(name, False),
            "origin_copy": held.get(name, False),
            "registered": name in cache.registry,
            "variants": [{"variant": r.variant, "state": r.state, "bytes": r.nbytes, "filled": r.filled,
                          "total": r.data_bytes, "leases": r.leases, "pinned": r.pinned,
                          "huge_pages": all(s.huge for s in r.segments),
                          "timeline": r.timeline.as_dict()} for r in resident],  # time.monotonic() of each step
            "leased": any(m == name for m, _ in leased),
        })
    leases = [{"id": i, "model": r.model, "variant": r.variant, "pid": c.pid, "uid": c.uid}
              for c in conns for i, r in c.leases.items()]
    c = cache.counters
    in_progress = [r for r in tier.entries.values() if r.state == "filling"]  # fills and streaming pulls
    filled = c.bytes_filled + sum(r.filled for r in in_progress)  # count as they go
    return {"pid": os.getpid(), "storage_path": str(store.root), "gpus": cache.gpu.buses,
            "relay": cache.gpu.relay_status(),  # what relaying others' loads cost each GPU (issue 26)
            "origin": str(cache.origin) if cache.origin else None,
            # used counts the mount's passthrough copies too (mount_copies: their share of it)
            "memory": {"used": tier.used, "budget": tier.budget, "retired": len(tier.retired),
                       "mount_copies": tier.mount_copies,
                       # the tier's own files backing mount files (in used: a resident whose file a reader
                       # has open is not evicted by LRU, one evicted anyway stays in used, retired, until closed)
                       "mount_files": tier.mount_files,
                       "blanks": tier.blanks.nbytes,  # faulted in for fills, not in used; given back first
                       "blanks_pinned": tier.blanks.pinned_bytes},  # of those, pinned for GPU copies
            # used: models and kernel caches, as --disk-size counts them (disktier)
            "disk": {"used": sum(sizes.values()) + sum(e.size for e in kernel_entries),
                     "budget": cache.settings.disk_size},
            "kernel_caches": {"entries": len(kernel_entries), "bytes": sum(e.size for e in kernel_entries)},
            "models": models, "leases": leases, "connections": len(conns),
            "counters": {"hits": c.hits, "misses": c.misses, "fills": c.fills, "bytes_filled": filled,
                         "evictions": tier.evictions, "client_errors": c.client_errors,
                         "connections_refused": c.connections_refused}}
