"""Backings made ahead: the first passthrough open of one file of a resident, sharded variant makes
the other files' backings before their opens (a loader reads the shards one after another), so
their first opens find them made. Real mounts, the server in a child (test_passthrough.py's)."""

from __future__ import annotations

import time
from pathlib import Path

from safetensors import safe_open

from tests.fuse.test_passthrough import Child, pytestmark, served  # noqa: F401  (the fixture and skip)
from tests.support.synth import raw


def _shards(mnt: Path) -> list[Path]:
    shards = sorted((mnt / "org" / "tiny").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3, shards
    return shards


def _until(child: Child, what: str, done: object) -> tuple[int, int, int]:
    deadline = time.monotonic() + 20
    while not done(stats := child.stats()):  # type: ignore[operator]
        assert time.monotonic() < deadline, (what, stats)
        time.sleep(0.05)
    return stats


def test_the_first_open_makes_the_other_shards_backings_before_their_opens(served, llama_dir: Path) -> None:  # noqa: F811
    store, mnt, flag, children = served
    child = Child(store.root, mnt, "org/tiny", flag, "ahead-sharded")
    children.append(child)
    shards = _shards(mnt)
    assert child.stats()[1] == 0  # listing the folder makes nothing
    shards[0].read_bytes()
    reads, built, _ = _until(child, "every shard's backing made", lambda s: s[1] >= len(shards))
    assert (reads, built) == (0, len(shards))
    got = {}
    for path in shards:  # each first open finds its backing: no copy more, no read reaches the daemon
        with safe_open(path, "pt") as sf:
            got.update({k: raw(sf.get_tensor(k)) for k in sf.keys()})
    assert child.stats()[:2] == (0, len(shards))
    with safe_open(llama_dir / "model.safetensors", "pt") as want:
        assert sorted(got) == sorted(want.keys())
        for k in want.keys():
            assert got[k] == raw(want.get_tensor(k)), k
    assert child.stop()[0] == 0


def test_a_shard_read_alone_stops_the_others_being_made_ahead(served) -> None:  # noqa: F811
    """Backings made ahead that nobody opened expire (LINGER, 0.5 s here) and are not made ahead again
    (UNWANTED_FOR): a reader of one shard costs no copy of the rest each time. Opens still pass through."""
    store, mnt, flag, children = served
    child = Child(store.root, mnt, "org/tiny", flag, "expiring-sharded")
    children.append(child)
    shards = _shards(mnt)
    n = len(shards)
    shards[0].read_bytes()
    _until(child, "made ahead", lambda s: s[1] >= n)
    _until(child, "all expired unopened", lambda s: s[2] >= n)
    shards[0].read_bytes()  # its own backing again (it lingered out too), none of the others
    _until(child, "shard 1 made again, lingered out", lambda s: s[2] >= n + 1)
    assert child.stats()[:2] == (0, n + 1)
    shards[1].read_bytes()  # its own first open makes it as before, and shard 1 (opened before) ahead again
    _until(child, "shard 2 made, shard 1 ahead", lambda s: s[1] >= n + 3)
    time.sleep(0.5)
    assert child.stats()[:2] == (0, n + 3)  # the three never opened: still not made ahead


def test_a_variant_not_resident_makes_nothing_ahead(served) -> None:  # noqa: F811
    store, mnt, flag, children = served
    flag.unlink()
    child = Child(store.root, mnt, "org/tiny", flag, "ahead-sharded")
    children.append(child)
    shards = _shards(mnt)
    shards[0].read_bytes()
    time.sleep(0.5)
    reads, built, _ = child.stats()
    assert built == 0 and reads > 0  # through the daemon, nothing copied
