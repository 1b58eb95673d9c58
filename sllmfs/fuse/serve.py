"""``serve``: mount the view, answer the kernel until cancelled, always unmount."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from sllmfs.core.errors import BadInput
from sllmfs.fuse import mount
from sllmfs.fuse.ops import OnMiss, Ops, ResidentView
from sllmfs.fuse.tree import Tree
from sllmfs.store.store import Store

log = logging.getLogger(__name__)


def mount_options() -> set[str]:
    # no max_read option: pyfuse3 leaves conn.max_read at 0, which libfuse then rejects; the
    # kernel's own cap (max_pages, 1 MiB) already bounds requests, and read-ahead feeds them.
    opts = {"fsname=sllmfs", "subtype=sllmfs", "ro", "default_permissions"}
    if os.geteuid() == 0:
        opts.add("allow_other")  # the service runs as root; inference pods run as anyone
    return opts


async def serve(mountpoint: Path, store: Store, resident_view: ResidentView | None, socket_path: str, *,
                gid: int | None = None, visible: Callable[[str], bool] | None = None,
                in_use: Counter[str] | None = None, on_miss: OnMiss | None = None,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``store`` read-only at ``mountpoint`` until cancelled (or unmounted from outside).

    ``gid``: only root and this group may read (as the socket); None: every local user may.
    ``visible``: which models to show (None: all). ``in_use``: kept up to date with the models
    whose weights are open through the mount. ``on_miss``: asked about a name the store lacks
    (the sidecar's origin), in a worker thread.
    """
    mountpoint = Path(mountpoint).absolute()
    mount.prepare(mountpoint)
    ops = Ops(Tree(store, socket_path, visible), resident_view, gid, in_use, on_miss)
    try:
        pyfuse3.init(ops, str(mountpoint), mount_options())
    except RuntimeError as e:
        raise BadInput(f"cannot mount FUSE at {mountpoint} ({e}); is /dev/fuse there and fuse3 installed?") from None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            # a stat completes only once the kernel's INIT is answered; tuning before that is undone
            try:
                await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
            except OSError as e:
                raise BadInput(f"the FUSE mount at {mountpoint} did not come up ({e.strerror})") from None
            mount.tune(mountpoint)
            log.info("serving %s at %s", store.root, mountpoint)
            task_status.started()
    finally:
        pyfuse3.close(unmount=True)
