"""The FUSE view's entry points: ``serve`` for the daemon, and a standalone runner.

    python -m sllmfs.fuse.main STORE_PATH MOUNT [--socket PATH]

serves the store at MOUNT (from the store only: no memory tier) until SIGTERM
or SIGINT, then unmounts. The daemon calls ``serve`` in its own nursery.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from sllmfs.core.errors import SllmfsError, user_error
from sllmfs.fuse.serve import serve
from sllmfs.store.store import Store

__all__ = ["serve", "main"]


async def _run(store: Store, mountpoint: Path, socket_path: str, driver: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, mountpoint, store, None, socket_path, driver=driver))
            print(f"sllmfs: serving {store.root} at {mountpoint}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()  # serve unmounts on its way out
                break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sllmfs.fuse.main", description="Serve an sllmfs store over FUSE.")
    p.add_argument("store", type=Path)
    p.add_argument("mount", type=Path)
    p.add_argument("--socket", default="", help="sidecar socket advertised to clients (xattr and .sllmfs.json)")
    p.add_argument("--driver", choices=["auto", "kernel", "pyfuse3"], default="auto",
                   help="who answers the kernel: ours (root; FUSE passthrough) or pyfuse3; auto: ours as root")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="sllmfs: %(message)s")
    try:
        store = Store(args.store, create=False, cleanup=False)
        trio.run(_run, store, args.mount, args.socket, args.driver)
    except SllmfsError as e:
        print(f"sllmfs: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        err = user_error(group)
        if err is None:
            raise
        print(f"sllmfs: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
