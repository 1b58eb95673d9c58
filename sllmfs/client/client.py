"""Client of the sidecar: leases on resident models and zero-copy tensor views.

    import sllmfs.client.client
    with sllmfs.client.client.connect() as c, c.acquire("org/model") as lease:
        tensors = lease.tensors()   # CPU tensors viewing the shared segments, no copy

Segments are mapped read-only (MAP_SHARED): every process sees the one copy in
host memory. Views are read-only; copy (``.clone()``, ``.to("cuda")``) to modify.
Protocol: docs/protocol.md. This module never imports trio or the daemon.
"""

from __future__ import annotations

import builtins
import functools
import logging
import mmap
import os
import socket as pysocket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from sllmfs.core import dtypes
from sllmfs.core.config import env_seconds
from sllmfs.core.errors import Corrupt, Pulling, SllmfsError
from sllmfs.core.names import HF_VARIANT
from sllmfs.protocol import wire
from sllmfs.protocol.messages import HELLO_OFF_ELEMENT, FailCause, Op, Readiness, SidecarError, TensorRef, raise_for
from sllmfs.store.format import TIED

__all__ = ["Client", "FillFailed", "Lease", "TensorRef", "SidecarError", "connect", "warm"]

log = logging.getLogger("sllmfs.client")
PULL_TIMEOUT_S = 3600.0  # how long a request waits for a model coming from the origin (SLLMFS_PULL_TIMEOUT)
REPLY_TIMEOUT = 60.0  # seconds a reply may take (SLLMFS_REPLY_TIMEOUT): ops answer at once, fills run behind
SLOWEST_COPY = 100e6  # bytes/s: load_ipc replies once its bytes have landed; its wait grows with them


class FillFailed(Corrupt):
    """A leased variant's fill (from the store) or streaming pull (from the origin) failed: the message
    is the sidecar's own line for it; ``cause`` what went wrong (decide on it, not on the text)."""

    def __init__(self, line: str, cause: FailCause):
        super().__init__(line)
        self.cause = cause


def connect(socket: str | None = None, *, timeout: float | None = None) -> Client:
    """Connect to the sidecar at ``socket`` (default: the configured socket) and say hello.

    ``timeout``: seconds to wait for each reply (default: $SLLMFS_REPLY_TIMEOUT, else 60).
    """
    if socket is None:
        from sllmfs.core.config import load_settings

        socket = load_settings().socket
    return Client(socket, timeout=timeout)


