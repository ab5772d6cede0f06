"""Configuration of the store client (TOML table ``[client]``, env ``APPENDFS_CLIENT_*``)."""

from __future__ import annotations

from dataclasses import dataclass

from appendfs.config import option, positive


def _frame_sized(value: int) -> str | None:
    """Appends and reads travel in one frame each: keep them well inside its bound."""
    return None if 4096 <= value <= 8 << 20 else "must be between 4096 and 8388608 bytes"


def _cell_sized(value: int) -> str | None:
    """An EC cell is a whole number of checksum blocks, and K of them must fit a frame."""
    return None if value % 4096 == 0 and 4096 <= value <= 4 << 20 else "must be a multiple of 4096 from 4096 to 4194304"


@dataclass(frozen=True)
class ClientConfig:
    append_bytes: int = option(1 << 20, "largest single append sent to DataNodes (bytes)", _frame_sized)
    window_bytes: int = option(16 << 20, "unacknowledged bytes buffered per stream (memory bound, backpressure)", positive)
    append_timeout_s: float = option(15.0, "a replica silent this long while appends wait for it is failed (checked every quarter of it)", positive)
    read_timeout_s: float = option(15.0, "a replica that does not answer a read within this is skipped", positive)
    read_bytes: int = option(4 << 20, "bytes per read request", _frame_sized)
    read_parallel: int = option(4, "read requests in flight for one sequential read", positive)
    connect_timeout_s: float = option(5.0, "TCP connect + handshake deadline", positive)
    leader_wait_s: float = option(60.0, "how long calls wait for a MetaNode leader before failing", positive)
    placement_wait_s: float = option(30.0, "how long an append waits for enough healthy DataNodes before failing", positive)
    max_resends: int = option(8, "extent switches for one append before it fails", positive)
    short_circuit: bool = option(True, "read sealed extents of DataNodes on this host from their files "
                                       "(verified as usual; see store/client/local.py)")
    local_inline_bytes: int = option(64 << 10, "short-circuit reads up to this size run on the event loop, "
                                               "larger ones in a worker thread (bytes)", positive)
    local_direct_reads: bool = option(True, "short-circuit reads in worker threads use O_DIRECT: no page-cache "
                                            "copy (off: buffered, the page cache keeps what was read)")
    ec_cell_bytes: int = option(64 << 10, "cell size of new ec:K+M streams (bytes; fixed per stream, "
                                          "see docs/erasure-coding.md §2)", _cell_sized)
