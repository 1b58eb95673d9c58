"""Residency: which variants are in the memory tier, the fills that bring them there, the
refusals of damaged ones, the disk budget, and pinning them for GPU copies.

Only the trio thread changes this state; fill and copy work runs in worker threads.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from sllmfs.core import names
from sllmfs.core.config import Settings
from sllmfs.core.errors import BadInput, Corrupt, NotFound, Pulling, SllmfsError
from sllmfs.origin import url as origin_url
from sllmfs.origin.client import connect as origin_client
from sllmfs.origin.fetch import ensure_local, origin_holds, origin_kind
from sllmfs.origin.kernels import SyncState, node_facts
from sllmfs.origin.pull import PullPlan, RangeSink
from sllmfs.protocol.messages import FailCause, Readiness
from sllmfs.sidecar import disktier, prefault
from sllmfs.sidecar.fill import Fill, refusal
from sllmfs.sidecar.gpucopy import GpuCopier
from sllmfs.sidecar.gpufirst import HOLD_LIMIT_S, HeldFills
from sllmfs.sidecar.memtier import MemoryTier, Resident
from sllmfs.sidecar.pullfeed import PullFeed
from sllmfs.sidecar.registry import Registry
from sllmfs.store.format import Manifest, load_manifest, open_dir
from sllmfs.store.store import Identity, Store, variant_identity

log = logging.getLogger("sllmfs.sidecar")

STORE_WATCH_S = 1.0  # how often resident copies are checked against the store (one stat each)
DISK_LOOP_S = 30.0  # how often the disk budget is enforced
ORIGIN_MISS_S = 30.0  # how long a name the origin lacked is not asked about again
# with --copy-direct, a GPU-first copy reads O_DIRECT when the page cache holds less than this share of
# the files: O_DIRECT reads every byte from disk (at ~1.4x the buffered rate if it does as well as
# fastsafetensors' reads, NOTES-cold run 19), so past ~30% cached the buffered split is the sooner one
COPY_DIRECT_BELOW = 0.25


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    fills: int = 0
    bytes_filled: int = 0
    client_errors: int = 0
    connections_refused: int = 0  # over MAX_CONNECTIONS or MAX_PER_PEER


@dataclass
class _Pull:
    started: float
    variant: str = names.HF_VARIANT  # what the first asker wants: streamed into the tier as it downloads
    feed: PullFeed | None = None
    off_element_ok: bool = True  # the first asker reads tensors off their element size (else: stored only)
    done: bool = False
    finished: float = 0.0
    bytes: int = 0
    error: SllmfsError | None = None

    def add(self, n: int) -> None:  # the pull's progress callback (worker threads; an int add is atomic enough)
        self.bytes += n


class Cache:
    def __init__(self, settings: Settings, store: Store, tier: MemoryTier, registry: Registry):
        self.settings = settings
        self.store = store
        self.tier = tier
        self.registry = registry
        self.counters = Counters()
        self.mount_in_use: Counter[str] = Counter()  # models read through the mount now (the FUSE view counts)
        self.refused: dict[tuple[str, str], tuple[Identity, str]] = {}
        self.fills: set[Fill] = set()
        self.gpu = GpuCopier(stage_threads=settings.num_thread, read_depth=settings.copy_read_depth,
                             read_overlap=settings.copy_read_overlap)
        self.held = HeldFills(self._start_held)  # fills waiting for their GPU-first copy
        self.origin = origin_url.parse(settings.origin, settings.origin_endpoint or None) if settings.origin else None
        self._origin_copy: dict[str, tuple[float, bool]] = {}  # model -> (checked at, held): status asks often
        self._origin_misses: dict[str, float] = {}  # names the origin lacked -> when (the mount's lookups)
        self._pulls: dict[str, _Pull] = {}  # models coming from the origin for acquires (one pull each)
        self.kernel_sync: SyncState | None = None  # kernel caches through the origin (origin/kernels.py)
        if self.origin is not None and settings.origin_kernels:
            self.kernel_sync = SyncState(node=node_facts())
        self._nursery: trio.Nursery | None = None
        self._blanking = False  # a blank pass runs (one at a time)
        self._blank_again = False  # memory was freed meanwhile: one more pass after it

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The background loops (disk budget, store watch); fills and pins start in this nursery too."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._disk_loop)
                if self.origin is not None:
                    nursery.start_soon(self._origin_loop)
                    if self.kernel_sync is not None:
                        nursery.start_soon(self._kernels_loop)
                nursery.start_soon(self._watch_store)
                if self.settings.prefault:  # memory given back becomes blanks again once no fill runs
                    self.tier.on_freed = self.reblank
                task_status.started()
        finally:
            self._nursery = None  # a lease ending at shutdown starts no blank pass in a closed nursery

    def start_soon(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None, "Cache.run has not started"
        self._nursery.start_soon(fn, *args)

    def reblank(self) -> None:
        """The trio thread, after memory was given back or a fill ended: a blank pass, in the background."""
        if self._nursery is not None and self.settings.prefault:
            self._nursery.start_soon(self.blank_pass)

    async def blank_pass(self) -> None:
        """Fault in blanks while the budget has room and no fill runs (prefault.py): at start, and after
        an eviction or a fill; one pass at a time (a request meanwhile runs one more after it). On a GPU
        node each blank is pinned as it is made (once warm_gpus set the hook)."""
        if self._blanking:
            self._blank_again = True
            return
        self._blanking = True
        tier = self.tier

        def room() -> int:  # read on the trio thread (it owns the tier), before each blank
            try:
                return trio.from_thread.run_sync(tier.blank_room)
            except (trio.RunFinishedError, trio.Cancelled):  # stopping: no more blanks
                return 0

        try:
            while True:
                self._blank_again = False
                await trio.to_thread.run_sync(prefault.run, tier.blanks, tier.budget, self.settings.num_thread, room,
                                              abandon_on_cancel=True)
                if not self._blank_again:
                    break
        except Exception as e:  # blanks only speed fills up: a pass that fails (EMFILE, a pin) never stops the daemon
            log.error("making blank segments failed (%s); fills write into fresh memory until a later pass", e)
        finally:
            self._blanking = False

    def stop_fills(self) -> None:
        for f in self.fills:
            f.stop = True
        for f in self.held.drain():  # never started: their residents fail as a stopped fill's do
            f.close()
            self._finish(f.res, None, True, 0.0)

    # -- residency -----------------------------------------------------------

    def identity(self, model: str, variant: str) -> Identity | None:
        return self.store.identity(model, variant)

    async def resident(self, model: str, variant: str, *, gpu_first: bool = False,
                       off_element_ok: bool = True) -> Resident:
        """The resident copy of a variant: a hit, or a new fill started from the store (a miss).
        ``gpu_first``: the caller will ask for a GPU copy next; a miss's fill waits for it (gpufirst.py).
        ``off_element_ok``: the caller reads tensors stored off their element size; if not, such a variant
        is refused before any fill starts (an old client, HELLO_OFF_ELEMENT)."""
        if self.settings.registration_required and model not in self.registry:
            raise NotFound(f"model {model!r} is not registered; this sidecar runs with --registration-required")
        res = self.tier.get(model, variant)
        again = partial(self.resident, model, variant, gpu_first=gpu_first, off_element_ok=off_element_ok)
        if res is not None and res.source == "origin" and res.state == "filling":
            _check_off_element(model, variant, res.manifest, off_element_ok)
            self.counters.hits += 1  # coming from the origin now: the lease follows the download
            return res
        ident = self.identity(model, variant)  # one stat: notices `sllmfs save --force` and `rm`
        if res is not None and res.identity == ident and res.error:  # its fill is failing right now
            raise Corrupt(refusal(res.model, res.variant, res.error))
        if res is not None and res.identity == ident and res.state != "failed":
            _check_off_element(model, variant, res.manifest, off_element_ok)
            self.counters.hits += 1
            return res
        if res is not None:
            self.tier.drop(res, why="store changed" if res.identity != ident else "failed")
        if ident is None and self.origin is not None and not self.store.has(model):
            self._pull(model, variant, off_element_ok)  # a miss on disk too: Pulling until it streams into memory
            ident = self.identity(model, variant)
        if ident is None:
            info = await trio.to_thread.run_sync(self.store.get, model)  # raises NotFound naming the model
            raise NotFound(f"model {model!r} has no variant {variant!r} (has: {', '.join(info.variants) or 'none'})")
        refused = self.refused.get((model, variant))
        if refused and refused[0] == ident:
            raise Corrupt(refused[1])
        await trio.to_thread.run_sync(self.store.get, model)  # a damaged model is refused as every reader does
        variant_dir = self.store.variant_path(model, variant)
        try:  # one version throughout: identity, manifest and data files through one directory fd,
            # opened without following a link at any step below models/
            dir_fd = open_dir(variant_dir, below=self.store.models_dir)
        except FileNotFoundError:
            return await again()  # replaced or removed: again
        except OSError as e:
            raise Corrupt(f"model {model!r} [{variant}]: cannot open {variant_dir} ({e.strerror}); "
                          f"run `sllmfs verify --model {model}`") from None
        try:
            pinned = Path(f"/proc/self/fd/{dir_fd}")
            ident = variant_identity(pinned)
            if ident is None:
                return await again()
            manifest = await trio.to_thread.run_sync(load_manifest, pinned)
            _check_off_element(model, variant, manifest, off_element_ok)
            if self.tier.get(model, variant) is not None:  # another task filled it while we read
                return await again()
            self.counters.misses += 1
            res = self.tier.reserve(model, variant, manifest, ident)
            try:
                fill = Fill(res, pinned, self.settings.chunk_size, direct=self.settings.fill_direct,
                            read_size=self.settings.fill_read_size)
            except SllmfsError:
                res.state = "failed"
                self.tier.drop(res, why="fill failed")
                raise
            # GPU first from the page cache and from disk alike (NOTES-cold runs 16-18); not past the page
            # cache, and only where the native xxh3 is bound and agrees with python xxhash (the copy checks)
            copy_first = gpu_first and self.gpu.active and not self.settings.fill_direct and fill.hashed is not None
            share = fill.cached_share() if copy_first else 1.0
            if copy_first and self.settings.copy_direct and share < COPY_DIRECT_BELOW:
                fill.open_copy_direct()  # while the pinned directory is open
        finally:
            os.close(dir_fd)
        if copy_first:
            log.info("gpu first model=%s variant=%s page_cache_share=%.2f: copy from the files (%s), fill after",
                     model, variant, share, "O_DIRECT" if fill.copy_direct else "through the page cache")
            self.held.hold(fill)
            self.start_soon(self._hold_limit, res)
        else:
            self.start_soon(self._fill, fill)
        return res

    def _start_held(self, fill: Fill, why: str) -> None:
        if self._nursery is None:  # the sidecar stopped while a copy read the files: end as a stopped fill
            fill.close()
            self._finish(fill.res, None, True, 0.0)
            return
        self.start_soon(self._fill, fill)

    async def _hold_limit(self, res: Resident) -> None:
        await trio.sleep(HOLD_LIMIT_S)
        self.held.release(res, f"no GPU copy asked within {HOLD_LIMIT_S:g} s")

    async def _fill(self, fill: Fill) -> None:
        res = fill.res
        self.fills.add(fill)
        t0 = time.perf_counter()
        res.timeline.fill_start = time.monotonic()
        log.info("fill started model=%s variant=%s bytes=%d threads=%d", res.model, res.variant, fill.total,
                 self.settings.num_thread)
        try:
            # the fill's own threads: on trio's shared limiter (40), a few fills at once (the mount starts
            # them too) would starve every other to_thread call (store reads, manifests) until one ends
            threads = max(1, self.settings.num_thread)
            own = trio.CapacityLimiter(threads)
            async with trio.open_nursery() as n:
                for _ in range(threads):
                    n.start_soon(partial(trio.to_thread.run_sync, fill.worker, limiter=own))
        except Exception as e:  # a bug fails this fill, never the daemon
            log.exception("fill crashed model=%s variant=%s", res.model, res.variant)
            fill.error = fill.error or f"internal error: {type(e).__name__}"
        finally:
            fill.close()
            self.fills.discard(fill)
        tl = res.timeline
        tl.fill_end = time.monotonic()
        self._finish(res, fill.error, fill.stop, time.perf_counter() - t0, adopted=fill.adopted,
                     detail=f" from_page_cache={fill.cached_bytes} handovers={fill.handovers}"
                            f" from_the_gpu_copy={fill.adopted} read={fill.read_bytes}"
                            f" native_reads={fill.hashed is not None} direct_native={fill.hashed_direct is not None}"
                            f" blanks={tl.from_blanks}/{tl.partitions} alloc_s={tl.alloc_s:.3f}"
                            f" first_ready_s={max(0.0, tl.first_ready - tl.fill_start):.3f}"
                            f" acquire_to_end_s={tl.fill_end - tl.reserved:.3f}")

    def _finish(self, res: Resident, error: str | None, stopped: bool, seconds: float,
                cause: FailCause = FailCause.INTERNAL, detail: str = "", adopted: int = 0) -> None:
        """A fill or a streamed pull ended: ready (and pinned for GPU copies), or failed and refused.
        ``cause``: a pull's (a fill's own threads recorded theirs as they failed); ``adopted``: bytes a
        GPU-first copy wrote in (not the fill's: left out of its rate)."""
        self.counters.bytes_filled += res.filled
        if error or stopped:
            res.state = "failed"
            if error and res.identity is not None:
                res.fail(cause, refusal(res.model, res.variant, error))  # a crash: the fill recorded nothing
            elif error:
                res.fail(cause, error)
            else:
                res.fail(FailCause.STOPPED, f"model {res.model!r} [{res.variant}]: the sidecar stopped filling it "
                                            "(shutting down); load it again once it is back")
            ready = res.ready.mm
            for i in range(res.ready.size):  # clients waiting on unread windows learn at once
                if ready[i] == Readiness.PENDING:
                    ready[i] = Readiness.FAILED
            if error and res.identity is not None:
                self.refused[(res.model, res.variant)] = (res.identity, refusal(res.model, res.variant, error))
                log.error("fill failed model=%s variant=%s: %s; refusing the model", res.model, res.variant, error)
            elif error:
                log.error("streaming pull failed model=%s variant=%s: %s", res.model, res.variant, error)
        else:
            res.state = "ready"
            self.counters.fills += 1
            log.info("filled model=%s variant=%s bytes=%d seconds=%.3f rate=%.2fGB/s%s%s", res.model, res.variant,
                     res.filled, seconds, (res.filled - adopted) / seconds / 1e9 if seconds else 0,
                     " (streamed from the origin)" if res.source == "origin" else "", detail)
            if self.gpu.active and not res.gpu_pinned and self._nursery is not None:
                self._nursery.start_soon(self._pin, res)
        if res.state == "failed" and not res.retired:
            self.tier.drop(res, why="fill failed")
        self.tier.settle(res)
        self.reblank()  # the hugetlb pool is the fills' no more: what the budget has left may become blanks

    async def refresh(self) -> tuple[list[dict[str, str]], list[str]]:
        """Re-read the store: drop resident copies it replaced, forget refusals, enforce the disk budget.
        Returns (dropped variants, models removed from disk)."""
        dropped = []
        for (model, variant), res in list(self.tier.entries.items()):
            if res.state == "filling":  # checked when its fill or pull ends
                continue
            ident = await trio.to_thread.run_sync(self.identity, model, variant)
            if ident != res.identity and self.tier.entries.get((model, variant)) is res:  # not dropped meanwhile
                self.tier.drop(res, why="store changed")
                dropped.append({"model": model, "variant": variant})
        self.refused.clear()
        return dropped, await self.enforce_disk()

    # -- GPU copies ----------------------------------------------------------

    async def warm_gpus(self) -> None:
        """Start the GPU copy engines now (the daemon calls this once it is up), then pin what was
        filled before they existed."""
        try:
            await trio.to_thread.run_sync(self.gpu.warm_up)
            if self.gpu.active:  # blanks pinned now, off any load: a load into them pins nothing (NOTES-cold run 9)
                self.tier.release_pins = self.gpu.release
                self.tier.copying = self.gpu.busy
                t0 = time.perf_counter()
                n = await trio.to_thread.run_sync(self.tier.blanks.pin_all, self.gpu.pin_blank)
                if n:
                    log.info("pinned %d blank segments for GPU copies in %.2f s (blanks made later are pinned "
                             "as they are made)", n, time.perf_counter() - t0)
            for res in list(self.tier.entries.values()):
                if self.gpu.active and res.state == "ready" and not res.gpu_pinned and not res.retired:
                    await self._pin(res)
        except Exception:  # never the daemon: loads start their engines themselves
            log.exception("GPU warm-up failed")

    async def _pin(self, res: Resident) -> None:
        t0 = time.monotonic()
        try:
            await trio.to_thread.run_sync(self.gpu.pin, res)
            res.timeline.pin_s = time.monotonic() - t0
        except Exception:  # a bug costs the pin (the first copy pins instead), never the daemon
            log.exception("pinning model=%s variant=%s failed", res.model, res.variant)
        self.reblank()  # the pages its blanks held past the partitions' ends are the pool's again

    # -- disk ----------------------------------------------------------------

    def _disk_protected(self) -> set[str]:
        """Models the disk budget must keep now: leased, pinned, filling, retired, or in the mount's use."""
        protected = {r.model for r in self.tier.entries.values() if r.busy} | set(self.mount_in_use)
        return protected | {r.model for r in self.tier.retired}

    def _in_use_now(self, model: str) -> bool:
        """From the disk budget's thread: asked on the trio thread, where leases and fills change."""
        return model in trio.from_thread.run_sync(self._disk_protected)

    async def enforce_disk(self) -> list[str]:
        evicted = self.kernel_sync.evicted if self.kernel_sync is not None else set()
        removed = await trio.to_thread.run_sync(disktier.enforce_budget, self.store, self.settings.disk_size,
                                                self._disk_protected(), self._origin_holds_now, evicted.add,
                                                self._in_use_now)
        for name in removed:
            for (m, _), res in list(self.tier.entries.items()):
                if m == name:
                    self.tier.drop(res, why="removed from disk")
        return removed

    def _origin_holds_now(self, model: str) -> bool:
        """Uncached: the disk budget asks this under the model's lock, right before deleting it."""
        return self.origin is not None and origin_holds(self.store, model, self.origin)

    def origin_holds(self, model: str) -> bool:
        """What the disk loop last learned: does the origin hold this very model? Never blocks (an
        unreachable origin must not stall `status` or metrics); unknown yet is False."""
        return self._origin_copy.get(model, (0.0, False))[1]

    def _refresh_origin_copies(self) -> None:
        """Blocking (a worker thread, once per disk loop): one GET per stored model."""
        assert self.origin is not None
        stored = {info.name for info in self.store.listing()[0]}
        client = origin_client(self.origin, 2)  # one client for the round
        for name in stored:
            self._origin_copy[name] = (time.monotonic(), origin_holds(self.store, name, self.origin, client=client))
        for gone in set(self._origin_copy) - stored:
            del self._origin_copy[gone]

    def _pull(self, model: str, variant: str = names.HF_VARIANT, off_element_ok: bool = True) -> None:
        """Bring ``model`` from the origin in the background; the caller's reply says Pulling (the
        client asks again) rather than wait out a download. Returns once it is in the store; a
        failed pull (not in the origin, damaged copy) is its error, told to everyone who asks for a while."""
        state = self._pulls.get(model)
        now = time.monotonic()
        if state is not None and state.done and (state.error is None or now - state.finished > ORIGIN_MISS_S):
            state = None  # an old failure, or a pull whose model has gone again (evicted, rm): pull anew
        if state is None:
            state = self._pulls[model] = _Pull(started=now, variant=variant, off_element_ok=off_element_ok)
            self.start_soon(self._run_pull, model, state)
        if state.error is not None:
            raise state.error
        if not state.done:
            raise Pulling(f"model {model!r} is being pulled from {self.origin} ({state.bytes / 1e9:.2f} GB so "
                          "far); ask again")

    async def _run_pull(self, model: str, state: _Pull) -> None:
        assert self.origin is not None
        origin = self.origin

        def on_plan(plan: PullPlan) -> RangeSink | None:  # a pull thread, before any large transfer
            return trio.from_thread.run_sync(self._stream_pull, model, state, plan)

        def pull() -> bool:
            if origin_kind(origin, model) != "model":
                raise NotFound(f"model {model!r} is neither in the store at {self.store.root} nor in the "
                               f"origin {origin}")
            if ensure_local(self.store, model, origin, progress=state.add, on_plan=on_plan):
                self._origin_copy[model] = (time.monotonic(), True)  # pulled: the origin holds this copy
                return True
            return False

        published = False
        try:
            published = await trio.to_thread.run_sync(pull)
        except SllmfsError as e:
            state.error = e
            log.warning("pull of model=%s from %s failed: %s", model, origin, e)
        except Exception as e:  # a bug costs this pull, never the daemon
            log.exception("pull of model=%s from %s failed", model, origin)
            state.error = SllmfsError(f"pulling model {model!r} from {origin} failed ({e}); see the sidecar's log")
        finally:
            state.done, state.finished = True, time.monotonic()
            if state.feed is not None:
                await self._end_stream(state, published)
            if state.error is None and self._pulls.get(model) is state:
                del self._pulls[model]  # only failures are remembered (for ORIGIN_MISS_S)

    def _stream_pull(self, model: str, state: _Pull, plan: PullPlan) -> RangeSink | None:
        """The trio thread, once the pull's plan is checked: reserve the wanted variant in the memory
        tier so the pull's verified ranges land there as they arrive (None: the pull only stores)."""
        manifest = plan.manifests.get(state.variant)
        if manifest is None or self.tier.get(model, state.variant) is not None:
            return None
        if manifest.off_element and not state.off_element_ok:  # its asker will be refused: no memory for it
            return None
        try:
            res = self.tier.reserve(model, state.variant, manifest, None)
        except BadInput as e:  # bigger than the pool, or the pool is busy: stored only, filled on the next ask
            log.info("pull of model=%s goes to disk only: %s", model, e)
            return None
        res.source = "origin"
        self.counters.misses += 1
        state.feed = PullFeed(res)
        log.info("pull of model=%s variant=%s streams into memory bytes=%d", model, state.variant,
                 manifest.total_bytes)
        return state.feed

    async def _end_stream(self, state: _Pull, published: bool) -> None:
        """The pull ended: its resident is ready, now known by the committed variant's identity, or failed
        (the pull failed, the feed broke, or what is committed is not what was downloaded)."""
        assert state.feed is not None
        res, feed = state.feed.res, state.feed
        if res.closed:
            return
        try:
            stored = await self._stored_version(res) if published and feed.complete else None
        except Exception:  # a bug must not leave the lease's windows pending, nor stop the cache's loops
            log.exception("checking the streamed copy of model=%s failed", res.model)
            stored = None
        if state.error is None and stored is not None and stored[1] == res.manifest:
            res.identity = stored[0]
            self._finish(res, None, False, time.monotonic() - state.started)
            return
        head = f"model {res.model!r} [{res.variant}] streaming from {self.origin}"
        if state.error is not None:
            why, cause = f"{head} failed: {state.error}", _pull_cause(state.error)
        elif feed.broken:
            why, cause = f"{head} stopped ({feed.broken}); load it again", FailCause.INTERNAL
        else:
            why, cause = (f"{head}: the store's copy is not the one that streamed in (saved or pulled meanwhile); "
                          "load it again"), FailCause.REPLACED
        self._finish(res, why, False, time.monotonic() - state.started, cause)

    async def _stored_version(self, res: Resident) -> tuple[Identity, Any] | None:
        """The committed variant's identity and manifest, read through one directory fd (one version)."""
        try:
            dir_fd = open_dir(self.store.variant_path(res.model, res.variant), below=self.store.models_dir)
        except (OSError, SllmfsError):
            return None
        try:
            pinned = Path(f"/proc/self/fd/{dir_fd}")
            ident = variant_identity(pinned)
            manifest = await trio.to_thread.run_sync(load_manifest, pinned)
        except (OSError, SllmfsError):
            return None
        finally:
            os.close(dir_fd)
        return None if ident is None else (ident, manifest)

    def on_mount_miss(self, name: str) -> str | None:
        """The mount's lookup of a name the store lacks (blocking, in a worker thread): pull a model
        the origin holds, or say it is a namespace of some. Misses are remembered for a while, so a
        tool probing many names does not send each to the origin again."""
        assert self.origin is not None
        try:
            names.check_model_name(name)
        except SllmfsError:
            return None
        seen = self._origin_misses.get(name)
        if seen is not None and time.monotonic() - seen < ORIGIN_MISS_S:
            return None
        kind = origin_kind(self.origin, name)
        if kind == "model":
            if ensure_local(self.store, name, self.origin):
                self._origin_copy[name] = (time.monotonic(), True)
        if kind is not None:
            return kind
        self._origin_misses[name] = time.monotonic()
        if len(self._origin_misses) > 10_000:  # bounded: the oldest half goes
            for k in sorted(self._origin_misses, key=self._origin_misses.__getitem__)[:5_000]:
                del self._origin_misses[k]
        return None

    async def _watch_store(self) -> None:
        """Drop resident copies whose stored variant was replaced or removed (`save --force`, `rm`),
        so their memory comes back once no lease holds them, without a manual evict."""
        while True:
            await trio.sleep(STORE_WATCH_S)
            for (model, variant), res in list(self.tier.entries.items()):
                if res.state == "filling":
                    continue
                ident = await trio.to_thread.run_sync(self.identity, model, variant)
                if ident != res.identity and self.tier.entries.get((model, variant)) is res:
                    self.tier.drop(res, why="store changed")

    async def _origin_loop(self) -> None:
        """Its own loop: a slow or unreachable origin never holds up the disk budget."""
        while True:
            try:
                await trio.to_thread.run_sync(self._refresh_origin_copies, abandon_on_cancel=True)
            except Exception as e:  # an unreachable origin: status shows what it knew
                log.warning("origin: %s", e)
            await trio.sleep(DISK_LOOP_S)

    async def _kernels_loop(self) -> None:
        """Kernel caches to and from the origin (origin/kernels.py): at start (a new node gets what the
        fleet compiled for its GPUs before its first engine starts), then every round."""
        from sllmfs.origin import kernels as origin_kernels

        assert self.origin is not None and self.kernel_sync is not None
        origin, state = self.origin, self.kernel_sync
        client = None
        while True:
            try:
                client = client or origin_client(origin, 2)
                await trio.to_thread.run_sync(origin_kernels.sync, self.store, origin, client, state,
                                              self._disk_room_for, abandon_on_cancel=True)
            except Exception as e:  # an unreachable origin, no boto3: once per new reason
                state.warn("", str(e))
            await trio.sleep(DISK_LOOP_S)

    def _disk_room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the disk budget without removing anything (a worker thread)."""
        if not self.settings.disk_size:
            return True
        sizes, _ = disktier.disk_models(self.store)
        used = sum(sizes.values()) + sum(e.size for e in disktier.kernel_entries(self.store))
        return used + nbytes <= self.settings.disk_size

    async def _disk_loop(self) -> None:
        while True:
            if self.settings.disk_size:
                try:
                    await self.enforce_disk()
                except Exception as e:  # a damaged store entry must not stop the daemon
                    log.warning("disk tier: %s", e)
            await trio.sleep(DISK_LOOP_S)


def _check_off_element(model: str, variant: str, manifest: Manifest, ok: bool) -> None:
    if manifest.off_element and not ok:
        raise BadInput(f"model {model!r} [{variant}] has tensors stored off their element size, which this "
                       "client would misread; upgrade sllmfs where the client runs (pip install -U sllmfs)")


def _pull_cause(e: SllmfsError) -> FailCause:
    """What a failed pull's error says about the origin's copy, by its type (never its text)."""
    if isinstance(e, Corrupt):
        return FailCause.DAMAGED  # an object fails its checksum, is short, or its index lies
    if isinstance(e, (BadInput, NotFound)):
        return FailCause.ORIGIN  # unreachable, credentials refused, bucket or model gone
    return FailCause.INTERNAL
