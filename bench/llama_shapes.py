"""Llama-2-7B- and Qwen2.5-32B-shaped bf16 checkpoints with random weights, written without the hub.

Shared by the GPU benchmarks. Random bits come from torch on the GPU when there
is one (fast), and the files are written as plain safetensors (one file, or
HF-style shards with model.safetensors.index.json).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

LLAMA2_7B = dict(vocab=32000, hidden=4096, inter=11008, layers=32)
# Qwen2.5-32B: 40 query heads over 8 KV heads (GQA), q/k/v biases, untied lm_head; 65.5 GB in bf16
QWEN25_32B = dict(vocab=152064, hidden=5120, inter=27648, layers=64, heads=40, kv_heads=8, bias=True)
SHAPES = {"7b": ("llama", LLAMA2_7B), "32b": ("qwen2", QWEN25_32B)}


def tensor_shapes(vocab: int, hidden: int, inter: int, layers: int, heads: int = 32, kv_heads: int | None = None,
                  bias: bool = False) -> list[tuple[str, list[int]]]:
    kv = hidden // heads * (kv_heads or heads)
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden])]
        out += [(p + "self_attn.q_proj.weight", [hidden, hidden]), (p + "self_attn.k_proj.weight", [kv, hidden]),
                (p + "self_attn.v_proj.weight", [kv, hidden]), (p + "self_attn.o_proj.weight", [hidden, hidden])]
        if bias:
            out += [(p + "self_attn.q_proj.bias", [hidden]), (p + "self_attn.k_proj.bias", [kv]),
                    (p + "self_attn.v_proj.bias", [kv])]
        out += [(p + "mlp.gate_proj.weight", [inter, hidden]), (p + "mlp.up_proj.weight", [inter, hidden]),
                (p + "mlp.down_proj.weight", [hidden, inter])]
    out += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    return out


def config(vocab: int, hidden: int, inter: int, layers: int, heads: int = 32, kv_heads: int | None = None,
           bias: bool = False, arch: str = "llama") -> dict[str, object]:
    qwen = arch == "qwen2"
    return {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"], "model_type": arch,
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6 if qwen else 1e-5,
            "rope_theta": 1000000.0 if qwen else 10000.0, "torch_dtype": "bfloat16", "dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu"}


def checkpoint_bytes(dims: dict[str, object]) -> int:
    """The tensor bytes of a bf16 checkpoint of these dimensions (what a disk plan needs up front)."""
    total = 0
    for _name, shape in tensor_shapes(**dims):  # type: ignore[arg-type]
        n = 2
        for s in shape:
            n *= s
        total += n
    return total


def write_checkpoint(out: Path, scale: float = 1.0, layers: int | None = None, dims: dict[str, object] | None = None,
                     arch: str = "llama", shard_bytes: int | None = None) -> int:
    """Write model.safetensors (or shards of at most ``shard_bytes`` and an index) + config.json;
    ``layers`` shrinks the model (1, 4, 13.5 GB sizes for the 7B shape). Returns the tensor bytes."""
    import torch

    dims = dict(dims or LLAMA2_7B)
    if layers is not None:
        dims["layers"] = layers
    shapes = tensor_shapes(**dims)  # type: ignore[arg-type]
    sizes = []
    for _name, shape in shapes:
        n = 2
        for s in shape:
            n *= s
        sizes.append(n)
    groups: list[list[int]] = [[]]
    filled = 0
    for i, n in enumerate(sizes):
        if shard_bytes and groups[-1] and filled + n > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += n
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    files = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map: dict[str, str] = {}
    for file, group in zip(files, groups, strict=True):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in group:
            name, shape = shapes[i]
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + sizes[i]]}
            offset += sizes[i]
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for i in group:
                shape = shapes[i][1]
                t = (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * (0.02 * scale))
                f.write(t.to(torch.bfloat16).cpu().view(torch.uint8).numpy().data)  # no extra host copy
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config(**dims, arch=arch), indent=1))  # type: ignore[arg-type]
    return sum(sizes)


def stored_hf(work: Path, model: str, layers: int | None = None) -> tuple[Path, Any]:
    """saved_checkpoint's store: the ``hf`` variant's directory and its manifest."""
    from sllmfs.store.format import load_manifest

    _, store = saved_checkpoint(work, model, layers)
    vdir = next(store.glob("models/*/variants/hf"))
    return vdir, load_manifest(vdir)


def saved_checkpoint(work: Path, model: str, layers: int | None = None) -> tuple[Path, Path]:
    """``work``/src holding a checkpoint of ``layers`` layers and ``work``/store holding it saved as
    ``model`` (each made once, reused by later runs); returns (src, store)."""
    import subprocess
    import sys

    src, store = work / "src", work / "store"
    if not (src / "model.safetensors").exists():
        write_checkpoint(src, layers=layers)
    if not list(store.glob("models/*/variants/hf/manifest.json")):
        subprocess.run([sys.executable, "-m", "sllmfs", "save", "--model", model, "--local-model-path", str(src),
                        "--storage-path", str(store), "--force"], check=True)
    return src, store
