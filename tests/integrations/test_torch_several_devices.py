"""load_dict's report of each device's copy (what the two-GPU bench reads), against a real sidecar.

The split over two GPUs itself runs in bench/bench_sglang.py --sizes 7b --links (bytes checked there);
here the host target, the one device this machine has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sllmfs.core.errors import BadInput
from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.sidecar import sidecar


def test_load_dict_reports_each_device_copy(tmp_path: Path, llama_dir: Path) -> None:
    from sllmfs.integrations.torch import load_dict

    ref = load_file(llama_dir / "model.safetensors")
    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        layers = {n for n in ref if n.startswith("model.layers.0.")}
        dm = {"": "cpu", "model.layers.0": "cpu"}  # a split map that lands on the one device here
        out, stats = load_dict("org/llama", device_map=dm, socket=str(sd.socket), return_stats=True)
        assert layers and out.keys() == ref.keys() and all(torch.equal(out[k], v) for k, v in ref.items())
        assert {str(t.device) for t in out.values()} == {"cpu"}
        (host,) = stats.links.values()
        assert list(stats.links) == ["host"] and host["start"] < host["end"] and host["bytes"] > 0
        assert stats.bytes >= sum(v.numel() * v.element_size() for v in ref.values())  # runs carry padding
        cast, cstats = load_dict("org/llama", socket=str(sd.socket), dtype=torch.float32, return_stats=True)
        assert all(torch.equal(cast[k], v.float()) for k, v in ref.items()) and "host" in cstats.links


def test_a_map_naming_a_missing_gpu_is_one_clear_error(tmp_path: Path, llama_dir: Path) -> None:
    from sllmfs.integrations.torch import load_dict

    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        with pytest.raises(BadInput, match=r"device_map asks for cuda:1") as e:
            load_dict("org/llama", device_map={"": "cpu", "model.layers.1": 1}, socket=str(sd.socket))
        assert "\n" not in str(e.value)
