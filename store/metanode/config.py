"""Configuration of `appendfs metanode` (TOML table ``[metanode]``, env ``APPENDFS_METANODE_*``)."""

from __future__ import annotations

from dataclasses import dataclass

from appendfs.config import host_port, non_negative, option, positive


@dataclass(frozen=True)
class MetaNodeConfig:
    listen: str = option("127.0.0.1:7000", "HOST:PORT to serve clients and DataNodes on", host_port)
    advertise: str | None = option(None, "HOST:PORT written into the leader row (default: listen)")
    lease_ttl_s: float = option(10.0, "a stream lease ends this long after its last renewal; then it is fenced", positive)
    dead_after_s: float = option(5.0, "a DataNode silent this long is dead: no new extents, counted as missing", positive)
    write_min: int | None = option(None, "fewest replicas an extent may be placed on (default N-1, at least 1)", positive)
    ec_missing_max: int = option(1, "ec:K+M extents may start with this many fragments unplaced (never fewer than "
                                     "K+1 placed); repair places them once sealed. 0: every fragment", non_negative)
    election_interval_s: float = option(1.0, "how often a standby tries to take the leadership", positive)
    create_timeout_s: float = option(10.0, "deadline of extent create/seal calls to DataNodes", positive)
    repair_after_s: float = option(600.0, "a DataNode silent this long is dead for good: its replicas and fragments "
                                          "are re-created on other nodes", positive)
    repair_bytes_s: int = option(128 << 20, "bandwidth limit of repair, drain and rebalance together (bytes/s read)", positive)
    repair_parallel: int = option(2, "extents re-created at once (each gets repair_bytes_s / repair_parallel)", positive)
    maintain_interval_s: float = option(5.0, "how often the leader looks for repair, drain and rebalance work", positive)
    rebalance_spread: float = option(0.1, "rebalance until every DataNode stores within this fraction of its share "
                                          "(0: never rebalance)", non_negative)
    delete_grace_s: float = option(30.0, "a moved replica's old copy is deleted this long after the move", non_negative)
    metrics: str | None = option(None, "HOST:PORT for Prometheus /metrics (off when unset)", host_port)
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")
