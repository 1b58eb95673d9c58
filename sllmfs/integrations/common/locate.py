"""From a framework's model path (SGLang's ``--model-path``) to (store model name, sidecar socket).

A path under an sllmfs FUSE mount names the model by its place below the mount
root; the mount root carries the marker file and xattr of sllmfs.protocol.marker.
Anything else that is a valid model name is taken as the store name, with the
socket from sllmfs settings. (The messages still name SGLang's flags: it is the
one framework that passes a model path here today.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sllmfs.core import names
from sllmfs.core.config import load_settings
from sllmfs.core.errors import BadInput, FormatVersionError
from sllmfs.protocol.marker import MARKER_NAME, MARKER_VERSION, SOCKET_XATTR


@dataclass(frozen=True)
class Located:
    model: str  # store model name, e.g. "Qwen/Qwen2.5-7B"
    socket: str  # the sidecar's Unix socket
    mount: Path | None  # the FUSE mount root, when the path was under one
    storage_path: str  # the store on this host (write-back goes there)


def _marker(d: Path) -> dict[str, str] | None:
    """The mount root's ``.sllmfs.json``, or None when ``d`` is not a mount root."""
    info = d / MARKER_NAME
    try:
        raw = json.loads(info.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise BadInput(f"{info} is unreadable ({e}); is the sllmfs mount healthy? try `sllmfs status`") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("socket"), str):
        raise BadInput(f"{info} has no socket; is this an sllmfs mount? try `sllmfs status`")
    if raw.get("version") != MARKER_VERSION:
        raise FormatVersionError(f"{info} has version {raw.get('version')!r}, this sllmfs reads "
                                 f"{MARKER_VERSION}: use the same sllmfs for the sidecar and SGLang")
    return {k: str(v) for k, v in raw.items()}


def _xattr_socket(d: Path) -> str | None:
    try:
        return os.getxattr(d, SOCKET_XATTR).decode()
    except OSError:
        return None


def _mount_root(path: Path) -> tuple[Path, dict[str, str]] | None:
    """The mount root above ``path``: the directory with the marker, else the topmost one with the xattr."""
    for d in [path, *path.parents]:
        info = _marker(d)
        if info is not None:
            return d, info
    # every inode of the mount carries the xattr; the mount root is the last one that does
    root, socket = None, None
    for d in [path, *path.parents]:
        s = _xattr_socket(d)
        if s is None:
            break
        root, socket = d, s
    return (root, {"socket": socket}) if root is not None and socket else None


def locate(model_path: str, *, socket: str | None = None) -> Located:
    """Resolve ``model_path`` (a path under the mount, or a store model name)."""
    settings = load_settings()
    path = Path(model_path).expanduser()
    if path.is_dir():
        path = path.absolute()
        found = _mount_root(path)
        if found is not None:
            root, info = found
            if root == path:
                raise BadInput(f"--model-path {model_path} is the sllmfs mount itself; "
                               f"add the model name, e.g. {root}/<org>/<model>")
            name = names.check_model_name(path.relative_to(root).as_posix())
            return Located(name, socket or info["socket"], root,
                           info.get("storage_path") or settings.storage_path)
        raise BadInput(f"--model-path {model_path} is not under an sllmfs mount; pass /mnt/sllm/<model> "
                       "or a stored model name (see `sllmfs ls`), or drop --load-format sllm")
    try:
        name = names.check_model_name(model_path)
    except BadInput:
        raise BadInput(f"--model-path {model_path!r} is neither a directory under an sllmfs mount nor a "
                       "stored model name (see `sllmfs ls`)") from None
    return Located(name, socket or settings.socket, None, settings.storage_path)
