"""Kernel caches through the origin: what one node compiled, every node with the same stack gets.

Layout under the origin's prefix: ``.kernels/<key>/manifest.json`` (the store entry's manifest:
every file's path, size, xxh3_64, mtime and mode) and ``.kernels/<key>/<path>`` for each file. Model
names start with a letter or digit, so ``.kernels`` never names a model.

Push uploads the files the origin's manifest lacks (or names with another checksum), each read from the
store and checked against the local entry, then the manifest: the union of the origin's and ours (a
path in both keeps ours). Two nodes pushing at once may each write a manifest without the other's new
files; those stay as objects and come back with that node's next push. Pull fetches the origin's
manifest, then each file the local entry lacks, checks it against that manifest and merges it into the
local entry (store.kernels.publish: the union, swapped in atomically). A file that fails its check is
left out with one warning: the engine compiles that kernel again, it never loads a wrong byte.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from sllmfs.core.errors import BadInput, Corrupt, NotFound, SllmfsError
from sllmfs.origin.client import errors, get_bytes, get_json_or_none
from sllmfs.origin.url import Origin
from sllmfs.store import kernel_key, kernels
from sllmfs.store.format import MANIFEST, open_regular
from sllmfs.store.kernels import KernelEntry, KernelFile
from sllmfs.store.store import Store

PREFIX = ".kernels"
log = logging.getLogger("sllmfs.origin")


def _base(origin: Origin) -> str:
    return f"{origin.prefix}/{PREFIX}/" if origin.prefix else f"{PREFIX}/"


def object_key(origin: Origin, key: str, rel: str = "") -> str:
    return f"{_base(origin)}{kernels.check_key(key)}/{rel}"


def remote_keys(client: Any, origin: Origin) -> list[str]:
    """The kernel cache entries the origin holds (names only)."""
    base = _base(origin)
    found: list[str] = []
    with errors(origin, "listing kernel caches"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=origin.bucket, Prefix=base, Delimiter="/"):
            for p in page.get("CommonPrefixes", []):
                name = p["Prefix"][len(base):].rstrip("/")
                try:
                    found.append(kernels.check_key(name))
                except Exception:  # not ours to read; listed by nobody
                    continue
    return found


def remote_entry(client: Any, origin: Origin, key: str) -> KernelEntry | None:
    """The origin's manifest of ``key``; None when it holds none. Corrupt when it is not one."""
    name = object_key(origin, key, MANIFEST)
    with errors(origin, f"reading s3://{origin.bucket}/{name}"):
        raw = get_json_or_none(client, origin.bucket, name)
    if raw is None:  # none there (an unreadable one is treated as absent: the next push rewrites it)
        return None
    return kernels.parse_entry(raw, key, f"s3://{origin.bucket}/{name}")


def push(store: Store, key: str, origin: Origin, client: Any) -> int:
    """Upload the local entry ``key``'s files the origin lacks, then the merged manifest; returns how
    many files went up. A local file that fails its checksum is not sent (one warning). BadInput, with
    nothing uploaded, when the union would pass the size limit (every node would refuse to pull it)."""
    local = kernels.load_entry(store, key)
    remote = remote_entry(client, origin, key)
    have = {f.path: f for f in remote.files} if remote is not None else {}
    new = [f for f in local.files
           if not (f.path in have and have[f.path].checksum == f.checksum and have[f.path].size == f.size)]
    limit = kernels.max_entry_bytes()
    if sum(f.size for f in {**have, **{f.path: f for f in new}}.values()) > limit:
        raise BadInput(f"kernel cache {key!r} in {origin} would hold more than {limit} bytes ({kernels.MAX_ENV}) "
                       f"with this node's files; not pushed (run `sllmfs kernels rm {key}` here, or raise "
                       f"{kernels.MAX_ENV} on every node)")
    src = kernels.entry_dir(store, key)
    sent = 0
    merged = dict(have)
    for f in new:
        try:
            data = _read_checked(src / f.path, f, store.root)
        except (Corrupt, OSError) as e:
            log.warning("sllmfs: kernel cache %r: %s not pushed (%s)", key, f.path, e)
            continue
        with errors(origin, f"uploading kernel cache file {f.path}"):
            client.put_object(Bucket=origin.bucket, Key=object_key(origin, key, f.path), Body=data)
        merged[f.path] = f
        sent += 1
    if sent or remote is None:
        entry = KernelEntry(key, sorted(merged.values(), key=lambda f: f.path),
                            min(local.created, remote.created) if remote else local.created,
                            max(local.updated, remote.updated if remote else 0.0), local.facts or
                            (remote.facts if remote else {}))
        with errors(origin, f"uploading kernel cache manifest {key}"):
            client.put_object(Bucket=origin.bucket, Key=object_key(origin, key, MANIFEST),
                              Body=kernels.manifest_bytes(entry))
    return sent


