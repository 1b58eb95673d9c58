"""Fuzz the store's readers with hostile manifests and hostile store trees, under a running daemon and its mount.

    python -m bench.fuzz_store [--mutations N] [--seed S] [--json OUT]            (manifests)
    python -m bench.fuzz_store --trees [--rounds N] [--seed S] [--json OUT]       (store trees)
    (from the repository root)

A valid stored manifest is mutated thousands of times (types, huge and negative integers, floats, bools,
missing and extra keys, wrong nesting, broken JSON). Each mutant is committed as a new copy of a model
under a running `sllmfs start --mount` daemon (one directory exchange, as `save --force` does), then
listed and read through the mount and acquired through the socket. At the end the daemon must be alive
and a good model must still read byte for byte. tests/store/test_hostile_store.py runs it CI-sized.

``--trees`` damages the *tree* of stored models instead (``fuzz_trees``): each round restores the models it
damaged last round, then replaces files and directories of one or two victims with symlinks (to /etc/shadow, to
another model, dangling, loops), FIFOs, sockets, directories or files, truncates, extends or sparsely grows
partitions, flips, truncates and extends metadata files in place, removes them, writes junk into model.json,
drops permissions, and plants odd entries (newlines, 255-byte names, undecodable bytes) under models/, variants/
and files/. After each round every untouched model must acquire and read byte for byte through the socket and the
mount, `sllmfs ls` must list the good ones and one line per bad one, `status` must answer within 1 s, no byte of a
file outside the store (/etc/shadow, a planted secret) may be served, and a victim whose config.json was changed
or replaced must be refused it by the mount and the ``files`` op (its digest in model.json no longer matches).
tests/store/test_hostile_trees.py runs it CI-sized.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.numpy import load as load_safetensors

import sllmfs.client.client as sc
from sllmfs.core.errors import SllmfsError
from sllmfs.core.names import model_dirname
from sllmfs.store.store import Store, exchange
from tests.support.fuse import force_unmount
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


def _mounted_client(sd: Any, mnt: Path) -> Any:
    """Once the sidecar's mount is up: a client whose calls time out, so a hung daemon fails the fuzz
    instead of hanging it."""
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        assert time.monotonic() < deadline and sd.proc.poll() is None, "the mount did not come up"
        time.sleep(0.05)
    client = sd.connect()
    client._sock.settimeout(STEP_TIMEOUT)
    return client


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
        client = _mounted_client(sd, mnt)
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


# -- store trees ----------------------------------------------------------------------------------------------

TREE_MODELS = 6  # each round damages one or two; the others must go on serving unchanged
SECRET = b"SLLMFS-FUZZ-SECRET-outside-the-store"
STATUS_DEADLINE = 1.0  # seconds: status answers within this whatever the store holds
PARTITION, METADATA, MODEL_JSON, MANIFEST = ("variants/hf/model.safetensors", "files/config.json", "model.json",
                                             "variants/hf/manifest.json")
FILE_KINDS = ["symlink-shadow", "symlink-secret", "symlink-other", "symlink-dangling", "symlink-loop", "fifo",
              "socket", "directory", "perm-0000", "missing", "junk", "huge"]
PARTITION_KINDS = ["truncate", "extend", "sparse-huge"]
METADATA_KINDS = ["flip", "truncate", "extend", "sparse-huge"]  # bytes changed in place: only the digest can tell
DIR_KINDS = ["symlink-other", "symlink-etc", "symlink-outside", "symlink-dangling", "symlink-loop", "file",
             "perm-0000", "missing", "junk-entries"]
MODEL_KINDS = ["symlink-other", "file", "perm-0000", "models-junk"]
JUNK_NAMES = ["a\nb", "\n", " ", "-rf", "x" * 255, "%2E%2E", "..%2F..%2Fetc", "tree%2Fm0\n", "\x01\x7f",
              "\u00e9" * 127, ".hidden", "tree%2Fjunk", "tree%2F" + "y" * 248, "*", "\\", "tree%2Fm0%2F..",
              "\udcff\udcfe"]  # the last: undecodable bytes on disk


@dataclass
class Tree:
    """One fuzz run's fixed parts: the store, pristine copies of its models, the secrets."""

    store: Path
    pristine: Path
    outside: Path  # beside the store: what symlinks point out to
    trash: Path
    models: list[str]
    tensors: dict[str, dict[str, bytes]]  # model -> tensor name -> bytes
    config: bytes  # every model's config.json
    needles: list[bytes]  # bytes that must never be served

    def mdir(self, model: str) -> Path:
        return self.store / "models" / model_dirname(model)


