"""Hostile peers cannot exhaust the daemon (issue 19): a connection cap per process and in all, idle
timeouts, and message bodies that take memory only as their bytes arrive."""

from __future__ import annotations

from pathlib import Path

import bench.reliability as rel


def test_a_connection_flood_leaves_others_served(tmp_path: Path) -> None:
    r = rel.scenario_flood(tmp_path, processes=1, per_process=3000, probes=20)
    assert r["daemon_connections_during"] <= 64 + 2  # the flood's process got its share, no more
    assert r["refused"] >= 3000 - 64
    assert r["status_median_ms"] < 100, r
    assert r["mount_listing_ok"] and r["acquired_tensors"] > 0
    assert r["rss_kib"]["during"] - r["rss_kib"]["before"] < 64 << 10, r  # no 16 MiB per stalled peer
    assert r["silent_closed"] and r["silent_closed_after_s"] >= 9  # the hello timeout
    assert r["connections_after"] == 1
