"""`sllmfs demo`: the whole path on a tiny model built offline, in a scratch directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import typer

from sllmfs.cli import app
from sllmfs.cli.progress import console
from sllmfs.core.errors import SllmfsError


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SllmfsError(f"the sidecar exited ({proc.returncode}) before {what}; see the log above")
        if time.monotonic() > deadline:
            raise SllmfsError(f"the sidecar did not bring up {what} within {timeout:.0f} s")
        time.sleep(0.1)


@app.command(help="Build a tiny model offline, save it, serve it, read it back by mount and by handles.")
def demo(workdir: Optional[str] = typer.Option(
        None, "--workdir", help="Scratch dir, kept (default: a temp dir, removed at the end).")) -> None:
    work = Path(workdir or tempfile.mkdtemp(prefix="sllmfs-demo-"))
    try:
        _demo(work)
    finally:
        if workdir is None:  # our scratch dir: the mount is gone once the daemon has exited
            shutil.rmtree(work, ignore_errors=True)


def _demo(work: Path) -> None:
    # transformers' from_pretrained makes torch inductor's cache dir (<tmp>/torchinductor_<user>), empty:
    # keep it in the scratch dir so a demo leaves nothing behind (a user's own setting wins)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "torchinductor"))
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sllmfs.integrations.transformers import load_model
    from sllmfs.ops.demo import build_model
    from sllmfs.store.save import save_model
    from sllmfs.store.store import open_store

    src, store, sock, mnt = work / "src", work / "store", work / "sllmfs.sock", work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    console.print(f"1. building a tiny Llama with a tokenizer in {src} (offline, random weights)")
    build_model(src, "llama")
    console.print(f"2. sllmfs save --model demo/tiny-llama  (store: {store})")
    save_model(open_store(str(store), write=True), "demo/tiny-llama", src, force=True)
    console.print(f"3. sllmfs start --mount {mnt} --socket {sock}")
    env = {**os.environ, "SLLMFS_STORAGE_PATH": str(store)}
    daemon = subprocess.Popen([sys.executable, "-m", "sllmfs", "start", "--storage-path", str(store),
                               "--socket", str(sock), "--mount", str(mnt)], env=env)
    try:
        _wait_for(sock, daemon, "its socket")
        _wait_for(mnt / "demo" / "tiny-llama" / "config.json", daemon, "its mount")
        original = load_file(src / "model.safetensors")
        view = mnt / "demo" / "tiny-llama"
        console.print(f"4. {view}: {', '.join(sorted(p.name for p in view.iterdir()))}")
        by_mount: Any = AutoModelForCausalLM.from_pretrained(view)
        same_mount = all(torch.equal(by_mount.state_dict()[k], v) for k, v in original.items())
        console.print(f"   from_pretrained through the FUSE view: tensors identical = {same_mount}")
        model, stats = load_model("demo/tiny-llama", device_map="cpu", socket=str(sock), return_stats=True)
        same_handles = all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
        console.print(f"5. load_model through shared-memory handles: tensors identical = {same_handles} "
                      f"({stats.bytes / 1e6:.2f} MB in {stats.seconds:.3f} s)")
        tok = AutoTokenizer.from_pretrained(view)
        ids = tok("sllmfs makes cold starts", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        ref = by_mount.generate(ids, max_new_tokens=8, do_sample=False)
        same_tokens = torch.equal(out, ref)
        console.print(f"6. greedy tokens: {out[0, ids.shape[1]:].tolist()} (same by both paths: {same_tokens})")
        if not (same_mount and same_handles and same_tokens):
            raise SllmfsError("the demo found a mismatch; please report it with the output above")
        console.print("demo ok")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
