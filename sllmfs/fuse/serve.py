"""``serve``: mount the view, answer the kernel until cancelled, always unmount.

Two drivers answer the kernel with the same ``Ops``: our own (``driver``; root only: it mounts
with mount(2)), which opens resident safetensors files in FUSE passthrough so their reads never
reach us, and pyfuse3 (libfuse's fusermount3 mounts it for anyone), where every read does.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from sllmfs.core.errors import BadInput
from sllmfs.fuse import kernel, mount
from sllmfs.fuse.backing import CopyBudget, ResidentFile
from sllmfs.fuse.driver import KernelDriver
from sllmfs.fuse.incoming import Warm
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
                driver: str = "auto", passthrough: bool = True, resident_file: ResidentFile | None = None,
                copy_budget: CopyBudget | None = None, warm: Warm | None = None,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``store`` read-only at ``mountpoint`` until cancelled (or unmounted from outside).

    ``gid``: only root and this group may read (as the socket); None: every local user may.
    ``visible``: which models to show (None: all). ``in_use``: kept up to date with the models
    whose weights are open through the mount. ``on_miss``: asked about a name the store lacks
    (the sidecar's origin), in a worker thread. ``driver``: "kernel" (ours: passthrough), "pyfuse3",
    or "auto" (ours as root, else pyfuse3). ``passthrough``: off to serve every read ourselves.
    ``resident_file``: a memory tier that holds variants as their safetensors files (backing.py).
    ``copy_budget``: what passthrough backing copies count against (the sidecar's memory tier).
    ``warm``: fills a variant into the memory tier for a cold reader (``incoming``; the sidecar's).
    """
    mountpoint = Path(mountpoint).absolute()
    mount.prepare(mountpoint)
    ops = Ops(Tree(store, socket_path, visible), resident_view, gid, in_use, on_miss, warm)
    if driver != "pyfuse3":
        dev = _mount_ourselves(mountpoint, required=driver == "kernel")
        if dev is not None:
            await _serve_kernel(mountpoint, store, ops, dev, passthrough, resident_file, copy_budget, task_status)
            return
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


def _mount_ourselves(mountpoint: Path, *, required: bool) -> int | None:
    """/dev/fuse, mounted at ``mountpoint`` by mount(2) (CAP_SYS_ADMIN); None, with one line, where we
    may not (not root, a container without the capability): pyfuse3 and fusermount3 then serve."""
    if os.geteuid() != 0 and not required:
        log.warning("FUSE passthrough needs root (mount(2), backing files): reads of the mount go through the daemon")
        return None
    try:
        dev = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise BadInput(f"cannot open /dev/fuse ({e.strerror}); load the fuse module or pass /dev/fuse to "
                       "the container") from None
    try:
        kernel.mount(mountpoint, dev, allow_other=True)
    except OSError as e:
        os.close(dev)
        if e.errno == errno.EPERM and not required:
            log.warning("FUSE passthrough needs CAP_SYS_ADMIN to mount (%s): reads of the mount go through the "
                        "daemon", e.strerror)
            return None
        raise BadInput(f"cannot mount FUSE at {mountpoint} ({e.strerror}); the sidecar mounts as root") from None
    return dev


async def _serve_kernel(mountpoint: Path, store: Store, ops: Ops, dev: int, passthrough: bool,
                        resident_file: ResidentFile | None, copy_budget: CopyBudget | None,
                        task_status: trio.TaskStatus[None]) -> None:
    try:
        driver = KernelDriver(ops, mountpoint, dev, passthrough=passthrough, resident_file=resident_file,
                              copy_budget=copy_budget)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(driver.run)
                try:  # completes once the kernel's INIT is answered; tuning before that is undone
                    await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
                except OSError as e:
                    raise BadInput(f"the FUSE mount at {mountpoint} did not come up ({e.strerror})") from None
                mount.tune(mountpoint)
                log.info("serving %s at %s (%s)", store.root, mountpoint,
                         "passthrough for resident models" if driver.passthrough else "no passthrough")
                task_status.started()
        finally:
            driver.close()
            kernel.unmount(mountpoint)
    finally:
        os.close(dev)
