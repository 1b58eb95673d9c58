"""Framing shared by the sidecar and its clients: 4-byte big-endian length + msgpack map.

Kept free of trio so the client can import it. Replies are ``{"ok": True, ...}``
or ``{"ok": False, "error": "<one line>", "kind": "<error class>"}``.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from sllmfs import errors
from sllmfs.errors import SllmfsError

VERSION = 1
MAX_MESSAGE = 16 << 20  # checked on the prefix, before any body byte is read
MAX_FDS = 1024  # one per partition plus readiness; 1024 partitions of 4 GiB is 4 TiB
HEADER = struct.Struct(">I")


class ProtocolError(SllmfsError):
    """A message that breaks the framing or the protocol."""


class SidecarError(SllmfsError):
    """The sidecar refused a request, or cannot be reached."""


# error kinds sent on the wire -> the exception a client raises
KINDS: dict[str, type[SllmfsError]] = {
    "BadInput": errors.BadInput,
    "NotFound": errors.NotFound,
    "Corrupt": errors.Corrupt,
    "FormatVersionError": errors.FormatVersionError,
    "SidecarCannotCopy": errors.SidecarCannotCopy,
    "ProtocolError": ProtocolError,
}


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


def error_reply(e: BaseException) -> dict[str, Any]:
    kind = type(e).__name__ if type(e).__name__ in KINDS else "SidecarError"
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    return {"ok": False, "error": line, "kind": kind}


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is True:
        return reply
    cls = KINDS.get(str(reply.get("kind")), SidecarError)
    raise cls(str(reply.get("error", "sidecar sent a malformed reply")))


# -- blocking socket helpers (client side) -----------------------------------


def send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(pack(obj))


def recv(sock: socket.socket, *, use_list: bool = True) -> tuple[dict[str, Any], list[int]]:
    """One message and any fds that came with it (SCM_RIGHTS). use_list=False: arrays as tuples."""
    fds: list[int] = []
    try:
        header = _recv_exact(sock, HEADER.size, fds)
        body = _recv_exact(sock, body_length(header), fds)
        return unpack(body, use_list=use_list), fds
    except BaseException:
        for fd in fds:
            _close(fd)
        raise


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        data, got, flags, _ = socket.recv_fds(sock, min(left, 1 << 20), MAX_FDS)
        fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors in one reply")
        if not data:
            raise SidecarError("the sidecar closed the connection")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
