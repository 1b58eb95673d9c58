"""Variant keys for SGLang's per-rank post-processed state.

``sglang.tp{size}.r{rank}[.pp{size}.s{stage}][.ep{size}][.draft{n}].{dtype}.{quant}.v{version}``,
e.g. ``sglang.tp2.r0.bfloat16.none.v0.5.17``. Everything that changes the bytes
or shapes of a rank's state is in the key, so a start with another TP size,
dtype, quantization or SGLang release never picks up state it cannot use; a
speculative draft model read from the same checkpoint (MTP) gets its own key.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from sllmfs.core import names
from sllmfs.core.errors import BadInput

PREFIX = "sglang."
_KEY = re.compile(
    r"^sglang\.tp(?P<tp_size>\d+)\.r(?P<tp_rank>\d+)"
    r"(?:\.pp(?P<pp_size>\d+)\.s(?P<pp_rank>\d+))?"
    r"(?:\.ep(?P<ep_size>\d+))?"
    r"(?:\.draft(?P<draft>\d+))?"
    r"\.(?P<dtype>[a-z0-9]+)\.(?P<quant>[a-z0-9_+-]+)\.v(?P<version>[a-z0-9][a-z0-9._+-]*)$"
)


def _field(text: str) -> str:
    """Lowercase, and anything the key cannot hold becomes '-' (dots separate fields)."""
    return re.sub(r"[^a-z0-9_+-]", "-", text.lower())


@dataclass(frozen=True)
class RankVariant:
    tp_size: int
    tp_rank: int
    dtype: str  # torch name: bfloat16, float16, float32 ...
    quant: str  # SGLang quantization name, "none" when unquantized
    sglang_version: str
    pp_size: int = 1
    pp_rank: int = 0
    ep_size: int = 1
    draft: int | None = None  # speculative draft model (its index for multi-layer MTP), None: the target

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size and self.ep_size >= 1):
            raise BadInput(f"impossible parallel layout: tp rank {self.tp_rank} of {self.tp_size}, "
                           f"pp stage {self.pp_rank} of {self.pp_size}, ep {self.ep_size}")

    @property
    def key(self) -> str:
        parts = [f"sglang.tp{self.tp_size}.r{self.tp_rank}"]
        if self.pp_size > 1:
            parts.append(f"pp{self.pp_size}.s{self.pp_rank}")
        if self.ep_size > 1:
            parts.append(f"ep{self.ep_size}")
        if self.draft is not None:
            parts.append(f"draft{self.draft}")
        version = re.sub(r"[^a-z0-9._+-]", "-", self.sglang_version.lower())
        parts += [_field(self.dtype).replace("-", ""), _field(self.quant).replace(".", "-"), "v" + version]
        return names.check_variant(".".join(parts))

    def layout(self) -> dict[str, Any]:
        """What a stored variant records about itself (manifest metadata), checked on load."""
        return asdict(self)


def make(*, tp_size: int, tp_rank: int, dtype: Any, quant: str | None, sglang_version: str,
         pp_size: int = 1, pp_rank: int = 0, ep_size: int = 1, draft: int | None = None) -> RankVariant:
    """Build from SGLang's values: ``dtype`` may be a torch dtype, ``quant`` None."""
    return RankVariant(
        tp_size=int(tp_size), tp_rank=int(tp_rank),
        dtype=str(dtype).removeprefix("torch.").lower(),
        quant=(quant or "none").lower(), sglang_version=str(sglang_version).lower(),
        pp_size=int(pp_size), pp_rank=int(pp_rank), ep_size=int(ep_size),
        draft=None if draft is None else int(draft),
    )


def parse(key: str) -> RankVariant:
    m = _KEY.match(names.check_variant(key))
    if m is None:
        raise BadInput(f"{key!r} is not an SGLang variant key (expected e.g. sglang.tp2.r0.bfloat16.none.v0.5.17)")
    g = m.groupdict()
    return RankVariant(
        tp_size=int(g["tp_size"]), tp_rank=int(g["tp_rank"]), dtype=g["dtype"], quant=g["quant"],
        sglang_version=g["version"], pp_size=int(g["pp_size"] or 1), pp_rank=int(g["pp_rank"] or 0),
        ep_size=int(g["ep_size"] or 1), draft=None if g["draft"] is None else int(g["draft"]),
    )


def is_sglang(key: str) -> bool:
    return key.startswith(PREFIX)


def siblings(keys: list[str], want: RankVariant) -> list[str]:
    """Stored SGLang variants of the same model that this process cannot use (for messages)."""
    return sorted(k for k in keys if is_sglang(k) and k != want.key)
