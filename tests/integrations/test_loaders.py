"""The torch and transformers integrations against a real sidecar, on the host target (no GPU here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sllmfs.core.errors import BadInput
from sllmfs.store.save import save_adapter, save_model
from sllmfs.store.store import Store
from tests.support.cli import sllmfs
from tests.support.sidecar import sidecar


def _ref(src: Path) -> dict[str, torch.Tensor]:
    return load_file(src / "model.safetensors")


def test_load_dict_and_load_into_fill_exact_bytes(tmp_path: Path, llama_dir: Path) -> None:
    from sllmfs.integrations.torch import load_dict, load_into

    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        ref = _ref(llama_dir)
        out = load_dict("org/llama", device_map={"": "cpu"}, socket=str(sd.socket))
        assert out.keys() == ref.keys() and all(torch.equal(out[k], v) for k, v in ref.items())
        # one block per device, each tensor aligned in it: one allocation, one IPC handle on a GPU
        blocks = {t.untyped_storage().data_ptr() for t in out.values()}
        base = blocks.pop() if len(blocks) == 1 else -1
        assert base >= 0 and all((t.data_ptr() - base) % 512 == 0 for t in out.values())
        cast = load_dict("org/llama", device_map={"": "cpu"}, socket=str(sd.socket), dtype=torch.float32)
        assert all(cast[k].dtype == torch.float32 and torch.equal(cast[k], v.float()) for k, v in ref.items())
        targets = {k: torch.full_like(v, float("nan")) for k, v in ref.items()}  # poisoned
        stats = load_into(targets, "org/llama", socket=str(sd.socket))
        assert all(torch.equal(targets[k], v) for k, v in ref.items())
        assert stats.bytes == sum(v.numel() * v.element_size() for v in ref.values())
        cast = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in ref.items()}
        load_into(cast, "org/llama", socket=str(sd.socket))
        assert all(torch.equal(cast[k], v.float()) for k, v in ref.items())  # dtype cast on load
        with pytest.raises(BadInput, match="that the target lacks"):
            load_into({k: targets[k] for k in list(targets)[:3]}, "org/llama", socket=str(sd.socket))
        wrong = dict(targets)
        first = next(iter(wrong))
        wrong[first] = torch.empty(3, 3, dtype=ref[first].dtype)
        with pytest.raises(BadInput, match="stored shape"):
            load_into(wrong, "org/llama", socket=str(sd.socket))


def test_device_map_prefixes_choose_devices() -> None:
    from sllmfs.integrations.torch import _device_for

    dm = {"": "cpu", "model.layers.1": "meta"}
    assert _device_for("model.layers.1.mlp.up_proj.weight", dm).type == "meta"
    assert _device_for("model.layers.10.mlp.up_proj.weight", dm).type == "cpu"
    with pytest.raises(BadInput, match="places no device"):
        _device_for("lm_head.weight", {"model": "cpu"})


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_tied_dir"])
def test_load_model_matches_from_pretrained(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sllmfs.integrations.transformers import load_model

    src: Path = request.getfixturevalue(fixture)
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/m", src)
        model = load_model("org/m", device_map="cpu", socket=str(sd.socket))
        ref = AutoModelForCausalLM.from_pretrained(src)
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        ids = torch.tensor([[3, 17, 42, 5]])
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                           ref.generate(ids, max_new_tokens=6, do_sample=False))
        half = load_model("org/m", device_map="cpu", torch_dtype="float32", socket=str(sd.socket))
        assert next(half.parameters()).dtype == torch.float32


def test_load_lora_matches_peft(tmp_path: Path, llama_dir: Path, lora_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sllmfs.integrations.transformers import load_lora, load_model

    with sidecar(tmp_path) as sd:
        store = Store(sd.store)
        save_model(store, "base", llama_dir)
        save_adapter(store, "base", "chat", lora_dir)
        ours = load_lora(load_model("base", device_map="cpu", socket=str(sd.socket)), "base", "chat",
                         socket=str(sd.socket))
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), lora_dir)
        ids = torch.tensor([[3, 17, 42, 5]])
        assert torch.allclose(ours(ids).logits, ref(ids).logits)


def test_load_command_on_the_host_target(tmp_path: Path, llama_dir: Path) -> None:
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        out = sllmfs("load", "--model", "org/llama", "--backend", "transformers", "--device", "cpu",
                     "--socket", str(sd.socket), "--storage-path", str(sd.store))
        text = out.stdout + out.stderr
        assert "GB/s" in text and "generated" in text


def test_load_dict_mirrors_the_store_for_odd_tensors(tmp_path: Path) -> None:
    """Mixed dtypes, odd sizes, an empty tensor and a tied pair: whole runs copied as one piece each
    (the store's layout mirrored), byte for byte; with a dtype cast, packed and cast one by one."""
    from safetensors.torch import save_file

    from sllmfs.integrations.torch import load_dict

    g = torch.Generator().manual_seed(7)
    ref = {f"f.{i}": torch.randn(i * 37 + 1, generator=g) for i in range(40)}
    ref.update({"b": torch.rand(999, generator=g) > 0.5, "i8": torch.randint(-9, 9, (4097,), dtype=torch.int8),
                "h": torch.randn(3, 5, generator=g).to(torch.bfloat16), "empty": torch.empty(0, 7)})
    src = tmp_path / "src"
    src.mkdir()
    save_file(ref, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/odd", src)
        out = load_dict("org/odd", socket=str(sd.socket))
        assert out.keys() == ref.keys()
        assert all(out[k].dtype == v.dtype and torch.equal(out[k], v) for k, v in ref.items())
        cast = load_dict("org/odd", socket=str(sd.socket), dtype=torch.float64)
        assert all(torch.equal(cast[k], v.to(torch.float64)) for k, v in ref.items())


def test_load_dict_shares_tied_weights_stored_twice(tmp_path: Path, bin_dir: Path) -> None:
    """A safetensors file cannot share bytes, so a tied pair of a .bin checkpoint is stored twice and
    recorded as tied: load_dict gives one tensor under both names, as the checkpoint had; a manifest
    whose tied pair differs in its bytes is refused."""
    import json
    import os

    from sllmfs.core.errors import Corrupt
    from sllmfs.integrations.torch import load_dict
    from sllmfs.store.format import load_manifest

    ref = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/tied", bin_dir)
        vdir = Store(sd.store).get("org/tied").variant_dir("hf")
        tied = load_manifest(vdir).tied
        assert tied == {"lm_head.weight": "model.embed_tokens.weight"}, tied
        out = load_dict("org/tied", socket=str(sd.socket))
        assert out.keys() == ref.keys() and all(torch.equal(out[k], v) for k, v in ref.items())
        assert out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr()
        # a map that places only the stored name: the tied name follows it (as an alias always did)
        out = load_dict("org/tied", device_map={"model": "cpu"}, socket=str(sd.socket))
        assert out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr()
        d = json.loads((vdir / "manifest.json").read_text())
        d["metadata"]["tied"] = {"lm_head.weight": "model.norm.weight"}  # another tensor's bytes
        os.chmod(vdir / "manifest.json", 0o644)
        (vdir / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(Corrupt, match="metadata.tied must map stored tensors"):
            load_manifest(vdir)
        d["metadata"]["tied"] = {"lm_head.weight": ["model.embed_tokens.weight"]}  # not a name at all
        (vdir / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(Corrupt, match="metadata.tied must map stored tensors"):
            load_manifest(vdir)


def test_copy_spans_refuses_a_destination_that_is_not_bytes(tmp_path: Path, llama_dir: Path) -> None:
    from sllmfs.client.client import connect
    from sllmfs.client.transfer import copy_spans

    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        with connect(str(sd.socket)) as c, c.acquire("org/llama") as lease:
            with pytest.raises(BadInput, match=r"'org/llama' \[hf\].*partition 0 offset 0 must be a contiguous uint8"):
                copy_spans(lease, [(0, 0, torch.empty(16, dtype=torch.float32))])
