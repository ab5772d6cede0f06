"""Prometheus metrics for every daemon: one HTTP endpoint serving /metrics.

Daemons keep plain counters in dicts (cheap on hot paths); a collector reads them when
Prometheus scrapes. The endpoint runs in prometheus_client's own thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from appendfs.config import parse_host_port


class _DictCollector(Collector):
    def __init__(self, prefix: str, read: Callable[[], dict[str, float]]) -> None:
        self.prefix = prefix
        self.read = read

    def collect(self) -> Iterator[Any]:
        for key, value in sorted(self.read().items()):
            yield GaugeMetricFamily(f"{self.prefix}_{key}", f"{self.prefix.removeprefix('appendfs_')}: {key.replace('_', ' ')}", value=float(value))


def serve_metrics(address: str | None, prefix: str, read: Callable[[], dict[str, float]]) -> int | None:
    """Register the collector and, if ``address`` is set, serve /metrics there; return the port."""
    REGISTRY.register(_DictCollector(prefix, read))
    if not address:
        return None
    host, port = parse_host_port(address)
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
