"""Tiny real checkpoints built offline (random weights, a real tokenizer).

Used by the README's demo, the tests and the benchmarks; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 512


def build_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer trained on a few lines, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 3, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["sllmfs makes cold starts fast.", "The quick brown fox jumps over the lazy dog."] * 50
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(out)


def build_model(out: Path, arch: str = "llama", *, tied: bool = False, shard_size: str | None = None,
                safe: bool = True, hidden: int = 64, layers: int = 2, dtype: str = "bfloat16",
                seed: int = 0) -> Path:
    """Save a tiny causal LM (``llama`` or ``qwen2``) with a tokenizer into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=tied,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    with torch.no_grad():  # random init makes tiny models emit one token forever; spread the weights
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if shard_size:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(out, **kwargs)
    if not safe:  # a legacy PyTorch checkpoint; tied weights share storage in it
        for f in out.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    model.generation_config.save_pretrained(out)
    build_tokenizer(out)
    return out


def build_lora(base: Path, out: Path, seed: int = 1) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    return out
