"""A reader that reads a file the way InstantTensor's URING backend does: io_uring READs of fixed-size
chunks, many in flight, optionally O_DIRECT, from one submitting thread. Raw syscalls through ctypes
(no liburing, no fio: the GPU machines have neither), shared by tests/fuse/test_mount_direct.py and
bench/bench_mount_direct.py.

``punt=True`` sets IOSQE_ASYNC on every read: the kernel hands each one to an io-wq worker instead of
first trying it in the submitting thread. That is the switch that shows where a read is executed: a
file io_uring believes can be read without blocking (FMODE_NOWAIT, or pollable and readable, as every
FUSE file is) is read inline by the submitter, one read at a time, whatever the queue depth.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

_SYS_SETUP, _SYS_ENTER = 425, 426  # x86_64 and aarch64 alike (the generic table)
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1 << 0
_ENTER_GETEVENTS = 1 << 0
_OP_READ = 22
_SQE_ASYNC = 1 << 4
_SQE = struct.Struct("<BBHiQQIIQ24x")  # opcode flags ioprio fd off addr len rw_flags user_data; 64 bytes
_CQE = struct.Struct("<QiI")  # user_data res flags; 16 bytes
# io_uring_params: sq_entries cq_entries flags sq_thread_cpu sq_thread_idle features wq_fd resv[3],
# then io_sqring_offsets and io_cqring_offsets (7 u32 + resv u32 + user_addr u64 each)
_PARAMS = struct.Struct("<10I" + "8IQ" + "8IQ")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass
class Result:
    nbytes: int
    seconds: float
    submitter_cpu_s: float  # CPU the submitting thread spent (inline reads land here)
    process_cpu_s: float  # the whole process, io-wq workers included (they are its threads)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9

    @property
    def inline_share(self) -> float:
        """How much of the reading CPU the submitting thread did itself: ~1 inline, ~0 punted to io-wq."""
        return self.submitter_cpu_s / self.process_cpu_s if self.process_cpu_s > 0 else 0.0


def _syscall(*args: int) -> int:
    while True:
        r = _libc.syscall(*[ctypes.c_long(a) for a in args])
        if r >= 0:
            return int(r)
        e = ctypes.get_errno()
        if e != errno.EINTR:
            raise OSError(e, os.strerror(e))


def available() -> bool:
    """Whether this process may make a ring (seccomp or kernel.io_uring_disabled may refuse it)."""
    try:
        Ring(2).close()
    except OSError:
        return False
    return True


class Ring:
    def __init__(self, entries: int):
        params = bytearray(_PARAMS.size)
        buf = (ctypes.c_char * len(params)).from_buffer(params)
        self.fd = _syscall(_SYS_SETUP, entries, ctypes.addressof(buf))
        p = _PARAMS.unpack_from(params)
        self.sq_entries, self.cq_entries, features = p[0], p[1], p[5]
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _, _, cqes = p[19:25]
        if not features & _FEAT_SINGLE_MMAP:
            os.close(self.fd)
            raise OSError(0, "io_uring without IORING_FEAT_SINGLE_MMAP (Linux < 5.4)")
        size = max(sq_array + self.sq_entries * 4, cqes + self.cq_entries * _CQE.size)
        try:
            self.ring = mmap.mmap(self.fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQ_RING)
            try:
                self.sqes = mmap.mmap(self.fd, self.sq_entries * _SQE.size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                      mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQES)
            except OSError:
                self.ring.close()
                raise
        except OSError:
            os.close(self.fd)
            raise
        self._sq = (sq_head, sq_tail, sq_mask, sq_array)
        self._cq = (cq_head, cq_tail, cq_mask, cqes)

    def _u32(self, off: int) -> int:
        return int(struct.unpack_from("<I", self.ring, off)[0])

    def _set_u32(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.ring, off, value & 0xFFFFFFFF)

    def queue_read(self, fd: int, offset: int, addr: int, length: int, tag: int, *, punt: bool) -> None:
        _, tail_off, mask_off, array_off = self._sq
        tail, mask = self._u32(tail_off), self._u32(mask_off)
        slot = tail & mask
        _SQE.pack_into(self.sqes, slot * _SQE.size, _OP_READ, _SQE_ASYNC if punt else 0, 0, fd, offset, addr,
                       length, 0, tag)
        self._set_u32(array_off + slot * 4, slot)
        self._set_u32(tail_off, tail + 1)  # x86 (TSO): the stores above are visible first

    def submit_and_wait(self, to_submit: int, wait: int) -> None:
        took = _syscall(_SYS_ENTER, self.fd, to_submit, wait, _ENTER_GETEVENTS, 0, 0)
        while took < to_submit:  # the kernel may take fewer than asked: the rest stay queued, submit them
            more = _syscall(_SYS_ENTER, self.fd, to_submit - took, 0, 0, 0, 0)
            if not more:
                raise OSError(0, f"io_uring took {took} of {to_submit} reads and no more")
            took += more

    def completions(self) -> list[tuple[int, int]]:
        head_off, tail_off, mask_off, cqes = self._cq
        head, tail, mask = self._u32(head_off), self._u32(tail_off), self._u32(mask_off)
        out = []
        while head != tail:
            tag, res, _ = _CQE.unpack_from(self.ring, cqes + (head & mask) * _CQE.size)
            out.append((tag, res))
            head = (head + 1) & 0xFFFFFFFF
        self._set_u32(head_off, head)
        return out

    def close(self) -> None:
        self.sqes.close()
        self.ring.close()
        os.close(self.fd)


def read_file(path: str, *, chunk: int = 8 << 20, depth: int = 64, direct: bool = True, punt: bool = False,
              check: Callable[[int, memoryview], None] | None = None) -> Result:
    """Read ``path`` whole, ``depth`` chunks in flight, each into its own page-aligned buffer (what
    O_DIRECT needs); ``check(offset, data)`` sees every chunk (tests compare bytes; the bench passes
    none: the reads are the figure)."""
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        ring = Ring(depth)
    except OSError:
        os.close(fd)
        raise
    depth = min(depth, ring.sq_entries)
    try:
        buffers = mmap.mmap(-1, depth * chunk, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    except OSError:
        ring.close()
        os.close(fd)
        raise
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffers))
    view = memoryview(buffers)
    inflight: dict[int, int] = {}  # buffer -> file offset
    try:
        free = list(range(depth))
        offset = done = 0
        t0, self0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_THREAD)
        proc0 = resource.getrusage(resource.RUSAGE_SELF)
        while done < size:
            queued = 0
            while free and offset < size:
                slot = free.pop()
                ring.queue_read(fd, offset, base + slot * chunk, chunk, slot, punt=punt)
                inflight[slot] = offset
                offset += chunk
                queued += 1
            ring.submit_and_wait(queued, 1)
            for slot, res in ring.completions():
                at = inflight.pop(slot)
                want = min(chunk, size - at)
                if res < 0:
                    raise OSError(-res, f"io_uring read of {path} at {at}: {os.strerror(-res)}")
                if res != want:  # a regular file in memory: a short read is a bug, not a retry
                    raise OSError(0, f"io_uring read of {path} at {at}: {res} bytes, wanted {want}")
                if check is not None:
                    check(at, view[slot * chunk:slot * chunk + res])
                done += res
                free.append(slot)
        seconds = time.perf_counter() - t0
        self1, proc1 = resource.getrusage(resource.RUSAGE_THREAD), resource.getrusage(resource.RUSAGE_SELF)
    finally:
        view.release()
        del base
        ring.close()
        os.close(fd)
        if not inflight:  # an error left reads in flight: the kernel may still land them, so their buffers
            try:  # stay mapped (leaked until the process ends) rather than under memory reused meanwhile
                buffers.close()
            except BufferError:
                pass
    cpu = lambda r0, r1: (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)  # noqa: E731
    return Result(size, seconds, cpu(self0, self1), cpu(proc0, proc1))
