"""Keep only one GPU architecture's device code in a CUDA shared library (for packing vLLM).

A CUDA extension carries its kernels in the ELF section ``.nv_fatbin``: one fatbin per
translation unit, each a header and entries (a cubin for one SM architecture, or PTX). The CUDA
driver loads, for a device of architecture ``sm_XY``, a cubin of major ``X`` and minor ``<= Y``,
else the newest PTX at or below ``XY`` (compiled at load time). This rewrites each fatbin with
exactly the entries that device could load (cubins of its major, and PTX where a fatbin has no
such cubin; a fatbin it can load nothing from keeps its smallest entry), moved to the front, its
size field shortened; the bytes left behind are zeroed, so they cost nothing once compressed.
Offsets of everything else in the file are unchanged: the library links and loads as before, with
fewer architectures, as if built for that GPU only.

    python bench/prune_fatbin.py 90 vllm/_C_stable_libtorch.abi3.so   # H100/H200 (sm_90, sm_90a)

Prints what it kept; refuses (exit 1, file untouched) a layout it does not recognise.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries after it
ENTRY = struct.Struct("<HHIQ")  # kind, unknown, entry header size, payload size
ARCH_OFFSET = 28  # u32 SM architecture (e.g. 90) inside an entry header
PTX, CUBIN = 1, 2


@dataclass(frozen=True)
class Entry:
    kind: int
    arch: int
    start: int  # offset in the file of its header
    length: int  # header + payload


def section(data: bytes, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian section."""
    if data[:6] != b"\x7fELF\x02\x01":
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    strings = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        start = strings + h[0]
        if data[start:data.index(b"\0", start)].decode() == name:
            return h[4], h[5]
    raise ValueError(f"no {name} section")


def fatbins(data: bytes, start: int, end: int) -> list[tuple[int, list[Entry]]]:
    """Each fatbin in ``data[start:end]``: (its offset, its entries)."""
    out = []
    pos = start
    while pos < end:
        magic, _, hsize, size = HEADER.unpack_from(data, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between fatbins
            if any(data[pos:pos + 8]):
                raise ValueError(f"unexpected bytes at {pos:#x} in .nv_fatbin")
            pos += 8
            continue
        entries, e, stop = [], pos + hsize, pos + hsize + size
        while e < stop:
            kind, _, ehs, payload = ENTRY.unpack_from(data, e)
            (arch,) = struct.unpack_from("<I", data, e + ARCH_OFFSET)
            if kind not in (PTX, CUBIN) or ehs < ARCH_OFFSET + 4:
                raise ValueError(f"unknown fatbin entry kind {kind} at {e:#x}")
            entries.append(Entry(kind, arch, e, ehs + payload))
            e += ehs + payload
        if e != stop:
            raise ValueError(f"fatbin at {pos:#x} overruns its size")
        out.append((pos, entries))
        pos = stop
    return out


def loadable(entries: list[Entry], sm: int) -> list[Entry]:
    """What a device of architecture ``sm`` could load from one fatbin."""
    cubins = [e for e in entries if e.kind == CUBIN and e.arch // 10 == sm // 10 and e.arch <= sm]
    if cubins:
        return cubins
    ptx = [e for e in entries if e.kind == PTX and e.arch <= sm]
    newest = max((e.arch for e in ptx), default=None)
    return [e for e in ptx if e.arch == newest]


def kept(entries: list[Entry], sm: int) -> list[Entry]:
    """The entries to keep: what ``sm`` loads; where it loads none (kernels built for other GPUs
    only), the smallest entry, so no fatbin is left empty (the runtime sees one it cannot use on
    this GPU, as before)."""
    if not entries:
        return []
    return loadable(entries, sm) or [min(entries, key=lambda e: e.length)]


def prune(path: Path, sm: int) -> tuple[int, int]:
    """Rewrite ``path`` in place; (bytes of device code kept, bytes zeroed)."""
    data = bytearray(path.read_bytes())
    start, size = section(bytes(data), ".nv_fatbin")
    total = dropped = 0
    for pos, entries in fatbins(bytes(data), start, start + size):
        keep = kept(entries, sm)
        hsize = HEADER.unpack_from(data, pos)[2]
        body = b"".join(bytes(data[e.start:e.start + e.length]) for e in keep)
        old = sum(e.length for e in entries)
        if any(e.length % 8 for e in keep):
            raise ValueError(f"fatbin at {pos:#x}: an entry of odd length; refusing to move it")
        first = pos + hsize
        data[first:first + old] = body + bytes(old - len(body))
        struct.pack_into("<Q", data, pos + 8, len(body))
        total += len(body)
        dropped += old - len(body)
    path.write_bytes(data)
    return total, dropped


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: prune_fatbin.py SM LIBRARY...  (SM e.g. 90 for H100/H200)", file=sys.stderr)
        return 2
    sm = int(argv[0])
    for name in argv[1:]:
        try:
            kept, dropped = prune(Path(name), sm)
        except (OSError, ValueError) as e:
            print(f"prune_fatbin: {name}: {e}; left as it was", file=sys.stderr)
            return 1
        print(f"prune_fatbin: {name}: kept {kept / 2**20:.1f} MiB of sm_{sm} device code, "
              f"zeroed {dropped / 2**20:.1f} MiB of other architectures")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
