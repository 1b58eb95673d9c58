"""`sllmfs save/ls/rm/verify/import-sllm-store` on real tiny checkpoints, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sllmfs.store.reader import VariantReader
from sllmfs.store.store import Store
from tests.support.cli import one_line_error, sllmfs


def _stored_state(store: Path, name: str, variant: str = "hf") -> dict[str, torch.Tensor]:
    info = Store(store).get(name)
    r = VariantReader(info.variant_dir(variant))
    return {n: r.tensor(n) for n in r.manifest.names()}


def _source_state(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(src.glob("*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_tied_dir", "sharded_dir", "bin_dir"])
def test_save_then_ls_and_verify(fixture: str, request: pytest.FixtureRequest, store_path: Path) -> None:
    src: Path = request.getfixturevalue(fixture)
    sllmfs("save", "--model", "org/tiny", "--local-model-path", str(src), store=store_path)
    stored = _stored_state(store_path, "org/tiny")
    original = _source_state(src)
    assert stored.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(stored[k], v), k
    info = Store(store_path).get("org/tiny")
    for rel in info.files:
        assert info.file_path(rel).read_bytes() == (src / rel).read_bytes()
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(info.files)
    assert not any(f.endswith(".index.json") for f in info.files)
    listing = json.loads(sllmfs("ls", "--json", store=store_path).stdout)
    assert [m["name"] for m in listing] == ["org/tiny"]
    assert "ok org/tiny [hf]" in sllmfs("verify", "--model", "org/tiny", store=store_path).stdout


def test_bin_checkpoint_keeps_tied_weights_as_tensors_of_their_own(bin_dir: Path, store_path: Path) -> None:
    """A safetensors file cannot share bytes: the tied name is stored as its own copy (the safetensors
    layout), as the mount showed it before."""
    sllmfs("save", "--model", "qwen-bin", "--local-model-path", str(bin_dir), store=store_path)
    info = Store(store_path).get("qwen-bin")
    m = info.manifest("hf")
    assert m.aliases == {} and m.as_files
    stored = load_file(info.variant_dir("hf") / m.partitions[0].file)
    assert torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])


def test_save_from_the_hf_cache_offline(llama_dir: Path, tmp_path: Path, store_path: Path) -> None:
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(llama_dir, snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    sllmfs("save", "--model", "acme/tiny-llama", store=store_path, env=env)
    assert Store(store_path).has("acme/tiny-llama")
    err = one_line_error(sllmfs("save", "--model", "acme/absent", store=store_path, env=env, check=False))
    assert "not in the Hugging Face cache" in err


def test_lora_adapter_saved_beside_its_base(llama_dir: Path, lora_dir: Path, store_path: Path) -> None:
    sllmfs("save", "--model", "base", "--local-model-path", str(llama_dir), store=store_path)
    sllmfs("save", "--model", "base", "--adapter-name", "Chat", "--adapter-path", str(lora_dir), store=store_path)
    info = Store(store_path).get("base")
    assert info.variants == ["hf", "lora.chat"]
    stored = _stored_state(store_path, "base", "lora.chat")
    original = load_file(lora_dir / "adapter_model.safetensors")
    assert stored.keys() == original.keys()
    assert all(torch.equal(stored[k], v) for k, v in original.items())
    assert (info.variant_dir("lora.chat") / "files" / "adapter_config.json").is_file()


def test_import_sllm_store_layout(tmp_path: Path, store_path: Path) -> None:
    """Build a ServerlessLLM folder (global offsets across tensor.data_N) and import it."""
    src = tmp_path / "sllm"
    src.mkdir()
    tensors = {"a": torch.randn(8, 8), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(3).half()}
    index, blobs, offset = {}, [b"", b""], 0
    for i, (name, t) in enumerate(tensors.items()):
        raw = t.numpy().tobytes()
        part = 0 if i < 2 else 1
        index[name] = [offset, len(raw), list(t.shape), list(t.stride()), str(t.dtype)]
        blobs[part] += raw
        offset += len(raw)
    for i, b in enumerate(blobs):
        (src / f"tensor.data_{i}").write_bytes(b)
    (src / "tensor_index.json").write_text(json.dumps(index))
    (src / "config.json").write_text("{}")
    sllmfs("import-sllm-store", str(src), "--model", "moved/model", store=store_path)
    stored = _stored_state(store_path, "moved/model")
    assert all(torch.equal(stored[k], v) for k, v in tensors.items())
    assert Store(store_path).get("moved/model").files == ["config.json"]


def test_rm_removes_the_model(llama_dir: Path, store_path: Path) -> None:
    sllmfs("save", "--model", "gone", "--local-model-path", str(llama_dir), store=store_path)
    sllmfs("rm", "--model", "gone", "-y", store=store_path)
    assert json.loads(sllmfs("ls", "--json", store=store_path).stdout) == []
    assert "not in the store" in one_line_error(sllmfs("rm", "--model", "gone", "-y", store=store_path, check=False))


def test_verify_names_the_first_corrupt_tensor(llama_dir: Path, store_path: Path) -> None:
    sllmfs("save", "--model", "flip", "--local-model-path", str(llama_dir), store=store_path)
    info = Store(store_path).get("flip")
    m = info.manifest("hf")
    victim = sorted(m.tensors.items(), key=lambda kv: kv[1].offset)[3]
    path = info.variant_dir("hf") / m.partitions[victim[1].partition].file
    with open(path, "r+b") as f:
        f.seek(victim[1].offset + 5)
        byte = f.read(1)
        f.seek(victim[1].offset + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    err = one_line_error(sllmfs("verify", "--model", "flip", store=store_path, check=False))
    assert f"(tensor {victim[0]!r}) is corrupt" in err


def _corrupt_header(tmp_path: Path) -> Path:
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    return d


def _unknown_dtype(tmp_path: Path) -> Path:
    d = tmp_path / "dtype"
    d.mkdir()
    header = json.dumps({"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}).encode()
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    return d


@pytest.mark.parametrize("case,expect", [
    ("missing", "is not a directory"),
    ("empty", "no weights in"),
    ("corrupt", "corrupt safetensors header"),
    ("dtype", "unknown dtype 'F12'"),
    ("dotdot", "bad model name"),
    ("slash", "bad model name"),
])
def test_bad_input_is_one_line_and_writes_nothing(case: str, expect: str, tmp_path: Path, store_path: Path) -> None:
    name, path = "ok/name", str(tmp_path / "nope")
    if case == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        path = str(tmp_path / "empty")
    elif case == "corrupt":
        path = str(_corrupt_header(tmp_path))
    elif case == "dtype":
        path = str(_unknown_dtype(tmp_path))
    elif case == "dotdot":
        name = "org/../etc"
    elif case == "slash":
        name = "/etc/passwd"
    err = one_line_error(sllmfs("save", "--model", name, "--local-model-path", path, store=store_path, check=False))
    assert expect in err
    assert not list((store_path / "models").iterdir()) if (store_path / "models").exists() else True
    assert not list((store_path / "tmp").iterdir()) if (store_path / "tmp").exists() else True


def test_existing_model_needs_force(llama_dir: Path, qwen_tied_dir: Path, store_path: Path) -> None:
    sllmfs("save", "--model", "m", "--local-model-path", str(llama_dir), store=store_path)
    err = one_line_error(sllmfs("save", "--model", "m", "--local-model-path", str(qwen_tied_dir),
                                store=store_path, check=False))
    assert "pass --force" in err
    assert "embed_tokens" in str(_stored_state(store_path, "m").keys())
    sllmfs("save", "--model", "m", "--local-model-path", str(qwen_tied_dir), "--force", store=store_path)
    assert "lm_head.weight" not in _stored_state(store_path, "m")  # the tied qwen replaced the llama


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_rolls_back(llama_dir: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        err = one_line_error(sllmfs("save", "--model", "big", "--local-model-path", str(llama_dir),
                                    store=small / "store", check=False))
        assert "disk full" in err
        assert list((small / "store" / "models").iterdir()) == []
        assert list((small / "store" / "tmp").iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_killed_save_leaves_no_model_and_next_save_cleans_up(tmp_path: Path, store_path: Path) -> None:
    """SIGKILL a save of a ~200 MB checkpoint at several moments: never a half model listed."""
    from safetensors.torch import save_file

    src = tmp_path / "big"
    src.mkdir()
    save_file({f"w{i}": torch.randn(1 << 20) for i in range(48)}, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    env = {**os.environ, "SLLMFS_STORAGE_PATH": str(store_path)}
    Store(store_path)  # `ls` of a store that was never created is an error, not an empty list
    for delay in (0.3, 0.8, 1.5):
        proc = subprocess.Popen([sys.executable, "-m", "sllmfs", "save", "--model", "big", "--force",
                                 "--local-model-path", str(src)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        listed = [m["name"] for m in json.loads(sllmfs("ls", "--json", store=store_path).stdout)]
        if listed:  # the save finished before the kill: then it must be whole
            sllmfs("verify", "--model", "big", store=store_path)
    # read-only commands leave the store as it is; the next writer removes the dead saves' leftovers
    sllmfs("save", "--model", "small", "--local-model-path", str(src), store=store_path)
    assert not list((store_path / "tmp").iterdir())


def test_rm_one_variant_keeps_the_model(llama_dir: Path, store_path: Path) -> None:
    from sllmfs.integrations.common import writeback
    from sllmfs.integrations.sglang import variants

    sllmfs("save", "--model", "m", "--local-model-path", str(llama_dir), store=store_path)
    key = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant=None, sglang_version="0.5.17")
    writeback.write_rank_state(Store(store_path), "m", key, {"w": torch.ones(4)})
    assert sorted(Store(store_path).get("m").variants) == ["hf", key.key]
    done = sllmfs("rm", "--model", "m", "--variant", key.key, "-y", store=store_path)
    assert f"removed m [{key.key}]; a running sidecar frees its memory copy" in done.stdout
    assert Store(store_path).get("m").variants == ["hf"]
    err = one_line_error(sllmfs("rm", "--model", "m", "--variant", key.key, "-y", store=store_path, check=False))
    assert f"has no variant {key.key!r}" in err
    err = one_line_error(sllmfs("rm", "--model", "m", "--variant", "hf", "-y", store=store_path, check=False))
    assert "is model 'm' itself" in err and "sllmfs rm --model m" in err
    assert Store(store_path).has("m")
