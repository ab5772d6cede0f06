"""``-o direct_io``: opens for reading only bypass the kernel's page cache.

Two mounts of one cluster: ``plain`` (the default) and ``direct`` (``-o direct_io``, the
fstab spelling, so the option's parsing is exercised too). What must hold:

* a read-only open of the direct mount sends every read(2) to the mount at the caller's
  size, twice for the same bytes read twice (the mount's ``fuse_read_bytes`` counter),
  while an open that may write keeps the page cache (a second read costs nothing);
* reads of any size at any offset, and past the end, return the file's bytes;
* a reader sees what another open of the same mount wrote and has not closed yet, and,
  opening after the writer of another mount closed, its new bytes (close-to-open);
* mmap: MAP_PRIVATE works; MAP_SHARED of a read-only direct open fails with ENODEV (the
  kernel's answer: libfuse 3.14 cannot ask for FUSE_DIRECT_IO_ALLOW_MMAP), of an open
  that may write it works, and without the option it works for a read-only open too.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
from collections.abc import Callable

import pytest
from cluster import Cluster, free_port, scrape
from mounts import Mount

MIB = 1 << 20


def _answered(port: int) -> float:
    return scrape(port)["appendfs_mount_fuse_read_bytes_total"]


def test_direct_io_reads_skip_the_page_cache_and_stay_correct(
        sqlite_url: str, make_cluster: Callable[..., Cluster], make_mount: Callable[..., Mount]) -> None:
    cluster = make_cluster(sqlite_url)
    plain = make_mount(cluster)
    port = free_port()
    direct = make_mount(cluster, "-o", "direct_io", env={"APPENDFS_MOUNT_METRICS": f"127.0.0.1:{port}"})
    rng = random.Random(2026)
    size = 9 * MIB + 12_345
    data = rng.randbytes(size)
    (plain.path / "f").write_bytes(data)
    f = direct.path / "f"

    # Every read of a read-only open reaches the mount, at the caller's size.
    fd = os.open(f, os.O_RDONLY)
    try:
        before = _answered(port)
        assert os.pread(fd, 4096, 8192) == data[8192:12288]
        assert os.pread(fd, 4096, 8192) == data[8192:12288]
        assert _answered(port) - before == 8192
    finally:
        os.close(fd)
    # An open that may write keeps the page cache: the same read again costs nothing.
    fd = os.open(f, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, 8192) == data[8192:12288]
        before = _answered(port)
        assert os.pread(fd, 4096, 8192) == data[8192:12288]
        assert _answered(port) == before
    finally:
        os.close(fd)

    # Whole-file reads in 1 MiB and odd sizes, random reads, past the end.
    for bs in (MIB, 131_071):
        with open(f, "rb", buffering=0) as r:
            got = bytearray()
            while chunk := r.read(bs):
                got += chunk
        assert bytes(got) == data, f"whole read in {bs}-byte reads"
    fd = os.open(f, os.O_RDONLY)
    try:
        for _ in range(200):
            off = rng.randrange(0, size + 100)
            n = rng.choice((1, 511, 4096, 65_537, MIB, 3 * MIB))
            assert os.pread(fd, n, off) == data[off:off + n], (off, n)
        assert os.pread(fd, 4096, size) == b""

        # What another open of this mount wrote, not yet closed, is read.
        w = os.open(f, os.O_RDWR)
        try:
            patch = rng.randbytes(300_000)
            os.pwrite(w, patch, 5 * MIB + 7)
            assert os.pread(fd, len(patch) + 20, 5 * MIB) == (data[5 * MIB:5 * MIB + 7] + patch + data[
                5 * MIB + 7 + len(patch):5 * MIB + 20 + len(patch)])
            tail = rng.randbytes(5000)
            os.pwrite(w, tail, size)  # grows the file
            assert os.pread(fd, 10_000, size - 100) == data[-100:] + tail
        finally:
            os.close(w)
        data = data[:5 * MIB + 7] + patch + data[5 * MIB + 7 + len(patch):] + tail
        size = len(data)
    finally:
        os.close(fd)
    assert f.read_bytes() == data

    # Close-to-open from another mount: new bytes written and closed there are read on
    # the next open here.
    new = rng.randbytes(size)
    (plain.path / "f").write_bytes(new)
    assert f.read_bytes() == new

    # mmap.
    with open(f, "rb") as r:
        with pytest.raises(OSError) as err:
            mmap.mmap(r.fileno(), 0, access=mmap.ACCESS_READ)
        assert err.value.errno == errno.ENODEV
        m = mmap.mmap(r.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        try:
            assert m[:] == new
        finally:
            m.close()
    with open(f, "r+b") as rw:
        m = mmap.mmap(rw.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            assert m[:] == new
        finally:
            m.close()
    with open(plain.path / "f", "rb") as r:
        m = mmap.mmap(r.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            assert m[:] == new
        finally:
            m.close()
