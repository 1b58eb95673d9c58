"""What a new user hits on a fresh machine: output streams, read-only commands, pasteable hints,
one-line errors for every misuse, sllm-store's flags, no leftovers (issue 15)."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sllmfs.core.errors import BadInput
from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.cli import one_line_error, sllmfs
from tests.support.sidecar import make_model, sidecar


def _tree(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


# -- output conventions -------------------------------------------------------------------------


def test_data_on_stdout_unwrapped_logs_on_stderr(tmp_path: Path, llama_dir: Path, store_path: Path) -> None:
    long_name = "an-organisation-with-a-long-name/" + "a-model-name-much-wider-than-eighty-columns" * 2
    sllmfs("save", "--model", long_name, "--local-model-path", str(llama_dir), store=store_path)
    listing = sllmfs("ls", store=store_path)
    assert long_name in listing.stdout  # whole, on one line: `sllmfs ls | grep` works
    assert [line for line in listing.stdout.splitlines() if long_name in line]
    assert long_name not in listing.stderr
    verify = sllmfs("verify", "--model", long_name, store=store_path)
    assert f"ok {long_name} [hf]" in verify.stdout
    saved = sllmfs("save", "--model", "org/b", "--local-model-path", str(llama_dir), store=store_path)
    assert "saved org/b" in saved.stdout and "saved" not in saved.stderr


def test_version_and_help() -> None:
    from importlib.metadata import version

    assert sllmfs("--version").stdout.strip() == f"sllmfs {version('sllmfs')}"
    text = " ".join(sllmfs("start", "--help", env={"COLUMNS": "200"}).stdout.split())
    for shown in ("(default: the CPU count, at most 16)", "(default: 32MiB)", "(default: half of the machine's memory)",
                  "(default: info)", "(default: --gpu-warmup)"):
        assert shown in text, shown
    assert "--host" not in text  # sllm-store's flags are accepted only to be refused


def test_every_option_has_help() -> None:
    import typer

    from sllmfs.cli import app

    group = typer.main.get_command(app)
    missing = [f"{name} {p.opts}" for name, cmd in group.commands.items()  # type: ignore[attr-defined]
               for p in cmd.params
               if getattr(p, "param_type_name", "") == "option" and not getattr(p, "hidden", False) and not p.help]
    assert not missing


# -- read-only commands ---------------------------------------------------------------------------


def test_read_only_commands_never_create_or_modify_a_store(tmp_path: Path, llama_dir: Path) -> None:
    typo = tmp_path / "typo"
    err = one_line_error(sllmfs("ls", "--storage-path", str(typo), check=False))
    assert f"no sllmfs store at {typo}" in err and not typo.exists()
    one_line_error(sllmfs("verify", "--model", "m", "--storage-path", str(typo), check=False))
    assert not typo.exists()
    before = _tree(llama_dir)  # a checkpoint folder given as the store by mistake
    for args in (["ls"], ["verify", "--model", "m"]):
        one_line_error(sllmfs(*args, "--storage-path", str(llama_dir), check=False))
    err = one_line_error(sllmfs("save", "--model", "m", "--local-model-path", str(llama_dir),
                                "--storage-path", str(llama_dir), check=False))
    assert "not empty and not an sllmfs store" in err
    assert _tree(llama_dir) == before
    # a real store with a dead save's leftover: ls reports, leaves the leftover to writers
    store = tmp_path / "store"
    save_model(Store(store), "m", llama_dir)
    (store / "tmp" / "0123abcd").mkdir()
    before = _tree(store)
    assert json.loads(sllmfs("ls", "--json", store=store).stdout)[0]["name"] == "m"
    sllmfs("verify", "--model", "m", store=store)
    assert _tree(store) == before


# -- hints that work as printed -------------------------------------------------------------------


def test_hints_carry_the_users_socket_and_paths(tmp_path: Path, llama_dir: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/m")
        sock = ["--socket", str(sd.socket)]
        sllmfs("pin", "--model", "org/m", *sock)
        err = one_line_error(sllmfs("evict", "--model", "org/m", *sock, check=False))
        hint = err.split("`")[1]
        assert hint == f"sllmfs unpin --model org/m --socket {sd.socket}"
        sllmfs(*hint.split()[1:])  # pasted as printed, it reaches the same sidecar
        assert "evicted org/m" in sllmfs("evict", "--model", "org/m", *sock).stdout
    store = tmp_path / "other-store"
    save_model(Store(store), "org/x", llama_dir)
    part = store / "models" / "org%2Fx" / "variants" / "hf" / "model.safetensors"
    if not part.exists():
        part = next((store / "models").glob("*/variants/hf/model.safetensors"))
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    err = one_line_error(sllmfs("verify", "--model", "org/x", "--storage-path", str(store), check=False))
    hint = err.split("`")[1]
    assert f"--local-model-path {llama_dir}" in hint and f"--storage-path {store}" in hint
    sllmfs(*hint.split()[1:])  # the pasted save stores it again
    sllmfs("verify", "--model", "org/x", "--storage-path", str(store))


# -- misuse gets one line, or works ---------------------------------------------------------------


def test_load_without_tokenizer_loads_and_skips_generation(tmp_path: Path, llama_dir: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in llama_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (bare / f.name).write_bytes(f.read_bytes())
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/bare", bare)
        out = sllmfs("load", "--model", "org/bare", "--backend", "transformers", "--device", "cpu",
                     "--socket", str(sd.socket))
        assert "loaded org/bare" in out.stdout and "generation skipped" in out.stdout
        assert "Traceback" not in out.stderr


def test_load_into_a_model_with_tied_embeddings(tmp_path: Path, qwen_tied_dir: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from sllmfs.integrations.torch import load_into

    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/qwen", qwen_tied_dir)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(qwen_tied_dir))
        sd_ = model.state_dict()
        assert "lm_head.weight" in sd_ and "lm_head.weight" not in load_file(qwen_tied_dir / "model.safetensors")
        stats = load_into(sd_, "org/qwen", socket=str(sd.socket))  # README's call, strict by default
        assert stats.tied == ["lm_head.weight"] and not stats.missing
        ref = load_file(qwen_tied_dir / "model.safetensors")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
        assert torch.equal(model.lm_head.weight, ref["model.embed_tokens.weight"])
        extra = {**sd_, "not.stored": torch.zeros(3)}
        with pytest.raises(BadInput, match="has no tensor 'not.stored'"):
            load_into(extra, "org/qwen", socket=str(sd.socket))
        assert load_into(extra, "org/qwen", socket=str(sd.socket), strict=False).missing == ["not.stored"]


def test_save_backend_sglang_without_sglang_stores_nothing(tmp_path: Path, llama_dir: Path,
                                                           store_path: Path) -> None:
    if subprocess.run([sys.executable, "-c", "import sglang"], capture_output=True).returncode == 0:
        pytest.skip("SGLang is installed here")
    err = one_line_error(sllmfs("save", "--model", "m", "--local-model-path", str(llama_dir),
                                "--backend", "sglang", store=store_path, check=False))
    assert "nothing was stored" in err
    assert not store_path.exists() or not Store(store_path, create=False).list()


def test_gpu_device_map_without_a_gpu_is_a_clear_error(tmp_path: Path, llama_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from sllmfs.integrations.torch import load_dict
    from sllmfs.integrations.transformers import load_model

    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        for call in (lambda: load_model("org/llama", device_map="cuda", socket=str(sd.socket)),
                     lambda: load_dict("org/llama", device_map={"": 0}, socket=str(sd.socket))):
            with pytest.raises(BadInput, match="sees no GPU"):
                call()


def test_evict_typo_warm_progress_and_rm_frees_memory(tmp_path: Path) -> None:
    with sidecar(tmp_path) as sd:
        make_model(sd.store, "org/m", tensors=8, nbytes=1 << 20)
        sock = ["--socket", str(sd.socket)]
        err = one_line_error(sllmfs("evict", "--model", "org/typo", *sock, check=False))
        assert "'org/typo' is neither in memory nor in the store" in err
        # the progress bar on a terminal: its total is the model's size, never "/0 bytes"
        leader, follower = pty.openpty()
        proc = subprocess.run([sys.executable, "-m", "sllmfs", "load", "--model", "org/m", "--warm", *sock],
                              stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60,
                              env={**os.environ, "COLUMNS": "200"})
        os.close(follower)
        bar = b""
        while True:
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            bar += chunk
        os.close(leader)
        assert proc.returncode == 0 and "is in memory" in proc.stdout
        assert b"/0 bytes" not in bar and b"8.4/8.4 MB" in bar, bar[-400:]
        assert sd.status()["memory"]["used"] > 0
        out = sllmfs("rm", "--model", "org/m", "-y", "--storage-path", str(sd.store))
        assert "frees its memory copy" in out.stdout
        deadline = time.monotonic() + 10
        while sd.status()["memory"]["used"] and time.monotonic() < deadline:
            time.sleep(0.1)
        st = sd.status()
        assert st["memory"]["used"] == 0 and not st["models"]


def _default_sigint() -> None:
    """A test run started in the background by a shell (`.ci/run &`) ignores SIGINT, and so would the
    load it starts (Python keeps an ignored SIGINT ignored): the user's Ctrl-C is what is tested here."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_load_leaves_no_temp_dir(tmp_path: Path, llama_dir: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        for sig in (signal.SIGINT, signal.SIGTERM):
            interrupted = False
            for _attempt in range(10):  # catch it while its temp dir exists
                proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "load", "--model", "org/llama",
                                         "--backend", "transformers", "--device", "cpu", "--socket",
                                         str(sd.socket)], env={**os.environ, "TMPDIR": str(scratch)},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        preexec_fn=_default_sigint)
                while proc.poll() is None and not list(scratch.glob("sllmfs-meta-*")):
                    time.sleep(0.002)
                if proc.poll() is None:
                    proc.send_signal(sig)
                    _, err = proc.communicate(timeout=60)
                    assert "Traceback" not in err
                    # 0: on a busy machine the load can end (dir removed, model loaded) before the signal
                    # lands, as late as the interpreter's exit, where Python no longer runs handlers
                    assert proc.returncode in (130, 0), err
                    assert not list(scratch.iterdir())
                    if proc.returncode == 130:
                        assert err.rstrip().endswith("sllmfs: interrupted"), err
                        interrupted = True
                        break
                else:
                    proc.communicate()
            assert interrupted, f"no load was caught while its temp dir existed ({sig!r})"
            assert not list(scratch.iterdir())


