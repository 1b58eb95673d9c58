"""What a copy can fail with: one class per way, so callers decide by type, never by message."""

from __future__ import annotations

from sllmfs.core.errors import Corrupt, SllmfsError


class CopyError(SllmfsError):
    """A copy did not complete; nothing it touched may be treated as loaded."""


class CudaUnavailable(CopyError):
    """target='cuda' on a machine (or build of torch) without a usable GPU."""


class CudaError(CopyError):
    """A CUDA call failed; the message names the call and the error code."""


class ChunkFailed(CopyError):
    """The cache marked a chunk the copy needs as failed (read or checksum error)."""


class ReadinessTimeout(CopyError, TimeoutError):
    """No chunk became ready for longer than the timeout."""


class BadPieces(CopyError, ValueError):
    """A piece reads outside its segment or names a segment that was not given."""


class ShortSegment(CopyError):
    """A segment's file holds fewer bytes than the manifest says."""


class SourceCorrupt(CopyError, Corrupt):
    """A file source's bytes differ from their manifest checksum: the stored file is damaged."""


class SourceReadFailed(CopyError, OSError):
    """Reading a file source failed (an I/O error, or the file is shorter than its manifest says)."""
