"""The mount marker: how a process finds the sidecar from a path under the FUSE mount.

The mount root holds ``MARKER_NAME``, one JSON line ``{"socket": ..., "storage_path": ...,
"version": MARKER_VERSION}``, and every inode of the mount answers the xattr
``SOCKET_XATTR`` with the socket. Written by the mount (sllmfs.fuse), read by the
framework integrations (sllmfs.integrations.common.locate).
"""

from __future__ import annotations

import json

MARKER_NAME = ".sllmfs.json"
MARKER_VERSION = 1
SOCKET_XATTR = "user.sllmfs.socket"


def marker_bytes(socket: str, storage_path: str) -> bytes:
    """The marker file's content (the store path lets an integration write its per-rank state back)."""
    return json.dumps({"socket": socket, "storage_path": storage_path, "version": MARKER_VERSION}).encode() + b"\n"
