"""`sllmfs start`: settings, logging, the socket, the mount, signals and a clean exit."""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket as pysocket
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from sllmfs.core.config import Settings, hint_flags
from sllmfs.core.errors import BadInput, SllmfsError, user_error
from sllmfs.ops.systemd import notify
from sllmfs.sidecar.fill import round_chunk
from sllmfs.sidecar.memtier import MemoryTier
from sllmfs.sidecar.mountfill import MountFill
from sllmfs.sidecar.server import Server
from sllmfs.store.store import Store

log = logging.getLogger("sllmfs.sidecar")


def run(settings: Settings) -> None:
    """Serve in the foreground until SIGTERM/SIGINT; raises SllmfsError on a bad start."""
    try:
        _run(settings)
    except SllmfsError as e:
        notify(f"STATUS=failed to start: {e}")
        raise
    except BaseExceptionGroup as group:  # trio groups what leaves a nursery: the user gets the one line
        err = user_error(group)
        if err is None:
            raise
        notify(f"STATUS=failed to start: {err}")
        raise err from None


def _run(settings: Settings) -> None:
    _setup_logging(settings.log_level)
    settings.chunk_size = round_chunk(settings.chunk_size)
    fuse_serve = _fuse_view() if settings.mount else None
    store = Store(settings.storage_path)
    budget = settings.mem_pool_size or _half_of_memory()
    tier = MemoryTier(budget, hint=hint_flags(socket=settings.socket))
    _raise_fd_limit()
    listener = _bind(Path(settings.socket), settings.group, bool(settings.allow_uids.strip()))
    try:
        trio.run(_main, settings, store, tier, listener, fuse_serve)
    finally:
        listener.close()
        try:
            os.unlink(settings.socket)
        except OSError:
            pass
        tier.close_all()
    log.info("stopped")


async def _main(settings: Settings, store: Store, tier: MemoryTier, raw: pysocket.socket, fuse_serve: Any) -> None:
    server = Server(settings, store, tier)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listener = trio.socket.from_stdlib_socket(raw)
            await nursery.start(server.serve, listener)
            if fuse_serve is not None:
                gid = grp.getgrnam(settings.group).gr_gid if settings.group else None
                visible = server.registry.is_registered if settings.registration_required else None
                await nursery.start(partial(fuse_serve, gid=gid, visible=visible, in_use=server.cache.mount_in_use,
                                            on_miss=server.cache.on_mount_miss if server.cache.origin else None,
                                            copy_budget=tier,  # passthrough copies count in --mem-pool-size
                                            resident_file=tier.resident_file,  # or no copy: the tier's own file
                                            warm=MountFill(server.cache)),  # cold reads ride a tier fill
                                    Path(settings.mount), store, tier.view, settings.socket)
                log.info("mounted %s", settings.mount)
            if settings.metrics_port:
                await nursery.start(_metrics, server, settings.metrics_port)
            if settings.prefault:  # blanks up to the budget now, and again whenever memory is given back
                nursery.start_soon(server.cache.blank_pass)
            if settings.gpu_warmup:  # once up: a start that fails says one line, not CUDA's news
                nursery.start_soon(server.cache.warm_gpus)
            log.info("serving socket=%s store=%s memory budget=%d disk budget=%d threads=%d chunk=%d",
                     settings.socket, store.root, tier.budget, settings.disk_size, settings.num_thread,
                     settings.chunk_size)
            notify("READY=1", f"STATUS=serving {settings.socket}" + (f", mounted {settings.mount}"
                                                                      if settings.mount else ""))
            async for signum in signals:
                log.info("got %s: draining", signal.Signals(signum).name)
                notify("STOPPING=1", "STATUS=draining")
                server.cache.stop_fills()  # fill threads stop after their current piece
                nursery.cancel_scope.cancel()
                break


async def _metrics(server: Server, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve Prometheus metrics from a status snapshot refreshed every 2 s (scrapes never touch the loop)."""
    from sllmfs.ops.metrics import serve_metrics

    latest: dict[str, Any] = {}

    async def refresh() -> None:
        latest["status"] = await server.status()

    await refresh()
    serve_metrics(port, lambda: latest.get("status"))
    log.info("metrics on 127.0.0.1:%d", port)
    task_status.started()
    while True:
        await trio.sleep(2)
        await refresh()


def _fuse_view() -> Any:
    try:
        from sllmfs.fuse import main as fuse_view
    except ModuleNotFoundError as e:
        if e.name != "sllmfs.fuse.main":
            raise
        raise SllmfsError("--mount needs the FUSE view (sllmfs.fuse.main), which this build lacks; "
                          "start without --mount") from None
    return fuse_view.serve


def _bind(path: Path, group: str, allow_others: bool = False) -> pysocket.socket:
    """The listening socket: directory 0750, socket 0660, a stale socket replaced, a live one refused."""
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        if allow_others:  # --allow-uids: the path must be reachable; peer credentials decide who is served
            os.chmod(path.parent, 0o755)
    except OSError as e:
        raise BadInput(f"cannot create socket directory {path.parent}: {e.strerror}") from None
    if path.exists() or path.is_symlink():
        probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise BadInput(f"a sidecar already serves {path}; stop it first or pass another --socket")
        except OSError:
            path.unlink()  # stale: its daemon is gone
        finally:
            probe.close()
    sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    old = os.umask(0o117)  # no window where the socket is open to others
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise BadInput(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o666 if allow_others else 0o660)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            raise BadInput(f"--group {group!r} is not a group on this machine") from None
        os.chown(path, -1, gid)
        os.chown(path.parent, -1, gid)
    sock.listen(256)
    return sock


def _raise_fd_limit() -> None:
    """Each segment and connection holds an fd: allow as many as the hard limit does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _half_of_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise BadInput(f"--log-level {level!r} is not one of debug, info, warning, error")
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(asctime)s sllmfs %(levelname)s %(message)s")
