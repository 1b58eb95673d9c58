"""`sllmfs load --backend transformers`: load through the sidecar, time it, prove it generates."""

from __future__ import annotations

import time
from pathlib import Path

from sllmfs.cli.progress import human, out
from sllmfs.core.errors import BadInput
from sllmfs.core.names import HF_VARIANT
from sllmfs.core.scratch import scratch_dir

PROMPT = "sllmfs makes cold starts"


def load_transformers(model: str, *, adapter: str | None, precision: str | None, device: str,
                      socket: str | None) -> None:
    try:
        import torch

        from sllmfs.integrations.transformers import fetch_files, load_lora, load_model
    except ImportError as e:
        raise BadInput(f"--backend transformers needs torch and transformers ({e.name} is missing): "
                       "pip install 'sllmfs[transformers]'") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: torch {torch.__version__} sees no GPU; use --device cpu")
    dtype = None
    if precision:
        dtype = getattr(torch, precision, None)
        if not isinstance(dtype, torch.dtype):
            raise BadInput(f"--precision {precision!r} is not a torch dtype (try bfloat16, float16, float32)")
    from transformers import AutoTokenizer

    from sllmfs.client.client import connect

    with scratch_dir("sllmfs-meta-") as tmp:
        t0 = time.perf_counter()
        with connect(socket) as c:  # config and tokenizer files, fetched once for both
            meta = fetch_files(c, model, HF_VARIANT, Path(tmp))
        m, stats = load_model(model, device_map=device, torch_dtype=dtype, socket=socket, return_stats=True,
                              files_dir=meta)
        if adapter:
            m = load_lora(m, model, adapter, socket=socket)
        seconds = time.perf_counter() - t0
        out.print(f"loaded {model}{' + ' + adapter if adapter else ''} to {device}: {human(stats.bytes)} in "
                      f"{seconds:.3f} s ({stats.bytes / seconds / 1e9:.2f} GB/s end to end; "
                      f"weights moved at {stats.engine.get('gbps', 0.0):.2f} GB/s)")
        if not _has_tokenizer(meta):
            out.print(f"generation skipped: model {model!r} has no tokenizer files (tokenizer.json, "
                      "tokenizer.model, vocab.json, ...); save them beside the weights to try a prompt")
            return
        tok = AutoTokenizer.from_pretrained(meta)
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        generated = m.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    out.print(f"generated {generated.shape[1] - ids.shape[1]} tokens: {PROMPT!r} -> {text!r}")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)
