"""What the sidecar and its clients say to each other, written once: op names, tensor rows,
readiness states and error kinds. Framing (bytes on the socket) is ``wire``'s; the
reference for other clients is docs/protocol.md.

Kept free of trio and of the daemon so the client, the copy engine and the FUSE view
can import it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any, NamedTuple

from sllmfs.core import errors
from sllmfs.core.errors import SllmfsError

# hello's field from clients that read a tensor stored off its element size (a safetensors-layout variant may
# hold one): a client that does not send it is refused such a variant, never handed an offset it misreads
HELLO_OFF_ELEMENT = "off_element_tensors"


class Op(StrEnum):
    """A request's ``"op"``; the server's dispatch table and the client's calls both use these."""

    HELLO = "hello"
    LIST = "list"
    ACQUIRE = "acquire"
    RELEASE = "release"
    FILES = "files"
    STATUS = "status"
    PIN = "pin"
    UNPIN = "unpin"
    EVICT = "evict"
    REFRESH = "refresh"
    REGISTER = "register"
    LOAD_IPC = "load_ipc"
    FAILURE = "failure"  # why a lease's fill or streaming pull failed (after readiness says FAILED)
    FILL = "fill"  # start a lease's fill held for its GPU copy (acquire's gpu_first): the client reads the segments


class Readiness(IntEnum):
    """One byte per fill chunk of each partition in a resident variant's readiness segment.

    The sidecar's fill writes them, clients and the copy engine poll them; the native
    engine's copy (csrc/engine.h, kChunk*) reads the same values.
    """

    PENDING = 0
    READY = 1  # in memory and verified
    FAILED = 2  # a read or checksum failed: the fill stopped


class FailCause(StrEnum):
    """Why a resident's fill (from the store) or streaming pull (from the origin) failed: the
    ``failure`` reply's ``cause``, so a client decides on it, never on the line's text."""

    DAMAGED = "damaged"  # a window fails its checksum, a data file or an origin object is short
    READ = "read"  # the store's disk failed a read
    ORIGIN = "origin"  # the origin is unreachable, refused the sidecar, or does not hold the model
    REPLACED = "replaced"  # what the pull committed is not the version that streamed into memory
    STOPPED = "stopped"  # the sidecar stopped the fill (it is shutting down)
    INTERNAL = "internal"  # a sidecar bug (its log has the trace)


class Failure(NamedTuple):
    """A failed fill or pull: its cause and its one line (what, where, what to do)."""

    cause: FailCause
    line: str


class TensorRef(NamedTuple):  # a tuple, not a dataclass: a 1,000-tensor lease decodes 3x faster (0.18 ms)
    """Where a tensor's bytes lie in a leased variant: ``partition`` indexes the lease's segments.

    On the wire (``acquire``'s ``"tensors"``) a row is the list
    ``[name, dtype, shape, partition, offset, nbytes]``: positional, so a 1,000-tensor
    manifest stays a small message; :meth:`encode` and :meth:`decode` are its only spellings.
    """

    name: str
    dtype: str  # safetensors-style code (sllmfs.core.dtypes)
    shape: tuple[int, ...]
    partition: int
    offset: int
    nbytes: int

    def encode(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.partition, self.offset, self.nbytes]

    @classmethod
    def decode(cls, row: Any) -> TensorRef:
        name, dtype, shape, partition, offset, nbytes = row
        return cls(name, dtype, tuple(shape), partition, offset, nbytes)


class ErrorKind(StrEnum):
    """An error reply's ``"kind"``: what a client decides on (never the message's text).

    The values are the exception class names protocol version 1 has always sent.
    """

    BAD_INPUT = "BadInput"
    NOT_FOUND = "NotFound"
    CORRUPT = "Corrupt"
    FORMAT_VERSION = "FormatVersionError"
    CANNOT_COPY = "SidecarCannotCopy"  # no GPU copies on the sidecar's side: the client copies itself
    PULLING = "Pulling"  # the model is on its way from the origin: ask again (replies never wait for it)
    PROTOCOL = "ProtocolError"
    SIDECAR = "SidecarError"  # anything else, a sidecar bug included


class ProtocolError(SllmfsError):
    """A message that breaks the framing or the protocol."""

    kind = ErrorKind.PROTOCOL


class SidecarError(SllmfsError):
    """The sidecar refused a request, or cannot be reached."""

    kind = ErrorKind.SIDECAR


# kind on the wire <-> the exception raised on either side; exact classes, as version 1 matched names
RAISES: dict[ErrorKind, type[SllmfsError]] = {
    ErrorKind.BAD_INPUT: errors.BadInput,
    ErrorKind.NOT_FOUND: errors.NotFound,
    ErrorKind.CORRUPT: errors.Corrupt,
    ErrorKind.FORMAT_VERSION: errors.FormatVersionError,
    ErrorKind.CANNOT_COPY: errors.SidecarCannotCopy,
    ErrorKind.PULLING: errors.Pulling,
    ErrorKind.PROTOCOL: ProtocolError,
    ErrorKind.SIDECAR: SidecarError,
}
_KIND_OF: dict[type[BaseException], ErrorKind] = {cls: kind for kind, cls in RAISES.items()}


def kind_of(e: BaseException) -> ErrorKind:
    return _KIND_OF.get(type(e), ErrorKind.SIDECAR)


def error_reply(e: BaseException) -> dict[str, Any]:
    """The reply for a failed request: its kind and its first line."""
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    return {"ok": False, "error": line, "kind": kind_of(e).value}


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply itself when it says ok, else the exception its kind names (unknown kinds: SidecarError)."""
    if reply.get("ok") is True:
        return reply
    try:
        kind = ErrorKind(str(reply.get("kind")))
    except ValueError:
        kind = ErrorKind.SIDECAR
    raise RAISES[kind](str(reply.get("error", "sidecar sent a malformed reply")))
