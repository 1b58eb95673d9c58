"""``sllmfs push``: upload a stored model to the origin, resumably.

Order makes a half-pushed model invisible: an outdated index is deleted first, then data
partitions and metadata files go up (in parallel, large ones as multipart uploads), then each
variant's manifest, then model.json, and the index last. A re-run skips every object already there
with the right size and digest (x-amz-meta-xxh3), and resumes an interrupted multipart upload from
its marker object (``<model>/.uploads/<rel>.json``: upload id and digest), sending only missing parts.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sllmfs.core.errors import Corrupt, SllmfsError
from sllmfs.origin import client as s3
from sllmfs.origin.objects import Obj, local_objects, make_index, parse_index
from sllmfs.origin.url import INDEX, UPLOADS, Origin
from sllmfs.store.format import CHUNK_SIZE, MANIFEST, digest, open_regular
from sllmfs.store.store import MODEL_JSON, Store


@dataclass
class PushResult:
    objects: int = 0
    uploaded: int = 0  # objects sent (wholly or the missing parts)
    skipped: int = 0  # already in the origin, identical
    bytes_sent: int = 0
    bytes_total: int = 0


@dataclass
class _Multipart:
    obj: Obj
    upload_id: str
    parts: dict[int, str] = field(default_factory=dict)  # part number -> ETag
    lock: threading.Lock = field(default_factory=threading.Lock)


Progress = Callable[[int], None]


def push_model(store: Store, name: str, origin: Origin, *, threads: int = 16,
               progress: Progress | None = None, on_total: Callable[[int], None] | None = None,
               force: bool = False, client: Any = None) -> PushResult:
    """Upload model ``name`` to ``origin`` (holding its write lock: no save or rm changes it meanwhile).
    ``force``: send every object, trusting nothing the origin holds (repairs a damaged origin copy)."""
    progress = progress or (lambda n: None)
    client = client or s3.connect(origin, threads)
    with store.writing(name):
        info = store.get(name)
        objs, small = local_objects(info)
        result = PushResult(objects=len(objs) + 1, bytes_total=sum(o.size for o in objs))
        if on_total:
            on_total(result.bytes_total)
        index = make_index(name, objs)
        with s3.errors(origin, f"push {name}"):
            _drop_outdated_index(client, origin, name, objs, force)
            first = [o for o in objs if not o.rel.endswith("/" + MANIFEST) and o.rel != MODEL_JSON]
            manifests = [o for o in objs if o.rel.endswith("/" + MANIFEST)]
            model_json = [o for o in objs if o.rel == MODEL_JSON]
            with s3.pool(threads, "sllmfs-push") as pool:
                for batch in (first, manifests, model_json):  # each waits for the one before
                    _upload_batch(client, pool, store, info.path, origin, name, batch, small, progress, result,
                                  force)
            client.put_object(Bucket=origin.bucket, Key=origin.key(name, INDEX), Body=index,
                              ContentType="application/json")
    return result


def _drop_outdated_index(client: Any, origin: Origin, name: str, objs: list[Obj], force: bool) -> None:
    """A pusher replacing another version removes the old index before any object changes, so no
    puller ever reads the old index over a mix of old and new objects."""
    key = origin.key(name, INDEX)
    raw = None if force else s3.get_json_or_none(client, origin.bucket, key)
    if raw is None:
        if force:  # every object is rewritten: the model must not look whole meanwhile
            client.delete_object(Bucket=origin.bucket, Key=key)
        return
    try:
        old = {(o.rel, o.size, o.digest) for o in parse_index(raw, name, f"s3://{origin.bucket}/{key}")}
    except SllmfsError:
        old = set()
    if old != {(o.rel, o.size, o.digest) for o in objs}:
        client.delete_object(Bucket=origin.bucket, Key=key)


def _upload_batch(client: Any, pool: ThreadPoolExecutor, store: Store, model_dir: Any, origin: Origin, name: str,
                  batch: list[Obj], small: dict[str, bytes], progress: Progress, result: PushResult,
                  force: bool) -> None:
    below = store.models_dir
    fds: list[int] = []
    jobs: list[Future[Any]] = []
    uploads: list[_Multipart] = []
    try:
        for o in batch:
            key = origin.key(name, o.rel)
            if not force and s3.holds(client, origin.bucket, key, o.size, o.digest):
                result.skipped += 1
                progress(o.size)
                continue
            result.uploaded += 1
            if o.rel in small:  # read once, hashed from these bytes: what goes up is what the index names
                jobs.append(pool.submit(_put, client, origin, key, small[o.rel], o, progress, result))
                continue
            fd = open_regular(model_dir / o.rel, below=below)
            fds.append(fd)
            if o.size <= s3.PART:
                data = _pread(fd, 0, o.size, o)
                jobs.append(pool.submit(_put, client, origin, key, data, o, progress, result))
                continue
            up = _start_multipart(client, origin, name, o, force)
            uploads.append(up)
            for number, (off, length) in enumerate(s3.ranges(o.size), start=1):
                if number in up.parts:
                    progress(length)
                    continue
                jobs.append(pool.submit(_put_part, client, origin, key, fd, up, number, off, length, progress,
                                        result))
        s3.wait_all(jobs)
        for up in uploads:
            _complete(client, origin, name, up)
    finally:
        s3.settle(jobs)  # no job may still read an fd closed below (its number reused)
        for fd in fds:
            os.close(fd)


def _pread(fd: int, offset: int, length: int, o: Obj) -> bytes:
    """Bytes of a stored partition, each window checked against the manifest: the origin never gets
    (and the disk budget never trusts) a copy of rotted local bytes."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise SllmfsError(f"a stored file shrank while it was pushed (wanted {length} bytes at {offset}); "
                          "push again")
    view = memoryview(data)
    # parts start on window boundaries (PART is a multiple of CHUNK_SIZE)
    for start in range(0, length if o.partition else 0, CHUNK_SIZE):
        k = (offset + start) // CHUNK_SIZE
        if k >= len(o.windows) or digest(view[start:start + CHUNK_SIZE]) != o.windows[k]:
            raise Corrupt(f"stored {o.rel} fails its checksum at window {k}: nothing of it was pushed; "
                          "run `sllmfs verify` on the model and save it again")
    return data