def _clear(path: Path) -> None:
    """Whatever is at ``path`` goes: a directory whole, a symlink itself (never followed)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _junk_entries(at: Path, rng: random.Random) -> list[str]:
    """Odd names under ``at``: files, directories, a symlink and a FIFO; returns what was made."""
    made = []
    for name in rng.sample(JUNK_NAMES, rng.randint(1, 4)):
        p = at / name
        if os.path.lexists(p):
            continue
        kind = rng.choice(["file", "dir", "symlink", "fifo"])
        if kind == "file":
            p.write_bytes(rng.randbytes(rng.choice([0, 7, 300])))
        elif kind == "dir":
            p.mkdir()
            (p / "model.json").write_bytes(b'{"name": "tree/m0", "files": []}')
        elif kind == "symlink":
            os.symlink("/etc/shadow", p)
        else:
            os.mkfifo(p)
        made.append(f"{kind} {name!r}")
    return made


def _damage_file(t: Tree, model: str, rel: str, kind: str, rng: random.Random) -> None:
    p = t.mdir(model) / rel
    other = rng.choice([m for m in t.models if m != model])
    if kind == "perm-0000":
        os.chmod(p, 0)
        return
    if kind == "flip":  # one bit, same size, same inode: what rot on the disk does
        with open(p, "r+b") as f:
            at = rng.randrange(os.path.getsize(p))
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
        return
    if kind in ("truncate", "extend", "sparse-huge"):
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            if kind == "truncate":
                f.truncate(rng.choice([0, 1, size // 2, size - 1]))
            elif kind == "extend":
                f.seek(0, os.SEEK_END)
                f.write(rng.randbytes(rng.choice([1, 4096, 1 << 20])))
            else:
                f.truncate(1 << 40)  # sparse: a terabyte that takes no disk
        return
    _clear(p)
    if kind == "symlink-shadow":
        os.symlink("/etc/shadow", p)
    elif kind == "symlink-secret":
        os.symlink(t.outside / "secret", p)
    elif kind == "symlink-other":
        os.symlink(t.mdir(other) / rel, p)
    elif kind == "symlink-dangling":
        os.symlink(t.outside / "nothing-here", p)
    elif kind == "symlink-loop":
        os.symlink(p.name, p)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        os.mknod(p, stat.S_IFSOCK | 0o600)
    elif kind == "directory":
        p.mkdir()
        (p / "inside").write_bytes(SECRET)
    elif kind == "junk":
        p.write_bytes(rng.randbytes(rng.choice([0, 1, 64, 5000])))
    elif kind == "huge":
        with open(p, "wb") as f:
            f.truncate(rng.choice([(1 << 30) + 1, 1 << 40]))  # sparse, past the largest JSON the store reads
    # "missing": cleared above


def _damage_dir(t: Tree, model: str, rel: str, kind: str, rng: random.Random) -> list[str]:
    p = t.mdir(model) / rel
    if kind == "perm-0000":
        os.chmod(p, 0)
        return []
    if kind == "junk-entries":
        return _junk_entries(p, rng)
    other = rng.choice([m for m in t.models if m != model])
    if kind == "symlink-outside":  # an intact copy out of the store, its metadata swapped for the secret
        dest = t.outside / f"{model_dirname(model)}-{rel.replace('/', '_')}"
        if not dest.exists():
            shutil.copytree(t.pristine / model_dirname(model) / rel, dest)
            for f in dest.rglob("*.json"):
                if f.name == "config.json":
                    f.write_bytes(SECRET)
    _clear(p)
    if kind == "symlink-other":
        os.symlink(t.mdir(other) / rel, p)
    elif kind == "symlink-etc":
        os.symlink("/etc", p)
    elif kind == "symlink-outside":
        os.symlink(dest, p)
    elif kind == "symlink-dangling":
        os.symlink(t.outside / "nothing-here", p)
    elif kind == "symlink-loop":
        os.symlink(p.name, p)
    elif kind == "file":
        p.write_bytes(rng.randbytes(100))
    return []  # "missing": cleared above


def _damage_model(t: Tree, model: str, kind: str, rng: random.Random) -> list[str]:
    p = t.mdir(model)
    if kind == "perm-0000":
        os.chmod(p, 0)
        return []
    if kind == "models-junk":
        return _junk_entries(p.parent, rng)
    os.rename(p, t.trash / f"{model_dirname(model)}-{rng.randrange(1 << 30)}")
    if kind == "symlink-other":  # the model's directory swapped for a symlink to another model's
        os.symlink(t.mdir(rng.choice([m for m in t.models if m != model])), p)
    else:
        p.write_bytes(rng.randbytes(100))
    return []


def mutate_tree(t: Tree, model: str, rng: random.Random) -> tuple[str, list[str]]:
    """One random damage to ``model``'s tree (or beside it under models/): its label, and junk made under
    models/ (to remove before the next round)."""
    where = rng.choice(["partition", "metadata", "model.json", "manifest", "variant", "variants", "files",
                        "model"])
    target = t.mdir(model) / {"partition": PARTITION, "metadata": METADATA, "model.json": MODEL_JSON,
                              "manifest": MANIFEST, "variant": "variants/hf", "variants": "variants",
                              "files": "files", "model": ""}[where]
    if os.path.realpath(target.parent) != str(target.parent):  # damage through a planted link would hit
        return f"{where}: already damaged", []  # another model, which must stay untouched
    if where in ("partition", "metadata", "model.json", "manifest"):
        rel = {"partition": PARTITION, "metadata": METADATA, "model.json": MODEL_JSON, "manifest": MANIFEST}[where]
        kinds = FILE_KINDS + {"partition": PARTITION_KINDS, "metadata": METADATA_KINDS}.get(where, [])
        if not os.path.isfile(t.mdir(model) / rel) or os.path.islink(t.mdir(model) / rel):
            return f"{where}: already damaged", []
        kind = rng.choice(kinds)
        _damage_file(t, model, rel, kind, rng)
        return f"{where} {kind}", []
    if where == "model":
        if os.path.islink(t.mdir(model)) or not os.path.isdir(t.mdir(model)):
            return "model: already damaged", []
        kind = rng.choice(MODEL_KINDS)
        made = _damage_model(t, model, kind, rng)
        return f"model {kind}", made if kind == "models-junk" else []
    rel = {"variant": "variants/hf", "variants": "variants", "files": "files"}[where]
    p = t.mdir(model) / rel
    if not os.path.isdir(p) or os.path.islink(p) or os.path.islink(p.parent) or not os.path.isdir(p.parent):
        return f"{where}: already damaged", []
    kind = rng.choice(DIR_KINDS)
    _damage_dir(t, model, rel, kind, rng)
    return f"{where} {kind}", []


def restore(t: Tree, model: str) -> None:
    """Put the pristine copy back as a new version (fresh inodes and times): whatever was there goes."""
    p = t.mdir(model)
    if os.path.lexists(p):
        os.rename(p, t.trash / f"old-{os.urandom(6).hex()}")
    stage = t.store / "tmp" / f"restore-{os.urandom(6).hex()}"
    shutil.copytree(t.pristine / model_dirname(model), stage, copy_function=shutil.copyfile)
    os.rename(stage, p)
    shutil.rmtree(t.trash)  # root removes 0000 directories as well
    t.trash.mkdir()


def _read_all(top: Path) -> tuple[dict[str, bytes], int]:
    """Every file under ``top`` through the mount, by relative path; and how many failed."""
    out, failed = {}, 0
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            path = os.path.join(dirpath, f)
            try:
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, top)] = fh.read()
            except OSError:
                failed += 1
    return out, failed


def _tensors(blob: bytes) -> dict[str, bytes]:
    return {name: a.tobytes() for name, a in load_safetensors(blob).items()}


class _Round:
    """The checks after one round; problems are collected, not raised (the run reports them all)."""

    def __init__(self, t: Tree, sd: Any, client: Any, mnt: Path, counts: dict[str, Any], problems: list[str],
                 label: str):
        self.t, self.sd, self.client, self.mnt, self.counts, self.problems = t, sd, client, mnt, counts, problems
        self.label = label
        self.served: list[bytes] = []  # every byte handed out this round, searched for the needles

    def bad(self, what: str) -> None:
        self.problems.append(f"{self.label}: {what}")

    def untouched(self, model: str) -> None:
        want = self.t.tensors[model]
        with self.client.acquire(model) as lease:
            lease.wait(timeout=STEP_TIMEOUT)
            if {k: a.tobytes() for k, a in lease.numpy().items()} != want:
                self.bad(f"untouched {model} leased wrong bytes")
        files, failed = bounded(lambda: _read_all(self.mnt / model))
        if failed or set(files) != {"config.json", "model.safetensors"}:
            self.bad(f"untouched {model} through the mount: {sorted(files)}, {failed} reads failed")
        elif _tensors(files["model.safetensors"]) != want or files["config.json"] != self.t.config:
            self.bad(f"untouched {model} read wrong bytes through the mount")
        self.counts["untouched_reads"] += 1

    def victim(self, model: str, metadata_damaged: bool = False) -> None:
        """``metadata_damaged``: its config.json was changed or replaced this round (not just chmod), so
        neither the mount nor the files op may serve it: both must refuse (model.json holds its digest)."""
        want = self.t.tensors[model]
        try:
            files, failed = bounded(lambda: _read_all(self.mnt / model))
        except NotADirectoryError:
            files, failed = {}, 0
        except OSError as e:
            if isinstance(e, TimeoutError):
                raise
            files, failed = {}, 1
        self.counts["victim_mount_read_errors"] += failed
        self.served += files.values()
        for rel, data in files.items():
            ok = (rel == "config.json" and data == self.t.config) or \
                 (rel == "model.safetensors" and _safe_tensors(data) == want)
            if not ok:
                self.bad(f"victim {model}: the mount served {rel!r} ({len(data)} bytes) that is not the model's")
        if metadata_damaged and "config.json" in files:
            self.bad(f"victim {model}: the mount served a damaged config.json")
        try:
            with self.client.acquire(model) as lease:
                lease.wait(timeout=STEP_TIMEOUT)
                got = {k: a.tobytes() for k, a in lease.numpy().items()}
                self.served += [bytes(b) for b in lease.buffers()]
            self.counts["victim_served"] += 1
            if got != want:
                self.bad(f"victim {model} leased bytes that are not the model's")
        except SllmfsError as e:
            self.counts["victim_refused"] += 1
            self.line(e, model)
        try:
            meta = self.client.files(model)
            self.served += meta.values()
            if any(v != self.t.config for v in meta.values()) or set(meta) - {"config.json"}:
                self.bad(f"victim {model}: the files op served {sorted(meta)} that are not the model's")
            if metadata_damaged:
                self.bad(f"victim {model}: the files op served a damaged config.json")
        except SllmfsError as e:
            self.counts["metadata_refused"] += metadata_damaged
            self.line(e, model)

    def line(self, e: Exception, model: str) -> None:
        text = str(e)
        if "\n" in text or "Traceback" in text:
            self.bad(f"victim {model}: refusal is not one line: {text!r}")
        self.counts["refusal_samples"].setdefault(text.split(": ", 1)[-1][:50], text)

    def daemon(self) -> None:
        t0 = time.monotonic()
        with sc.connect(str(self.sd.socket)) as c:  # a fresh connection, as `sllmfs status` makes
            c._sock.settimeout(STEP_TIMEOUT)
            c.status()
        took = time.monotonic() - t0
        self.counts["status_max_ms"] = max(self.counts["status_max_ms"], round(took * 1000, 1))
        if took > STATUS_DEADLINE:
            self.bad(f"status took {took:.2f} s")
        if self.sd.proc.poll() is not None:
            self.bad("the daemon died")

    def listing(self, untouched: list[str]) -> None:
        """`sllmfs ls`: the good models on stdout, one warning line per entry it does not show."""
        proc = subprocess.run([sys.executable, "-m", "sllmfs", "ls", "--json", "--storage-path",
                               str(self.t.store)], capture_output=True, text=True, timeout=STEP_TIMEOUT)
        self.counts["ls_runs"] += 1
        if proc.returncode != 0:
            self.bad(f"sllmfs ls exited {proc.returncode}: {proc.stderr.strip()[-300:]!r}")
            return
        listed = [m["name"] for m in json.loads(proc.stdout)]
        warnings = proc.stderr.splitlines()
        entries = os.listdir(self.t.store / "models")
        if missing := set(untouched) - set(listed):
            self.bad(f"sllmfs ls does not list untouched {sorted(missing)}")
        if any(not w.startswith("sllmfs: warning: ") for w in warnings) or \
                len(listed) + len(warnings) != len(entries):
            self.bad(f"sllmfs ls: {len(listed)} listed + {len(warnings)} warning lines for {len(entries)} entries: "
                     f"{proc.stderr[-400:]!r}")
        with sc.connect(str(self.sd.socket)) as c:
            c._sock.settimeout(STEP_TIMEOUT)
            if missing := set(untouched) - {m["name"] for m in c.list()}:
                self.bad(f"the socket's list does not have untouched {sorted(missing)}")

    def secrets(self) -> None:
        for blob in self.served:
            for needle in self.t.needles:
                if needle in blob:
                    self.bad(f"served bytes from outside the store ({needle[:12]!r}...)")
                    return


def _safe_tensors(blob: bytes) -> dict[str, bytes] | None:
    try:
        return _tensors(blob)
    except Exception:  # noqa: BLE001 - any unparsable file is "not the model's"
        return None


def _needles() -> list[bytes]:
    """What must never be served: the planted secret, and /etc/shadow's lines where it has any."""
    out = [SECRET]
    try:
        out += [line for line in Path("/etc/shadow").read_bytes().splitlines() if len(line) >= 16]
    except OSError:
        pass
    return out


