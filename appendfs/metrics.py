"""Prometheus metrics for every daemon: one HTTP endpoint serving /metrics.

Daemons keep plain counters in dicts (cheap on hot paths); a collector reads them when
Prometheus scrapes. The endpoint runs in prometheus_client's own thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from appendfs.config import parse_host_port

#: Metric families with labels (histograms, counters by label), built by the daemon at scrape.
Families = Callable[[], Iterable[Any]]


class _DictCollector(Collector):
    def __init__(self, prefix: str, read: Callable[[], dict[str, float]], families: Families | None) -> None:
        self.prefix = prefix
        self.read = read
        self.families = families

    def collect(self) -> Iterator[Any]:
        for key, value in sorted(self.read().items()):
            yield GaugeMetricFamily(f"{self.prefix}_{key}", f"{self.prefix.removeprefix('appendfs_')}: {key.replace('_', ' ')}", value=float(value))
        if self.families is not None:
            yield from self.families()


def serve_metrics(address: str | None, prefix: str, read: Callable[[], dict[str, float]],
                  families: Families | None = None) -> int | None:
    """Register the collector and, if ``address`` is set, serve /metrics there; return the port.

    ``read`` gives plain numbers (each a gauge named ``prefix_key``); ``families``, if set,
    gives ready prometheus_client metric families (labelled histograms and counters)."""
    REGISTRY.register(_DictCollector(prefix, read, families))
    if not address:
        return None
    host, port = parse_host_port(address)
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
