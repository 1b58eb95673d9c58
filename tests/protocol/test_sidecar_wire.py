"""Framing and error mapping shared by the sidecar and its clients (no daemon)."""

from __future__ import annotations

import socket
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sllmfs.core.errors import BadInput, Corrupt, NotFound
from sllmfs.protocol import messages, wire
from sllmfs.sidecar.fill import round_chunk
from sllmfs.store.format import CHUNK_SIZE


def test_round_trip_over_a_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        msg = {"op": "acquire", "model": "org/m", "variant": "hf", "blob": b"\x00\xff"}
        wire.send(a, msg)
        got, fds = wire.recv(b)
        assert got == msg and fds == []


def test_fds_arrive_with_the_message() -> None:
    import os

    a, b = socket.socketpair()
    r, w = os.pipe()
    with a, b:
        data = wire.pack({"ok": True, "n": 1})
        socket.send_fds(a, [data[:3]], [r, w])
        a.sendall(data[3:])
        got, fds = wire.recv(b)
        assert got == {"ok": True, "n": 1} and len(fds) == 2
        for fd in (r, w, *fds):
            os.close(fd)


def test_absurd_length_is_refused_before_reading() -> None:
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.body_length(struct.pack(">I", wire.MAX_MESSAGE + 1))
    assert wire.body_length(struct.pack(">I", wire.MAX_MESSAGE)) == wire.MAX_MESSAGE
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.pack({"x": b"\0" * (wire.MAX_MESSAGE + 1)})


@given(st.binary(max_size=256))
def test_unpack_of_any_bytes_is_a_map_or_a_protocol_error(data: bytes) -> None:
    try:
        obj = wire.unpack(data)
    except wire.ProtocolError:
        return
    assert isinstance(obj, dict)


def test_non_map_bodies_are_protocol_errors() -> None:
    for body in (msgpack.packb([1]), msgpack.packb(3), b"\xc1", b""):
        with pytest.raises(wire.ProtocolError):
            wire.unpack(body)


def test_errors_cross_the_wire_as_their_kind() -> None:
    for exc in (BadInput("bad x"), NotFound("no model 'm'"), Corrupt("bad bytes"), wire.ProtocolError("p")):
        with pytest.raises(type(exc), match=str(exc)):
            messages.raise_for(messages.error_reply(exc))
    with pytest.raises(wire.SidecarError, match="boom"):
        messages.raise_for(messages.error_reply(RuntimeError("boom\nsecond line")))
    with pytest.raises(wire.SidecarError):
        messages.raise_for({"weird": 1})


def test_chunk_size_rounds_up_to_checksum_windows() -> None:
    assert round_chunk(1) == CHUNK_SIZE
    assert round_chunk(CHUNK_SIZE) == CHUNK_SIZE
    assert round_chunk(5 << 20) == 2 * CHUNK_SIZE
    assert round_chunk(0) == CHUNK_SIZE
