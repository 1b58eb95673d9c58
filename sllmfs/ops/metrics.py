"""Prometheus endpoint (``--metrics-port``): the sidecar's status as gauges and counters.

The daemon refreshes a status snapshot (``Server.status()``: the dict
``sllmfs status --json`` prints) every few seconds; the collector only reads the latest one, so a
scrape never waits on the trio loop or the disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from sllmfs.core.errors import BadInput

Snapshot = Callable[[], dict[str, Any] | None]


class StatusCollector:
    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot()
        if not s:
            return
        tier = GaugeMetricFamily("sllmfs_tier_bytes", "Bytes used per cache tier", labels=["tier"])
        tier.add_metric(["memory"], s["memory"]["used"])
        tier.add_metric(["disk"], s["disk"]["used"])
        yield tier
        budget = GaugeMetricFamily("sllmfs_tier_budget_bytes", "Budget per cache tier (0: unbounded)", labels=["tier"])
        budget.add_metric(["memory"], s["memory"]["budget"])
        budget.add_metric(["disk"], s["disk"]["budget"] or 0)
        yield budget
        yield GaugeMetricFamily("sllmfs_mount_copy_bytes", "Bytes of the memory tier held by the mount's passthrough "
                                "backing copies (part of sllmfs_tier_bytes{tier=\"memory\"})",
                                value=s["memory"].get("mount_copies", 0))
        models = GaugeMetricFamily("sllmfs_models", "Models per tier", labels=["tier"])
        for t in ("memory", "disk"):
            models.add_metric([t], sum(1 for m in s["models"] if m["tier"] == t))
        yield models
        yield GaugeMetricFamily("sllmfs_leases", "Leases held by clients", value=len(s["leases"]))
        yield GaugeMetricFamily("sllmfs_connections", "Open client connections", value=s["connections"])
        c = s["counters"]
        for key, help_ in (("hits", "Acquires served from the memory tier"),
                           ("misses", "Acquires that started a fill"),
                           ("fills", "Fills from the store"),
                           ("bytes_filled", "Bytes read from the store into memory"),
                           ("evictions", "Variants evicted from the memory tier"),
                           ("client_errors", "Requests answered with an error")):
            yield CounterMetricFamily(f"sllmfs_{key}", help_, value=c.get(key, 0))


def serve_metrics(port: int, snapshot: Snapshot, addr: str = "127.0.0.1") -> None:
    """Start the HTTP endpoint in a daemon thread (localhost unless ``addr`` says otherwise)."""
    try:
        from prometheus_client import start_http_server
        from prometheus_client.core import REGISTRY
    except ImportError:
        raise BadInput("--metrics-port needs prometheus-client: pip install 'sllmfs[metrics]'") from None
    REGISTRY.register(StatusCollector(snapshot))
    try:
        start_http_server(port, addr=addr)
    except OSError as e:
        raise BadInput(f"cannot serve metrics on {addr}:{port} ({e.strerror}); pick another --metrics-port") from None
