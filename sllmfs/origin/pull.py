"""``sllmfs pull``: bring a model from the origin into the store, verified, committed atomically.

The index is read first (no index: the model is not in the origin, or its push is unfinished), then
the small objects (model.json, metadata files, manifests) are fetched and checked against it, so a
damaged origin copy is refused before any large transfer. Partitions come in parallel ranged GETs;
each 4 MiB window is checked against the manifest's digest (format.digest, as the store's fill does)
before it is written. Work goes to ``<store>/pulls/<model>/`` (outside tmp/, which the next writer
would clear) so a killed pull resumes: a range whose local windows already verify is not fetched
again. Only a whole, verified copy is published, the way ``save`` publishes (Store.commit_model).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllmfs.core import names
from sllmfs.core.errors import BadInput, Corrupt, NotFound
from sllmfs.origin import client as s3
from sllmfs.origin.objects import Obj, check_manifest_matches, parse_index
from sllmfs.origin.url import INDEX, Origin
from sllmfs.store.format import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    MANIFEST,
    READ_VERSIONS,
    FileDigest,
    FileDigests,
    Manifest,
    _Bad,
    _parse,
    digest,
    parse_file_digests,
)
from sllmfs.store.store import MODEL_JSON, Store, fsync_tree

Progress = Callable[[int], None]
# (object's rel path, offset, its verified bytes) for each range as it lands (pull threads): how the
# sidecar streams a pull into its memory tier while the download goes on
RangeSink = Callable[[str, int, bytes], None]


@dataclass
class PullPlan:
    origin: Origin
    name: str
    objs: list[Obj]
    small: dict[str, bytes]  # rel -> bytes, each checked against the index
    manifests: dict[str, Manifest] = field(default_factory=dict)  # variant key -> manifest

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objs if o.partition)


@dataclass
class PullResult:
    bytes_total: int = 0
    bytes_fetched: int = 0
    bytes_resumed: int = 0  # already in the pull's work folder, verified, not fetched again
    published: bool = False


def pull_dir(store: Store, name: str) -> Path:
    return store.layout.pulls_dir / names.model_dirname(name)


def plan_pull(client: Any, origin: Origin, name: str, threads: int = 16) -> PullPlan:
    """Read and check the origin copy's index, model.json, metadata files and manifests."""
    names.check_model_name(name)
    index_key = origin.key(name, INDEX)
    with s3.errors(origin, f"read {origin.where(name, INDEX)}"):
        raw = s3.get_json_or_none(client, origin.bucket, index_key)
        if raw is None:
            raise NotFound(f"model {name!r} is not in origin {origin} (no {origin.where(name, INDEX)}, or its push "
                           f"did not finish); push it from a node that has it: `sllmfs push --model {name} "
                           f"--to {origin}`")
        objs = parse_index(raw, name, origin.where(name, INDEX))
        with s3.pool(threads, "sllmfs-plan") as pool:
            wanted = [o for o in objs if not o.partition]
            jobs = [pool.submit(s3.get_bytes, client, origin.bucket, origin.key(name, o.rel)) for o in wanted]
            s3.wait_all(jobs)
    plan = PullPlan(origin, name, objs, {})
    for o, job in zip(wanted, jobs, strict=True):
        data = job.result()
        if len(data) != o.size or digest(data) != o.digest:
            raise _damaged(origin, name, o.rel, "does not match the checksum its index gives")
        plan.small[o.rel] = data
    by_rel = {o.rel: o for o in objs}
    for rel, data in plan.small.items():
        if rel.startswith("variants/") and rel.endswith("/" + MANIFEST) and rel.count("/") == 2:
            key = rel.split("/")[1]
            plan.manifests[key] = _manifest(origin, name, rel, data)
            check_manifest_matches(plan.manifests[key], key, by_rel, origin.where(name))
    named = {f"variants/{k}/{p.file}" for k, m in plan.manifests.items() for p in m.partitions}
    stray = sorted({o.rel for o in objs if o.partition} - named)
    if stray:
        raise _damaged(origin, name, stray[0], "is in the index but in no variant's manifest")
    _check_model_json(origin, name, plan)
    return plan