# -- sllm-store's flags ---------------------------------------------------------------------------


def test_sllm_store_flags_are_refused_with_what_to_use(tmp_path: Path, llama_dir: Path, store_path: Path) -> None:
    err = one_line_error(sllmfs("start", "--host", "0.0.0.0", "--port", "8073", store=store_path, check=False))
    assert "--socket" in err
    err = one_line_error(sllmfs("load", "--model", "m", "--tensor-parallel-size", "2", check=False))
    assert "--load-format sllm --tp N" in err
    src = ["--model", "m", "--local-model-path", str(llama_dir)]
    err = one_line_error(sllmfs("save", *src, "--tensor-parallel-size", "2", store=store_path, check=False))
    assert "needs --backend sglang" in err
    err = one_line_error(sllmfs("save", *src, "--backend", "vllm", store=store_path, check=False))
    assert "needs vLLM" in err  # this environment has none; .venv-vllm's tests run the save itself
    assert not store_path.exists()


def test_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        err = one_line_error(sllmfs("start", "--storage-path", str(tmp_path / "store"), "--socket",
                                    str(tmp_path / "s.sock"), "--metrics-port", str(port), check=False))
        assert str(port) in err
    finally:
        busy.close()


def test_save_never_follows_a_link_out_of_the_folder(tmp_path: Path, llama_dir: Path, store_path: Path) -> None:
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(llama_dir, src)
    secret = tmp_path / "secret.txt"
    secret.write_text("not model data")
    (src / "notes.txt").symlink_to(secret)
    err = one_line_error(sllmfs("save", "--model", "m", "--local-model-path", str(src), store=store_path,
                                check=False))
    assert f"links to {secret}, outside {src}" in err
    (src / "notes.txt").unlink()
    os.mkfifo(src / "notes.txt")  # would block a reader forever
    err = one_line_error(sllmfs("save", "--model", "m", "--local-model-path", str(src), store=store_path,
                                check=False, timeout=60))
    assert "not a regular file" in err
    (src / "notes.txt").unlink()
    # links that stay inside are fine, and so is a Hugging Face cache snapshot linking into its blobs/
    (src / "alias.json").symlink_to(src / "config.json")
    sllmfs("save", "--model", "m", "--local-model-path", str(src), store=store_path)
    repo = tmp_path / "hf" / "models--org--m"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in llama_dir.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    sllmfs("save", "--model", "hf/m", "--local-model-path", str(snap), store=store_path)
    assert "ok hf/m [hf]" in sllmfs("verify", "--model", "hf/m", store=store_path).stdout
