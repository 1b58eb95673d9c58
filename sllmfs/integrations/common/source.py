"""Where a framework's loader gets tensors: the sidecar (production) or the store directly.

Both hand out a context manager per variant whose value looks like
sllmfs.client.client.Lease where the loader needs it (``metadata``: the manifest's
metadata; ``entries``: name → dtype code and shape; ``tensors()``: CPU views, no
copy) and raise sllmfs.core.errors.NotFound for a variant that is not stored.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from sllmfs.core import dtypes
from sllmfs.core.config import usable_cpus
from sllmfs.core.errors import Corrupt, NotFound, SllmfsError
from sllmfs.store.format import CHUNK_SIZE, Manifest, corrupt
from sllmfs.store.reader import Partitions, window_ok, windows


class Lease(Protocol):
    metadata: dict[str, Any]

    @property
    def entries(self) -> Mapping[str, Any]: ...  # name -> .dtype (code), .shape, aliases included

    def tensors(self) -> dict[str, Any]: ...


class WeightSource(Protocol):
    model: str

    # gpu_first: the sidecar will copy this lease to a GPU next (False: the loader reads CPU views)
    def open(self, variant: str, *, gpu_first: bool = True) -> AbstractContextManager[Lease]: ...


class SidecarSource:
    """Leases from the running sidecar (shared-memory segments, zero copy)."""

    def __init__(self, model: str, socket: str):
        self.model = model
        self.socket = socket
        self._client: Any = None

    def _connect(self) -> Any:
        if self._client is None:
            from sllmfs.client import client

            try:
                self._client = client.connect(self.socket)
            except (OSError, SllmfsError) as e:
                raise SllmfsError(
                    f"cannot reach the sllmfs sidecar at {self.socket} to load {self.model!r} ({e}); "
                    "start it with `sllmfs start` (or `systemctl start sllmfs`), or set SLLMFS_SOCKET"
                ) from None
        return self._client

    def open(self, variant: str, *, gpu_first: bool = True) -> AbstractContextManager[Lease]:
        # no wait here: the copy engine starts on the first chunks while the sidecar fills the rest;
        # tensors() waits for all of them (and raises Corrupt on a failed checksum)
        from sllmfs.client.transfer import sidecar_copies

        # a lease copied to the GPU: on a miss the sidecar copies from its files first and fills after.
        # One read through CPU views (the any-TP path) says so: the fill starts at once, beside the model's
        # build, instead of being held for a copy that never comes
        lease: AbstractContextManager[Lease] = self._connect().acquire(self.model, variant,
                                                                        gpu_first=gpu_first and sidecar_copies())
        return lease


class _StoreLease:
    def __init__(self, manifest: Manifest, variant_dir: Path):
        self.manifest = manifest
        self.metadata = manifest.metadata
        self.entries = {name: manifest.entry(name) for name in manifest.names()}
        self._dir = variant_dir
        self._maps: list[mmap.mmap | None] = []

    def _open_maps(self) -> None:
        files = Partitions(self._dir, self.manifest.partitions)
        for i in range(len(self.manifest.partitions)):
            try:
                self._maps.append(files.map_private(i))
            except FileNotFoundError:
                raise corrupt(files.path(i), "is missing") from None
        self._verify()

    def _verify(self) -> None:
        """Every window against the manifest, as the sidecar's fill checks it (xxh3 drops the GIL: threads)."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = [(i, k) for i, p in enumerate(self.manifest.partitions) for k in range(windows(p))]

        def bad(job: tuple[int, int]) -> str | None:
            i, k = job
            p, buf = self.manifest.partitions[i], self._maps[i]
            assert buf is not None
            view = memoryview(buf)[k * CHUNK_SIZE:min((k + 1) * CHUNK_SIZE, p.size)]
            ok = window_ok(p, k, view)
            view.release()
            return None if ok else f"{p.file} window {k}"

        with ThreadPoolExecutor(min(16, usable_cpus())) as pool:
            failed = next((w for w in pool.map(bad, jobs) if w), None)
        if failed:
            raise Corrupt(f"{self._dir}: {failed} fails its checksum; run `sllmfs verify` and save the model again")

    def tensors(self) -> dict[str, Any]:
        import torch

        if not self._maps and self.manifest.partitions:
            self._open_maps()
        out: dict[str, Any] = {}
        for name in self.manifest.names():
            t = self.manifest.entry(name)
            dt = dtypes.to_torch(dtypes.by_code(t.dtype))
            buf = self._maps[t.partition]
            if t.nbytes == 0 or buf is None:
                out[name] = torch.empty(t.shape, dtype=dt)
                continue
            raw = torch.frombuffer(buf, dtype=torch.uint8, offset=t.offset, count=t.nbytes)
            out[name] = raw.view(dt).reshape(t.shape)
        return out

    def raw(self, partition: int, offset: int, nbytes: int) -> Any:
        """The stored bytes of a partition range as a CPU uint8 tensor (no copy)."""
        import torch

        if not self._maps and self.manifest.partitions:
            self._open_maps()
        if not nbytes:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._maps[partition], dtype=torch.uint8, offset=offset, count=nbytes)

    def close(self) -> None:
        # views handed out keep their pages alive (torch holds the buffer); drop ours
        self._maps.clear()


class StoreSource:
    """Reads a store on this host without the sidecar (``sllmfs save --backend sglang``, tests)."""

    def __init__(self, model: str, storage_path: str):
        from sllmfs.store.store import Store

        self.model = model
        self.store = Store(storage_path, create=False, cleanup=False)

    @contextmanager
    def open(self, variant: str, *, gpu_first: bool = True) -> Iterator[Lease]:
        info = self.store.get(self.model)
        if variant not in info.variants:
            raise NotFound(f"model {self.model!r} has no variant {variant!r}")
        lease = _StoreLease(info.manifest(variant), info.variant_dir(variant))
        try:
            yield lease
        finally:
            lease.close()


def weights_as_filled(lease: Lease) -> Iterator[tuple[str, Any]]:
    """(name, CPU view) pairs in file order, each as soon as its own bytes are verified, tied names
    included: a model's ``load_weights`` shards and copies the first tensors while the sidecar is
    still filling the rest (a first load streams instead of waiting for the whole variant).

    A store lease checks every window when it opens, so it has nothing to wait for."""
    wait = getattr(lease, "wait", None)
    if wait is None:
        yield from lease.tensors().items()
        return
    entries = lease.entries  # aliases map to their target's entry: the bytes waited for are the same
    views = lease.tensors(wait=False)  # type: ignore[call-arg]  # the sidecar's Lease
    for name in sorted(views, key=lambda n: (entries[n].partition, entries[n].offset)):  # the fill's order
        t = entries[name]
        if t.nbytes:
            wait(t.partition, t.offset, t.nbytes)  # raises Corrupt on a window that failed its checksum
        yield name, views[name]
