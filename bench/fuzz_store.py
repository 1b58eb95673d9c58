"""Fuzz the store's readers with hostile manifests, under a running daemon and its mount.

    python -m bench.fuzz_store [--mutations N] [--seed S]    (from the repository root)

A valid stored manifest is mutated thousands of times (types, huge and negative integers, floats, bools,
missing and extra keys, wrong nesting, broken JSON). Each mutant is committed as a new copy of a model
under a running `sllmfs start --mount` daemon (one directory exchange, as `save --force` does), then
listed and read through the mount and acquired through the socket. At the end the daemon must be alive
and a good model must still read byte for byte. tests/store/test_hostile_store.py runs it CI-sized.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors.numpy import load as load_safetensors

from sllmfs.core.errors import SllmfsError
from sllmfs.core.names import model_dirname
from sllmfs.store.store import Store, exchange
from tests.support.sidecar import make_model, sidecar

GOOD, VICTIM = "fuzz/good", "fuzz/victim"
HOSTILE: list[Any] = [2**64, 2**63, 2**62 + 4096, 2**31, -1, -4096, 0, 1, 3, 1.5, 4096.0, 1e308, float("nan"),
                      True, False, None, "", "x", "4096", "F32", "../x", "\ud800", [], {}, [0], [2**64], [64, True],
                      {"a": 1}, [[[]]]]
NEST = "\x00nest\x00"  # replaced in the JSON text by nesting too deep to build as Python objects
STEP_TIMEOUT = 30.0  # one mutant's mount reads; longer means the daemon hangs


def mutate(manifest: dict[str, Any], rng: random.Random) -> str:
    """One random change somewhere in ``manifest``, as the JSON text to store."""
    if rng.random() < 0.05:  # broken text rather than a broken value
        text = json.dumps(manifest)
        return rng.choice([text[:rng.randrange(len(text))], text + "}", "[" * 100000, "\xff\xfe", ""])
    d = copy.deepcopy(manifest)
    container, key = rng.choice(list(_slots(d)))
    value = container[key]
    op = rng.choice(["replace", "replace", "nudge", "delete", "add", "wrap", "nest"])
    if op == "nudge" and type(value) is int:
        container[key] = rng.choice([value + 1, value - 1, value + 4096, value - 4096, value * 2, -value,
                                     value + 2**32, value * 2**40, float(value)])
    elif op == "delete":
        del container[key]
    elif op == "add":
        if isinstance(value, dict):
            value[rng.choice(["extra", "offset", "shape", "__metadata__"])] = rng.choice(HOSTILE)
        elif isinstance(value, list):
            value.insert(rng.randrange(len(value) + 1), rng.choice(HOSTILE))
        else:
            container[key] = [value, rng.choice(HOSTILE)]
    elif op == "wrap":
        container[key] = rng.choice([[value], {"value": value}])
    elif op == "nest":
        container[key] = NEST
    else:
        container[key] = rng.choice(HOSTILE)
    depth = rng.choice([40, 3000, 200000])
    return json.dumps(d).replace(json.dumps(NEST), "[" * depth + "]" * depth)


def _slots(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) in a JSON value, the root's own fields included."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in list(items):
        yield value, key
        yield from _slots(child)


def commit(store: Path, pristine: Path, manifest_text: str, work: Path) -> None:
    """A copy of the pristine model, with this manifest, put in the victim's place in one exchange: new
    inodes for model.json and the manifest, so the mount and the daemon see a new version."""
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(pristine, stage, copy_function=os.link)  # data files shared, never copied
    for rel in ("model.json", "variants/hf/manifest.json"):
        (stage / rel).unlink()
    shutil.copyfile(pristine / "model.json", stage / "model.json")
    (stage / "variants" / "hf" / "manifest.json").write_text(manifest_text, errors="surrogatepass")
    exchange(stage, store / "models" / model_dirname(VICTIM))
    shutil.rmtree(stage)


def read_tree(top: Path, limit: int = 4 << 20) -> tuple[int, int]:
    """(files read, files that failed) under ``top`` through the mount."""
    ok = failed = 0
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            try:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    fh.read(limit)
                ok += 1
            except OSError:
                failed += 1
    return ok, failed


def bounded(fn: Callable[[], Any], timeout: float = STEP_TIMEOUT) -> Any:
    """``fn()`` in a thread: a mount that stops answering fails the fuzz instead of hanging it."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"the mount did not answer within {timeout} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def fuzz(tmp: Path, mutations: int = 2000, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    store = tmp / "store"
    Store(store)
    good = make_model(store, GOOD, tensors=3, nbytes=64 << 10)
    make_model(store, VICTIM, tensors=3, nbytes=64 << 10, seed=1)
    pristine = tmp / "pristine"
    shutil.copytree(store / "models" / model_dirname(VICTIM), pristine)
    manifest = json.loads((pristine / "variants" / "hf" / "manifest.json").read_text())
    mnt = tmp / "mnt"
    counts = {"mutations": 0, "refused": 0, "served": 0, "mount_files_read": 0, "mount_read_errors": 0,
              "mount_hidden": 0, "mount_list_errors": 0}
    samples: dict[str, str] = {}
    t0 = time.monotonic()
    with sidecar(tmp, "--mount", str(mnt), store=store) as sd:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline and sd.proc.poll() is None, "the mount did not come up"
            time.sleep(0.05)
        client = sd.connect()
        client._sock.settimeout(STEP_TIMEOUT)  # a hung daemon fails the fuzz instead of hanging it
        victim = mnt / VICTIM
        try:
            for _ in range(mutations):
                commit(store, pristine, mutate(manifest, rng), tmp)
                counts["mutations"] += 1
                try:  # a refused model is listed empty; any error listing it is the view failing
                    counts["mount_hidden"] += not bounded(lambda: os.listdir(victim))
                    ok, failed = bounded(lambda: read_tree(victim))
                    counts["mount_files_read"] += ok
                    counts["mount_read_errors"] += failed
                except OSError as e:
                    counts["mount_list_errors"] += 1
                    samples.setdefault(f"mount {e.strerror}", f"listing {victim}: {e}")
                try:
                    with client.acquire(VICTIM) as lease:
                        lease.wait(timeout=STEP_TIMEOUT)
                    counts["served"] += 1
                except SllmfsError as e:
                    counts["refused"] += 1
                    samples.setdefault(str(e).split(":")[-1][:60], str(e))
                if sd.proc.poll() is not None:
                    break
            try:
                intact = _good_intact(client, mnt, good)
            except (OSError, SllmfsError):  # TimeoutError is an OSError
                intact = False
        finally:
            client.close()
        alive = sd.proc.poll() is None
        log = sd.log()
    return {**counts, "daemon_alive": alive, "good_intact": intact, "seconds": round(time.monotonic() - t0, 1),
            "tracebacks": log.count("Traceback"), "refusal_samples": list(samples.values())[:8]}


def _good_intact(client: Any, mnt: Path, good: dict[str, bytes]) -> bool:
    """The good model, byte for byte, through the socket and through the mount."""
    with client.acquire(GOOD) as lease:
        lease.wait(timeout=STEP_TIMEOUT)
        leased = {name: a.tobytes() for name, a in lease.numpy().items()}
    mounted = bounded(lambda: (mnt / GOOD / "model.safetensors").read_bytes())
    read = {name: a.tobytes() for name, a in load_safetensors(mounted).items()}
    return leased == good and read == good


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mutations", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sllmfs-fuzz-") as tmp:
        result = fuzz(Path(tmp), args.mutations, args.seed)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["daemon_alive"] and result["good_intact"] else 1)


if __name__ == "__main__":
    main()
