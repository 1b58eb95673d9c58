"""Engines of one process that copy out of the same mapping (one per GPU, a load over a device map).

A page-locked range is process-wide: the driver refuses (712) to register a page already in another
registration, and refuses a copy whose source spans two registrations, or a registered and an
unregistered range (cudaErrorInvalidValue). Two engines pinning the same segment block by block each
pick ranges of their own, so one engine's copy could start in the other's registration and end past
it: on the H200 pair that failed as "cudaMemcpyAsync: invalid argument". The stand-in runtime here
keeps registrations as the driver does (tests/support/cudart.py), so that copy fails here too.
"""

from __future__ import annotations

from tests.engine.test_relay import run  # the stand-in runtime's prelude and runner (fake_lib: conftest.py)

# Even tensors to GPU 0, odd ones to GPU 1, each engine pinning block by block as chunks arrive.
TWO_ENGINES = """
import sys
engines = [ce.CopyEngine(target="cuda", device=d, chunk_bytes=2 * MiB, mode="register", register_threads=3)
           for d in (0, 1)]
dst = np.empty(src.size, np.uint8)
rows = pieces_into(dst)
halves = [rows[0::2], rows[1::2]]
errors = []
def go(i):
    try:
        engines[i].copy([seg], halves[i])
    except Exception as e:
        errors.append(repr(e))
if CONCURRENT:
    ts = [threading.Thread(target=go, args=(i,)) for i in (0, 1)]
    [t.start() for t in ts]; [t.join() for t in ts]
else:
    go(0); go(1)
ok = same(dst)
again = np.empty(src.size, np.uint8)  # a second load through the same engines: every pin reused
r2 = pieces_into(again)
for i in (0, 1):
    engines[i].copy([seg], [r2[0::2], r2[1::2]][i])
ok2 = same(again)
pinned = [e.registered_bytes for e in engines]
engines[0].release(seg)  # GPU 0 is done: the pins GPU 1 still holds stay
engines[0].close()
third = np.empty(src.size, np.uint8)
r3 = pieces_into(third)
engines[1].copy([seg], r3[1::2])
ok3 = all(digest(memoryview(third[o:o + n])) == digest(memoryview(src[o:o + n]))
          for o, n in list(zip(offs, sizes))[1::2])
engines[1].release(seg)
engines[1].close()
print(json.dumps({"errors": errors, "same": ok, "same_again": ok2, "same_after_one_closed": ok3,
                  "bad_copies": fake.fake_bad_copies(), "pinned": pinned, "pins_left": fake.fake_pins()}))
"""


def test_two_engines_one_after_the_other_share_pins(fake_lib):
    out = run(fake_lib, "CONCURRENT = False\n" + TWO_ENGINES)
    assert out["errors"] == [] and out["bad_copies"] == 0
    assert out["same"] and out["same_again"] and out["same_after_one_closed"]
    assert all(p > 0 for p in out["pinned"])
    assert out["pins_left"] == 0  # the last reference unpinned every range


def test_two_engines_at_once_share_pins(fake_lib):
    for _ in range(3):  # the race needs the two engines' pins to interleave; a few rounds
        out = run(fake_lib, "CONCURRENT = True\n" + TWO_ENGINES)
        assert out["errors"] == [] and out["bad_copies"] == 0
        assert out["same"] and out["same_again"] and out["same_after_one_closed"] and out["pins_left"] == 0
