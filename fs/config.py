"""Configuration of the file layer (TOML table ``[fs]``, env ``APPENDFS_FS_*``).

Shared by every process that runs a :class:`~appendfs.fs.FileSystem`: the mount and the S3
gateway. Memory bounds: ``write_buffer_bytes`` (dirty + unacknowledged + uncommitted
file data) plus ``cache_bytes`` (verified extent blocks) plus the store client's
per-stream windows make up nearly all of a mount's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from appendfs.config import non_negative, option, positive
from appendfs.store.ec import Layout, LayoutError
from appendfs.store.placement import PolicyError, parse_policy


def _policy(value: str) -> str | None:
    try:
        p = parse_policy(value).final
        if p.kind == "ec":
            Layout(p.data, p.parity)
    except (PolicyError, LayoutError) as exc:
        return str(exc)
    return None


def _chunk(value: int) -> str | None:
    return None if 64 << 10 <= value <= 64 << 20 and value % 4096 == 0 else \
        "must be a multiple of 4096 between 65536 and 67108864"


@dataclass(frozen=True)
class FsConfig:
    redundancy: str = option("rep:3", "redundancy of files whose directory sets no user.appendfs.redundancy", _policy)
    streams_per_policy: int = option(4, "LogStreams this client writes in parallel per redundancy policy", positive)
    chunk_bytes: int = option(4 << 20, "a file's write buffer becomes a slice at this size", _chunk)
    write_buffer_bytes: int = option(96 << 20, "file data buffered until committed, all files together (backpressure)", positive)
    flush_age_s: float = option(5.0, "a write buffer untouched this long is sent to the store", positive)
    cache_bytes: int = option(64 << 20, "verified extent blocks kept in memory for sequential reads", non_negative)
    block_bytes: int = option(4 << 20, "unit of the block cache and of readahead requests", _chunk)
    readahead_bytes: int = option(16 << 20, "largest readahead window of one sequential reader; the most one S3 GET buffers", positive)
    readahead_parallel: int = option(8, "readahead block reads in flight, all readers of this client together (an S3 GET: at most this many)", positive)
    attr_timeout_s: float = option(1.0, "how long the kernel may cache attributes (close-to-open still holds)", non_negative)
    entry_timeout_s: float = option(1.0, "how long the kernel may cache a name → inode lookup", non_negative)
    meta_timeout_s: float = option(15.0, "a namespace call fails with EIO after the database is unreachable this long", positive)
    meta_pool: int = option(8, "database connections (and threads) of this client", positive)
    inline_sqlite_reads: bool = option(True, "on SQLite, run namespace reads on the event loop instead of a thread")
    inline_sqlite_writes: bool = option(True, "on SQLite, run short namespace writes on the event loop instead of a thread")
    inline_sync_s: float = option(0.001, "the WAL fsync of inline writes runs on the event loop while fsyncs average under this; 0: always in a thread", non_negative)
    session_ttl_s: float = option(60.0, "this client is declared dead (its open files released) after this silence", positive)
    statfs_cache_s: float = option(2.0, "statfs answers are reused for this long", non_negative)
    maintenance_interval_s: float = option(10.0, "period of dead-session cleanup and deleted-file purge", positive)

    def __post_init__(self) -> None:
        if self.write_buffer_bytes < 2 * self.chunk_bytes:
            raise ValueError("write_buffer_bytes must be at least twice chunk_bytes")
