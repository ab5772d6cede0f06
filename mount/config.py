"""Configuration of the mount daemon (TOML table ``[mount]``, env ``APPENDFS_MOUNT_*``).

The file layer's settings are in ``[fs]`` (:class:`appendfs.fs.FsConfig`) and the store
client's in ``[client]``; this table holds only what is about the FUSE mount itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from appendfs.config import host_port, non_negative, option, positive


@dataclass(frozen=True)
class MountConfig:
    allow_other: bool = option(False, "let users other than the one mounting use the mount (multi-user hosts)")
    fsname: str = option("appendfs", "the source shown by mount(8) and df")
    max_tasks: int = option(64, "FUSE requests served at once", positive)
    read_ahead_kb: int = option(4096, "kernel readahead of the mount (its bdi read_ahead_kb); 0 keeps the kernel's 128", non_negative)
    direct_io: bool = option(False, "opens for reading only bypass the kernel's page cache: faster large sequential reads, "
                             "no page cache filled by scans; a MAP_SHARED mmap of such an open fails (ENODEV) and each "
                             "read(2) is one FUSE request (docs/mount.md)")
    metrics: str | None = option(None, "serve Prometheus /metrics on HOST:PORT", host_port)
    slow_request_s: float = option(5.0, "log a warning for each FUSE request that takes at least this long; 0: never",
                                   non_negative)
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")
