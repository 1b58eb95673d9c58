"""SGLang's per-rank variant keys: ``sglang.tp{size}.r{rank}…`` (sllmfs.integrations.common.variants).

e.g. ``sglang.tp2.r0.bfloat16.none.v0.5.17``; the key and the layout recorded in
the manifest (``sglang_version``) are those every earlier sllmfs wrote.
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
