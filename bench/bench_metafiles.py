"""What checking metadata files costs: opening and reading them through a real mount (each open reads
the whole file and checks its recorded xxh3_64) and through the sidecar's ``files`` op, against
reading the same bytes straight from the store file (page cache: the limit).

    python -m bench.bench_metafiles [--tokenizer-mib 10] [--opens 50] [--json bench/results/metafiles-vm.json]

Prints per-open milliseconds and the ratio to the direct read; CPU only (no GPU involved).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.limits import measured
from sllmfs.store.save import save_model
from sllmfs.store.store import Store


def _tokenizer(nbytes: int) -> bytes:
    """A JSON document of about ``nbytes``, shaped like a tokenizer's vocab."""
    vocab, n, size = {}, 0, 2
    while size < nbytes:
        key = f"tok{n}_{os.urandom(4).hex()}"
        vocab[key] = n
        size += len(key) + 12
        n += 1
    return json.dumps({"model": {"type": "BPE", "vocab": vocab}}).encode()


def _timed(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of ``fn()`` over ``reps`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer-mib", type=float, default=10.0)
    ap.add_argument("--opens", type=int, default=50)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    import numpy as np
    from safetensors.numpy import save_file

    from tests.support.fuse import Runner, force_unmount
    from tests.support.sidecar import sidecar

    with tempfile.TemporaryDirectory(prefix="sllmfs-bench-meta-") as tmp:
        root = Path(tmp)
        src = root / "src"
        src.mkdir()
        save_file({"w": np.zeros(1024, dtype=np.float32)}, str(src / "model.safetensors"))
        tok = _tokenizer(int(args.tokenizer_mib * (1 << 20)))
        (src / "tokenizer.json").write_bytes(tok)
        (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
        store = Store(root / "store")
        save_model(store, "org/m", src)
        stored = store.get("org/m").files_dir
        direct_tok = measured("a direct read of tokenizer.json", 1 / _timed(lambda: _read(stored / "tokenizer.json"),
                                                                            args.opens))
        direct_cfg = measured("a direct read of config.json", 1 / _timed(lambda: _read(stored / "config.json"),
                                                                         args.opens))
        mnt = root / "mnt"
        runner = Runner(store.root, mnt)
        try:
            model = mnt / "org" / "m"
            assert _read(model / "tokenizer.json") == tok
            mount_tok = 1 / _timed(lambda: _read(model / "tokenizer.json"), args.opens)
            mount_cfg = 1 / _timed(lambda: _read(model / "config.json"), args.opens)
        finally:
            runner.stop()
            force_unmount(mnt)
        with sidecar(root, store=store.root) as sd, sd.connect() as c:
            assert c.files("org/m")["tokenizer.json"] == tok
            files_op = 1 / _timed(lambda: c.files("org/m"), args.opens)
    mib = len(tok) / (1 << 20)
    result = {
        "tokenizer_bytes": len(tok), "opens": args.opens,
        "direct_tokenizer_ms": round(1000 / direct_tok, 3), "mount_tokenizer_ms": round(1000 / mount_tok, 3),
        "mount_tokenizer_ratio_to_direct": round(mount_tok / direct_tok, 3),
        "direct_config_ms": round(1000 / direct_cfg, 4), "mount_config_ms": round(1000 / mount_cfg, 3),
        "files_op_ms": round(1000 / files_op, 3),
        "files_op_ratio_to_direct": round(files_op / direct_tok, 3),
    }
    print(f"tokenizer.json {mib:.1f} MiB: direct {result['direct_tokenizer_ms']} ms, through the mount (open = "
          f"read whole + xxh3 check) {result['mount_tokenizer_ms']} ms = {result['mount_tokenizer_ratio_to_direct']} "
          f"of the direct rate; config.json: direct {result['direct_config_ms']} ms, mount "
          f"{result['mount_config_ms']} ms; files op (both files, checked, sealed copies) {result['files_op_ms']} ms "
          f"= {result['files_op_ratio_to_direct']} of the direct tokenizer rate")
    if args.json:
        cmd = shlex.join(["python", "-m", "bench.bench_metafiles", *sys.argv[1:]])
        Path(args.json).write_text(json.dumps({"command": cmd, **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
