"""The socket server: one trio task per connection, one method per protocol op.

Protocol reference: docs/protocol.md. Every request gets one reply; a request
that breaks the framing gets an error reply and the connection is closed.
Errors from one client never reach the nursery, so everyone else keeps going.
"""

from __future__ import annotations

import array
import grp
import itertools
import json
import logging
import math
import os
import pwd
import socket as pysocket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from sllmfs.core import names
from sllmfs.core.config import Settings
from sllmfs.core.errors import BadInput, Corrupt, NotFound, SllmfsError
from sllmfs.protocol import wire
from sllmfs.sidecar import disktier
from sllmfs.sidecar.fill import Fill
from sllmfs.sidecar.gpucopy import GpuCopier
from sllmfs.sidecar.memtier import FAILED, PENDING, MemoryTier, Resident
from sllmfs.store.format import CHUNK_SIZE, load_manifest, open_dir, open_regular
from sllmfs.store.store import Identity, Store, variant_identity

log = logging.getLogger("sllmfs.sidecar")

BODY_TIMEOUT = 60.0  # seconds for a message body to arrive once its length is known
HELLO_TIMEOUT = 10.0  # a connection that has not said hello by then is closed
IDLE_TIMEOUT = 600.0  # a greeted connection holding no lease, silent this long, is closed
MAX_CONNECTIONS = 4096  # in all: each holds an fd and a task
MAX_PER_PEER = 64  # per client process: one process cannot take the daemon's descriptors
STORE_WATCH_S = 1.0  # how often resident copies are checked against the store (one stat each)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(eq=False)
class Conn:
    id: int
    pid: int
    uid: int
    leases: dict[int, Resident] = field(default_factory=dict)


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    fills: int = 0
    bytes_filled: int = 0
    client_errors: int = 0
    connections_refused: int = 0  # over MAX_CONNECTIONS or MAX_PER_PEER