RETRY_BAD_S = 3600.0  # a file whose bytes failed their checksum is asked for again after this long


def pull(store: Store, key: str, origin: Origin, client: Any, failed: dict[tuple[str, str, str], float] | None = None,
         ) -> int:
    """Fetch the files of the origin's entry ``key`` that the local entry lacks, check each, merge them
    in; returns how many arrived. ``failed``: (key, path, checksum) -> when its bytes failed their check;
    such a file is left out for RETRY_BAD_S. A download that fails otherwise (the origin unreachable, the
    disk full) ends the pull with what arrived merged, and raises. NotFound when the origin has no such
    entry; BadInput when the entry would pass the size limit (nothing is downloaded)."""
    failed = {} if failed is None else failed
    now = time.monotonic()
    remote = remote_entry(client, origin, key)
    if remote is None:
        raise NotFound(f"origin {origin} has no kernel cache {key!r} (see `sllmfs kernels ls --origin URL`)")
    try:
        local = {f.path: f for f in kernels.load_entry(store, key).files}
    except (NotFound, Corrupt):
        local = {}
    want = _wanted(remote, {p: f.checksum for p, f in local.items()}, failed, now)
    if not want:
        return 0
    limit = kernels.max_entry_bytes()
    if sum(f.size for f in {**local, **{f.path: f for f in want}}.values()) > limit:
        raise BadInput(f"kernel cache {key!r} from {origin} would hold more than {limit} bytes "
                       f"({kernels.MAX_ENV}); not pulled")
    got = 0
    stopped: BaseException | None = None
    with store.staging() as root:  # a private, locked directory the store's cleanup leaves alone
        for f in want:
            try:
                with errors(origin, f"downloading kernel cache file {f.path}"):  # never more than it should hold
                    data = get_bytes(client, origin.bucket, object_key(origin, key, f.path), 0, f.size + 1) \
                        if f.size else b""
                if len(data) != f.size or xxhash.xxh3_64_hexdigest(data) != f.checksum:
                    raise Corrupt(f"fails its checksum ({len(data)} bytes, {f.size} recorded)")
                dest = root / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                os.chmod(dest, f.mode | 0o600)  # ours to read and replace; the recorded bits on top
                os.utime(dest, ns=(f.mtime_ns, f.mtime_ns))  # ninja compares the files' times
            except Corrupt as e:  # this file's bytes: the engine compiles that kernel again
                failed[(key, f.path, f.checksum)] = now
                log.warning("sllmfs: kernel cache %r: %s from %s left out: %s", key, f.path, origin, e)
                continue
            except (SllmfsError, OSError) as e:  # the origin or this disk, not the file: the next round retries
                stopped = e
                break
            got += 1
        if got:
            kernels.publish(store, key, root, facts=remote.facts)
    if stopped is not None:
        raise stopped
    return got


def _wanted(remote: KernelEntry, have: dict[str, str], failed: dict[tuple[str, str, str], float],
            now: float) -> list[KernelFile]:
    """The origin entry's files worth fetching: not held here with those bytes (``have``: path ->
    checksum), not a name a publish skips, not failed within RETRY_BAD_S."""
    return [f for f in remote.files if have.get(f.path) != f.checksum and not kernels.skipped(f.path)
            and now - failed.get((remote.key, f.path, f.checksum), -RETRY_BAD_S) >= RETRY_BAD_S]


