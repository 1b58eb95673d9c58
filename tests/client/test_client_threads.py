"""One Client used from several threads (a load's GPU and host links do): requests never interleave."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.support.sidecar import make_model, sidecar


def test_concurrent_requests_on_one_client_get_their_own_replies(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/m", tensors=2)
        errors: list[BaseException] = []
        with sd.connect() as c:
            def status() -> None:
                try:
                    for _ in range(200):
                        assert "memory" in c.status()
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            def listing() -> None:
                try:
                    for _ in range(200):
                        assert [m["name"] for m in c.list()] == ["org/m"]
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=f) for f in (status, listing, status, listing)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors[:2]
            assert c.status()["pid"] > 0  # the connection is still in step