def run_pull(store: Store, plan: PullPlan, client: Any, *, force: bool = False, threads: int = 16,
             progress: Progress | None = None, wait: bool = False, if_missing: bool = False,
             on_start: Callable[[PullPlan], RangeSink | None] | None = None) -> PullResult:
    """Download what the plan names into the pull's work folder, verified, and publish it.
    ``wait``: queue behind another writer of the model; ``if_missing``: return unpublished if the
    model is in the store by then (another pull got it first); ``on_start``: told the plan once this
    pull holds the model's write lock and will download it; what it returns is handed every
    partition range once verified (resumed ones too), before the model is published."""
    progress = progress or (lambda n: None)
    name, origin = plan.name, plan.origin
    result = PullResult(bytes_total=plan.total_bytes)
    with store.writing(name, wait=wait):
        if store.has(name):
            if if_missing:
                return result
            if not force:
                raise BadInput(f"model {name!r} is already in the store at {store.root}; pass --force to replace "
                               "it with the origin's copy")
        on_range = on_start(plan) if on_start is not None else None
        work = pull_dir(store, name)
        work.mkdir(parents=True, exist_ok=True)
        _prune(work, {o.rel for o in plan.objs})
        for rel, data in plan.small.items():
            _write_small(work / rel, data)
        with s3.errors(origin, f"pull {name}"), s3.pool(threads, "sllmfs-pull") as pool:
            fds: list[int] = []
            jobs: list[Future[Any]] = []
            try:
                for o in plan.objs:
                    if o.partition:
                        key, file = o.rel.split("/")[1:3]
                        chunks = next(p.chunks for p in plan.manifests[key].partitions if p.file == file)
                        fd, fresh = _open_partition(work / o.rel, o.size)
                        fds.append(fd)
                        for off, length in s3.ranges(o.size):
                            jobs.append(pool.submit(_fetch_range, client, origin, name, o.rel, fd, chunks, off,
                                                    length, fresh, progress, result, on_range))
                s3.wait_all(jobs)
            finally:
                s3.settle(jobs)  # no job may still write to an fd closed below (its number reused)
                for fd in fds:
                    os.close(fd)
        fsync_tree(work)  # the long part of a commit, done where an interruption keeps the pull to resume
        ours = os.stat(work).st_ino
        with store.staging() as staged:
            os.rename(work, staged / "model")
            try:
                store.commit_model(staged / "model", name, force=force)
            except BaseException:
                # not published (or published, and what sits here is the replaced copy): ours goes back
                # to pulls/, verified, so the next pull resumes instead of fetching it all again
                with contextlib.suppress(OSError):
                    if os.stat(staged / "model").st_ino == ours:
                        os.rename(staged / "model", work)
                raise
        result.published = True
    return result


def _fetch_range(client: Any, origin: Origin, name: str, rel: str, fd: int, chunks: list[str], off: int,
                 length: int, fresh: bool, progress: Progress, result: PullResult,
                 on_range: RangeSink | None = None) -> None:
    if not fresh:
        have = os.pread(fd, length, off)
        if _windows_ok(have, chunks, off) is None:
            result.bytes_resumed += length  # verified where an earlier pull left it
            if on_range is not None:
                on_range(rel, off, have)
            progress(length)
            return
    data = s3.get_bytes(client, origin.bucket, origin.key(name, rel), off, length)
    if len(data) != length:
        raise _damaged(origin, name, rel, f"is shorter than its index says ({off + len(data)} bytes at most)")
    bad = _windows_ok(data, chunks, off)
    if bad is not None:
        lo = bad * CHUNK_SIZE
        raise _damaged(origin, name, rel, f"bytes {lo}..{min(lo + CHUNK_SIZE, off + length)} (window {bad}) fail "
                                          "their checksum")
    written = os.pwrite(fd, data, off)
    if written != length:
        raise OSError(f"short write to {rel}")
    result.bytes_fetched += length
    if on_range is not None:
        on_range(rel, off, data)
    progress(length)


def _windows_ok(data: bytes, chunks: list[str], off: int) -> int | None:
    """The first window of ``data`` (which starts at window boundary ``off``) whose digest is wrong."""
    view = memoryview(data)
    for i in range(0, len(data), CHUNK_SIZE):
        k = (off + i) // CHUNK_SIZE
        if k >= len(chunks) or digest(view[i:i + CHUNK_SIZE]) != chunks[k]:
            return k
    return None


