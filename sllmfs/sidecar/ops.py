"""The protocol's ops, one method each: check the arguments, ask the cache, shape the reply.

Each takes the connection and the request and returns (reply, fds to pass); errors are
raised and become error replies in the server. Protocol reference: docs/protocol.md.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from sllmfs.core import names
from sllmfs.core.errors import BadInput, NotFound
from sllmfs.protocol import wire
from sllmfs.protocol.messages import Op
from sllmfs.sidecar.cache import Cache
from sllmfs.sidecar.memtier import Resident
from sllmfs.store.format import CHUNK_SIZE
from sllmfs.store.metafiles import MetaFiles, warn_unverified
from sllmfs.store.store import Store

log = logging.getLogger("sllmfs.sidecar")

Reply = tuple[dict[str, Any], list[int]]
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x0001, 0x0002, 0x0004, 0x0008  # fcntl's, on every Linux


@dataclass(eq=False)
class Conn:
    id: int
    pid: int
    uid: int
    leases: dict[int, Resident] = field(default_factory=dict)
    off_element: bool = False  # its hello said it reads tensors stored off their element size (HELLO_OFF_ELEMENT)


class Ops:
    def __init__(self, cache: Cache, ids: itertools.count[int], status: Callable[[], Awaitable[dict[str, Any]]]):
        self.cache = cache
        self._ids = ids  # lease ids: the server's counter, so they never equal a connection id
        self._status = status
        self.table: dict[str, Callable[[Conn, dict[str, Any]], Awaitable[Reply]]] = {
            Op.LIST: self.op_list, Op.ACQUIRE: self.op_acquire, Op.RELEASE: self.op_release,
            Op.STATUS: self.op_status, Op.PIN: self.op_pin, Op.UNPIN: self.op_unpin, Op.EVICT: self.op_evict,
            Op.REFRESH: self.op_refresh, Op.REGISTER: self.op_register, Op.FILES: self.op_files,
            Op.LOAD_IPC: self.op_load_ipc, Op.FAILURE: self.op_failure, Op.FILL: self.op_fill,
        }

    async def op_list(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        c = self.cache
        infos, bad = await trio.to_thread.run_sync(c.store.listing)
        models = [{"name": i.name, "variants": i.variants,
                   "resident": [v for v in i.variants if (i.name, v) in c.tier.entries],
                   "registered": i.name in c.registry} for i in infos]
        # entries that are not (whole) models: one line each, the good models listed all the same
        return {"ok": True, "models": models, "bad": [[name, why] for name, why in bad]}, []

    async def op_acquire(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        model, variant = _model_arg(msg), _variant_arg(msg)
        t0 = time.perf_counter()
        gpu_first = msg.get("gpu_first", False)
        if not isinstance(gpu_first, bool):
            raise BadInput("acquire 'gpu_first' must be true or false")
        res = await self.cache.resident(model, variant, gpu_first=gpu_first, off_element_ok=conn.off_element)
        seconds = time.perf_counter() - t0  # a miss: the tier's allocation (the fill runs behind)
        lease_id = next(self._ids)
        res.leases += 1
        conn.leases[lease_id] = res
        self.cache.store.touch(model)
        log.info("lease taken id=%d model=%s variant=%s pid=%d uid=%d state=%s seconds=%.3f",
                 lease_id, model, variant, conn.pid, conn.uid, res.state, seconds)
        fds = []
        try:
            for seg in [*res.segments, res.ready]:
                fds.append(seg.readonly_fd())
        except OSError:
            for fd in fds:
                os.close(fd)
            self.end_lease(conn, lease_id, why="fd error")
            raise
        m = res.manifest
        reply = {
            "ok": True, "lease": lease_id, "model": model, "variant": variant, "state": res.state,
            "tensors": res.wire_tensors, "aliases": m.aliases, "metadata": m.metadata,
            "partitions": [{"file": p.file, "size": p.size, "length": s.length, "huge": s.huge}
                           for p, s in zip(m.partitions, res.segments, strict=True)],
            "ready": {"unit": CHUNK_SIZE, "base": res.chunk_base, "length": res.ready.size},
            # the fill waits for a GPU copy (gpufirst.py): a client reading the segments sends `fill` first
            "fill_after_copy": self.cache.held.holds(res),
        }
        return reply, fds

    async def op_files(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        """The model's metadata files (config, tokenizer, ...; an adapter variant's own files) as read-only fds."""
        model, variant = _model_arg(msg), _variant_arg(msg)
        store = self.cache.store
        if self.cache.settings.registration_required and model not in self.cache.registry:
            raise NotFound(f"model {model!r} is not registered; this sidecar runs with --registration-required")
        # read whole and checked against the digests recorded at save (Corrupt: one line, no fd handed out);
        # each client gets a sealed in-memory copy of those very bytes, never the store file itself
        meta = await trio.to_thread.run_sync(_metadata_files, store, model, variant)
        fds: list[int] = []
        listing = []
        try:
            for rel, data in meta.data.items():
                fds.append(sealed_copy(data))
                listing.append([rel, len(data)])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return {"ok": True, "files": listing}, fds

    async def op_release(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        lease_id = msg.get("lease")
        if not isinstance(lease_id, int) or lease_id not in conn.leases:
            raise BadInput(f"no lease {str(lease_id)[:40]!r} on this connection")
        self.end_lease(conn, lease_id, why="released")
        return {"ok": True}, []

    async def op_failure(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        """Why a lease's fill or streaming pull failed (its readiness says FAILED): cause and line."""
        lease_id = msg.get("lease")
        if not isinstance(lease_id, int) or lease_id not in conn.leases:
            raise BadInput(f"no lease {str(lease_id)[:40]!r} on this connection")
        failure = conn.leases[lease_id].failure
        if failure is None:
            return {"ok": True, "failed": False}, []
        return {"ok": True, "failed": True, "cause": failure.cause.value, "error": failure.line}, []

    async def op_fill(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        """Start a lease's held fill now: the client reads the segments itself (sidecar/gpufirst.py)."""
        res = self._leased(conn, msg)
        self.cache.held.release(res, f"pid {conn.pid} reads the segments")
        return {"ok": True}, []

    def _leased(self, conn: Conn, msg: dict[str, Any]) -> Resident:
        lease_id = msg.get("lease")
        res = conn.leases.get(lease_id) if isinstance(lease_id, int) else None
        if res is None:
            raise BadInput(f"lease {str(lease_id)[:40]!r} is not held on this connection")
        return res

    def end_lease(self, conn: Conn, lease_id: int, *, why: str) -> None:
        res = conn.leases.pop(lease_id)
        self.cache.held.release(res, f"lease {lease_id} ended")
        res.leases -= 1
        res.last_used = time.monotonic()
        log.info("lease ended id=%d model=%s variant=%s pid=%d (%s)", lease_id, res.model, res.variant, conn.pid, why)
        self.cache.tier.settle(res)

    async def op_pin(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        model, variant = _model_arg(msg), _variant_arg(msg)
        res = await self.cache.resident(model, variant)
        res.pinned = True
        log.info("pinned model=%s variant=%s", model, variant)
        return {"ok": True, "state": res.state}, []

    async def op_unpin(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        model, variant = _model_arg(msg), _variant_arg(msg)
        res = self.cache.tier.entries.get((model, variant))
        if res is None or not res.pinned:
            return {"ok": True, "was_pinned": False}, []
        res.pinned = False
        log.info("unpinned model=%s variant=%s", model, variant)
        return {"ok": True, "was_pinned": True}, []

    async def op_evict(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        model = _model_arg(msg)
        variant = _variant_arg(msg) if msg.get("variant") is not None else None
        store = self.cache.store
        gone = self.cache.tier.evict(model, variant)
        if not gone and not await trio.to_thread.run_sync(store.has, model):
            raise NotFound(f"model {model!r} is neither in memory nor in the store at {store.root}; "
                           "see `sllmfs ls` for the names")
        return {"ok": True, "evicted": [r.variant for r in gone]}, []

    async def op_register(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        model = _model_arg(msg)
        store = self.cache.store
        if not await trio.to_thread.run_sync(store.has, model):
            raise NotFound(f"model {model!r} is not in the store at {store.root}; `sllmfs save` it first")
        await self.cache.registry.add(model)
        log.info("registered model=%s", model)
        return {"ok": True}, []

    async def op_refresh(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        dropped, removed = await self.cache.refresh()
        models = await trio.to_thread.run_sync(self.cache.store.list)
        return {"ok": True, "models": len(models), "dropped": dropped, "removed": removed}, []

    async def op_load_ipc(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        """Copy a leased variant's bytes into the client's GPU tensors (CUDA IPC handles it exported)."""
        res = self._leased(conn, msg)
        blocks, pieces = msg.get("blocks"), msg.get("pieces")
        if not isinstance(blocks, list) or not isinstance(pieces, list):
            raise BadInput("load_ipc needs 'blocks' and 'pieces' lists")
        timeout = msg.get("timeout", 120.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 3600:
            raise BadInput("load_ipc 'timeout' must be a number of seconds in (0, 3600]")
        t0 = time.perf_counter()
        files = self.cache.held.begin_copy(res)  # tier empty, fill held: copy from the stored files
        try:
            stats, close = await trio.to_thread.run_sync(self.cache.gpu.copy, res, blocks, pieces, float(timeout),
                                                         files.fill.fds() if files else None, bool(files and files.tee))
            teed = stats.pop("teed", None)
            if files is not None and teed is not None:  # before the fill starts: it reads only the rest
                stats["teed_bytes"] = files.fill.adopt(teed)
        finally:
            if files is not None:
                self.cache.held.end_copy(res)  # the last copy from the files starts the tier's fill
            self.cache.reblank()  # blanks wait while copies run (tier.blank_room): room left now becomes blanks
        stats["wall_s"] = time.perf_counter() - t0
        self.cache.start_soon(trio.to_thread.run_sync, close)  # off the client's clock: the reply goes first
        log.info("gpu copy model=%s variant=%s pid=%d bytes=%d seconds=%.3f (wall %.3f) rate=%.2fGB/s opens=%d "
                 "source=%s stage_fill_s=%.3f stage_wait_s=%.3f teed_bytes=%d", res.model, res.variant, conn.pid,
                 stats.get("bytes", 0), stats.get("seconds", 0.0), stats["wall_s"], stats.get("gbps", 0.0),
                 stats.get("ipc_opens", 0), stats.get("source", "tier"), stats.get("stage_fill_seconds", 0.0),
                 stats.get("stage_wait_seconds", 0.0), stats.get("teed_bytes", 0))
        return {"ok": True, **{k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}}, []

    async def op_status(self, conn: Conn, msg: dict[str, Any]) -> Reply:
        return {"ok": True, **await self._status()}, []


def _model_arg(msg: dict[str, Any]) -> str:
    model = msg.get("model")
    if not isinstance(model, str):
        raise BadInput("request needs 'model' (a string)")
    return names.check_model_name(model)


def _variant_arg(msg: dict[str, Any]) -> str:
    variant = msg.get("variant", names.HF_VARIANT)
    if not isinstance(variant, str):
        raise BadInput("'variant' must be a string")
    return names.check_variant(variant)


def _metadata_files(store: Store, model: str, variant: str) -> MetaFiles:
    info = store.get(model)
    if variant not in info.variants:
        raise NotFound(f"model {model!r} has no variant {variant!r} (has: {', '.join(info.variants) or 'none'})")
    own = variant != names.HF_VARIANT and os.path.lexists(info.variant_files_dir(variant))
    meta = info.meta_files(variant if own else None)  # adapters keep their own config beside their weights
    warn_unverified(meta, store.root)
    if len(meta.data) > wire.MAX_FDS:  # each is an open fd in the sidecar until the reply is sent
        raise BadInput(f"model {model!r} has {len(meta.data)} metadata files; the sidecar serves at most "
                       f"{wire.MAX_FDS}")
    return meta


def sealed_copy(data: bytes) -> int:
    """A read-only fd on a memfd holding ``data``, sealed: no process can change or resize it."""
    fd = os.memfd_create("sllmfs-file", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, 0o400)  # no other uid may reopen it through /proc
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)
