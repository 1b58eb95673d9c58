"""What the sidecar asks of the origin: pull a model it lacks, and whether the origin holds a model
(so the disk tier may evict it). Both are blocking: the sidecar calls them from a worker thread."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sllmfs.core import names
from sllmfs.core.errors import SllmfsError
from sllmfs.origin import client as s3
from sllmfs.origin.objects import Obj, local_objects, parse_index
from sllmfs.origin.pull import Progress, PullPlan, RangeSink, plan_pull, run_pull
from sllmfs.origin.url import INDEX, Origin
from sllmfs.store.store import Store

log = logging.getLogger("sllmfs.origin")


def ensure_local(store: Store, model: str, origin: Origin, *, threads: int = 16, progress: Progress | None = None,
                 client: Any = None, on_plan: Callable[[PullPlan], RangeSink | None] | None = None) -> bool:
    """Make ``model`` present in the store, pulling it from ``origin`` if it is not (True: it was pulled).
    Concurrent callers for one model queue on its write lock; the first pulls, the others find it there.
    A model in neither place raises NotFound naming the origin; a damaged origin copy raises Corrupt
    and stores nothing. ``on_plan``: told the checked plan once this call holds the model's write lock
    and downloads it (never while another writer does); what it returns is handed each verified range
    (the sidecar streams them into its memory tier)."""
    names.check_model_name(model)
    if store.has(model):
        return False
    client = client or s3.connect(origin, threads)
    plan = plan_pull(client, origin, model, threads)
    result = run_pull(store, plan, client, threads=threads, progress=progress, wait=True, if_missing=True,
                      on_start=on_plan)
    if result.published:
        log.info("pulled model=%s from %s bytes=%d resumed=%d", model, origin, result.bytes_total,
                 result.bytes_resumed)
    return result.published


def origin_holds(store: Store, model: str, origin: Origin, *, client: Any = None) -> bool:
    """Does the origin hold this very model, so the disk tier may delete the local copy? Every metadata
    file, model.json, the hf variant and every adapter must be in the origin's (complete) copy with the
    same size and digest; framework variants (per-rank state) may be missing: a load writes them back.
    Any doubt (origin unreachable, damaged, another version) answers False: the local copy is kept."""
    try:
        info = store.get(model)
        local, _small = local_objects(info)
        client = client or s3.connect(origin, 2)
        with s3.errors(origin, f"read {origin.where(model, INDEX)}"):
            raw = s3.get_json_or_none(client, origin.bucket, origin.key(model, INDEX))
        if raw is None:
            return False
        remote = {(o.rel, o.size, o.digest) for o in parse_index(raw, model, origin.where(model, INDEX))}
        must = [o for o in local if _must_be_held(o)]
        if not all((o.rel, o.size, o.digest) in remote for o in must):
            return False
        with s3.errors(origin, f"check the objects of {model}"):  # the index may name objects replaced since
            return all(s3.holds(client, origin.bucket, origin.key(model, o.rel), o.size, o.digest) for o in must)
    except (SllmfsError, OSError) as e:
        log.info("origin check model=%s: %s; keeping it on disk", model, e)
        return False


def _must_be_held(o: Obj) -> bool:
    """What cannot be made again without the origin: all but framework variants (written back on load)."""
    if not o.rel.startswith("variants/"):
        return True
    key = o.rel.split("/")[1]
    return key == "hf" or key.startswith(names.ADAPTER_PREFIX)


def in_origin(origin: Origin, name: str, *, client: Any = None) -> bool:
    """Is ``name`` a complete model in the origin, or a namespace of one (``org`` of ``org/m``)? The
    mount's lookup walks a path one component at a time, so it must know ``org`` before ``org/m``."""
    return origin_kind(origin, name, client=client) is not None


def origin_kind(origin: Origin, name: str, *, client: Any = None) -> str | None:
    """"model" (a complete copy: its index is there), "namespace" (complete models lie below it) or None."""
    from urllib.parse import quote

    names.check_model_name(name)
    client = client or s3.connect(origin, 2)
    with s3.errors(origin, f"look up {name!r}"):
        if s3.head(client, origin.bucket, origin.key(name, INDEX)) is not None:
            return "model"
        under = (f"{origin.prefix}/" if origin.prefix else "") + quote(name + "/", safe="")
        page = client.list_objects_v2(Bucket=origin.bucket, Prefix=under)
        return "namespace" if any(o["Key"].endswith("/" + INDEX) for o in page.get("Contents", [])) else None
