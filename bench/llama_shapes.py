"""A Llama-2-7B-shaped bf16 checkpoint with random weights, written without the hub.

Shared by the GPU benchmarks. Random bits come from torch on the GPU when there
is one (fast), and the file is written as plain safetensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

LLAMA2_7B = dict(vocab=32000, hidden=4096, inter=11008, layers=32)


def tensor_shapes(vocab: int, hidden: int, inter: int, layers: int) -> list[tuple[str, list[int]]]:
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden])]
        out += [(p + f"self_attn.{n}_proj.weight", [hidden, hidden]) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", [inter, hidden]), (p + "mlp.up_proj.weight", [inter, hidden]),
                (p + "mlp.down_proj.weight", [hidden, inter])]
    out += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    return out


def config(vocab: int, hidden: int, inter: int, layers: int) -> dict[str, object]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu"}


def write_checkpoint(out: Path, scale: float = 1.0, layers: int | None = None) -> int:
    """Write model.safetensors + config.json; ``layers`` shrinks the model (1, 4, 13.5 GB sizes)."""
    import torch

    dims = dict(LLAMA2_7B)
    if layers is not None:
        dims["layers"] = layers
    shapes = tensor_shapes(**dims)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _name, shape in shapes:
            t = (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * (0.02 * scale)).to(torch.bfloat16)
            f.write(t.cpu().view(torch.uint8).numpy().tobytes())
    (out / "config.json").write_text(json.dumps(config(**dims), indent=1))
    return offset
