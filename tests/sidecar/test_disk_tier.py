"""The disk budget never deletes the only copy: here, an adapter saved from the user's own folder
beside a base model that the Hugging Face cache could give back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sllmfs.sidecar import disktier
from sllmfs.store.save import save_adapter, save_model
from sllmfs.store.store import Store


def test_a_model_with_an_adapter_is_not_evicted_on_its_hf_cache_entry(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    snap = hub / "models--org--m" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(64)}, snap / "model.safetensors")
    (snap / "config.json").write_text("{}")
    store = Store(tmp_path / "store")
    save_model(store, "org/m", snap)
    assert disktier.refetchable(store.get("org/m"))  # the base alone: the HF cache gives it back
    adapter = tmp_path / "my_adapter"
    adapter.mkdir()
    save_file({"base_model.model.lora_A.weight": torch.ones(8)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_adapter(store, "org/m", "mine", adapter)
    assert not disktier.refetchable(store.get("org/m"))  # the adapter is the user's: only an origin brings it back
    assert disktier.enforce_budget(store, 1, set()) == [] and store.has("org/m")
    # leased meanwhile (the snapshot said free): asked last, under the model's lock, it stays
    assert disktier.enforce_budget(store, 1, set(), lambda name: True, in_use_now=lambda name: True) == []
    assert disktier.enforce_budget(store, 1, set(), lambda name: True) == ["org/m"]  # the origin holds it all
