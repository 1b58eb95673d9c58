"""Store a rank's post-processed state as a variant, so the next start takes the fast path.

The bytes leave the GPU before the framework's load returns (a copy running later
could meet its CUDA-graph capture, as SGLang's would); the disk write runs in a
thread afterwards.
A crash mid-write leaves only a tmp/ entry, which the store removes later.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any

from sllmfs.core import dtypes
from sllmfs.core.config import env_str
from sllmfs.core.errors import BadInput, SllmfsError
from sllmfs.core.names import HF_VARIANT
from sllmfs.integrations.common.variants import RankVariant
from sllmfs.store.format import Manifest
from sllmfs.store.store import Identity
from sllmfs.store.writer import VariantWriter

OFF, ASYNC, SYNC = "off", "async", "sync"
ENV = "SLLMFS_WRITE_BACK"


def mode(extra_value: Any = None) -> str:
    """``sllm_write_back`` from --model-loader-extra-config, else $SLLMFS_WRITE_BACK, else async."""
    value = extra_value if extra_value is not None else (env_str(ENV) or None)
    if value is None:
        return ASYNC
    text = str(value).strip().lower()
    if text in ("0", "false", "no", "off"):
        return OFF
    if text in ("1", "true", "yes", "on", "async"):
        return ASYNC
    if text == "sync":
        return SYNC
    raise BadInput(f"sllm_write_back / {ENV} is {value!r}: use true, false or sync")


def _log(variant: RankVariant) -> logging.Logger:
    """The framework integration's logger: its users configure that one."""
    return logging.getLogger(f"sllmfs.integrations.{variant.framework.name}")


def _bytes(t: Any) -> memoryview:
    import torch

    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def hf_identity(storage_path: str | None, model: str) -> Identity | None:
    """The identity of ``model``'s hf variant now (None: no store path, or no such variant)."""
    if not storage_path:
        return None
    from sllmfs.store.store import Store

    try:
        return Store(storage_path, create=False, cleanup=False).identity(model, HF_VARIANT)
    except SllmfsError:
        return None


def write_rank_state(store: Any, model: str, variant: RankVariant, state: dict[str, Any], *,
                     replace: bool = False, metadata: dict[str, Any] | None = None,
                     base: Identity | None = None) -> Manifest | None:
    """Write ``state`` (CPU tensors, e.g. snapshot's; consumed) as variant ``variant.key`` of ``model``.

    ``base``: the hf version the state was made from; if the model was replaced since (its hf
    identity differs), nothing is committed: that state belongs to weights no longer stored.
    Returns None when nothing was committed (a peer committed the same key first, or the base is gone).
    """
    key = variant.key
    with store.staging() as work:
        vdir = work / key
        writer = VariantWriter(vdir, key)
        fw = variant.framework
        writer.metadata = {"kind": fw.state_kind, fw.name: variant.layout(), **(metadata or {})}
        try:
            for name in list(state):
                t = state.pop(name)  # a tensor of its own frees its memory here (snapshot's one buffer: after the last)
                writer.add_bytes(name, dtypes.from_torch(t.dtype).code, list(t.shape), _bytes(t))
            manifest = writer.finish()
        except BaseException:
            writer.abort()
            raise
        try:
            with store.writing(model, wait=True):  # ranks queue; a save or rm of the model goes first
                now = store.identity(model, HF_VARIANT)
                if base is not None and now != base:
                    _log(variant).warning("sllmfs: %r was replaced while its rank state was being written; %s is "
                                "dropped (the next start writes it from the new weights)", model, key)
                    return None
                store.commit_variant(vdir, model, key, force=replace)
        except BadInput:
            if replace:
                raise
            return None  # a peer won the race
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return None
            raise
    return manifest


class WriteBack:
    """One rank's write-back, in the background or inline."""

    def __init__(self, storage_path: str, model: str, variant: RankVariant, state: dict[str, Any], *,
                 replace: bool, metadata: dict[str, Any] | None = None, socket: str | None = None,
                 base: Identity | None = None):
        self.storage_path = storage_path
        self.socket = socket  # the sidecar to load the new variant into its memory tier: the next start hits
        self.base = base  # the hf version the state was made from
        self.model = model
        self.variant = variant
        self.state = state
        self.replace = replace
        self.metadata = metadata
        self.result: Manifest | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        from sllmfs.store.store import Store

        t0 = time.perf_counter()
        try:
            store = Store(self.storage_path, create=False, cleanup=False)
            self.result = write_rank_state(store, self.model, self.variant, self.state,
                                           replace=self.replace, metadata=self.metadata, base=self.base)
        except (SllmfsError, OSError) as e:
            self.error = e
            _log(self.variant).warning("sllmfs: could not write %s of %r back to the store at %s (%s); the next start "
                        "loads the hf variant again", self.variant.key, self.model, self.storage_path, e)
            return
        if self.result is not None:
            _log(self.variant).info("sllmfs: wrote %s of %r (%.2f GB) in %.1f s; the next start takes the fast path",
                     self.variant.key, self.model, self.result.total_bytes / 1e9, time.perf_counter() - t0)
        if self.socket:
            self._fill_memory_tier(self.socket)

    def _fill_memory_tier(self, socket: str) -> None:
        """Ask the sidecar to fill the new variant while its bytes are still in the page cache: a
        lease taken and given back starts the fill, which goes on (LRU evicts the hf copy if the
        budget needs the room). Best effort: without a sidecar the next start fills it instead."""
        from sllmfs.client.client import connect

        try:
            with connect(socket) as client, client.acquire(self.model, self.variant.key):
                pass
        except (SllmfsError, OSError) as e:
            _log(self.variant).info("sllmfs: %s of %r stays on disk until its first load (%s)", self.variant.key,
                                    self.model, e)
            return
        _log(self.variant).info("sllmfs: the sidecar fills %s of %r into memory: the next start is a hit",
                                self.variant.key, self.model)

    def start(self) -> WriteBack:
        # daemon: a server that exits mid-write leaves a tmp/ entry, never half a variant
        self._thread = threading.Thread(target=self.run, name=f"sllmfs-write-back-{self.variant.key}",
                                        daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
