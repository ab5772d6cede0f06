"""The contract every DataNode storage backend keeps (store/datanode/backend.py docstring).

One suite, parametrized over backends: a new backend (SPDK) joins by adding one entry to
``BACKENDS`` — a function that builds it over a directory with an optional capacity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appendfs.store.codec import ENTRY_BYTES, encode_entry
from appendfs.store.datanode.backend import Backend, BackendError, ExtentMeta
from appendfs.store.datanode.filebackend import FileBackend

MiB = 1 << 20

BackendFactory = Callable[[Path, "int | None"], Backend]
BACKENDS: dict[str, BackendFactory] = {
    "file": lambda root, capacity: FileBackend(root, capacity_bytes=capacity),
}


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Backend]]:
    """Build (or re-open, as after a restart) the backend under test over one directory."""
    opened: list[Backend] = []

    def make(capacity_bytes: int | None = 64 * MiB) -> Backend:
        backend = BACKENDS[request.param](tmp_path / "dev", capacity_bytes)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


@pytest.fixture
def backend(make_backend: Callable[..., Backend]) -> Backend:
    return make_backend()


def meta(extent_id: int, *, state: str = "open", sealed_length: int = 0) -> ExtentMeta:
    return ExtentMeta(extent_id=extent_id, stream_id=7, epoch=1, index=0, state=state, sealed_length=sealed_length)


def test_create_list_get_meta(backend: Backend) -> None:
    assert backend.list() == []
    for extent_id in (5, 1, 2**40 + 3):
        backend.create(meta(extent_id))
    assert backend.list() == [1, 5, 2**40 + 3]
    assert backend.get_meta(5) == meta(5)
    assert backend.data_size(5) == 0
    assert backend.read_data(5, 0, 100) == b""
    assert backend.read_checksums(5, 0, 4) == b""


def test_set_meta_round_trip_and_survives_reopen(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    backend.create(meta(1))
    sealed = meta(1, state="sealed", sealed_length=12345)
    backend.set_meta(sealed)
    assert backend.get_meta(1) == sealed
    backend.close()
    assert make_backend().get_meta(1) == sealed


def test_set_meta_leaves_no_temporary_record(backend: Backend, tmp_path: Path) -> None:
    backend.create(meta(1))
    for length in range(20):
        backend.set_meta(meta(1, state="sealed", sealed_length=length))
    assert backend.list() == [1]
    leftovers = [p for p in (tmp_path / "dev").rglob("*") if "tmp" in p.name]
    assert leftovers == []


def test_missing_extent_raises_backend_error(backend: Backend) -> None:
    with pytest.raises(BackendError):
        backend.get_meta(9)
    with pytest.raises(BackendError):
        backend.read_data(9, 0, 1)
    with pytest.raises(BackendError):
        backend.write_data(9, 0, b"x")


def test_write_and_read_data_at_offsets(backend: Backend) -> None:
    backend.create(meta(1))
    backend.write_data(1, 0, b"hello ")
    backend.write_data(1, 6, memoryview(b"world"))
    backend.write_data(1, 11, bytearray(b"!" * 5000))
    backend.sync_data([1])
    # The region may be padded past the written end (direct I/O writes whole 4 KiB blocks,
    # the file backend zeros ahead of small appends), but reads never return the padding.
    padded = backend.data_size(1)
    assert 5011 <= padded <= 1 * MiB
    assert len(backend.read_data(1, 0, 10_000)) == 5011
    assert backend.read_data(1, 0, 11) == b"hello world"
    assert backend.read_data(1, 3, 5) == b"lo wo"
    assert backend.read_data(1, 11, 5000) == b"!" * 5000
    backend.write_data(1, 0, b"J")  # overwrite in place does not grow the region
    assert backend.read_data(1, 0, 5) == b"Jello"
    assert backend.data_size(1) == padded
    assert len(backend.read_data(1, 0, 10_000)) == 5011


def test_short_read_past_the_end(backend: Backend) -> None:
    backend.create(meta(1))
    backend.write_data(1, 0, b"abcdef")
    assert backend.read_data(1, 4, 100) == b"ef"
    assert backend.read_data(1, 6, 10) == b""
    assert backend.read_data(1, 1000, 10) == b""


def test_checksum_region(backend: Backend) -> None:
    backend.create(meta(1))
    entries = [encode_entry(i * 1111, 4096) for i in range(5)]
    backend.write_checksums(1, 0, b"".join(entries[:2]))
    backend.write_checksums(1, 2, b"".join(entries[2:]))
    backend.sync_checksums([1])
    assert backend.read_checksums(1, 0, 5) == b"".join(entries)
    assert backend.read_checksums(1, 3, 1) == entries[3]
    # Rewriting one entry (the growing last block) leaves the others alone.
    backend.write_checksums(1, 4, encode_entry(9, 10))
    assert backend.read_checksums(1, 3, 2) == entries[3] + encode_entry(9, 10)
    # Short read past the last entry.
    assert backend.read_checksums(1, 4, 10) == encode_entry(9, 10)
    assert len(backend.read_checksums(1, 5, 3)) == 0


def test_regions_of_extents_are_independent(backend: Backend) -> None:
    backend.create(meta(1))
    backend.create(meta(2))
    backend.write_data(1, 0, b"one")
    backend.write_data(2, 0, b"two!")
    backend.write_checksums(2, 0, encode_entry(2, 4))
    assert backend.read_data(1, 0, 10) == b"one"
    assert backend.read_data(2, 0, 10) == b"two!"
    assert backend.read_checksums(1, 0, 1) == b""


def test_truncate_cuts_both_regions(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    backend.create(meta(1))
    backend.write_data(1, 0, bytes(range(256)) * 40)
    backend.write_checksums(1, 0, b"".join(encode_entry(i, 4096) for i in range(3)))
    backend.truncate(1, 5000, 2)
    assert backend.data_size(1) == 5000
    assert backend.read_data(1, 4990, 100) == (bytes(range(256)) * 40)[4990:5000]
    assert backend.read_checksums(1, 0, 3) == encode_entry(0, 4096) + encode_entry(1, 4096)
    backend.close()
    reopened = make_backend()
    assert reopened.data_size(1) == 5000
    assert len(reopened.read_checksums(1, 0, 3)) == 2 * ENTRY_BYTES


def test_delete_removes_from_list(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    backend.create(meta(1))
    backend.create(meta(2))
    backend.write_data(1, 0, b"x" * 100)
    backend.delete(1)
    assert backend.list() == [2]
    with pytest.raises(BackendError):
        backend.get_meta(1)
    with pytest.raises(BackendError):
        backend.read_data(1, 0, 1)  # no cached descriptor still serves the bytes
    backend.delete(1)  # deleting twice is harmless
    backend.close()
    assert make_backend().list() == [2]


#: A backend may round each extent's space up to its block size (the file backend's direct
#: writes pad to 4 KiB; a thin-provisioned lvol rounds to its cluster): usage checks allow
#: that much per extent and no more. (The file backend also zeros ahead of *small* appends,
#: up to 256 KiB: these checks write more than 32 KiB at a time, which it does not pad.)
SLACK = 4096


def near(actual: int, expected: int, extents: int) -> bool:
    return expected <= actual <= expected + SLACK * extents


def test_usage_accounting(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(capacity_bytes=4 * MiB)
    start = backend.usage()
    assert start.capacity_bytes == 4 * MiB
    assert start.used_bytes + start.free_bytes == 4 * MiB
    backend.create(meta(1))
    backend.create(meta(2))
    backend.write_data(1, 0, b"a" * 100_000)
    backend.write_data(1, 100_000, b"a" * 50_000)
    backend.write_data(2, 0, b"b" * 200_000)
    after_writes = backend.usage()
    assert near(after_writes.used_bytes - start.used_bytes, 350_000, 2)
    assert after_writes.free_bytes == start.free_bytes - (after_writes.used_bytes - start.used_bytes)
    backend.write_data(1, 0, b"c" * 1000)  # an overwrite uses no new space
    assert backend.usage().used_bytes == after_writes.used_bytes
    backend.truncate(1, 30_000, 8)
    assert near(backend.usage().used_bytes - start.used_bytes, 230_000, 1)
    backend.delete(2)
    assert backend.usage().used_bytes - start.used_bytes == 30_000
    backend.close()
    # A restarted device accounts for what is already there.
    assert make_backend(capacity_bytes=4 * MiB).usage().used_bytes - start.used_bytes == 30_000


def test_usage_after_reopen_counts_new_writes_once(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(capacity_bytes=4 * MiB)
    backend.create(meta(1))
    backend.write_data(1, 0, b"a" * 100_000)
    backend.close()
    backend = make_backend(capacity_bytes=4 * MiB)
    base = backend.usage().used_bytes
    backend.write_data(1, 50_000, b"b" * 100_000)  # overlaps 50 000 existing bytes, grows by 50 000
    assert near(backend.usage().used_bytes - base, 50_000 - SLACK, 1)
    assert backend.read_data(1, 0, 200_000) == b"a" * 50_000 + b"b" * 100_000


def test_free_bytes_never_negative(make_backend: Callable[..., Backend]) -> None:
    small = make_backend(capacity_bytes=1000)
    small.create(meta(1))
    small.write_data(1, 0, b"z" * 1500)
    assert small.usage().free_bytes == 0


def test_usage_without_capacity_reports_the_filesystem(make_backend: Callable[..., Backend]) -> None:
    usage = make_backend(capacity_bytes=None).usage()
    assert usage.capacity_bytes > 0
    assert 0 <= usage.free_bytes <= usage.capacity_bytes


def test_sweep_orphans_removes_data_without_a_record(make_backend: Callable[..., Backend],
                                                     tmp_path: Path) -> None:
    backend = make_backend()
    backend.create(meta(1))
    backend.create(meta(2))
    backend.write_data(2, 0, b"q" * 1000)
    backend.close()
    # A crash in the middle of delete(2): the record went first, the data is still there.
    records = [p for p in (tmp_path / "dev").rglob("*") if p.is_file() and p.name.startswith(f"{2:016x}")]
    record = [p for p in records if p.name.endswith(".meta")]
    assert len(record) == 1
    record[0].unlink()
    backend = make_backend()
    sweep = getattr(backend, "sweep_orphans", None)
    assert sweep is not None, "a backend with per-extent files must sweep orphans at start"
    assert sweep() >= 1
    assert backend.list() == [1]
    assert not any(p.exists() for p in records)
    assert backend.usage().used_bytes == 0  # the orphan's bytes are no longer counted
    assert backend.get_meta(1) == meta(1)  # extents with records are untouched


def test_sweep_orphans_removes_an_interrupted_record_update(make_backend: Callable[..., Backend],
                                                            tmp_path: Path) -> None:
    backend = make_backend()
    backend.create(meta(1))
    # A crash inside set_meta before the rename leaves a temporary beside the old record.
    dev = tmp_path / "dev"
    record = next(p for p in dev.rglob("*.meta"))
    stale = record.with_name(record.name + ".tmp")
    stale.write_text('{"torn": ')
    sweep = getattr(backend, "sweep_orphans", None)
    assert sweep is not None
    sweep()
    assert not stale.exists()
    assert backend.get_meta(1) == meta(1)
    assert backend.list() == [1]


def test_read_cached_answers_like_the_plain_reads_or_not_at_all(backend: Backend) -> None:
    backend.create(meta(1))
    payload = bytes(range(256)) * 40  # 10240 bytes: two full blocks and a partial one
    entries = b"".join(encode_entry(i, 4096) for i in range(3))
    backend.write_data(1, 0, payload)
    backend.write_checksums(1, 0, entries)
    backend.sync_data([1])
    backend.sync_checksums([1])
    for offset, length, first, count in ((0, 10240, 0, 3), (4096, 4096, 1, 1), (8192, 2048, 2, 1)):
        plain = (backend.read_data(1, offset, length), backend.read_checksums(1, first, count))  # warms caches
        got = backend.read_cached(1, offset, length, first, count)
        assert got is None or got == plain
        if isinstance(backend, FileBackend):  # the page cache holds what was just read
            assert got == plain
    assert backend.read_cached(1, 8192, 8192, 2, 2) in (None, (payload[8192:], entries[32:]))