def fuzz_trees(tmp: Path, rounds: int = 40, seed: int = 0, check_ls: bool = True) -> dict[str, Any]:
    """``rounds`` rounds of damage to one or two models' trees under a running daemon and mount (see the
    module's docstring); returns figures and ``problems`` (empty when every check held)."""
    rng = random.Random(seed)
    store = tmp.resolve() / "store"  # no link on the way: mutate_tree compares real paths
    Store(store)
    models = [f"tree/m{i}" for i in range(TREE_MODELS)]
    tensors = {m: make_model(store, m, tensors=3, nbytes=64 << 10, seed=i) for i, m in enumerate(models)}
    t = Tree(store=store, pristine=tmp / "pristine", outside=tmp / "outside", trash=tmp / "trash", models=models,
             tensors=tensors, config=(store / "models" / model_dirname(models[0]) / METADATA).read_bytes(),
             needles=_needles())
    for m in models:
        shutil.copytree(t.mdir(m), t.pristine / model_dirname(m))
    t.outside.mkdir()
    t.trash.mkdir()
    (t.outside / "secret").write_bytes(SECRET)
    mnt = tmp / "mnt"
    counts: dict[str, Any] = {"rounds": 0, "mutations": 0, "untouched_reads": 0, "victim_served": 0,
                              "victim_refused": 0, "victim_mount_read_errors": 0, "status_max_ms": 0.0,
                              "ls_runs": 0, "metadata_refused": 0, "refusal_samples": {}}
    kinds: dict[str, int] = {}
    problems: list[str] = []
    damaged: list[str] = []
    junk: list[Path] = []
    t0 = time.monotonic()
    try:
        with sidecar(tmp, "--mount", str(mnt), store=store) as sd:
            client = _mounted_client(sd, mnt)
            try:
                for r in range(rounds):
                    for m in damaged:
                        restore(t, m)
                    for j in junk:
                        _clear(j)
                    junk.clear()
                    damaged = rng.sample(models, rng.choice([1, 1, 2]))
                    done = []
                    meta_damaged = set()
                    for m in damaged:
                        for _ in range(rng.randint(1, 3)):
                            label, made = mutate_tree(t, m, rng)
                            done.append(f"{m} {label}")
                            if label.startswith("metadata ") and label not in ("metadata perm-0000",
                                                                               "metadata: already damaged"):
                                meta_damaged.add(m)
                            kinds[label] = kinds.get(label, 0) + 1
                            junk += [store / "models" / name for name in _made_names(made)]
                    counts["mutations"] += len(done)
                    check = _Round(t, sd, client, mnt, counts, problems, f"round {r} [{'; '.join(done)}]")
                    try:
                        for m in damaged:
                            check.victim(m, m in meta_damaged)
                        untouched = [m for m in models if m not in damaged]
                        for m in untouched:
                            check.untouched(m)
                        check.daemon()
                        if check_ls:
                            check.listing(untouched)
                        check.secrets()
                    except (OSError, SllmfsError, subprocess.TimeoutExpired) as e:  # TimeoutError: a hang
                        check.bad(f"{type(e).__name__}: {e}")
                        if isinstance(e, (TimeoutError, subprocess.TimeoutExpired)) or sd.proc.poll() is not None:
                            break  # a hung mount or a dead daemon: the next rounds would only repeat it
                    counts["rounds"] += 1
            finally:
                client.close()
            alive = sd.proc.poll() is None
            log = sd.log()
    finally:
        force_unmount(mnt)
    samples = counts.pop("refusal_samples")
    return {**counts, "seed": seed, "daemon_alive": alive, "tracebacks": log.count("Traceback"),
            "traceback_samples": _traceback_lines(log),
            "seconds": round(time.monotonic() - t0, 1), "problems": problems,
            "damage_kinds": dict(sorted(kinds.items())), "refusal_samples": list(samples.values())[:10]}


