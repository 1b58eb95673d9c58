"""A streaming pull that fails tells the lease's client its own reason (a typed cause and the pull's
line), not "see the sidecar log": the real S3 server (moto) behind a proxy that holds the data GETs
until the lease is taken, then lets a damaged object through, or dies as an unreachable origin does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from sllmfs.client.client import FillFailed  # noqa: E402
from sllmfs.origin.push import push_model  # noqa: E402
from sllmfs.origin.url import Origin  # noqa: E402
from sllmfs.protocol.messages import FailCause  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402
from tests.origin import test_origin as base  # noqa: E402
from tests.support.sidecar import sidecar  # noqa: E402

# the origin tests' fixtures: a moto server (its own for this module), a bucket, a stored model
server, env, origin, odd_ckpt, stored = base.server, base.env, base.origin, base.odd_ckpt, base.stored
MODEL = base.MODEL


class HeldOrigin:
    """A TCP proxy in front of the S3 server. Ranged GETs (the partitions' bytes) wait until ``let_go``;
    ``die`` cuts every connection and refuses new ones, as an origin that went away."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.gate = threading.Event()
        self.holding = threading.Event()  # a data request is being held
        self.dead = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed: die()
            try:
                up = socket.create_connection(self.upstream)
            except OSError:
                conn.close()
                continue
            self._socks += [conn, up]
            threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if requests and b"range: bytes=" in data.lower() and not self.gate.is_set():
                    self.holding.set()
                    self.gate.wait()
                if self.dead:
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def let_go(self) -> None:
        self.gate.set()

    def die(self) -> None:
        self.dead = True
        self.listener.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.gate.set()


@contextmanager
def _pull_held(stored: Store, origin: Origin, env: dict[str, str],
               tmp_path: Path) -> Iterator[tuple[Any, Any, Any, HeldOrigin]]:
    """A node's sidecar (its origin behind the proxy) and a lease on the model while its bytes are still
    on their way (the proxy holds them): (sidecar, client, lease, proxy)."""
    proxy = HeldOrigin(env["SLLMFS_ORIGIN_ENDPOINT"])
    try:
        node_env = {**env, "SLLMFS_ORIGIN_ENDPOINT": proxy.url}
        with sidecar(tmp_path, "--origin", str(origin), env=node_env, store=tmp_path / "node") as sd:
            with sd.connect() as c:
                lease = c.acquire(MODEL)  # Pulling until the plan is read and the variant reserved in memory
                assert proxy.holding.wait(30), "the pull never asked for the partitions' bytes"
                assert not lease.ready(), "the bytes are held: the lease cannot be ready yet"
                yield sd, c, lease, proxy
    finally:
        proxy.die()


def test_a_damaged_object_mid_pull_reaches_the_client_as_damaged(stored: Store, origin: Origin,
                                                                  env: dict[str, str], tmp_path: Path) -> None:
    push_model(stored, MODEL, origin)
    big = base._flip_in_origin(stored, origin, at=5 << 20)  # window 1 of the biggest partition
    with _pull_held(stored, origin, env, tmp_path) as (sd, c, lease, proxy):
        proxy.let_go()
        with pytest.raises(FillFailed) as failed:
            lease.wait(timeout=60)
        assert failed.value.cause == FailCause.DAMAGED
        line = str(failed.value)
        assert "\n" not in line and big.file in line and "fail their checksum" in line, line
        assert "see the sidecar log" not in line
        assert c.status()["pid"] == sd.proc.pid  # the daemon goes on
        assert not Store(tmp_path / "node").has(MODEL)  # nothing damaged is committed


def test_an_origin_that_goes_away_mid_pull_reaches_the_client_as_unreachable(
        stored: Store, origin: Origin, env: dict[str, str], tmp_path: Path) -> None:
    push_model(stored, MODEL, origin)
    with _pull_held(stored, origin, env, tmp_path) as (sd, c, lease, proxy):
        proxy.die()  # connections cut mid-request, new ones refused: boto3 retries, then gives up
        with pytest.raises(FillFailed) as failed:
            lease.wait(timeout=120)
        assert failed.value.cause == FailCause.ORIGIN
        line = str(failed.value)
        assert "\n" not in line and str(origin) in line and proxy.url in line, line
        assert c.status()["pid"] == sd.proc.pid