def _put(client: Any, origin: Origin, key: str, data: bytes, o: Obj, progress: Progress, result: PushResult) -> None:
    client.put_object(Bucket=origin.bucket, Key=key, Body=data, Metadata={s3.META_DIGEST: o.digest})
    result.bytes_sent += len(data)  # int += under the GIL from several threads: good enough for a summary
    progress(len(data))


def _marker_key(origin: Origin, name: str, rel: str) -> str:
    return origin.key(name, f"{UPLOADS}/{rel}.json")


def _start_multipart(client: Any, origin: Origin, name: str, o: Obj, force: bool) -> _Multipart:
    """Resume the upload a marker names where it was for these very bytes, else start one."""
    key = origin.key(name, o.rel)
    marker = None if force else s3.get_json_or_none(client, origin.bucket, _marker_key(origin, name, o.rel))
    if isinstance(marker, dict) and marker.get("digest") == o.digest and marker.get("size") == o.size \
            and isinstance(marker.get("upload_id"), str):
        parts = _listed_parts(client, origin, key, marker["upload_id"], o.size)
        if parts is not None:
            return _Multipart(o, marker["upload_id"], parts)
    upload_id = client.create_multipart_upload(Bucket=origin.bucket, Key=key,
                                               Metadata={s3.META_DIGEST: o.digest})["UploadId"]
    client.put_object(Bucket=origin.bucket, Key=_marker_key(origin, name, o.rel),
                      Body=json.dumps({"upload_id": upload_id, "digest": o.digest, "size": o.size}).encode())
    return _Multipart(o, upload_id)


def _listed_parts(client: Any, origin: Origin, key: str, upload_id: str, size: int) -> dict[int, str] | None:
    """Parts already uploaded whole (each the size this push would send); None: the upload is gone."""
    from botocore.exceptions import ClientError

    want = dict(enumerate((length for _off, length in s3.ranges(size)), start=1))
    parts: dict[int, str] = {}
    try:
        for page in client.get_paginator("list_parts").paginate(Bucket=origin.bucket, Key=key, UploadId=upload_id):
            for p in page.get("Parts", []):
                if want.get(p["PartNumber"]) == p["Size"]:
                    parts[p["PartNumber"]] = p["ETag"]
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("NoSuchUpload", "404"):
            return None
        raise
    return parts


def _put_part(client: Any, origin: Origin, key: str, fd: int, up: _Multipart, number: int, off: int, length: int,
              progress: Progress, result: PushResult) -> None:
    data = _pread(fd, off, length, up.obj)
    etag = client.upload_part(Bucket=origin.bucket, Key=key, UploadId=up.upload_id, PartNumber=number,
                              Body=data)["ETag"]
    with up.lock:
        up.parts[number] = etag
    result.bytes_sent += length
    progress(length)


def _complete(client: Any, origin: Origin, name: str, up: _Multipart) -> None:
    parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(up.parts.items())]
    client.complete_multipart_upload(Bucket=origin.bucket, Key=origin.key(name, up.obj.rel), UploadId=up.upload_id,
                                     MultipartUpload={"Parts": parts})
    client.delete_object(Bucket=origin.bucket, Key=_marker_key(origin, name, up.obj.rel))
