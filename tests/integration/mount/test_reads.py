"""Reads through a real mount fetch each byte from the store once.

The mount's ``read_fetch_bytes`` metric counts what file reads asked the store for (block
fetches and uncached reads). A cold sequential read must fetch the file's bytes once:
the kernel's readahead keeps several requests of one window in flight, our tasks may take
them out of order, and such a request used to count as a random read — read again from
the disk, uncached — and to break the readahead streak (~8% of a cold read, twice).
Random reads of bytes the block cache holds are served from it.

The reordering cannot be forced from a test (it showed on cold reads of a 1 GiB file on a
busy disk, docs/benchmarks.md); what the test pins is the outcome: a bound on the bytes
fetched for a sequential read, and no fetch at all for random reads of cached blocks
(which is also what makes an out-of-order request cheap).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

from cluster import Cluster, free_port, random_file, scrape, wait_for
from mounts import Mount, drop_page_cache

from appendfs.fs import FsConfig

MIB = 1 << 20


def _fetched(port: int) -> float:
    return scrape(port)["appendfs_mount_read_fetch_bytes"]


def _unread(port: int) -> float:
    """Cached bytes fetched for a reader that has not read them yet: readahead only
    fetches into the room the rest of the cache leaves, so none may be left behind."""
    return scrape(port)["appendfs_mount_cache_unread_bytes"]


def _read_all(path: Path) -> bytes:
    got = bytearray()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MIB):
            got += chunk
    return bytes(got)


def test_cold_sequential_reads_fetch_every_byte_once_and_random_reads_use_cached_blocks(
        sqlite_url: str, make_cluster: Callable[..., Cluster], make_mount: Callable[..., Mount],
        tmp_path: Path) -> None:
    port = free_port()
    m = make_mount(make_cluster(sqlite_url), env={"APPENDFS_MOUNT_METRICS": f"127.0.0.1:{port}"})
    small, big = 16 * MIB, 96 * MIB
    data = {n: random_file(tmp_path / f"src{n}", n, seed=73 + n % 7).read_bytes() for n in (small, big)}
    for n, d in data.items():
        (m.path / str(n)).write_bytes(d)
        drop_page_cache(m.path / str(n))

    # A file smaller than the block cache (64 MiB), read once, then 4 KiB random reads
    # anywhere in it, with the kernel's own readahead off: all from the cache.
    f_small = m.path / str(small)
    before = _fetched(port)
    assert _read_all(f_small) == data[small]
    assert small <= _fetched(port) - before <= small + 2 * MIB
    assert _unread(port) == 0
    drop_page_cache(f_small)
    rng = random.Random(5)
    before = _fetched(port)
    with open(f_small, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(100):
            off = rng.randrange(0, small - 4096) // 4096 * 4096
            assert os.pread(f.fileno(), 4096, off) == data[small][off:off + 4096]
    assert _fetched(port) - before == 0

    # Files shorter than a block, read whole, and a reader that stops after 6 MiB of a
    # 40 MiB file and closes it (readahead was ahead of it) leave no unread bytes behind.
    for i in range(20):
        (m.path / f"s{i}").write_bytes(bytes([i]) * (10_000 + i))
    (m.path / "mid").write_bytes(data[big][:40 * MIB])
    drop_page_cache(m.path)
    assert all(_read_all(m.path / f"s{i}") == bytes([i]) * (10_000 + i) for i in range(20))
    assert _unread(port) == 0
    with open(m.path / "mid", "rb", buffering=0) as f:
        for _ in range(6):
            assert len(f.read(MIB)) == MIB
        wait_for(lambda: _unread(port) > 0, "readahead to fetch ahead of the reader", 20)
    wait_for(lambda: _unread(port) == 0, "the closed reader's readahead to stop counting as unread", 20)
    # A reader that starts in a block's middle never takes all of that block: it stops
    # counting as unread once the reader closes too.
    (m.path / "mid2").write_bytes(data[big][:20 * MIB])
    drop_page_cache(m.path / "mid2")
    with open(m.path / "mid2", "rb", buffering=0) as f:
        f.seek(3 * MIB // 2)
        while f.read(MIB):
            pass
    wait_for(lambda: _unread(port) == 0, "a block read from its middle to stop counting as unread", 20)

    # A cold sequential read: each byte once; one block (the default block_bytes) of slack
    # for a block that straddles two slices.
    before = _fetched(port)
    assert _read_all(m.path / str(big)) == data[big]
    fetched = _fetched(port) - before
    assert big <= fetched <= big + FsConfig().block_bytes, f"a cold sequential read of {big} bytes fetched {fetched:.0f}"
    assert _unread(port) == 0