@dataclass
class SyncState:
    """What a sidecar's kernel sync remembers between rounds."""

    node: tuple[str, str]  # this node's (GPU models, driver): node_facts()
    pushed: dict[str, float] = field(default_factory=dict)  # key -> the entry's `updated` when last pushed
    failed: dict[tuple[str, str, str], float] = field(default_factory=dict)  # files whose bytes failed: when
    evicted: set[str] = field(default_factory=set)  # keys the disk tier removed: not pulled back
    said: dict[str, str] = field(default_factory=dict)  # key -> the last warning about it

    def warn(self, key: str, line: str) -> None:
        if self.said.get(key) != line:  # once per new reason, not every round
            self.said[key] = line
            log.warning("origin kernel caches: %s", line)


def sync(store: Store, origin: Origin, client: Any, state: SyncState,
         room_for: Callable[[int], bool] = lambda nbytes: True) -> None:
    """One round of the sidecar's: push each local entry updated since its last push, pull each origin
    entry made for this node's GPUs and driver that brings files the local entry lacks (and fits the
    disk budget: ``room_for``). A key that fails (read-only credentials, a damaged manifest, the size
    limit) is that key's warning; the others go on."""
    good, _bad = kernels.entries(store)
    local = {e.key: e for e in good}
    state.evicted -= set(local)  # made here again since the disk tier removed it: the fleet's files may follow
    now = time.monotonic()
    for e in good:
        if state.pushed.get(e.key, -1.0) >= e.updated:
            continue
        try:
            n = push(store, e.key, origin, client)
        except SllmfsError as err:
            state.warn(e.key, f"{e.key} not pushed: {err}")
            continue
        state.pushed[e.key] = e.updated
        if n:
            log.info("kernel cache %s: pushed %d files to %s", e.key, n, origin)
    for key in remote_keys(client, origin):
        if key in state.evicted:
            continue
        try:
            remote = remote_entry(client, origin, key)
            if remote is None or not for_node(remote.facts, state.node):
                continue
            have = {f.path: f.checksum for f in local[key].files} if key in local else {}
            missing = _wanted(remote, have, state.failed, now)
            if not missing:
                continue
            if not room_for(sum(f.size for f in missing)):
                state.warn(key, f"{key} not pulled: the disk budget (--disk-size) has no room for it")
                continue
            n = pull(store, key, origin, client, state.failed)
        except SllmfsError as err:
            state.warn(key, f"{key} not pulled: {err}")
            continue
        if n:
            state.pushed[key] = kernels.load_entry(store, key).updated  # what came from the origin need not go back
            log.info("kernel cache %s: pulled %d files from %s", key, n, origin)


def node_facts() -> tuple[str, str]:
    """(GPU models, driver) of this node as KernelKey names them, from the driver's /proc files (no CUDA,
    no NVML library needed); ("", "") on a node without NVIDIA GPUs."""
    return kernel_key.node_gpus(), kernel_key.proc_driver()


def for_node(facts: dict[str, Any], node: tuple[str, str]) -> bool:
    """Whether an entry made with ``facts`` can serve this node: the same GPU models, and the same driver
    where both are known (the key holds every other fact; engines restore only their own key)."""
    gpu, driver = node
    if "capability" in facts:
        return False  # made before the key left the capability out: no start of this version asks for it
    want_driver = str(facts.get("driver", ""))
    return str(facts.get("gpu", "")) == gpu and (not want_driver or not driver or want_driver == driver)


def _read_checked(path: Path, f: KernelFile, root: Path) -> bytes:
    with os.fdopen(open_regular(path, below=root), "rb") as inp:
        data = inp.read()
    if len(data) != f.size or xxhash.xxh3_64_hexdigest(data) != f.checksum:
        raise Corrupt(f"its bytes no longer match the entry's checksum ({len(data)} bytes, {f.size} recorded)")
    return data
