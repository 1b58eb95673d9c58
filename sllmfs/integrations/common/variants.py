"""Variant keys for a framework's per-rank post-processed state.

``{framework}.tp{size}.r{rank}[.pp{size}.s{stage}][.ep{size}][.draft{n}].{dtype}.{quant}.v{version}``,
e.g. ``sglang.tp2.r0.bfloat16.none.v0.5.17``. Everything that changes the bytes
or shapes of a rank's state is in the key, so a start with another TP size,
dtype, quantization or framework release never picks up state it cannot use; a
speculative draft model read from the same checkpoint (MTP) gets its own key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sllmfs.core import names
from sllmfs.core.errors import BadInput


@dataclass(frozen=True)
class Framework:
    name: str  # the keys' first field and the manifest metadata's name for the layout, e.g. "sglang"
    label: str  # for messages, e.g. "SGLang"

    @property
    def prefix(self) -> str:
        return self.name + "."

    @property
    def state_kind(self) -> str:
        """The manifest metadata's ``kind`` of a rank state this framework's loader wrote."""
        return f"{self.name}-rank-state"

    def pattern(self) -> re.Pattern[str]:
        return re.compile(
            rf"^{re.escape(self.name)}\.tp(?P<tp_size>\d+)\.r(?P<tp_rank>\d+)"
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
    framework: Framework
    tp_size: int
    tp_rank: int
    dtype: str  # torch name: bfloat16, float16, float32 ...
    quant: str  # the framework's quantization name, "none" when unquantized
    version: str  # the framework's release
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
        parts = [f"{self.framework.name}.tp{self.tp_size}.r{self.tp_rank}"]
        if self.pp_size > 1:
            parts.append(f"pp{self.pp_size}.s{self.pp_rank}")
        if self.ep_size > 1:
            parts.append(f"ep{self.ep_size}")
        if self.draft is not None:
            parts.append(f"draft{self.draft}")
        version = re.sub(r"[^a-z0-9._+-]", "-", self.version.lower())
        parts += [_field(self.dtype).replace("-", ""), _field(self.quant).replace(".", "-"), "v" + version]
        return names.check_variant(".".join(parts))

    def layout(self) -> dict[str, Any]:
        """What a stored variant records about itself (manifest metadata), checked on load. The
        fields and their order are on disk: ``<framework>_version`` names the release."""
        return {"tp_size": self.tp_size, "tp_rank": self.tp_rank, "dtype": self.dtype, "quant": self.quant,
                f"{self.framework.name}_version": self.version, "pp_size": self.pp_size,
                "pp_rank": self.pp_rank, "ep_size": self.ep_size, "draft": self.draft}


def make(framework: Framework, *, tp_size: int, tp_rank: int, dtype: Any, quant: str | None, version: str,
         pp_size: int = 1, pp_rank: int = 0, ep_size: int = 1, draft: int | None = None) -> RankVariant:
    """Build from the framework's values: ``dtype`` may be a torch dtype, ``quant`` None."""
    return RankVariant(
        framework=framework, tp_size=int(tp_size), tp_rank=int(tp_rank),
        dtype=str(dtype).removeprefix("torch.").lower(),
        quant=(quant or "none").lower(), version=str(version).lower(),
        pp_size=int(pp_size), pp_rank=int(pp_rank), ep_size=int(ep_size),
        draft=None if draft is None else int(draft),
    )


def parse(framework: Framework, key: str) -> RankVariant:
    m = framework.pattern().match(names.check_variant(key))
    if m is None:
        raise BadInput(f"{key!r} is not an {framework.label} variant key (expected e.g. "
                       f"{framework.name}.tp2.r0.bfloat16.none.v0.5.17)")
    g = m.groupdict()
    return RankVariant(
        framework=framework, tp_size=int(g["tp_size"]), tp_rank=int(g["tp_rank"]), dtype=g["dtype"],
        quant=g["quant"], version=g["version"], pp_size=int(g["pp_size"] or 1), pp_rank=int(g["pp_rank"] or 0),
        ep_size=int(g["ep_size"] or 1), draft=None if g["draft"] is None else int(g["draft"]),
    )


def is_framework(framework: Framework, key: str) -> bool:
    return key.startswith(framework.prefix)


def layout_problem(meta: dict[str, Any], want: RankVariant) -> str | None:
    """Why a stored per-rank variant (its manifest metadata) cannot serve this process, or None."""
    fw = want.framework
    if meta.get("kind") != fw.state_kind:
        return f"it was not written by the {fw.label} loader"
    if meta.get(fw.name) != want.layout():
        return f"it was written for {meta.get(fw.name)}, this process is {want.layout()}"
    return None