def _open_partition(path: Path, size: int) -> tuple[int, bool]:
    """The partition's work file, sized (sparse); ``fresh``: just made, nothing in it to resume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)
    return fd, fresh


def _write_small(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    with open(fd, "wb") as f:
        f.write(data)


def _prune(work: Path, keep: set[str]) -> None:
    """Drop what an earlier pull of another version left that this one does not name."""
    for dirpath, dirs, files in os.walk(work, topdown=False):
        for f in files:
            p = Path(dirpath) / f
            if p.relative_to(work).as_posix() not in keep:
                p.unlink()
        for d in dirs:
            p = Path(dirpath) / d
            if p.is_symlink():
                p.unlink()
            elif not any(p.iterdir()):
                p.rmdir()


def _damaged(origin: Origin, name: str, rel: str, why: str) -> Corrupt:
    return Corrupt(f"origin object {origin.where(name, rel)} {why}: the origin copy of {name!r} is damaged and "
                   f"nothing was stored; push it again from a node that has it (`sllmfs push --model {name} "
                   f"--to {origin} --force`)")


def _manifest(origin: Origin, name: str, rel: str, data: bytes) -> Manifest:
    """The store's one manifest validator, on bytes not yet in a store (its messages name the origin object)."""
    try:
        d = json.loads(data)
    except ValueError:
        raise _damaged(origin, name, rel, "is not valid JSON") from None
    if not isinstance(d, dict) or d.get("format") != "sllmfs-variant":
        raise _damaged(origin, name, rel, "is not an sllmfs manifest")
    if type(d.get("format_version")) is not int or d["format_version"] not in READ_VERSIONS:
        raise BadInput(f"origin object {origin.where(name, rel)} has format version {d.get('format_version')!r}; "
                       f"this sllmfs reads versions {READ_VERSIONS[0]}-{FORMAT_VERSION}: upgrade sllmfs")
    try:
        return _parse(d)
    except _Bad as e:
        raise _damaged(origin, name, rel, f"is invalid ({e})") from None


def _check_model_json(origin: Origin, name: str, plan: PullPlan) -> None:
    try:
        meta = json.loads(plan.small[MODEL_JSON])
    except ValueError:
        raise _damaged(origin, name, MODEL_JSON, "is not valid JSON") from None
    files = {o.rel[len("files/"):] for o in plan.objs if o.rel.startswith("files/")}
    if not isinstance(meta, dict) or meta.get("name") != name or not isinstance(meta.get("files"), list) \
            or set(meta["files"]) != files:
        raise _damaged(origin, name, MODEL_JSON, "does not describe the model and files the index lists")
    try:
        digests = parse_file_digests(meta)
    except _Bad as e:
        raise _damaged(origin, name, MODEL_JSON, f"is invalid ({e})") from None
    _check_meta_files(origin, name, plan, "files/", files, digests)
    for key, manifest in plan.manifests.items():
        prefix = f"variants/{key}/files/"
        own = {o.rel[len(prefix):] for o in plan.objs if o.rel.startswith(prefix)}
        _check_meta_files(origin, name, plan, prefix, own, manifest.file_digests)


def _check_meta_files(origin: Origin, name: str, plan: PullPlan, prefix: str, present: set[str],
                      digests: FileDigests | None) -> None:
    """Each metadata file downloaded matches the size and digest its model.json (or adapter manifest)
    recorded at save, checked before anything is written: a pusher that read a damaged file, or an
    origin object replaced together with its index entry, fails the pull here and the local copy stays
    as it was. Without digests (saved by an older sllmfs) the index's checksums are all there is."""
    if digests is None:
        return
    if set(digests) != present:
        odd = sorted(set(digests) ^ present)[0]
        raise _damaged(origin, name, prefix + odd, "is not one of the metadata files the model was saved with "
                                                   "(or is missing)")
    for f, want in digests.items():
        data = plan.small[prefix + f]
        if FileDigest.of(data) != want:
            raise _damaged(origin, name, prefix + f, f"does not match the size and xxh3_64 recorded when the model "
                                                     f"was saved ({want.size} bytes, {want.xxh3_64})")
