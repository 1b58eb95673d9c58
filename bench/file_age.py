"""Is it the files? (NOTES-cold, the tee's run: fastsafetensors reads the source checkpoint ~1.1x faster than
the store's files made from it, and that is all of sllmfs' gap to it in the cold pairs.)

The source file is written first, the store's three files right after it. On this virtual disk a file's place
(or its age, if the host caches what the guest wrote last) could decide its read rate. This writes a third
set, a plain copy of the source made after the store, and reads all three cold, order rotating per rep:
fastsafetensors on each, and the disk's buffered 64 MiB read (16 threads) of each.
If the copy reads like the source, the store's layout (three files) is what differs; if it reads like the
store, the order the files were written in is.

    python bench/file_age.py [--layers 32] [--reps 3] [--device cuda:0] [--out DIR]
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from gpu_first_cold import fastsafetensors_reader  # noqa: E402
from limits import cold_read_args, cold_rounds, read_files, write_result  # noqa: E402
from llama_shapes import saved_checkpoint  # noqa: E402

MODEL = "bench/file-age"


def main() -> int:
    ap = cold_read_args(__doc__, "/tmp/sllmfs-file-age", layers=32, reps=3)
    args = ap.parse_args()
    src, store = saved_checkpoint(args.workdir, MODEL, args.layers)
    copy = args.workdir / "copy"
    if not (copy / "model.safetensors").exists():
        copy.mkdir(exist_ok=True)
        shutil.copyfile(src / "model.safetensors", copy / "model.safetensors.tmp")
        fd = os.open(copy / "model.safetensors.tmp", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.rename(copy / "model.safetensors.tmp", copy / "model.safetensors")
    sets = {"source": src, "store": next(store.glob("models/*/variants/hf")), "copy after the store": copy}
    files = {k: sorted(d.glob("*.safetensors")) for k, d in sets.items()}
    sizes = {k: sum(f.stat().st_size for f in v) for k, v in files.items()}  # the store's: three headers

    readers: list[tuple[str, Callable[[], float]]] = []
    for name, d in sets.items():
        peer = fastsafetensors_reader(d, args.device, sizes[name]) if args.device != "cpu" else None
        if peer is not None:
            readers.append((f"fastsafetensors, {name}", peer))
        readers.append((f"buffered 64 MiB x 16, {name}", lambda fs=files[name]: read_files(fs, 16, 64 << 20,
                                                                                           direct=False)))
    runs = cold_rounds(readers, args.reps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {}
    for reader in ("fastsafetensors", "buffered 64 MiB x 16"):
        base = med.get(f"{reader}, source")
        if base:
            for name in ("store", "copy after the store"):
                ratios[f"{reader}: {name} / source"] = med[f"{reader}, {name}"] / base
    write_result(args.out, "file-age", ratios,
                 {"bench": "file-age", "host": platform.node(), "device": args.device, "bytes": sizes,
                  "files": {k: [str(f) for f in v] for k, v in files.items()}, "gbps": runs, "median_gbps": med})
    return 0


if __name__ == "__main__":
    sys.exit(main())