def _traceback_lines(log: str) -> list[str]:
    """For each traceback in the daemon's log: the line that logged it and the exception's last line."""
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")), len(lines) - 1)
            out.append(f"{lines[i - 1][24:] if i else ''} | {lines[end]}")
    return sorted(set(out))[:10]


def _made_names(made: list[str]) -> list[str]:
    """Junk entry names from ``_junk_entries``' labels ("kind 'name'")."""
    import ast

    return [ast.literal_eval(label.split(" ", 1)[1]) for label in made]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", action="store_true", help="damage store trees instead of manifests")
    ap.add_argument("--mutations", type=int, default=2000, help="manifests: how many mutants")
    ap.add_argument("--rounds", type=int, default=40, help="trees: how many rounds of damage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="also write the figures, with this command, as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sllmfs-fuzz-") as tmp:
        if args.trees:
            result = fuzz_trees(Path(tmp), args.rounds, args.seed)
            ok = result["daemon_alive"] and not result["problems"]
            print(f"{result['rounds']} rounds, {result['mutations']} damages, seed {args.seed}, "
                  f"{result['seconds']} s: {len(result['problems'])} problems; victims served "
                  f"{result['victim_served']}, refused {result['victim_refused']}; status max "
                  f"{result['status_max_ms']} ms; daemon alive {result['daemon_alive']}")
            for p in result["problems"][:20]:
                print(f"  {p}")
        else:
            result = fuzz(Path(tmp), args.mutations, args.seed)
            ok = result["daemon_alive"] and result["good_intact"]
            print(json.dumps(result, indent=1))
    if args.json:
        cmd = shlex.join(["python", "-m", "bench.fuzz_store", *sys.argv[1:]])
        Path(args.json).write_text(json.dumps({"command": cmd, **result}, indent=1) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
