"""The mount's cold reads ride a fill of the memory tier (``fuse/incoming.py`` says why).

A reader of the mount gets no lease: `sllmfs evict` and the LRU treat the copy as they would without it.
Once the copy is freed (or failed, or replaced in the store) the reader's next read goes to the store.
"""

from __future__ import annotations

import logging

from sllmfs.core.errors import SllmfsError
from sllmfs.fuse.incoming import Incoming
from sllmfs.protocol.messages import Readiness
from sllmfs.sidecar.cache import Cache
from sllmfs.sidecar.memtier import Resident
from sllmfs.store.format import CHUNK_SIZE
from sllmfs.store.store import Identity

log = logging.getLogger("sllmfs.sidecar")


class TierIncoming:
    """A resident copy as the mount reads it while (and after) its fill runs. Trio thread only: the
    tier frees memory there too, so a state() that found the copy alive holds until the next await."""

    def __init__(self, res: Resident):
        self.res = res

    def _alive(self) -> bool:
        return not self.res.closed and self.res.state != "failed"

    def state(self, part: int, lo: int, hi: int) -> Readiness | None:
        if not self._alive():
            return None
        res = self.res
        ready, base = res.ready.mm, res.chunk_base[part]
        for k in range(lo // CHUNK_SIZE, (max(hi, lo + 1) - 1) // CHUNK_SIZE + 1):
            s = ready[base + k]
            if s != Readiness.READY:
                return Readiness.FAILED if s == Readiness.FAILED else Readiness.PENDING
        return Readiness.READY

    def views(self) -> list[memoryview] | None:
        if not self._alive():
            return None
        return [memoryview(s.mm)[: s.size] for s in self.res.segments]


class MountFill:
    """``fuse.incoming.Warm`` for the sidecar's mount: the variant's resident copy (a hit, or with
    ``start`` a fill started from the store like any miss), when it is exactly the version the reader
    opened."""

    def __init__(self, cache: Cache):
        self.cache = cache
        # one line per version and outcome: (model, variant) -> (the version said of, lines said); a new
        # version starts afresh, so this holds one entry per variant however often models are replaced
        self._said: dict[tuple[str, str], tuple[Identity, set[str]]] = {}

    async def __call__(self, model: str, variant: str, identity: Identity, start: bool) -> Incoming | None:
        if not start:  # join a copy that is there; start nothing
            res = self.cache.tier.get(model, variant)
            ok = (res is not None and res.identity == identity and res.state != "failed" and not res.closed
                  and not res.error)  # a fill failing right now: the store answers (its window fails there)
            if not ok or res is None:
                return None
            self.cache.held.release(res, "the mount reads it")  # a fill held for a GPU copy: now (or after it)
            return TierIncoming(res)
        if self.cache.identity(model, variant) != identity:  # replaced since the reader opened it: filling
            return None  # the new version would evict others for a reader that never reads it
        try:
            res = await self.cache.resident(model, variant)
        except SllmfsError as e:  # no room in the pool, refused as damaged, removed: the store serves
            self._once(model, variant, identity, "reads of the mount come from the store: %s", e)
            return None
        except Exception:  # a bug here must not fail the read: the store serves it
            log.exception("mount: model=%s variant=%s: filling it for a reader failed", model, variant)
            return None
        if res.identity != identity:  # replaced since the reader opened it: its reads stay on that version
            return None
        self.cache.held.release(res, "the mount reads it")
        if res.state == "filling":
            self._once(model, variant, identity, "reads of the mount wait for its fill into the memory tier")
        return TierIncoming(res)

    def _once(self, model: str, variant: str, identity: Identity, line: str, *args: object) -> None:
        said = self._said.get((model, variant))
        if said is None or said[0] != identity:
            said = self._said[(model, variant)] = (identity, set())
        if line not in said[1]:
            said[1].add(line)
            log.info("mount: model=%s variant=%s " + line, model, variant, *args)
