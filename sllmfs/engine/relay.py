"""Peer relays: load one GPU through other GPUs' PCIe links too (issue 26).

A copy bound for GPU g splits into a direct share (host -> g) and, for each idle
peer p given here, a relayed share: host -> a staging slot on p (p's own PCIe
link) -> g by a peer-to-peer copy (NVLink). Both stages of every path run at
once (one stream per slot on p). Each path claims its next 64 MiB block only
when its queued bytes have landed, so the shares follow the paths' measured
rates. The engine skips a peer, saying why in ``stats["relays"]``, when there
is no peer access either way, when the copy stages (its sources are not pinned:
relays read pinned segments only), or when the peer has no memory for the slots;
the bytes then go the direct way. Which GPUs may relay is the caller's choice
(the sidecar: :mod:`sllmfs.sidecar.gpucopy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sllmfs.engine.segments import MiB


@dataclass(frozen=True)
class Relay:
    """The peers (device ordinals in this process) that may carry a share of one copy."""

    peers: tuple[int, ...]
    slot_bytes: int = 32 * MiB  # staging on each peer = slots * slot_bytes
    slots: int = 4
    direct_window: int = 256 * MiB  # bytes the direct path may have queued while relays run

    def native(self) -> dict[str, Any]:
        return {"peers": list(self.peers), "slot_bytes": self.slot_bytes, "slots": self.slots,
                "direct_window": self.direct_window}


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """Adds to a copy's stats what went the direct way, and each relay's rate and share."""
    relays = stats.get("relays", [])
    carried = sum(int(r["bytes"]) for r in relays)
    total = int(stats.get("bytes", 0))
    stats["direct_bytes"] = total - carried
    for r in relays:
        r["gbps"] = r["bytes"] / r["busy_seconds"] / 1e9 if r["busy_seconds"] > 0 else 0.0
        r["share"] = r["bytes"] / total if total else 0.0
    return stats