class Client:
    def __init__(self, path: str, *, timeout: float | None = None):
        self.path = path
        self.timeout = env_seconds("SLLMFS_REPLY_TIMEOUT", REPLY_TIMEOUT) if timeout is None else timeout
        # one request at a time on the socket: a load's host link may ask for the fill while its GPU
        # link waits on load_ipc (sllmfs.client.transfer runs them in threads)
        self._lock = threading.Lock()
        self._sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise SidecarError(f"cannot reach the sidecar at {path}: {e.strerror}; is `sllmfs start` running?") \
                from None
        hello = self._call({"op": Op.HELLO, "version": wire.VERSION, HELLO_OFF_ELEMENT: True})[0]
        self.server_pid: int = hello.get("pid", 0)

    def _call(self, msg: dict[str, Any], *, use_list: bool = True) -> tuple[dict[str, Any], list[int]]:
        """One request; while the sidecar says the model is being pulled from its origin, the same
        request again (each reply comes at once; soon after the first, as the download then streams into
        memory and the next ask gets it: 50 ms, doubling to half a second), up to $SLLMFS_PULL_TIMEOUT."""
        deadline = None
        pause = 0.05
        while True:
            try:
                return self._call_once(msg, use_list=use_list)
            except Pulling as e:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + env_seconds("SLLMFS_PULL_TIMEOUT", PULL_TIMEOUT_S)
                    log.info("%s", e)
                if now > deadline:
                    raise SidecarError(f"{e}; gave up waiting (SLLMFS_PULL_TIMEOUT)") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _call_once(self, msg: dict[str, Any], *, use_list: bool = True) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            return self._exchange(msg, use_list)

    def _exchange(self, msg: dict[str, Any], use_list: bool) -> tuple[dict[str, Any], list[int]]:
        wait = self._wait(msg)
        deadline = time.monotonic() + wait
        try:
            self._sock.settimeout(wait)
            wire.send(self._sock, msg)
        except OSError:
            pass  # the sidecar may have refused us and closed: its error reply is still there to read
        try:
            reply, fds = wire.recv(self._sock, use_list=use_list, deadline=deadline)
        except BaseException as e:
            self._sock.close()  # mid-reply the stream is out of step: a late reply would answer the next request
            if isinstance(e, TimeoutError):
                op = str(msg.get("op"))  # an Op prints as its value
                raise SidecarError(f"no reply to {op!r} from the sidecar at {self.path} within {wait:g} s "
                                   "(SLLMFS_REPLY_TIMEOUT); the connection is closed") from None
            if isinstance(e, OSError):
                raise SidecarError(f"lost the sidecar at {self.path}: {e.strerror or e}") from None
            raise
        finally:
            if self._sock.fileno() >= 0:
                # blocking again between calls: closed_by_peer's MSG_DONTWAIT probe must not wait
                # out a timeout and take it for a dead sidecar
                self._sock.settimeout(None)
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
        return raise_for(reply), fds

    def _wait(self, msg: dict[str, Any]) -> float:
        """Seconds for this request's reply: load_ipc answers once its bytes are on the GPU."""
        if msg.get("op") != Op.LOAD_IPC:
            return self.timeout
        nbytes = sum(p[4] for p in msg.get("pieces", ()))
        return self.timeout + float(msg.get("timeout", 0)) + nbytes / SLOWEST_COPY

    def _op(self, op: Op, **args: Any) -> dict[str, Any]:
        return self._call({"op": op, **{k: v for k, v in args.items() if v is not None}})[0]

    def acquire(self, model: str, variant: str = HF_VARIANT, *, gpu_first: bool = False) -> Lease:
        """Lease a model variant: it stays in host memory until released or this client closes.

        ``gpu_first``: this client will have the sidecar copy the lease to a GPU next (``copy_to_gpu``);
        on a miss the sidecar copies from the stored files and fills its memory after that copy
        (docs/protocol.md). Reading the segments here first is fine: the lease asks for the fill then."""
        msg: dict[str, Any] = {"op": Op.ACQUIRE, "model": model, "variant": variant}
        if gpu_first:
            msg["gpu_first"] = True
        # tuples: a 1,000-tensor manifest then gives the cyclic GC nothing to scan (p99 latency)
        reply, fds = self._call(msg, use_list=False)
        try:
            return Lease(self, reply, fds)
        except (OSError, KeyError, TypeError, ValueError) as e:  # cannot map: give the lease back at once
            self._op(Op.RELEASE, lease=reply.get("lease"))
            raise SidecarError(f"cannot map model {model!r} [{variant}]: {e}") from None
        finally:
            for fd in fds:  # the maps keep the memory; the fds are not needed after mapping
                os.close(fd)

    def files(self, model: str, variant: str = HF_VARIANT) -> dict[str, bytes]:
        """The model's metadata files (config.json, tokenizer files, ...) by relative name.

        An adapter variant (``lora.<name>``) gives its own files (adapter_config.json, ...).
        The sidecar passes read-only fds, so large tokenizers need no message-size room.
        """
        reply, fds = self._call({"op": Op.FILES, "model": model, "variant": variant})
        try:
            if len(fds) != len(reply["files"]):
                raise wire.ProtocolError(f"files reply carried {len(fds)} fds for {len(reply['files'])} files")
            out = {}
            for fd, (rel, size) in zip(fds, reply["files"], strict=True):
                out[rel] = _read_fd(fd, size)
            return out
        finally:
            for fd in fds:
                os.close(fd)

    def list(self) -> builtins.list[dict[str, Any]]:
        """Stored models: name, variants, which are resident, registered."""
        return builtins.list(self._op(Op.LIST)["models"])

    def status(self) -> dict[str, Any]:
        reply = self._op(Op.STATUS)
        reply.pop("ok", None)
        return reply

    def pin(self, model: str, variant: str = HF_VARIANT) -> str:
        """Keep a variant in memory (filling it if needed); returns its state."""
        return str(self._op(Op.PIN, model=model, variant=variant)["state"])

    def unpin(self, model: str, variant: str = HF_VARIANT) -> bool:
        return bool(self._op(Op.UNPIN, model=model, variant=variant)["was_pinned"])

    def evict(self, model: str, variant: str | None = None) -> builtins.list[str]:
        """Drop a model (one variant, or all) from the memory tier; returns the variants dropped."""
        return builtins.list(self._op(Op.EVICT, model=model, variant=variant)["evicted"])

    def refresh(self) -> dict[str, Any]:
        """Make the sidecar re-read the store (after `sllmfs save` or `rm`)."""
        return self._op(Op.REFRESH)

    def register(self, model: str) -> None:
        self._op(Op.REGISTER, model=model)

    def closed_by_peer(self) -> bool:
        """True once the sidecar has closed our connection (it died, or dropped us)."""
        try:
            return self._sock.recv(1, pysocket.MSG_PEEK | pysocket.MSG_DONTWAIT) == b""
        except (BlockingIOError, TimeoutError):  # nothing to read: the sidecar is there
            return False
        except OSError:
            return True

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lease:
    """A model variant held in host memory: mapped segments, readiness and tensor views."""

    def __init__(self, client: Client, reply: dict[str, Any], fds: list[int]):
        parts = reply["partitions"]
        if len(fds) != len(parts) + 1:
            raise wire.ProtocolError(f"acquire reply carried {len(fds)} fds for {len(parts)} partitions")
        self.client = client
        self.id: int = reply["lease"]
        self.model: str = reply["model"]
        self.variant: str = reply["variant"]
        self.metadata: dict[str, Any] = reply.get("metadata", {})
        self.sizes: list[int] = [p["size"] for p in parts]
        self.files: list[str] = [p["file"] for p in parts]
        self.huge: list[bool] = [bool(p.get("huge")) for p in parts]  # hugetlb-backed, per partition
        self.huge_pages: bool = bool(parts) and all(self.huge)
        # which memory the segments are (a memfd's inode lives as long as a map of it): two leases with
        # equal ids map the same bytes (sllmfs.client.transfer copies one model to several GPUs at once)
        self.segment_ids: tuple[tuple[int, int], ...] = tuple(
            (st.st_dev, st.st_ino) for st in (os.fstat(fd) for fd in fds))
        # MAP_SHARED + PROT_READ: shares the one copy; hugetlb memfds cannot be mapped private anyway
        self.maps = [mmap.mmap(fd, p["length"], mmap.MAP_SHARED, mmap.PROT_READ)
                     for fd, p in zip(fds, parts, strict=False)]  # the last fd is readiness
        ready = reply["ready"]
        self._unit: int = ready["unit"]
        self._base: list[int] = ready["base"]
        self._ready = mmap.mmap(fds[-1], ready["length"], mmap.MAP_SHARED, mmap.PROT_READ)
        self._raw: tuple[Any, ...] = reply["tensors"]  # TensorRef rows as sent, decoded on first use
        self._aliases: dict[str, str] = dict(reply.get("aliases", {}))
        # name -> the stored name whose bytes it has, for a loader that shares one tensor between them (as the
        # checkpoint did): the aligned layout's aliases (stored once) and the safetensors layout's tied pairs
        # (store.format.TIED: stored twice, checked equal)
        self.shares: dict[str, str] = _roots({**self._aliases, **self.metadata.get(TIED, {})})
        self._fill_held = bool(reply.get("fill_after_copy"))  # the sidecar fills after a GPU copy (gpu_first)
        self.released = False

    def _want_fill(self) -> None:
        """About to read readiness or the segments: a fill held for a GPU copy starts now (or once the
        copies reading the files end). Released, or the sidecar gone: nothing to ask (the lease's end
        started it; a dead sidecar shows in the wait)."""
        if self._fill_held and not self.released:
            self._fill_held = False
            try:
                self.client._op(Op.FILL, lease=self.id)
            except SllmfsError as e:
                log.debug("asking the sidecar to fill lease %d: %s", self.id, e)

    @property
    def readiness(self) -> mmap.mmap:
        """The readiness map: byte ``ready_base[p] + offset // ready_unit`` covers partition p at offset."""
        self._want_fill()
        return self._ready

    @property
    def ready_base(self) -> builtins.list[int]:
        return builtins.list(self._base)

    @property
    def ready_unit(self) -> int:
        return self._unit

    @functools.cached_property
    def rows(self) -> builtins.list[TensorRef]:
        """The stored tensors, in the manifest's order (aliases not included)."""
        return [TensorRef.decode(r) for r in self._raw]

    @functools.cached_property
    def entries(self) -> dict[str, TensorRef]:
        """name -> where its bytes lie, aliases (tied names) included. Built on first use."""
        out = {r.name: r for r in self.rows}
        for alias, target in self._aliases.items():
            out[alias] = out[target]
        return out

    # -- readiness -----------------------------------------------------------

    def _span(self, partition: int | None, offset: int, nbytes: int | None) -> tuple[int, int]:
        if partition is None:
            return 0, len(self._ready)
        size = self.sizes[partition]
        end = size if nbytes is None else min(size, offset + nbytes)
        if end <= offset:
            return 0, 0
        base = self._base[partition]
        return base + offset // self._unit, base + (end - 1) // self._unit + 1

    def ready(self, partition: int | None = None, offset: int = 0, nbytes: int | None = None) -> bool:
        """True when those bytes (default: all) are in memory and verified; raises Corrupt on a failed fill."""
        self._want_fill()
        a, b = self._span(partition, offset, nbytes)
        window = self._ready[a:b]
        if window.count(Readiness.READY) == len(window):
            return True
        if Readiness.FAILED in window:
            raise self.failure()
        return False

    def failure(self) -> FillFailed:
        """Why this lease's fill or pull failed, as the sidecar recorded it (ask once its readiness says
        FAILED): the error to raise, with its cause."""
        try:
            reply = self.client._op(Op.FAILURE, lease=self.id)
        except SllmfsError as e:  # a sidecar from before the `failure` op, or gone meanwhile
            log.debug("asking why lease %d failed: %s", self.id, e)
            reply = {}
        if not reply.get("failed"):
            return FillFailed(f"model {self.model!r} [{self.variant}] failed to fill (see the sidecar log)",
                              FailCause.INTERNAL)
        try:
            cause = FailCause(str(reply.get("cause")))
        except ValueError:  # a newer sidecar's cause: the line still says what happened
            cause = FailCause.INTERNAL
        return FillFailed(str(reply.get("error")), cause)

    def wait(self, partition: int | None = None, offset: int = 0, nbytes: int | None = None,
             timeout: float | None = None) -> None:
        """Block until ``ready(...)``; raises SidecarError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 50e-6
        next_check = time.monotonic() + 0.1
        while not self.ready(partition, offset, nbytes):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise SidecarError(f"model {self.model!r} [{self.variant}] not ready after {timeout} s")
            if now >= next_check:  # a dead sidecar never marks the rest ready: notice its closed socket
                next_check = now + 0.1
                if self.client.closed_by_peer():
                    raise SidecarError(f"the sidecar went away while filling model {self.model!r} "
                                       f"[{self.variant}]; restart it (`sllmfs start`) and load again")
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)

    def progress(self) -> tuple[int, int]:
        """(bytes ready, total bytes)."""
        self._want_fill()
        done = 0
        for i, size in enumerate(self.sizes):
            a, b = self._span(i, 0, None)
            for k in range(a, b):
                if self._ready[k] == Readiness.READY:
                    done += min(self._unit, size - (k - a) * self._unit)
        return done, sum(self.sizes)

    # -- views ---------------------------------------------------------------

    def buffers(self) -> list[memoryview]:
        """One read-only memoryview per partition (the stored file's exact bytes)."""
        self._want_fill()  # a caller polling readiness on its own must not wait out a held fill
        return [memoryview(m)[:size] for m, size in zip(self.maps, self.sizes, strict=True)]

    def tensors(self, *, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """name -> CPU torch.Tensor viewing the shared segment (read-only, zero-copy; a tensor stored off
        its element size, which a safetensors file may hold, is a copy: torch cannot view it)."""
        import torch

        self._want_fill()
        if wait:
            self.wait(timeout=timeout)
        with warnings.catch_warnings():  # torch warns on read-only buffers; the views are read-only by design
            warnings.simplefilter("ignore", UserWarning)
            bases = [torch.frombuffer(m, dtype=torch.uint8) for m in self.maps]
        typed: dict[tuple[int, str], Any] = {}  # (partition, dtype) -> the whole segment viewed as that dtype
        out = {}
        for name, code, shape, part, offset, nbytes in self.rows:  # unpacked: the hot loop of a hit
            base = typed.get((part, code))
            if base is None:
                raw, dt = bases[part], dtypes.by_code(code)  # an exact-size segment may end off the element size
                base = typed[(part, code)] = raw[: len(raw) - len(raw) % dt.itemsize].view(dtypes.to_torch(dt))
            if nbytes == 0:
                out[name] = torch.empty(shape, dtype=base.dtype)
            elif offset % base.element_size():  # off its element size (a safetensors file may): no view, a copy
                out[name] = bases[part][offset:offset + nbytes].clone().view(base.dtype).reshape(shape)
            else:
                out[name] = base.as_strided(shape, _contiguous_strides(shape), offset // base.element_size())
        for alias, target in self._aliases.items():
            out[alias] = out[target]
        return out

    def numpy(self, *, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """name -> read-only numpy array viewing the shared segment (bf16/fp8 as raw unsigned ints)."""
        import numpy as np

        self._want_fill()
        if wait:
            self.wait(timeout=timeout)
        out = {}
        for name, t in self.entries.items():
            dt = np.dtype(dtypes.by_code(t.dtype).numpy)
            count = t.nbytes // dt.itemsize
            out[name] = np.frombuffer(self.maps[t.partition], dtype=dt, count=count, offset=t.offset).reshape(t.shape) \
                if t.nbytes else np.empty(t.shape, dtype=dt)
        return out

    # -- lifetime ------------------------------------------------------------

    def copy_to_gpu(self, blocks: builtins.list[dict[str, Any]], pieces: builtins.list[builtins.list[int]],
                    timeout: float = 120.0) -> dict[str, Any]:
        """Have the sidecar copy these bytes into our GPU tensors (``load_ipc``; see sllmfs.client.transfer)."""
        reply = self.client._op(Op.LOAD_IPC, lease=self.id, blocks=blocks, pieces=pieces, timeout=timeout)
        self._fill_held = False  # the copy's end started it (refused: a fallback's first read asks for it)
        return reply

    def release(self) -> None:
        """End the lease. Views already made stay valid until dropped (the map lives on with them)."""
        if self.released:
            return
        self.released = True
        try:
            self.client._op(Op.RELEASE, lease=self.id)
        finally:
            self._drop_maps()

    def _drop_maps(self) -> None:
        # never munmap under live views: drop our references and let the last view unmap
        self.maps = []
        self._ready = mmap.mmap(-1, 1)  # readiness checks after release see "pending", never freed memory

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except SllmfsError:
            if exc[0] is None:
                raise


def _read_fd(fd: int, size: int) -> bytes:
    chunks, pos = [], 0
    while pos < size:
        data = os.pread(fd, size - pos, pos)
        if not data:
            break
        chunks.append(data)
        pos += len(data)
    return b"".join(chunks)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def warm(model: str, variant: str = HF_VARIANT, *, socket: str | None = None,
         progress: Callable[[int, int], None] | None = None, timeout: float | None = None) -> int:
    """Prefetch a variant into the memory tier and wait until it is all there; returns its size in bytes.

    ``progress(done, total)`` is called as bytes become ready.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with connect(socket) as client, client.acquire(model, variant) as lease:
        last = -1
        while True:
            complete = lease.ready()
            done, total = lease.progress()
            if progress and done != last:
                progress(done, total)
                last = done
            if complete:
                return total
            if deadline is not None and time.monotonic() >= deadline:
                raise SidecarError(f"model {model!r} [{variant}] not warm after {timeout} s")
            time.sleep(0.05)


def _roots(shares: dict[str, str]) -> dict[str, str]:
    """Each name -> the stored name at the end of its chain (an alias of a tied name, in a hand-made
    aligned manifest, names a name that itself shares). The manifest checks rule out cycles; the bound
    keeps a bad one from hanging."""
    out = {}
    for name, target in shares.items():
        for _ in range(len(shares)):
            if target not in shares:
                break
            target = shares[target]
        out[name] = target
    return out
