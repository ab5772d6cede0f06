"""Configuration of `appendfs datanode` (TOML table ``[datanode]``, env ``APPENDFS_DATANODE_*``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appendfs.config import fraction, host_port, non_negative, option, positive


def _addresses(value: tuple[str, ...]) -> str | None:
    if not value:
        return "at least one MetaNode HOST:PORT is required"
    for v in value:
        if (reason := host_port(v)) is not None:
            return reason
    return None


def _block_multiple(value: int) -> str | None:
    return None if value > 0 and value % 4096 == 0 else "must be a positive multiple of 4096"


@dataclass(frozen=True)
class DataNodeConfig:
    data: Path = option(Path("/var/lib/appendfs/datanode"), "data directory (one device); stamped with node.json")
    listen: str = option("127.0.0.1:7100", "HOST:PORT to serve extents on", host_port)
    advertise: str | None = option(None, "HOST:PORT clients should use (default: listen)")
    metanode: tuple[str, ...] = option((), "MetaNode addresses HOST:PORT[,HOST:PORT...]; redirects are followed", _addresses)
    secret_file: Path = option(Path("/etc/appendfs/secret"), "cluster secret file written by `appendfs format`")
    failure_domain: str | None = option(None, "failure domain (rack, host); default: the node itself")
    direct_io: bool = option(True, "write extent data with O_DIRECT (falls back to buffered where refused)")
    commit_wait_s: float = option(0.005, "a group commit waits up to this long for writes still in flight to join it", non_negative)
    commit_bytes: int = option(8 << 20, "... but no longer than until this many bytes are waiting", positive)
    inline_write_bytes: int = option(64 << 10, "appends up to this size are written on the event loop when the "
                                               "device's write lane is idle (saves a thread hand-off; 0: never)",
                                     non_negative)
    inline_commit_s: float = option(0.005, "a group commit of at most inline_write_bytes runs its fdatasyncs on the "
                                           "event loop while commits average less than this (saves a thread "
                                           "hand-off; 0: never)", non_negative)
    capacity_bytes: int | None = option(None, "cap the device below the filesystem size (bytes)", positive)
    high_water: float = option(0.95, "fraction of capacity above which the device takes no new extents", fraction)
    reserve_bytes: int = option(64 << 20, "free bytes kept back: below this the device takes no new extents", non_negative)
    heartbeat_interval_s: float = option(1.0, "seconds between heartbeats to the MetaNode", positive)
    read_threads: int = option(4, "concurrent reads per device", positive)
    max_inflight: int = option(16, "requests in flight per connection (memory bound)", positive)
    scrub_bytes_s: int = option(16 << 20, "scrub: bytes per second re-verified against their block checksums "
                                          "(0 disables scrub)", non_negative)
    scrub_interval_s: float = option(86400.0, "scrub: seconds between two verifications of the same sealed extent",
                                     positive)
    scrub_chunk_bytes: int = option(1 << 20, "scrub: bytes read per step (a multiple of 4096)", _block_multiple)
    metrics: str | None = option(None, "HOST:PORT for Prometheus /metrics (off when unset)", host_port)
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")