class Server:
    def __init__(self, settings: Settings, store: Store, tier: MemoryTier):
        self.settings = settings
        self.store = store
        self.tier = tier
        self.counters = Counters()
        self.registered: set[str] = _load_registered(store)  # kept in the store: survives restarts
        self._registry_lock = trio.Lock()
        self.mount_in_use: Counter[str] = Counter()  # models read through the mount now (the FUSE view counts)
        self.refused: dict[tuple[str, str], tuple[tuple[int, int], str]] = {}
        self.fills: set[Fill] = set()
        self.conns: set[Conn] = set()
        self._per_pid: dict[int, int] = {}  # open connections by client process
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._allowed_uids = {0, os.geteuid()} | {int(u) for u in settings.allow_uids.split(",") if u.strip()}
        self._group_gid = grp.getgrnam(settings.group).gr_gid if settings.group else None
        self.ops: dict[str, Callable[[Conn, dict[str, Any]], Awaitable[tuple[dict[str, Any], list[int]]]]] = {
            "list": self.op_list, "acquire": self.op_acquire, "release": self.op_release,
            "status": self.op_status, "pin": self.op_pin, "unpin": self.op_unpin, "evict": self.op_evict,
            "refresh": self.op_refresh, "register": self.op_register, "files": self.op_files,
            "load_ipc": self.op_load_ipc,
        }
        self.gpu = GpuCopier()

    # -- serving -------------------------------------------------------------

    async def serve(self, listener: trio.socket.SocketType, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._disk_loop)
            nursery.start_soon(self._watch_store)
            task_status.started()
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as e:  # EMFILE/ENFILE: keep serving the connections we have, retry soon
                    log.warning("accept failed: %s", e.strerror or e)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._connection, sock)

    async def warm_gpus(self) -> None:
        """Start the GPU copy engines now (the daemon calls this once it is up), then pin what was
        filled before they existed."""
        try:
            await trio.to_thread.run_sync(self.gpu.warm_up)
            for res in list(self.tier.entries.values()):
                if self.gpu.active and res.state == "ready" and res.unpin is None and not res.retired:
                    await self._pin(res)
        except Exception:  # never the daemon: loads start their engines themselves
            log.exception("GPU warm-up failed")

    async def _pin(self, res: Resident) -> None:
        try:
            await trio.to_thread.run_sync(self.gpu.pin, res)
        except Exception:  # a bug costs the pin (the first copy pins instead), never the daemon
            log.exception("pinning model=%s variant=%s failed", res.model, res.variant)

    def stop_fills(self) -> None:
        for f in self.fills:
            f.stop = True

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                pid, uid, gid = _CRED.unpack(sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_PEERCRED, _CRED.size))
            except OSError:
                return
            conn = Conn(next(self._ids), pid, uid)
            if not self._allowed(pid, uid, gid):
                log.warning("client error conn=%d pid=%d uid=%d: not allowed to use this sidecar", conn.id, pid, uid)
                await self._send(sock, wire.error_reply(BadInput(f"uid {uid} may not use this sidecar")), conn=conn)
                return
            if len(self.conns) >= MAX_CONNECTIONS or self._per_pid.get(pid, 0) >= MAX_PER_PEER:
                self.counters.connections_refused += 1
                if self.counters.connections_refused % 1000 == 1:  # a flood logs a line per thousand
                    log.warning("refusing connections: pid=%d holds %d (limit %d), %d in all (limit %d); "
                                "%d refused so far", pid, self._per_pid.get(pid, 0), MAX_PER_PEER, len(self.conns),
                                MAX_CONNECTIONS, self.counters.connections_refused)
                await self._send(sock, wire.error_reply(BadInput(
                    f"too many connections (process {pid}: at most {MAX_PER_PEER}, {MAX_CONNECTIONS} in all); "
                    "close idle ones and connect again")), conn=conn)
                return
            self._per_pid[pid] = self._per_pid.get(pid, 0) + 1
            self.conns.add(conn)
            try:
                await self._talk(sock, conn)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # peer went away: its leases end below
            except Exception:  # a bug must cost one connection, never the daemon
                log.exception("internal error on conn=%d pid=%d", conn.id, pid)
            finally:
                self.conns.discard(conn)
                self._per_pid[pid] -= 1
                if not self._per_pid[pid]:
                    del self._per_pid[pid]
                for lease_id in list(conn.leases):
                    self._end_lease(conn, lease_id, why="connection closed")

    def _allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid in self._allowed_uids:
            return True
        g = self._group_gid
        if g is None:
            return False
        if gid == g:
            return True
        try:
            if pwd.getpwuid(uid).pw_name in grp.getgrgid(g).gr_mem:
                return True
        except KeyError:
            pass
        return g in _supplementary_groups(pid)

    async def _talk(self, sock: trio.socket.SocketType, conn: Conn) -> None:
        greeted = False
        while True:
            # idle peers go: before hello, and greeted ones that hold no lease (a lease keeps its connection)
            wait = HELLO_TIMEOUT if not greeted else IDLE_TIMEOUT if not conn.leases else math.inf
            header = None
            with trio.move_on_after(wait):
                header = await _recv_exact(sock, wire.HEADER.size)
            if header is None:
                return
            try:
                n = wire.body_length(header)
            except wire.ProtocolError as e:  # cannot resync after a bad prefix
                await self._reject(sock, conn, e)
                return
            body = None
            with trio.move_on_after(BODY_TIMEOUT):  # a stalled half message must not hold a task forever
                body = await _recv_exact(sock, n)
            if body is None:
                return
            fds: list[int] = []
            op: object = None
            try:
                msg = wire.unpack(body)
                op = msg.get("op")
                if not greeted:
                    if op != "hello":
                        raise wire.ProtocolError("say hello first: {'op': 'hello', 'version': 1}")
                    if msg.get("version") != wire.VERSION:
                        raise wire.ProtocolError(
                            f"protocol version {msg.get('version')!r} not served; this sidecar speaks {wire.VERSION}")
                    greeted = True
                    reply: dict[str, Any] = {"ok": True, "version": wire.VERSION, "pid": os.getpid()}
                else:
                    handler = self.ops.get(op) if isinstance(op, str) else None
                    if handler is None:
                        raise wire.ProtocolError(f"unknown op {str(op)[:40]!r}")
                    reply, fds = await handler(conn, msg)
            except SllmfsError as e:
                self.counters.client_errors += 1
                log.info("client error conn=%d pid=%d: %s", conn.id, conn.pid, e)
                await self._send(sock, wire.error_reply(e), conn=conn, op=op)
                if not greeted:
                    return
                continue
            except Exception as e:  # a bug costs one request, never the connection or the daemon
                log.exception("internal error on conn=%d pid=%d", conn.id, conn.pid)
                await self._send(sock, wire.error_reply(wire.SidecarError(f"internal error: {type(e).__name__}: {e}")),
                                 conn=conn, op=op)
                continue
            try:
                await self._send(sock, reply, fds, conn=conn, op=op)
            finally:
                for fd in fds:
                    os.close(fd)

    async def _reject(self, sock: trio.socket.SocketType, conn: Conn, e: SllmfsError) -> None:
        self.counters.client_errors += 1
        log.info("client error conn=%d pid=%d: %s", conn.id, conn.pid, e)
        await self._send(sock, wire.error_reply(e), conn=conn)

    async def _send(self, sock: trio.socket.SocketType, obj: dict[str, Any], fds: list[int] | None = None, *,
                    conn: Conn, op: object = None) -> None:
        """One reply and its fds (batched: wire.frames). A failed send is logged and closes the connection,
        so the peer's next read ends instead of waiting for a reply that will never come."""
        try:
            frames = wire.frames(obj, fds or [])
        except wire.ProtocolError as e:  # too large to send: the client gets the reason instead
            log.warning("reply not sent conn=%d pid=%d op=%.40s: %s", conn.id, conn.pid, op, e)
            frames = wire.frames(wire.error_reply(e), [])
        try:
            for data, batch in frames:
                if batch:  # one carrier byte: sent whole or not at all
                    await sock.sendmsg([data], [(pysocket.SOL_SOCKET, pysocket.SCM_RIGHTS, array.array("i", batch))])
                    continue
                view = memoryview(data)
                while view:
                    view = view[await sock.send(view):]
        except OSError as e:
            log.warning("send failed conn=%d pid=%d op=%.40s: %s; closing the connection", conn.id, conn.pid, op,
                        e.strerror or e)
            sock.close()  # the receive loop then ends and the connection's leases with it

    # -- ops -----------------------------------------------------------------

    async def op_list(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        infos, bad = await trio.to_thread.run_sync(self.store.listing)
        models = [{"name": i.name, "variants": i.variants,
                   "resident": [v for v in i.variants if (i.name, v) in self.tier.entries],
                   "registered": i.name in self.registered} for i in infos]
        # entries that are not (whole) models: one line each, the good models listed all the same
        return {"ok": True, "models": models, "bad": [[name, why] for name, why in bad]}, []

    async def op_acquire(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        model, variant = _model_arg(msg), _variant_arg(msg)
        res = await self._resident(model, variant)
        lease_id = next(self._ids)
        res.leases += 1
        conn.leases[lease_id] = res
        self.store.touch(model)
        log.info("lease taken id=%d model=%s variant=%s pid=%d uid=%d state=%s",
                 lease_id, model, variant, conn.pid, conn.uid, res.state)
        fds = []
        try:
            for seg in [*res.segments, res.ready]:
                fds.append(seg.readonly_fd())
        except OSError:
            for fd in fds:
                os.close(fd)
            self._end_lease(conn, lease_id, why="fd error")
            raise
        m = res.manifest
        reply = {
            "ok": True, "lease": lease_id, "model": model, "variant": variant, "state": res.state,
            "tensors": res.wire_tensors, "aliases": m.aliases, "metadata": m.metadata,
            "partitions": [{"file": p.file, "size": p.size, "length": s.length, "huge": s.huge}
                           for p, s in zip(m.partitions, res.segments, strict=True)],
            "ready": {"unit": CHUNK_SIZE, "base": res.chunk_base, "length": res.ready.size},
        }
        return reply, fds

    async def op_files(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """The model's metadata files (config, tokenizer, ...; an adapter variant's own files) as read-only fds."""
        model, variant = _model_arg(msg), _variant_arg(msg)
        if self.settings.registration_required and model not in self.registered:
            raise NotFound(f"model {model!r} is not registered; this sidecar runs with --registration-required")
        found = await trio.to_thread.run_sync(_metadata_files, self.store, model, variant)
        fds: list[int] = []
        listing = []
        try:
            for rel, path in found:
                fd = open_regular(path, below=self.store.models_dir)  # no link followed, no FIFO waited on
                fds.append(fd)
                listing.append([rel, os.fstat(fd).st_size])
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise NotFound(f"model {model!r}: cannot open {Path(str(e.filename)).name} ({e.strerror})") from None
        except SllmfsError:
            for fd in fds:
                os.close(fd)
            raise
        return {"ok": True, "files": listing}, fds

    async def op_release(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        lease_id = msg.get("lease")
        if not isinstance(lease_id, int) or lease_id not in conn.leases:
            raise BadInput(f"no lease {str(lease_id)[:40]!r} on this connection")
        self._end_lease(conn, lease_id, why="released")
        return {"ok": True}, []

    async def op_pin(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        model, variant = _model_arg(msg), _variant_arg(msg)
        res = await self._resident(model, variant)
        res.pinned = True
        log.info("pinned model=%s variant=%s", model, variant)
        return {"ok": True, "state": res.state}, []

    async def op_unpin(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        model, variant = _model_arg(msg), _variant_arg(msg)
        res = self.tier.entries.get((model, variant))
        if res is None or not res.pinned:
            return {"ok": True, "was_pinned": False}, []
        res.pinned = False
        log.info("unpinned model=%s variant=%s", model, variant)
        return {"ok": True, "was_pinned": True}, []

    async def op_evict(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        model = _model_arg(msg)
        variant = _variant_arg(msg) if msg.get("variant") is not None else None
        gone = self.tier.evict(model, variant)
        if not gone and not await trio.to_thread.run_sync(self.store.has, model):
            raise NotFound(f"model {model!r} is neither in memory nor in the store at {self.store.root}; "
                           "see `sllmfs ls` for the names")
        return {"ok": True, "evicted": [r.variant for r in gone]}, []

    async def op_register(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        model = _model_arg(msg)
        if not await trio.to_thread.run_sync(self.store.has, model):
            raise NotFound(f"model {model!r} is not in the store at {self.store.root}; `sllmfs save` it first")
        async with self._registry_lock:  # one writer of registered.json at a time, a snapshot each
            await trio.to_thread.run_sync(_save_registered, self.store, sorted(self.registered | {model}))
            self.registered.add(model)  # only once it is kept
        log.info("registered model=%s", model)
        return {"ok": True}, []

    async def op_refresh(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        dropped = []
        for (model, variant), res in list(self.tier.entries.items()):
            ident = await trio.to_thread.run_sync(self._identity, model, variant)
            if ident != res.identity:
                self.tier.drop(res, why="store changed")
                dropped.append({"model": model, "variant": variant})
        self.refused.clear()
        removed = await self._enforce_disk()
        models = await trio.to_thread.run_sync(self.store.list)
        return {"ok": True, "models": len(models), "dropped": dropped, "removed": removed}, []

    async def op_load_ipc(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """Copy a leased variant's bytes into the client's GPU tensors (CUDA IPC handles it exported)."""
        lease_id = msg.get("lease")
        res = conn.leases.get(lease_id) if isinstance(lease_id, int) else None
        if res is None:
            raise BadInput(f"lease {str(lease_id)[:40]!r} is not held on this connection")
        blocks, pieces = msg.get("blocks"), msg.get("pieces")
        if not isinstance(blocks, list) or not isinstance(pieces, list):
            raise BadInput("load_ipc needs 'blocks' and 'pieces' lists")
        timeout = msg.get("timeout", 120.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 3600:
            raise BadInput("load_ipc 'timeout' must be a number of seconds in (0, 3600]")
        t0 = time.perf_counter()
        stats, close = await trio.to_thread.run_sync(self.gpu.copy, res, blocks, pieces, float(timeout))
        stats["wall_s"] = time.perf_counter() - t0
        assert self._nursery is not None
        self._nursery.start_soon(trio.to_thread.run_sync, close)  # off the client's clock: the reply goes first
        log.info("gpu copy model=%s variant=%s pid=%d bytes=%d seconds=%.3f (wall %.3f) rate=%.2fGB/s opens=%d",
                 res.model, res.variant, conn.pid, stats.get("bytes", 0), stats.get("seconds", 0.0),
                 stats["wall_s"], stats.get("gbps", 0.0), stats.get("ipc_opens", 0))
        return {"ok": True, **{k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}}, []

    async def op_status(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        sizes = await trio.to_thread.run_sync(disktier.disk_usage, self.store)
        refetch = await trio.to_thread.run_sync(lambda: {n: disktier.is_refetchable(self.store, n) for n in sizes})
        leased = {(r.model, r.variant) for c in self.conns for r in c.leases.values()}
        models = []
        for name, size in sorted(sizes.items()):
            resident = [r for (m, _), r in self.tier.entries.items() if m == name]
            models.append({
                "name": name, "disk_bytes": size, "tier": "memory" if resident else "disk",
                # the disk budget evicts only models it can store again; others only `sllmfs rm` removes
                "disk_evictable": refetch.get(name, False),
                "registered": name in self.registered,
                "variants": [{"variant": r.variant, "state": r.state, "bytes": r.nbytes, "filled": r.filled,
                              "total": r.data_bytes, "leases": r.leases, "pinned": r.pinned,
                              "huge_pages": all(s.huge for s in r.segments)} for r in resident],
                "leased": any(m == name for m, _ in leased),
            })
        leases = [{"id": i, "model": r.model, "variant": r.variant, "pid": c.pid, "uid": c.uid}
                  for c in self.conns for i, r in c.leases.items()]
        c = self.counters
        filled = c.bytes_filled + sum(f.res.filled for f in self.fills)  # fills in progress count as they go
        return {"ok": True, "pid": os.getpid(), "storage_path": str(self.store.root), "gpus": self.gpu.buses,
                "memory": {"used": self.tier.used, "budget": self.tier.budget, "retired": len(self.tier.retired)},
                "disk": {"used": sum(sizes.values()), "budget": self.settings.disk_size},
                "models": models, "leases": leases, "connections": len(self.conns),
                "counters": {"hits": c.hits, "misses": c.misses, "fills": c.fills, "bytes_filled": filled,
                             "evictions": self.tier.evictions, "client_errors": c.client_errors,
                             "connections_refused": c.connections_refused}}, []

    # -- tiers ---------------------------------------------------------------

    def _identity(self, model: str, variant: str) -> Identity | None:
        return variant_identity(self.store.model_path(model) / "variants" / variant)

    async def _resident(self, model: str, variant: str) -> Resident:
        """The resident copy of a variant: a hit, or a new fill started from the store (a miss)."""
        if self.settings.registration_required and model not in self.registered:
            raise NotFound(f"model {model!r} is not registered; this sidecar runs with --registration-required")
        res = self.tier.get(model, variant)
        ident = self._identity(model, variant)  # one stat: notices `sllmfs save --force` and `rm`
        if res is not None and res.identity == ident and res.error:  # its fill is failing right now
            raise Corrupt(self._refusal(res.model, res.variant, res.error))
        if res is not None and res.identity == ident and res.state != "failed":
            self.counters.hits += 1
            return res
        if res is not None:
            self.tier.drop(res, why="store changed" if res.identity != ident else "failed")
        if ident is None:
            info = await trio.to_thread.run_sync(self.store.get, model)  # raises NotFound naming the model
            raise NotFound(f"model {model!r} has no variant {variant!r} (has: {', '.join(info.variants) or 'none'})")
        refused = self.refused.get((model, variant))
        if refused and refused[0] == ident:
            raise Corrupt(refused[1])
        await trio.to_thread.run_sync(self.store.get, model)  # a damaged model is refused as every reader does
        variant_dir = self.store.model_path(model) / "variants" / variant
        try:  # one version throughout: identity, manifest and data files through one directory fd,
            # opened without following a link at any step below models/
            dir_fd = open_dir(variant_dir, below=self.store.models_dir)
        except FileNotFoundError:
            return await self._resident(model, variant)  # replaced or removed meanwhile: look again
        except OSError as e:
            raise Corrupt(f"model {model!r} [{variant}]: cannot open {variant_dir} ({e.strerror}); "
                          f"run `sllmfs verify --model {model}`") from None
        try:
            pinned = Path(f"/proc/self/fd/{dir_fd}")
            ident = variant_identity(pinned)
            if ident is None:
                return await self._resident(model, variant)
            manifest = await trio.to_thread.run_sync(load_manifest, pinned)
            if self.tier.get(model, variant) is not None:  # another task filled it while we read
                return await self._resident(model, variant)
            self.counters.misses += 1
            res = self.tier.reserve(model, variant, manifest, ident)
            try:
                fill = Fill(res, pinned, self.settings.chunk_size)
            except SllmfsError:
                res.state = "failed"
                self.tier.drop(res, why="fill failed")
                raise
        finally:
            os.close(dir_fd)
        assert self._nursery is not None
        self._nursery.start_soon(self._fill, fill)
        return res

    async def _fill(self, fill: Fill) -> None:
        res = fill.res
        self.fills.add(fill)
        t0 = time.perf_counter()
        log.info("fill started model=%s variant=%s bytes=%d threads=%d", res.model, res.variant, fill.total,
                 self.settings.num_thread)
        try:
            async with trio.open_nursery() as n:
                for _ in range(max(1, self.settings.num_thread)):
                    n.start_soon(trio.to_thread.run_sync, fill.worker)
        except Exception as e:  # a bug fails this fill, never the daemon
            log.exception("fill crashed model=%s variant=%s", res.model, res.variant)
            fill.error = fill.error or f"internal error: {type(e).__name__}"
        finally:
            fill.close()
            self.fills.discard(fill)
        seconds = time.perf_counter() - t0
        self.counters.bytes_filled += res.filled
        if fill.error or fill.stop:
            res.state = "failed"
            ready = res.ready.mm
            for i in range(res.ready.size):  # clients waiting on unread windows learn at once
                if ready[i] == PENDING:
                    ready[i] = FAILED
            if fill.error:
                self.refused[(res.model, res.variant)] = (res.identity,
                                                          self._refusal(res.model, res.variant, fill.error))
                log.error("fill failed model=%s variant=%s: %s; refusing the model", res.model, res.variant, fill.error)
        else:
            res.state = "ready"
            self.counters.fills += 1
            log.info("filled model=%s variant=%s bytes=%d seconds=%.3f rate=%.2fGB/s", res.model, res.variant,
                     res.filled, seconds, res.filled / seconds / 1e9 if seconds else 0)
            if self.gpu.active and res.unpin is None and self._nursery is not None:
                self._nursery.start_soon(self._pin, res)
        if res.state == "failed" and not res.retired:
            self.tier.drop(res, why="fill failed")
        self.tier.settle(res)

    @staticmethod
    def _refusal(model: str, variant: str, why: str) -> str:
        return (f"model {model!r} [{variant}] failed verification: {why}; "
                f"run `sllmfs verify --model {model}` and save it again")

    def _end_lease(self, conn: Conn, lease_id: int, *, why: str) -> None:
        res = conn.leases.pop(lease_id)
        res.leases -= 1
        res.last_used = time.monotonic()
        log.info("lease ended id=%d model=%s variant=%s pid=%d (%s)", lease_id, res.model, res.variant, conn.pid, why)
        self.tier.settle(res)

    def is_registered(self, model: str) -> bool:
        return model in self.registered

    async def _enforce_disk(self) -> list[str]:
        protected = {r.model for r in self.tier.entries.values() if r.busy} | set(self.mount_in_use)
        protected |= {r.model for r in self.tier.retired}
        removed = await trio.to_thread.run_sync(disktier.enforce_budget, self.store, self.settings.disk_size,
                                                protected)
        for name in removed:
            for (m, _), res in list(self.tier.entries.items()):
                if m == name:
                    self.tier.drop(res, why="removed from disk")
        return removed

    async def _watch_store(self) -> None:
        """Drop resident copies whose stored variant was replaced or removed (`save --force`, `rm`),
        so their memory comes back once no lease holds them, without a manual evict."""
        while True:
            await trio.sleep(STORE_WATCH_S)
            for (model, variant), res in list(self.tier.entries.items()):
                if res.state == "filling":
                    continue
                ident = await trio.to_thread.run_sync(self._identity, model, variant)
                if ident != res.identity and self.tier.entries.get((model, variant)) is res:
                    self.tier.drop(res, why="store changed")

    async def _disk_loop(self) -> None:
        while True:
            if self.settings.disk_size:
                try:
                    await self._enforce_disk()
                except Exception as e:  # a damaged store entry must not stop the daemon
                    log.warning("disk tier: %s", e)
            await trio.sleep(30)


async def _recv_exact(sock: trio.socket.SocketType, n: int) -> bytes | None:
    """n bytes, or None when the peer closes (or a deadline cancels) first. Memory grows as bytes
    arrive: a peer that announces 16 MiB and stalls holds what it sent, not 16 MiB."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = await sock.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _model_arg(msg: dict[str, Any]) -> str:
    model = msg.get("model")
    if not isinstance(model, str):
        raise BadInput("request needs 'model' (a string)")
    return names.check_model_name(model)


def _variant_arg(msg: dict[str, Any]) -> str:
    variant = msg.get("variant", "hf")
    if not isinstance(variant, str):
        raise BadInput("'variant' must be a string")
    return names.check_variant(variant)


def _metadata_files(store: Store, model: str, variant: str) -> list[tuple[str, Path]]:
    info = store.get(model)
    vfiles = info.variant_dir(variant) / "files"  # adapters keep their own config beside their weights
    if variant != "hf" and vfiles.is_dir():
        rels = sorted(str(p.relative_to(vfiles)) for p in vfiles.rglob("*") if p.is_file())
        base = vfiles
    else:
        if variant not in info.variants:
            raise NotFound(f"model {model!r} has no variant {variant!r} (has: {', '.join(info.variants) or 'none'})")
        rels, base = info.files, info.path / "files"
    out = []
    for rel in rels:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:  # model.json is data: never follow it out of the store
            raise Corrupt(f"model {model!r} lists a bad file name {rel!r}; save it again")
        out.append((rel, base / rel))
    if len(out) > wire.MAX_FDS:  # each is an open fd in the sidecar until the reply is sent
        raise BadInput(f"model {model!r} has {len(out)} metadata files; the sidecar serves at most {wire.MAX_FDS}")
    return out


REGISTERED = "registered.json"  # <store>/registered.json: models allowed under --registration-required


def _load_registered(store: Store) -> set[str]:
    try:
        names_ = json.loads((store.root / REGISTERED).read_text())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as e:
        log.warning("ignoring %s (%s): no model is registered until `sllmfs register` writes it again",
                    store.root / REGISTERED, e)
        return set()
    return {n for n in names_ if isinstance(n, str)} if isinstance(names_, list) else set()


def _save_registered(store: Store, registered: list[str]) -> None:
    path = store.root / REGISTERED
    tmp = path.with_name(f".{REGISTERED}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(registered))
    os.chmod(tmp, 0o640)
    os.replace(tmp, path)  # whole or not at all


def _supplementary_groups(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()
