"""What ``sllmfs save --backend <framework>`` checks before it starts an engine to write per-rank state."""

from __future__ import annotations

from sllmfs.core import names
from sllmfs.core.errors import BadInput
from sllmfs.store.store import ModelInfo, Store


def stored_for_rank_state(store: Store, model: str, tp_size: int, framework: str) -> ModelInfo:
    """The stored model an engine can build and load to write its ranks' state, or one line saying why not."""
    if tp_size < 1:
        raise BadInput(f"--tensor-parallel-size {tp_size} must be 1 or more")
    info = store.get(model)
    if names.HF_VARIANT not in info.variants:
        raise BadInput(f"model {model!r} has no hf variant; run `sllmfs save --model {model} ...` first")
    if "config.json" not in info.files:
        raise BadInput(f"model {model!r} was stored without config.json; {framework} cannot build it")
    return info
