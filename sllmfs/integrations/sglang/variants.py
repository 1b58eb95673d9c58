"""SGLang's per-rank variant keys: ``sglang.tp{size}.r{rank}…`` (sllmfs.integrations.common.variants).

e.g. ``sglang.tp2.r0.bfloat16.none.v0.5.17``; the key and the layout recorded in
the manifest (``sglang_version``) are those every earlier sllmfs wrote.

Across releases: a variant holds the state SGLang's model classes and their
post-processing made, so another release may use it only when it lays the state
out the same way, byte for byte. Between 0.5.17 and 0.5.23 every file that shapes
even a dense model's rank state changed in every release (layers/linear.py,
layers/quantization/unquant.py, layers/vocab_parallel_embedding.py,
models/llama.py, qwen2.py, model_loader/weight_utils.py), so no release is known
to share another's layout: the release stays in the key and in the recorded layout,
each release writes and reads its own (a start on a new release takes the any-TP
path once and writes its own; the older release's variant stays for it), and a
variant whose recorded release differs from its key is refused
(``common.variants.layout_problem``). Tested with real SGLang in
tests/integrations/sglang/test_sglang_e2e.py.
"""

from __future__ import annotations

from typing import Any

from sllmfs.integrations.common import variants
from sllmfs.integrations.common.variants import Framework, RankVariant

SGLANG = Framework("sglang", "SGLang")


def make(*, tp_size: int, tp_rank: int, dtype: Any, quant: str | None, sglang_version: str,
         pp_size: int = 1, pp_rank: int = 0, ep_size: int = 1, draft: int | None = None) -> RankVariant:
    """Build from SGLang's values: ``dtype`` may be a torch dtype, ``quant`` None."""
    return variants.make(SGLANG, tp_size=tp_size, tp_rank=tp_rank, dtype=dtype, quant=quant, version=sglang_version,
                         pp_size=pp_size, pp_rank=pp_rank, ep_size=ep_size, draft=draft)


def parse(key: str) -> RankVariant:
    return variants.parse(SGLANG, key)


def is_sglang(key: str) -> bool:
    return variants.is_framework(SGLANG, key)
