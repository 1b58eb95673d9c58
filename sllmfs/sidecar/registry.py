"""Models allowed under --registration-required, kept in ``<store>/registered.json`` so they survive restarts."""

from __future__ import annotations

import json
import logging
import os

import trio

from sllmfs.store.store import Store

log = logging.getLogger("sllmfs.sidecar")



class Registry:
    def __init__(self, store: Store):
        self.store = store
        self.names: set[str] = _load(store)
        self._lock = trio.Lock()

    def __contains__(self, model: object) -> bool:
        return model in self.names

    def is_registered(self, model: str) -> bool:
        return model in self.names

    async def add(self, model: str) -> None:
        async with self._lock:  # one writer of registered.json at a time, a snapshot each
            await trio.to_thread.run_sync(_save, self.store, sorted(self.names | {model}))
            self.names.add(model)  # only once it is kept


def _load(store: Store) -> set[str]:
    try:
        names = json.loads((store.layout.registered).read_text())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as e:
        log.warning("ignoring %s (%s): no model is registered until `sllmfs register` writes it again",
                    store.layout.registered, e)
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def _save(store: Store, registered: list[str]) -> None:
    path = store.layout.registered
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(registered))
    os.chmod(tmp, 0o640)
    os.replace(tmp, path)  # whole or not at all
