"""Configuration of `appendfs metanode` (TOML table ``[metanode]``, env ``APPENDFS_METANODE_*``)."""

from __future__ import annotations

from dataclasses import dataclass

from appendfs.config import host_port, option, positive


@dataclass(frozen=True)
class MetaNodeConfig:
    listen: str = option("127.0.0.1:7000", "HOST:PORT to serve clients and DataNodes on", host_port)
    advertise: str | None = option(None, "HOST:PORT written into the leader row (default: listen)")
    lease_ttl_s: float = option(10.0, "a stream lease ends this long after its last renewal; then it is fenced", positive)
    dead_after_s: float = option(5.0, "a DataNode silent this long is dead: no new extents, counted as missing", positive)
    write_min: int | None = option(None, "fewest replicas an extent may be placed on (default N-1, at least 1)", positive)
    election_interval_s: float = option(1.0, "how often a standby tries to take the leadership", positive)
    create_timeout_s: float = option(10.0, "deadline of extent create/seal calls to DataNodes", positive)
    metrics: str | None = option(None, "HOST:PORT for Prometheus /metrics (off when unset)", host_port)
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")
