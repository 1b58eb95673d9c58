"""The SSD tier's budget: remove least recently used models past --disk-size.

"Used" is `Store.last_used` (used/<name>, touched by the sidecar on each acquire). Models
that are leased or pinned (any variant) are never removed.
"""

from __future__ import annotations

import logging

from sllmfs.store import Store

log = logging.getLogger("sllmfs.sidecar")


def disk_usage(store: Store) -> dict[str, int]:
    out = {}
    for info in store.list():
        try:
            out[info.name] = info.bytes_on_disk()
        except OSError:  # removed while we walked it
            continue
    return out


def enforce_budget(store: Store, budget: int, protected: set[str]) -> list[str]:
    """Remove LRU unprotected models until the store fits ``budget`` (0 = unbounded)."""
    if budget <= 0:
        return []
    sizes = disk_usage(store)
    used = sum(sizes.values())
    removed = []
    for name in sorted(sizes, key=store.last_used):
        if used <= budget:
            break
        if name in protected:
            continue
        try:
            store.remove(name)
        except Exception as e:  # noqa: BLE001 - another process may have removed it first
            log.warning("disk tier: could not remove model=%s: %s", name, e)
            continue
        used -= sizes[name]
        removed.append(name)
        log.info("evicted from disk model=%s bytes=%d (disk budget %d)", name, sizes[name], budget)
    if used > budget:
        log.warning("disk tier over budget: %d of %d bytes, the rest is leased or pinned", used, budget)
    return removed
