"""The SSD tier's budget: remove least recently used models past --disk-size.

Kernel cache entries (store/kernels.py) count against the budget too; once no model can go, the
least recently updated entries go (the next start compiles, or the origin brings, them again).

The SSD tier is a cache only of what can be fetched again: a model is evictable when its
source is a Hugging Face cache entry that is still there (a later `sllmfs save` stores it
again) and it has no adapter, or when the fleet's origin holds every object of it that cannot be
made again (checked object by object). A model saved from a local folder may be the only copy: never evicted, only
`sllmfs rm` removes it. "Used" is `Store.last_used` (used/<name>, touched by the sidecar on
each acquire). Models that are leased or pinned (any variant) are never removed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from sllmfs.core.names import ADAPTER_PREFIX
from sllmfs.store import kernels
from sllmfs.store.store import ModelInfo, Store

log = logging.getLogger("sllmfs.sidecar")


def disk_models(store: Store) -> tuple[dict[str, int], dict[str, bool]]:
    """Each stored model's bytes on disk, and whether it can be stored again without the user
    (``refetchable``), from one listing (which re-reads only models changed since the last)."""
    sizes, refetch = {}, {}
    for info in store.list():
        try:
            sizes[info.name] = info.bytes_on_disk()
            refetch[info.name] = refetchable(info)
        except (OSError, RuntimeError):  # removed while we walked it; a symlink loop in its source path
            sizes.pop(info.name, None)
    return sizes, refetch


def kernel_entries(store: Store) -> list[kernels.KernelEntry]:
    """The store's good kernel cache entries (a damaged one is the next publish's to replace)."""
    try:
        return kernels.entries(store)[0]
    except OSError:
        return []


def refetchable(info: ModelInfo) -> bool:
    """Can this model be stored again without the user? (Its HF cache entry is still there, and it has
    no adapter: one is saved from the user's own folder, and only the origin can bring it back.)"""
    if any(key.startswith(ADAPTER_PREFIX) for key in info.variants):
        return False
    path = info.source.get("path")
    if not isinstance(path, str) or not Path(path).is_dir():
        return False
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    cache = Path(constants.HF_HUB_CACHE).resolve()
    return cache in Path(path).resolve().parents


def enforce_budget(store: Store, budget: int, protected: set[str],
                   in_origin: Callable[[str], bool] = lambda name: False,
                   kernel_removed: Callable[[str], None] = lambda key: None,
                   in_use_now: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Remove LRU unprotected, refetchable models until the store fits ``budget`` (0 = unbounded).
    ``in_origin`` says whether the fleet's origin holds a model (so a later miss pulls it back);
    ``kernel_removed`` hears of each kernel cache entry removed (the origin sync does not pull it back);
    ``in_use_now``: asked last, under the model's lock, right before it goes (``protected`` is a
    snapshot, and the origin's answer may take seconds: a lease taken meanwhile keeps the model)."""
    if budget <= 0:
        return []
    sizes, _ = disk_models(store)
    entries = kernel_entries(store)
    used = sum(sizes.values()) + sum(k.size for k in entries)
    removed = []
    for name in sorted(sizes, key=store.last_used):
        if used <= budget:
            break
        if name in protected:
            continue
        # decided under the model's lock: a save replacing it meanwhile is not what the origin holds
        safe = functools.partial(_can_go, store, name, in_origin, in_use_now)
        try:
            if not store.remove(name, only_if=safe):
                continue
        except Exception as e:  # noqa: BLE001 - another process may have removed it first
            log.warning("disk tier: could not remove model=%s: %s", name, e)
            continue
        used -= sizes[name]
        removed.append(name)
        log.info("evicted from disk model=%s bytes=%d (disk budget %d)", name, sizes[name], budget)
    for k in sorted(entries, key=lambda k: k.updated):
        if used <= budget:
            break
        try:
            kernels.remove(store, k.key)
        except Exception as err:  # noqa: BLE001 - in use (being published), or gone already
            log.warning("disk tier: could not remove kernel cache %s: %s", k.key, err)
            continue
        used -= k.size
        kernel_removed(k.key)
        log.info("evicted from disk kernel cache=%s bytes=%d (disk budget %d)", k.key, k.size, budget)
    if used > budget:
        log.warning("disk tier over budget: %d of %d bytes; the rest is leased, pinned or the only copy "
                    "(saved from a local folder and not in an origin: `sllmfs rm` frees it)", used, budget)
    return removed


def _can_go(store: Store, name: str, in_origin: Callable[[str], bool], in_use_now: Callable[[str], bool]) -> bool:
    return (is_refetchable(store, name) or in_origin(name)) and not in_use_now(name)


def is_refetchable(store: Store, name: str) -> bool:
    try:
        return refetchable(store.get(name))
    except Exception:  # noqa: BLE001 - a damaged entry is never deleted by the budget
        return False
