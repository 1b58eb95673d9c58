"""``--load-format sllm`` end to end on CPU: SGLang's own ServerArgs, plugin loading, ModelConfig,
LoadConfig, get_model_loader, parallel state (gloo, TP 1) and model registry build a real torch
model; the first load takes the any-TP path and writes rank state back, the second the fast path.
With TP=2 two processes (gloo) each load their own shard and write and read their own variant.

Runs in child processes (torch.distributed and SGLang's globals are per process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __name__ != "__main__":
    from tests.support.sglang_env import require_sglang

    require_sglang()


class _Linear(nn.Module):
    """As SGLang's linear layers: the weight is a bare torch.empty (nn.Linear would initialise it)."""

    def __init__(self, cols: int, rows: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols), requires_grad=False)


class SllmTinyForCausalLM(nn.Module):
    """Llama-shaped, with SGLang-style fused qkv_proj / gate_up_proj parameters sharded by TP rank as
    SGLang's column- and row-parallel layers shard them (rows of qkv/gate_up, columns of o/down)."""

    def __init__(self, config: object, quant_config: object = None, **kw: object) -> None:
        from sglang.srt.runtime_context import get_parallel  # every release 0.5.17-0.5.23

        super().__init__()
        c: Any = config
        self.tp, self.rank = get_parallel().tp_size, get_parallel().tp_rank
        hidden, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
        kv = c.num_key_value_heads * (hidden // c.num_attention_heads)
        self.hidden, self.kv, self.inter = hidden // self.tp, kv // self.tp, inter // self.tp  # this rank's rows
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList()
        for _ in range(c.num_hidden_layers):
            layer = nn.Module()
            layer.qkv_proj = _Linear(hidden, self.hidden + 2 * self.kv)
            layer.o_proj = _Linear(self.hidden, hidden)
            layer.gate_up_proj = _Linear(hidden, 2 * self.inter)
            layer.down_proj = _Linear(self.inter, hidden)
            layer.input_layernorm = nn.Parameter(torch.empty(hidden))
            layer.post_attention_layernorm = nn.Parameter(torch.empty(hidden))
            self.layers.append(layer)
        self.norm = nn.Parameter(torch.empty(hidden))
        self.lm_head = _Linear(hidden, vocab)
        if getattr(c, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        offsets = {"q_proj": 0, "k_proj": self.hidden, "v_proj": self.hidden + self.kv,
                   "gate_proj": 0, "up_proj": self.inter}
        for name, w in weights:
            p = name.removeprefix("model.").split(".")
            if p[0] != "layers":
                target = {"embed_tokens": self.embed_tokens.weight, "norm": self.norm,
                          "lm_head": self.lm_head.weight}[p[0]]
                target.data.copy_(w)
                continue
            layer = self.layers[int(p[1])]
            leaf = p[3] if p[2] in ("self_attn", "mlp") else p[2]
            if leaf in offsets:  # column parallel: this rank's rows
                fused = layer.qkv_proj if leaf.endswith(("q_proj", "k_proj", "v_proj")) else layer.gate_up_proj
                mine = w.chunk(self.tp)[self.rank]
                fused.weight.data[offsets[leaf] : offsets[leaf] + mine.shape[0]].copy_(mine)
            elif leaf.endswith("layernorm"):
                getattr(layer, leaf).data.copy_(w)
            else:  # row parallel: this rank's columns
                getattr(layer, leaf).weight.data.copy_(w.chunk(self.tp, dim=1)[self.rank])


def prepare(tmp: Path) -> None:
    """The checkpoint, the store and what the FUSE view would show (marker at the root, files below)."""
    from sllmfs.ops.demo import build_model
    from sllmfs.store.save import save_model
    from sllmfs.store.store import Store

    src = build_model(tmp / "src", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["SllmTinyForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    store = Store(tmp / "store")
    save_model(store, "org/tiny", src)
    mnt = tmp / "mnt"
    (mnt / "org").mkdir(parents=True)
    (mnt / ".sllmfs.json").write_text(json.dumps({"socket": "/nonexistent.sock", "version": 1}))
    shutil.copytree(store.get("org/tiny").path / "files", mnt / "org" / "tiny")


def store_other_release(store: Any, config: Any, model_config: Any, release: str) -> str:
    """This rank's state as SGLang ``release`` would have written it, every byte zero (a start that
    used it would serve zeros): the variant another release left in the store. Its key."""
    import dataclasses

    from sllmfs.integrations.common import writeback
    from sllmfs.integrations.common.snapshot import snapshot
    from sllmfs.integrations.common.state import rank_state
    from sllmfs.integrations.sglang.loader import current_variant

    with torch.device("cpu"):
        model = SllmTinyForCausalLM(config).to(model_config.dtype)
    other = dataclasses.replace(current_variant(model_config), version=release)
    zeros = {name: torch.zeros_like(t) for name, t in rank_state(model).items()}
    writeback.write_rank_state(store, "org/tiny", other, snapshot(zeros))
    return other.key


def main(tmp: Path, port: int, rank: int, world: int, other_release: str = "") -> None:
    from safetensors.torch import load_file
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.loader import get_model_loader
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    from sllmfs.store.store import Store
    from tests.support.sglang_env import start_rank

    ModelRegistry.models["SllmTinyForCausalLM"] = SllmTinyForCausalLM
    store = Store(tmp / "store")
    load_plugins()  # as every SGLang process does
    extra = json.dumps({"sllm_storage_path": str(store.root), "sllm_write_back": "sync"})
    sa = ServerArgs(model_path=str(tmp / "mnt" / "org" / "tiny"), device="cpu", load_format="sllm",
                    model_loader_extra_config=extra, tp_size=world)
    start_rank(sa, rank=rank, world=world, port=port)
    mc = ModelConfig.from_server_args(sa)
    if other_release:
        print(f"r{rank} other", store_other_release(store, mc.hf_config, mc, other_release))

    def load() -> tuple[Any, nn.Module]:
        lc = LoadConfig(load_format=sa.load_format, model_loader_extra_config=sa.model_loader_extra_config)
        loader = get_model_loader(lc, mc)
        return loader, loader.load_model(model_config=mc, device_config=DeviceConfig("cpu"))

    first_loader, first = load()
    torch.distributed.barrier()  # every rank has written its variant back
    print(f"r{rank} first", first_loader.path_taken, sorted(store.get("org/tiny").variants))
    second_loader, second = load()
    print(f"r{rank} second", second_loader.path_taken, second_loader.copy_ran)
    s1, s2 = first.state_dict(), second.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    ref = load_file(tmp / "src" / "model.safetensors")
    got: Any = second
    q = ref["model.layers.1.self_attn.q_proj.weight"].chunk(world)[rank]
    assert torch.equal(got.layers[1].qkv_proj.weight[: got.hidden], q)
    o = ref["model.layers.0.self_attn.o_proj.weight"].chunk(world, dim=1)[rank]
    assert torch.equal(got.layers[0].o_proj.weight, o)
    print(f"r{rank} E2E OK", mc.dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ranks(tmp: Path, world: int, other_release: str = "") -> list[str]:
    """Run ``world`` ranks of ``main`` at once; their output lines."""
    prepare(tmp)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", __file__, str(tmp), str(port), str(r), str(world),
                               other_release],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    lines = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        lines += out.splitlines()
    return lines


def _release() -> str:
    from sllmfs.integrations.sglang import compat

    return compat.installed_version()


def test_load_model_any_tp_then_fast(tmp_path: Path) -> None:
    out = _ranks(tmp_path, 1)
    assert f"r0 first any-tp ['hf', 'sglang.tp1.r0.bfloat16.none.v{_release()}']" in out
    assert "r0 second fast beside the build" in out and "r0 E2E OK torch.bfloat16" in out


def test_a_variant_of_another_release_is_not_used(tmp_path: Path) -> None:
    """Each release reads only the state its own release wrote (sglang/variants.py says why): with only
    another supported release's variant stored (zeros, so using it would fail the byte checks), the start
    takes the any-TP path, writes its own, and the other release's variant stays for that release."""
    from sllmfs.integrations.sglang import compat

    other = compat.NEWEST if _release() != compat.NEWEST else compat.OLDEST
    out = _ranks(tmp_path, 1, other)
    theirs, mine = f"sglang.tp1.r0.bfloat16.none.v{other}", f"sglang.tp1.r0.bfloat16.none.v{_release()}"
    assert f"r0 other {theirs}" in out
    assert f"r0 first any-tp {sorted(['hf', theirs, mine])}" in out
    assert "r0 second fast beside the build" in out and "r0 E2E OK torch.bfloat16" in out


def test_two_ranks_write_and_read_their_own_variants(tmp_path: Path) -> None:
    out = _ranks(tmp_path, 2)
    v = _release()
    both = f"['hf', 'sglang.tp2.r0.bfloat16.none.v{v}', 'sglang.tp2.r1.bfloat16.none.v{v}']"
    for r in (0, 1):
        assert f"r{r} first any-tp {both}" in out
        assert f"r{r} second fast beside the build" in out and f"r{r} E2E OK torch.bfloat16" in out


if __name__ == "__main__":
    from tests.support.sglang_env import import_sglang

    import_sglang()
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
