"""FileBackend specifics beyond the backend contract: its descriptor cache, writes
from page-aligned buffers without the staging copy, zeros written ahead of small appends,
and how full a device without
``capacity_bytes`` is (the filesystem as ``df`` counts it).

The cache holds at most ``_MAX_OPEN_EXTENTS`` descriptors and evicts the least recently
used. A descriptor evicted while another thread is in a call with it (a long fdatasync of
the sync lane, a read of the read lane) must stay open until that call ends: closed under
it, its number could be handed to the next open, and the call would write to or sync
another extent's file.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appendfs.store.buffers import aligned_bytearray
from appendfs.store.datanode import filebackend
from appendfs.store.datanode.backend import ExtentMeta
from appendfs.store.datanode.extents import ExtentStore
from appendfs.store.datanode.filebackend import FileBackend

MiB = 1 << 20


def _target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


def test_an_evicted_descriptor_stays_open_while_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filebackend, "_MAX_OPEN_EXTENTS", 2)
    backend = FileBackend(tmp_path / "dev")
    try:
        for extent_id in range(1, 6):
            backend.create(ExtentMeta(extent_id=extent_id, stream_id=1, epoch=1, index=0))
            backend.write_data(extent_id, 0, bytes([extent_id]) * 4096)
        path_1 = str((tmp_path / "dev" / "extents" / f"{1:016x}.dat").resolve())
        with backend._using(1, "dat") as fd:
            for extent_id in range(2, 6):  # four other extents: extent 1's entry is evicted
                assert backend.read_data(extent_id, 0, 4096) == bytes([extent_id]) * 4096
            assert (1, "dat") not in backend._fds
            assert _target(fd) == path_1  # still open, still extent 1's file
            assert os.pread(fd, 4096, 0) == bytes([1]) * 4096
        assert _target(fd) != path_1  # closed once its last user is done
        assert backend.read_data(1, 0, 4096) == bytes([1]) * 4096  # and reopened on demand
    finally:
        backend.close()



def test_whole_blocks_in_an_aligned_buffer_are_written_from_it(tmp_path: Path) -> None:
    """A large append as the wire protocol receives it (whole blocks, page-aligned) goes to
    the device from its own buffer; anything else through the staging buffer. Either way
    the file holds exactly the appended bytes, partial blocks included."""
    backend = FileBackend(tmp_path / "dev")
    try:
        if not backend.direct_io:
            pytest.skip(f"{tmp_path} refuses O_DIRECT: the staging path is not used at all there")
        backend.create(ExtentMeta(extent_id=1, stream_id=1, epoch=1, index=0))
        first = aligned_bytearray(64 * 1024)
        first[:] = os.urandom(len(first))
        backend.write_data(1, 0, first)
        assert backend._staging is None  # nothing was staged
        tail = os.urandom(5000)  # ends in a partial block: staged
        backend.write_data(1, len(first), tail)
        assert backend._staging is not None
        after = aligned_bytearray(3 * 4096)  # not at a block boundary now: staged, tail merged
        after[:] = os.urandom(len(after))
        backend.write_data(1, len(first) + len(tail), after)
        want = bytes(first) + tail + bytes(after)
        assert backend.read_data(1, 0, len(want)) == want
        unaligned = bytearray(os.urandom(8192 + 1))[1:]  # whole blocks at a boundary, unaligned address
        backend.create(ExtentMeta(extent_id=2, stream_id=1, epoch=1, index=0))
        backend.write_data(2, 0, unaligned)
        assert backend.read_data(2, 0, 8192) == bytes(unaligned)
    finally:
        backend.close()


def test_small_appends_write_zeros_ahead_and_large_ones_do_not(tmp_path: Path) -> None:
    """A small append that grows the data file writes zeros up to the next _ZERO_AHEAD
    boundary, so the appends after it overwrite allocated blocks (their fdatasync needs no
    journal commit); the zeros count as used, are never read, and seal cuts them. A large
    append grows the file only to its own end."""
    backend = FileBackend(tmp_path / "dev", capacity_bytes=1 << 30)  # used: our files only
    try:
        if not backend.direct_io:
            pytest.skip(f"{tmp_path} refuses O_DIRECT: buffered writes never pad")
        ahead = filebackend._ZERO_AHEAD
        backend.create(ExtentMeta(extent_id=1, stream_id=1, epoch=1, index=0))
        want = b""
        sizes = set()
        while len(want) < ahead + 10_000:  # small appends across one boundary
            piece = os.urandom(4096 + 7)
            backend.write_data(1, len(want), piece)
            want += piece
            sizes.add(backend.data_size(1))
        assert sizes == {ahead, 2 * ahead}  # grew twice, by whole zeroed steps
        assert backend.read_data(1, 0, 4 * ahead) == want  # clipped to the logical end
        assert (tmp_path / "dev" / "extents" / f"{1:016x}.dat").read_bytes()[len(want):] == bytes(2 * ahead - len(want))
        assert backend.usage().used_bytes == 2 * ahead
        backend.truncate(1, len(want), -(-len(want) // 4096))  # what seal and recovery do
        assert backend.data_size(1) == len(want)
        assert backend.usage().used_bytes == len(want)

        backend.create(ExtentMeta(extent_id=2, stream_id=1, epoch=1, index=0))
        big = os.urandom(filebackend._ZERO_AHEAD_MAX + 4096 + 1)
        backend.write_data(2, 0, big)
        assert backend.data_size(2) == -(-len(big) // 4096) * 4096  # its own 4 KiB edge only
        assert backend.read_data(2, 0, len(big) + 1) == big
    finally:
        backend.close()


def test_zeros_ahead_stay_within_capacity_bytes(tmp_path: Path) -> None:
    """A device capped by ``capacity_bytes`` never counts more used than its capacity
    because of zeros ahead: near the cap, a small append writes its own blocks only."""
    backend = FileBackend(tmp_path / "dev", capacity_bytes=64 * 1024)
    try:
        if not backend.direct_io:
            pytest.skip(f"{tmp_path} refuses O_DIRECT: no zeros ahead")
        backend.create(ExtentMeta(extent_id=1, stream_id=1, epoch=1, index=0))
        backend.write_data(1, 0, os.urandom(60 * 1024))  # large: no zeros
        backend.write_data(1, 60 * 1024, os.urandom(4096))  # small, but 256 KiB of zeros would not fit
        u = backend.usage()
        assert u.used_bytes == 64 * 1024 == u.capacity_bytes and u.free_bytes == 0
        assert backend.data_size(1) == 64 * 1024
    finally:
        backend.close()


def _df(path: Path) -> tuple[int, int]:
    """(used, available) bytes of the filesystem holding ``path``, as df reports them."""
    out = subprocess.run(["df", "-B1", "--output=used,avail", str(path)], capture_output=True, text=True,
                         check=True).stdout.split("\n")[1].split()
    return int(out[0]), int(out[1])


def test_usage_without_capacity_agrees_with_df(tmp_path: Path) -> None:
    """Used is every allocated block, free what we may still allocate, capacity their sum:
    blocks reserved for another user are not capacity (ext4 reserves 5% for root by default;
    CI's disk reserved 150 of its 250 GiB, so a device with 12 GiB free counted as 95% full).
    Other processes write to this disk meanwhile, hence the tolerance."""
    backend = FileBackend(tmp_path / "dev")
    try:
        used, avail = _df(tmp_path)
        u = backend.usage()
        assert abs(u.used_bytes - used) < 256 * MiB and abs(u.free_bytes - avail) < 256 * MiB
        assert u.capacity_bytes == u.used_bytes + u.free_bytes
    finally:
        backend.close()


def test_a_capacity_beyond_the_filesystem_is_reported_as_what_it_can_hold(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "dev", capacity_bytes=1 << 60)  # an exbibyte
    try:
        backend.create(ExtentMeta(extent_id=1, stream_id=1, epoch=1, index=0))
        backend.write_data(1, 0, b"x" * 65536)  # (not a small append: no zeros ahead)
        u = backend.usage()
        _used, avail = _df(tmp_path)
        assert u.used_bytes == 65536 and abs(u.free_bytes - avail) < 256 * MiB
        assert u.capacity_bytes == u.used_bytes + u.free_bytes
    finally:
        backend.close()


def _loop_ext4(tmp_path: Path, reserved_pct: int) -> Iterator[Path]:
    """A 64 MiB ext4 filesystem (loop mount) with ``reserved_pct`` of its blocks reserved
    for root; skips with a printed reason where loop mounts are impossible."""
    image, where = tmp_path / "ext4.img", tmp_path / "ext4"
    where.mkdir()
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", str(reserved_pct), str(image)], check=True, capture_output=True)
    done = subprocess.run(["mount", "-o", "loop", str(image), str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"mount -o loop failed: {done.stderr.strip()}")
        pytest.skip("cannot loop-mount an ext4 image here (needs root and loop devices)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def reserved_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 with half its blocks reserved for root."""
    yield from _loop_ext4(tmp_path, 50)


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 without reserved blocks, to fill."""
    yield from _loop_ext4(tmp_path, 0)


def test_a_small_append_fits_where_its_zeros_ahead_do_not(small_ext4: Path) -> None:
    """With less room left than the zeros ahead need, a small append still succeeds: it
    writes its own blocks only."""
    backend = FileBackend(small_ext4 / "dev")
    try:
        if not backend.direct_io:
            pytest.skip(f"{small_ext4} refuses O_DIRECT: no zeros ahead")
        backend.create(ExtentMeta(extent_id=1, stream_id=1, epoch=1, index=0))
        first = os.urandom(5000)
        backend.write_data(1, 0, first)  # zeros ahead to 256 KiB
        filler = small_ext4 / "filler"
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(b"f" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            os.fsync(f.fileno())
        os.truncate(filler, filler.stat().st_size - 64 * 1024)  # 64 KiB of room
        os.sync()
        assert os.statvfs(small_ext4).f_bavail * os.statvfs(small_ext4).f_frsize < filebackend._ZERO_AHEAD
        want = first
        while len(want) < filebackend._ZERO_AHEAD + 8192:  # past the zeros written ahead
            piece = os.urandom(3000)
            backend.write_data(1, len(want), piece)
            want += piece
        backend.sync_data([1])
        assert backend.read_data(1, 0, len(want) + 1) == want
        assert backend.data_size(1) < 2 * filebackend._ZERO_AHEAD  # the second step's zeros did not fit
    finally:
        backend.close()


def test_reserved_blocks_do_not_count_as_used(reserved_ext4: Path) -> None:
    """On a fresh filesystem with 50% of its blocks reserved, a device is nearly empty,
    not at 50% (the old count: total minus available); it is full once what it may
    allocate is used past the high-water mark."""
    backend = FileBackend(reserved_ext4 / "dev", direct_io=False)
    store = ExtentStore(backend, high_water=0.5, reserve_bytes=0)
    try:
        u = backend.usage()
        assert u.used_bytes < 0.1 * u.capacity_bytes, u
        assert not store.full()
        backend.create(ExtentMeta(extent_id=1, stream_id=1, epoch=1, index=0))
        chunk = os.urandom(MiB)
        while not store.full():
            free = backend.usage().free_bytes
            assert free > MiB, f"never full, {free} bytes left"
            backend.write_data(1, backend.data_size(1), chunk)
            backend.sync_data([1])
        u = backend.usage()
        assert u.used_bytes >= 0.5 * u.capacity_bytes and u.free_bytes > 0
    finally:
        backend.close()
