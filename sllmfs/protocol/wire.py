"""Framing shared by the sidecar and its clients: 4-byte big-endian length + msgpack map.

Kept free of trio so the client can import it. What the maps say (ops, tensor rows,
readiness, error replies) is ``sllmfs.protocol.messages``.

Descriptors (``frames``): a reply that passes N fds says ``"fds": N``; right after
its message come ceil(N / FDS_PER_SEND) carrier bytes (zero bytes), each sent by its own
sendmsg with the next (at most FDS_PER_SEND) fds as SCM_RIGHTS. Linux refuses more
than 253 fds in one sendmsg, and a stream recvmsg only hands over the fds of the
bytes it reads, so the receiver reads each carrier byte on its own and collects N.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import msgpack

# raised here by the framing; defined beside the error kinds they carry
from sllmfs.protocol.messages import ProtocolError, SidecarError

VERSION = 1
MAX_MESSAGE = 16 << 20  # checked on the prefix, before any body byte is read
FDS_PER_SEND = 250  # per carrier byte: under Linux's SCM_MAX_FD (253)
SCM_MAX_FD = 253  # ancillary room on every read: whatever one sendmsg can carry, no MSG_CTRUNC
MAX_FDS = 65536  # per reply: one per partition plus readiness (65,535 partitions of 2 GiB is 128 TiB)
HEADER = struct.Struct(">I")


def pack(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    return HEADER.pack(len(body)) + body


def body_length(header: bytes) -> int:
    (n,) = HEADER.unpack(header)
    if n > MAX_MESSAGE:
        raise ProtocolError(f"message length {n} exceeds the {MAX_MESSAGE}-byte limit")
    return n


def unpack(body: bytes, *, use_list: bool = True) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=use_list)
    except Exception as e:  # msgpack raises many kinds on hostile bytes
        raise ProtocolError(f"message is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a msgpack map")
    return obj


def frames(obj: dict[str, Any], fds: list[int]) -> list[tuple[bytes, list[int]]]:
    """One reply as sendmsg calls (data, fds): the message, then one carrier byte per batch of fds."""
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"a reply of {len(fds)} fds exceeds the {MAX_FDS}-fd limit")
    batches = [(b"\0", fds[i:i + FDS_PER_SEND]) for i in range(0, len(fds), FDS_PER_SEND)]
    return [(pack({**obj, "fds": len(fds)} if fds else obj), []), *batches]


# -- blocking socket helpers (clients; send with fds: tests) -----------------


def send(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    for data, batch in frames(obj, fds or []):
        if batch:
            socket.send_fds(sock, [data], batch)  # one byte: sent whole or not at all
        else:
            sock.sendall(data)


def recv(sock: socket.socket, *, use_list: bool = True,
         deadline: float | None = None) -> tuple[dict[str, Any], list[int]]:
    """One message and all the fds it passes (see ``frames``). use_list=False: arrays as tuples.

    ``deadline`` (time.monotonic()): raise TimeoutError once it passes.
    """
    fds: list[int] = []
    try:
        header = _recv_exact(sock, HEADER.size, fds, deadline)
        msg = unpack(_recv_exact(sock, body_length(header), fds, deadline), use_list=use_list)
        want = msg.get("fds", 0)
        if type(want) is not int or not 0 <= want <= MAX_FDS:
            raise ProtocolError(f"bad fd count {str(want)[:40]!r} in a reply")
        for _ in range(-(-want // FDS_PER_SEND)):
            _recv_exact(sock, 1, fds, deadline)
        if want and len(fds) != want:  # no "fds": an older sidecar's fds rode on the message itself
            raise ProtocolError(f"{want} fds announced, {len(fds)} received")
        return msg, fds
    except BaseException:
        for fd in fds:
            _close(fd)
        raise


def _recv_exact(sock: socket.socket, n: int, fds: list[int], deadline: float | None) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(wait)
        data, got, flags, _ = socket.recv_fds(sock, min(left, 1 << 20), SCM_MAX_FD)
        fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("file descriptors were cut off (MSG_CTRUNC); is RLIMIT_NOFILE too low?")
        if not data:
            raise SidecarError("the sidecar closed the connection")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
