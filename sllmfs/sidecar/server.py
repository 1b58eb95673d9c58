"""The socket server: peer credentials, connection limits, framing and the dispatch of each request.

One trio task per connection. Every request gets one reply; a request that breaks the
framing gets an error reply and the connection is closed. Errors from one client never
reach the nursery, so everyone else keeps going. The ops themselves are ``ops``'; what
they act on (residency, fills, budgets) is ``cache``'s. Protocol reference: docs/protocol.md.
"""

from __future__ import annotations

import array
import grp
import itertools
import logging
import math
import os
import pwd
import socket as pysocket
import struct
from pathlib import Path
from typing import Any

import trio

from sllmfs.core.config import Settings
from sllmfs.core.errors import BadInput, SllmfsError
from sllmfs.protocol import wire
from sllmfs.protocol.messages import HELLO_OFF_ELEMENT, Op, ProtocolError, SidecarError, error_reply
from sllmfs.sidecar.cache import Cache
from sllmfs.sidecar.memtier import MemoryTier
from sllmfs.sidecar.ops import Conn, Ops
from sllmfs.sidecar.registry import Registry
from sllmfs.sidecar.status import status
from sllmfs.store.store import Store

log = logging.getLogger("sllmfs.sidecar")

BODY_TIMEOUT = 60.0  # seconds for a message body to arrive once its length is known
HELLO_TIMEOUT = 10.0  # a connection that has not said hello by then is closed
IDLE_TIMEOUT = 600.0  # a greeted connection holding no lease, silent this long, is closed
MAX_CONNECTIONS = 4096  # in all: each holds an fd and a task
MAX_PER_PEER = 64  # per client process: one process cannot take the daemon's descriptors
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Server:
    def __init__(self, settings: Settings, store: Store, tier: MemoryTier):
        self.settings = settings
        self.registry = Registry(store)  # kept in the store: survives restarts
        self.cache = Cache(settings, store, tier, self.registry)
        self.counters = self.cache.counters
        self.conns: set[Conn] = set()
        self._per_pid: dict[int, int] = {}  # open connections by client process
        self._ids = itertools.count(1)
        self.ops = Ops(self.cache, self._ids, self.status)
        self._allowed_uids = {0, os.geteuid()} | {int(u) for u in settings.allow_uids.split(",") if u.strip()}
        self._group_gid = grp.getgrnam(settings.group).gr_gid if settings.group else None

    async def serve(self, listener: trio.socket.SocketType, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.cache.run)
            task_status.started()
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as e:  # EMFILE/ENFILE: keep serving the connections we have, retry soon
                    log.warning("accept failed: %s", e.strerror or e)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._connection, sock)

    async def status(self) -> dict[str, Any]:
        """The status dict: the ``status`` op's reply and what the metrics endpoint exports."""
        return await status(self.cache, self.conns)

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                pid, uid, gid = _CRED.unpack(sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_PEERCRED, _CRED.size))
            except OSError:
                return
            conn = Conn(next(self._ids), pid, uid)
            if not self._allowed(pid, uid, gid):
                log.warning("client error conn=%d pid=%d uid=%d: not allowed to use this sidecar", conn.id, pid, uid)
                await self._send(sock, error_reply(BadInput(f"uid {uid} may not use this sidecar")), conn=conn)
                return
            if len(self.conns) >= MAX_CONNECTIONS or self._per_pid.get(pid, 0) >= MAX_PER_PEER:
                self.counters.connections_refused += 1
                if self.counters.connections_refused % 1000 == 1:  # a flood logs a line per thousand
                    log.warning("refusing connections: pid=%d holds %d (limit %d), %d in all (limit %d); "
                                "%d refused so far", pid, self._per_pid.get(pid, 0), MAX_PER_PEER, len(self.conns),
                                MAX_CONNECTIONS, self.counters.connections_refused)
                await self._send(sock, error_reply(BadInput(
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
                    self.ops.end_lease(conn, lease_id, why="connection closed")

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
            except ProtocolError as e:  # cannot resync after a bad prefix
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
                    if op != Op.HELLO:
                        raise ProtocolError("say hello first: {'op': 'hello', 'version': 1}")
                    if msg.get("version") != wire.VERSION:
                        raise ProtocolError(
                            f"protocol version {msg.get('version')!r} not served; this sidecar speaks {wire.VERSION}")
                    greeted = True
                    conn.off_element = msg.get(HELLO_OFF_ELEMENT) is True
                    reply: dict[str, Any] = {"ok": True, "version": wire.VERSION, "pid": os.getpid()}
                else:
                    handler = self.ops.table.get(op) if isinstance(op, str) else None
                    if handler is None:
                        raise ProtocolError(f"unknown op {str(op)[:40]!r}")
                    reply, fds = await handler(conn, msg)
            except SllmfsError as e:
                self.counters.client_errors += 1
                log.info("client error conn=%d pid=%d: %s", conn.id, conn.pid, e)
                await self._send(sock, error_reply(e), conn=conn, op=op)
                if not greeted:
                    return
                continue
            except Exception as e:  # a bug costs one request, never the connection or the daemon
                log.exception("internal error on conn=%d pid=%d", conn.id, conn.pid)
                await self._send(sock, error_reply(SidecarError(f"internal error: {type(e).__name__}: {e}")),
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
        await self._send(sock, error_reply(e), conn=conn)

    async def _send(self, sock: trio.socket.SocketType, obj: dict[str, Any], fds: list[int] | None = None, *,
                    conn: Conn, op: object = None) -> None:
        """One reply and its fds (batched: wire.frames). A failed send is logged and closes the connection,
        so the peer's next read ends instead of waiting for a reply that will never come."""
        try:
            frames = wire.frames(obj, fds or [])
        except ProtocolError as e:  # too large to send: the client gets the reason instead
            log.warning("reply not sent conn=%d pid=%d op=%.40s: %s", conn.id, conn.pid, op, e)
            frames = wire.frames(error_reply(e), [])
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


def _supplementary_groups(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()
