"""ExtentStore over the file backend: append rules, verified reads, seal, full devices, recovery."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from appendfs.store.codec import BLOCK_BYTES, ENTRY_BYTES, checksum, verify_blocks
from appendfs.store.datanode.backend import ExtentMeta
from appendfs.store.datanode.extents import ExtentError, ExtentStore
from appendfs.store.datanode.filebackend import FileBackend

MiB = 1 << 20
EXT = 0x51


class Started:
    """The RPC layer's callback: called once the append is accepted and its range reserved."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = trio.Event()

    def started(self) -> None:
        self.calls += 1
        self.event.set()


class GatedBackend(FileBackend):
    """The file backend, with writes that can be held at a gate (to order events exactly)."""

    gate: threading.Event | None = None
    sync_gate: threading.Event | None = None  # holds data syncs (commits in the sync thread only)

    def write_data(self, extent_id: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        super().write_data(extent_id, offset, data)

    def sync_data(self, extent_ids: list[int]) -> None:
        if self.sync_gate is not None:
            self.sync_gate.wait(timeout=10)
        super().sync_data(extent_ids)


def payload(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def meta(extent_id: int = EXT) -> ExtentMeta:
    return ExtentMeta(extent_id=extent_id, stream_id=3, epoch=1, index=0)


@pytest.fixture
def device(tmp_path: Path) -> Path:
    return tmp_path / "dev"


@pytest.fixture
def backends(device: Path) -> Iterator[list[FileBackend]]:
    opened: list[FileBackend] = []
    yield opened
    for backend in opened:
        backend.close()


def open_store(device: Path, backends: list[FileBackend], *, capacity_bytes: int = 256 * MiB,
               **kw: Any) -> ExtentStore:
    backend = GatedBackend(device, capacity_bytes=capacity_bytes)
    backends.append(backend)
    kw.setdefault("reserve_bytes", 0)
    return ExtentStore(backend, **kw)


@asynccontextmanager
async def serving(store: ExtentStore) -> AsyncIterator[ExtentStore]:
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()


@pytest.fixture
async def store(device: Path, backends: list[FileBackend]) -> AsyncIterator[ExtentStore]:
    store = open_store(device, backends)
    store.recover()
    async with serving(store):
        yield store


async def append(store: ExtentStore, offset: int, data: bytes, extent_id: int = EXT) -> int:
    return await store.append(extent_id, offset, data, checksum(data), Started())


async def assert_reads_verify(store: ExtentStore, expected: bytes, extent_id: int = EXT,
                              ranges: list[tuple[int, int]] | None = None) -> None:
    """Every read returns aligned data whose entries verify, and contains the expected bytes."""
    if ranges is None:
        n = len(expected)
        ranges = [(0, n), (0, 0), (n, 0), (0, min(n, 1)), (max(0, n - 1), min(n, 1)),
                  (n // 3, n // 2 - n // 3), (n - n % BLOCK_BYTES, n % BLOCK_BYTES)]
    for offset, length in ranges:
        start, data, entries = await store.read(extent_id, offset, length)
        assert start % BLOCK_BYTES == 0 and start <= offset
        assert len(entries) == -(-len(data) // BLOCK_BYTES) * ENTRY_BYTES
        verify_blocks(data, entries, start // BLOCK_BYTES)
        assert data[offset - start:offset - start + length] == expected[offset:offset + length]


def error_of(exc_info: pytest.ExceptionInfo[ExtentError], code: str) -> ExtentError:
    assert exc_info.value.code == code, exc_info.value.message
    return exc_info.value


# ---- appends ------------------------------------------------------------------------------


async def test_append_only_at_the_current_end(store: ExtentStore) -> None:
    await store.create(meta())
    data = payload(1000)
    assert await append(store, 0, data) == 1000
    for wrong in (0, 999, 1001, 5000):
        started = Started()
        with pytest.raises(ExtentError) as err:
            await store.append(EXT, wrong, b"x", checksum(b"x"), started)
        assert error_of(err, "bad_offset").details["length"] == 1000
        assert "1000" in err.value.message
        assert started.calls == 0
    assert await append(store, 1000, b"more") == 1004
    assert store.stat(EXT)["length"] == store.stat(EXT)["durable"] == 1004


async def test_started_called_once_per_accepted_append(store: ExtentStore) -> None:
    await store.create(meta())
    started = Started()
    assert await store.append(EXT, 0, b"abc", checksum(b"abc"), started) == 3
    assert started.calls == 1


async def test_checksum_mismatch_writes_nothing(store: ExtentStore) -> None:
    await store.create(meta())
    await append(store, 0, b"first")
    data = payload(5000)
    started = Started()
    with pytest.raises(ExtentError) as err:
        await store.append(EXT, 5, data, checksum(data) ^ 1, started)
    error_of(err, "checksum")
    assert started.calls == 0
    assert store.stat(EXT)["length"] == 5
    assert store.backend.read_data(EXT, 0, 10_000) == b"first"  # nothing of the rejected append
    assert store.stats["checksum_rejects"] == 1
    assert await append(store, 5, data) == 5005  # the range was not reserved either
    await assert_reads_verify(store, b"first" + data)


async def test_unknown_extent(store: ExtentStore) -> None:
    with pytest.raises(ExtentError) as err:
        await append(store, 0, b"x", extent_id=999)
    error_of(err, "not_found")
    with pytest.raises(ExtentError) as err:
        await store.read(999, 0, 0)
    error_of(err, "not_found")


async def test_create_is_idempotent_for_a_retry_only(store: ExtentStore) -> None:
    await store.create(meta())
    await store.create(meta())  # a retried create of the same empty extent
    await append(store, 0, b"x")
    with pytest.raises(ExtentError) as err:
        await store.create(meta())
    error_of(err, "exists")


async def test_pipelined_appends_share_group_commits(store: ExtentStore) -> None:
    await store.create(meta())
    pieces = [payload(n, seed=n) for n in (1, 4095, 1, 4096, 10_000, 3, 0, 7000, 4093, 5)]
    ends: list[int] = []

    async def one(offset: int, data: bytes, started: Started) -> None:
        ends.append(await store.append(EXT, offset, data, checksum(data), started))

    commits_before = store.stats["commits"]
    async with trio.open_nursery() as nursery:
        offset = 0
        for data in pieces:
            started = Started()
            nursery.start_soon(one, offset, data, started)
            await started.event.wait()  # the next append may be sent once this one is reserved
            offset += len(data)
    whole = b"".join(pieces)
    assert sorted(ends) == [sum(map(len, pieces[:i + 1])) for i in range(len(pieces))]
    assert store.stat(EXT)["durable"] == len(whole)
    assert store.stats["commits"] - commits_before <= len(pieces)
    await assert_reads_verify(store, whole)
    on_disk = store.backend.read_checksums(EXT, 0, -(-len(whole) // BLOCK_BYTES))
    verify_blocks(store.backend.read_data(EXT, 0, len(whole)), on_disk, 0)


# ---- reads --------------------------------------------------------------------------------


async def test_read_growing_last_block(store: ExtentStore) -> None:
    await store.create(meta())
    whole = b""
    for n in (1, 99, 3000, 996, 1, BLOCK_BYTES - 1, 2, 5000):
        data = payload(n, seed=len(whole))
        assert await append(store, len(whole), data) == len(whole) + n
        whole += data
        await assert_reads_verify(store, whole)


async def test_read_random_ranges(store: ExtentStore) -> None:
    await store.create(meta())
    whole = payload(5 * BLOCK_BYTES + 777)
    await append(store, 0, whole[:10_000])
    await append(store, 10_000, whole[10_000:])
    rng = random.Random(3)
    ranges = []
    for _ in range(50):
        offset = rng.randrange(len(whole) + 1)
        ranges.append((offset, rng.randrange(len(whole) - offset + 1)))
    await assert_reads_verify(store, whole, ranges=ranges)


async def test_read_past_the_end_refused(store: ExtentStore) -> None:
    await store.create(meta())
    await append(store, 0, b"x" * 100)
    for offset, length in ((0, 101), (100, 1), (-1, 1), (0, -1)):
        with pytest.raises(ExtentError) as err:
            await store.read(EXT, offset, length)
        assert error_of(err, "out_of_range").details["length"] == 100


@pytest.fixture
async def threaded_store(device: Path, backends: list[FileBackend]) -> AsyncIterator[ExtentStore]:
    """A store that writes every append through its write lane's thread (none inline)."""
    store = open_store(device, backends, inline_write_bytes=0)
    store.recover()
    async with serving(store):
        yield store


async def test_read_while_a_later_append_is_in_flight(threaded_store: ExtentStore) -> None:
    # Regression: the growing last block was vouched for with the in-memory tail, which
    # already holds the bytes of the append still being written, so the read did not verify.
    store = threaded_store
    await store.create(meta())
    first = payload(100, seed=1)
    await append(store, 0, first)
    backend = store.backend
    assert isinstance(backend, GatedBackend)
    for second in (payload(50, seed=2), payload(5000, seed=3)):
        end = store.stat(EXT)["length"]
        backend.gate = threading.Event()
        started = Started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.append, EXT, end, second, checksum(second), started)
            try:
                await started.event.wait()
                assert store.stat(EXT)["length"] == end  # reserved, not yet written
                await assert_reads_verify(store, first, ranges=[(0, end), (end - 1, 1), (0, 10)])
            finally:
                backend.gate.set()
        backend.gate = None
        first += second
    await assert_reads_verify(store, first)


async def test_small_appends_are_written_inline_only_while_the_write_lane_is_idle(
        device: Path, backends: list[FileBackend]) -> None:
    """Appends up to ``inline_write_bytes`` skip the thread hand-off when no write is in the
    device's lane; one arriving while a write is held there queues behind it in order."""
    store = open_store(device, backends, inline_write_bytes=8192)
    store.recover()
    async with serving(store):
        await store.create(meta())
        await store.create(meta(EXT + 1))
        small, big = payload(3000, seed=4), payload(9000, seed=5)
        await append(store, 0, small)
        await append(store, len(small), big)  # larger than inline_write_bytes: the thread
        assert store.stats["writes_inline"] == 1
        backend = store.backend
        assert isinstance(backend, GatedBackend)
        backend.gate = threading.Event()
        held = payload(20000, seed=6)
        other = payload(100, seed=7)
        async with trio.open_nursery() as nursery:
            first = Started()
            nursery.start_soon(store.append, EXT + 1, 0, held, checksum(held), first)
            await first.event.wait()
            while not store._write_lane.borrowed_tokens:  # the held write is in the lane
                await trio.sleep(0.001)
            nursery.start_soon(append, store, len(small) + len(big), other)
            await trio.sleep(0.05)
            assert store.stats["writes_inline"] == 1  # the small one waits in the lane
            backend.gate.set()
        backend.gate = None
        assert store.stats["writes_inline"] == 1
        await assert_reads_verify(store, small + big + other)
        await assert_reads_verify(store, held, extent_id=EXT + 1)


async def test_an_append_to_an_idle_device_commits_in_its_own_task(device: Path, backends: list[FileBackend]) -> None:
    """Nothing else waiting and the device idle: the append makes itself durable without the
    commit loop (not even running here), and its entries are on disk when it returns."""
    store = open_store(device, backends)
    store.recover()
    await store.create(meta())
    data = payload(5000, seed=11)
    with trio.fail_after(10):
        assert await append(store, 0, data) == len(data)
    assert store.stats["commits"] == store.stats["commits_inline"] == 1
    assert store.stat(EXT)["durable"] == len(data)
    on_disk = store.backend.read_checksums(EXT, 0, 2)
    verify_blocks(store.backend.read_data(EXT, 0, len(data)), on_disk, 0)


async def test_an_append_during_a_commit_waits_for_the_commit_loop(device: Path, backends: list[FileBackend]) -> None:
    """While the commit loop is flushing a batch in its thread, a small append to the same
    extent must not commit by itself: its entry for the shared partial block would be
    overwritten by the older one still being written. It joins the loop's next commit,
    and the entries on disk then vouch for every byte."""
    store = open_store(device, backends)
    store.recover()
    async with serving(store):
        await store.create(meta())
        big = payload(store.inline_write_bytes + 1000, seed=12)  # too big to commit inline
        small = payload(500, seed=13)  # continues big's last, partial block
        backend = store.backend
        assert isinstance(backend, GatedBackend)
        backend.sync_gate = threading.Event()
        done: list[int] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(append, store, 0, big)
                while not store._sync_lane.borrowed_tokens:  # the loop's commit is in its thread
                    await trio.sleep(0.001)

                async def second() -> None:
                    done.append(await append(store, len(big), small))

                nursery.start_soon(second)
                await trio.sleep(0.1)
                assert not done  # waiting for the commit loop, not committed on its own
                backend.sync_gate.set()
        finally:
            backend.sync_gate.set()
            backend.sync_gate = None
        assert done == [len(big) + len(small)]
        whole = big + small
        assert store.stat(EXT)["durable"] == len(whole)
        on_disk = store.backend.read_checksums(EXT, 0, -(-len(whole) // BLOCK_BYTES))
        verify_blocks(store.backend.read_data(EXT, 0, len(whole)), on_disk, 0)


# ---- seal ---------------------------------------------------------------------------------


async def test_append_to_sealed_refused(store: ExtentStore) -> None:
    await store.create(meta())
    await append(store, 0, b"abc")
    assert await store.seal(EXT, 3) == 3
    with pytest.raises(ExtentError) as err:
        await append(store, 3, b"d")
    assert error_of(err, "sealed").details["length"] == 3
    assert store.stat(EXT)["state"] == "sealed"


async def test_seal_truncates_and_rewrites_the_last_partial_entry(
        store: ExtentStore, device: Path, backends: list[FileBackend]) -> None:
    await store.create(meta())
    whole = payload(3 * BLOCK_BYTES + 10)
    await append(store, 0, whole)
    seal_at = BLOCK_BYTES + 904
    assert await store.seal(EXT, seal_at) == seal_at
    assert store.backend.data_size(EXT) == seal_at
    assert len(store.backend.read_checksums(EXT, 0, 10)) == 2 * ENTRY_BYTES
    assert store.stat(EXT)["length"] == seal_at
    await assert_reads_verify(store, whole[:seal_at])
    # The sealed record and the rewritten entry are what a restart finds.
    again = open_store(device, backends)
    assert again.recover() == []
    assert again.stat(EXT)["state"] == "sealed" and again.stat(EXT)["length"] == seal_at
    await assert_reads_verify(again, whole[:seal_at])


@pytest.mark.parametrize("seal_at", [0, BLOCK_BYTES, 2 * BLOCK_BYTES])
async def test_seal_at_block_boundaries(store: ExtentStore, seal_at: int) -> None:
    await store.create(meta())
    whole = payload(2 * BLOCK_BYTES + 300)
    await append(store, 0, whole)
    await store.seal(EXT, seal_at)
    assert store.backend.data_size(EXT) == seal_at
    await assert_reads_verify(store, whole[:seal_at])


async def test_seal_idempotent_and_conflicting(store: ExtentStore) -> None:
    await store.create(meta())
    await append(store, 0, payload(5000))
    assert await store.seal(EXT, 4000) == 4000
    assert await store.seal(EXT, 4000) == 4000
    for other in (3999, 4001, 5000):
        with pytest.raises(ExtentError) as err:
            await store.seal(EXT, other)
        assert error_of(err, "conflict").details["length"] == 4000


async def test_seal_longer_than_written_refused(store: ExtentStore) -> None:
    await store.create(meta())
    await append(store, 0, payload(100))
    with pytest.raises(ExtentError) as err:
        await store.seal(EXT, 101)
    assert error_of(err, "short").details["length"] == 100
    assert store.stat(EXT)["state"] == "open"
    assert await append(store, 100, b"ok") == 102  # a refused seal leaves the extent writable


# ---- full devices ---------------------------------------------------------------------------


async def test_high_water_refuses_new_extents(device: Path, backends: list[FileBackend]) -> None:
    store = open_store(device, backends, capacity_bytes=1 * MiB, high_water=0.5)
    store.recover()
    async with serving(store):
        await store.create(meta(1))
        # just below the mark, allowing for the 4 KiB padding of direct writes
        await append(store, 0, payload(MiB // 2 - 4097), extent_id=1)
        await store.create(meta(2))
        await append(store, 0, b"xy", extent_id=2)
        with pytest.raises(ExtentError) as err:
            await store.create(meta(3))
        error_of(err, "no_space")
        # Existing extents still take appends while there is room.
        assert await append(store, 2, b"z", extent_id=2) == 3
        # Deleting makes room again.
        await store.delete(1)
        await store.create(meta(3))


async def test_reserve_refuses_new_extents(device: Path, backends: list[FileBackend]) -> None:
    store = open_store(device, backends, capacity_bytes=1 * MiB, reserve_bytes=MiB // 4)
    store.recover()
    async with serving(store):
        await store.create(meta(1))
        await append(store, 0, payload(MiB // 2), extent_id=1)
        await store.create(meta(2))
        await append(store, 0, payload(MiB // 4 + 1), extent_id=2)
        with pytest.raises(ExtentError) as err:
            await store.create(meta(3))
        error_of(err, "no_space")


async def test_full_device_refuses_appends(device: Path, backends: list[FileBackend]) -> None:
    store = open_store(device, backends, capacity_bytes=64 * 1024)
    store.recover()
    async with serving(store):
        await store.create(meta())
        await append(store, 0, payload(60 * 1024))
        started = Started()
        data = payload(8 * 1024)
        with pytest.raises(ExtentError) as err:
            await store.append(EXT, 60 * 1024, data, checksum(data), started)
        error_of(err, "no_space")
        assert started.calls == 0
        assert store.stat(EXT)["length"] == 60 * 1024
        assert await append(store, 60 * 1024, payload(4 * 1024)) == 64 * 1024


# ---- crash recovery -------------------------------------------------------------------------


async def crashed_extent(device: Path, backends: list[FileBackend], sizes: list[int]) -> bytes:
    """Appends acknowledged, then the process dies: no seal, nothing shut down cleanly."""
    store = open_store(device, backends)
    store.recover()
    whole = b""
    async with serving(store):
        await store.create(meta())
        for n in sizes:
            data = payload(n, seed=len(whole))
            assert await append(store, len(whole), data) == len(whole) + n
            whole += data
    return whole


def extent_file(device: Path, suffix: str) -> Path:
    (path,) = device.rglob(f"{EXT:016x}.{suffix}")
    return path


async def assert_recovers(device: Path, backends: list[FileBackend], expected: bytes) -> ExtentStore:
    store = open_store(device, backends)
    assert store.recover() == [EXT]
    assert store.recovering() == [(EXT, len(expected))]
    stat = store.stat(EXT)
    assert stat["state"] == "recovering"
    assert stat["length"] == stat["durable"] == len(expected)
    assert store.backend.data_size(EXT) == len(expected)  # garbage past it is cut off
    async with serving(store):
        started = Started()
        with pytest.raises(ExtentError) as err:
            await store.append(EXT, len(expected), b"late", checksum(b"late"), started)
        error_of(err, "recovering")
        assert started.calls == 0
        await assert_reads_verify(store, expected)
    return store


SIZES = [1000, 4096, 3, 7000, 1]  # ends at 12100 = 2 full blocks + 3908 bytes


async def test_recover_after_crash(device: Path, backends: list[FileBackend]) -> None:
    whole = await crashed_extent(device, backends, SIZES)
    store = await assert_recovers(device, backends, whole)
    # Reconcile: the MetaNode's seal length ends recovery; the extent is then sealed.
    async with serving(store):
        assert await store.seal(EXT, len(whole)) == len(whole)
        assert store.stat(EXT)["state"] == "sealed"
        with pytest.raises(ExtentError) as err:
            await append(store, len(whole), b"late")
        error_of(err, "sealed")
        await assert_reads_verify(store, whole)


async def test_recover_cuts_data_written_without_entries(device: Path, backends: list[FileBackend]) -> None:
    whole = await crashed_extent(device, backends, SIZES)
    with open(extent_file(device, "dat"), "ab") as f:  # written, never vouched for
        f.write(payload(6000, seed=99))
    await assert_recovers(device, backends, whole)


async def test_recover_after_losing_checksum_entries(device: Path, backends: list[FileBackend]) -> None:
    whole = await crashed_extent(device, backends, SIZES)
    sums = extent_file(device, "sum")
    assert sums.stat().st_size >= 3 * ENTRY_BYTES  # (the region may be prewritten with zeros)
    os.truncate(sums, 2 * ENTRY_BYTES + 5)  # the last entry torn
    await assert_recovers(device, backends, whole[:2 * BLOCK_BYTES])
    os.truncate(sums, ENTRY_BYTES)  # recovery itself cut the .sum to 2 entries; lose one more
    await assert_recovers(device, backends, whole[:BLOCK_BYTES])


async def test_recover_stops_at_a_corrupt_block(device: Path, backends: list[FileBackend]) -> None:
    whole = await crashed_extent(device, backends, SIZES)
    dat = extent_file(device, "dat")
    with open(dat, "r+b") as f:
        f.seek(BLOCK_BYTES + 17)
        byte = f.read(1)
        f.seek(BLOCK_BYTES + 17)
        f.write(bytes([byte[0] ^ 0x40]))
    await assert_recovers(device, backends, whole[:BLOCK_BYTES])


async def test_recover_empty_and_sealed_extents(device: Path, backends: list[FileBackend]) -> None:
    store = open_store(device, backends)
    store.recover()
    async with serving(store):
        await store.create(meta(1))
        await store.create(meta(2))
        await append(store, 0, payload(5000), extent_id=2)
        await store.seal(2, 4500)
    again = open_store(device, backends)
    assert again.recover() == [1]
    assert again.stat(1)["state"] == "recovering" and again.stat(1)["length"] == 0
    assert again.stat(2)["state"] == "sealed" and again.stat(2)["length"] == 4500


async def test_recover_sweeps_orphan_files(device: Path, backends: list[FileBackend]) -> None:
    await crashed_extent(device, backends, [10])
    orphan = extent_file(device, "dat").with_name(f"{0xDEAD:016x}.dat")
    orphan.write_bytes(b"left by an interrupted create")
    store = open_store(device, backends)
    assert store.recover() == [EXT]
    assert not orphan.exists()
    assert [s["extent_id"] for s in store.all_extents()] == [EXT]


async def test_an_open_extent_whose_data_file_is_gone_is_skipped_at_recovery(
        device: Path, backends: list[FileBackend], caplog: pytest.LogCaptureFixture) -> None:
    # A record without its data (a file deleted by hand, a create interrupted between its
    # files and its record by a process whose threads outlived it): the node still starts.
    whole = await crashed_extent(device, backends, SIZES)
    store = open_store(device, backends)
    store.recover()
    async with serving(store):
        await store.create(meta(EXT + 1))
    (gone,) = device.rglob(f"{EXT + 1:016x}.dat")
    gone.unlink()
    again = open_store(device, backends)
    assert again.recover() == [EXT]
    assert [s["extent_id"] for s in again.all_extents()] == [EXT]
    assert f"open extent {EXT + 1} has a record but no data" in caplog.text
    # The record and the checksum file went with it: the next start does not see it again.
    assert not list(device.rglob(f"{EXT + 1:016x}.*"))
    caplog.clear()
    third = open_store(device, backends)
    assert third.recover() == [EXT]
    assert f"extent {EXT + 1}" not in caplog.text
    await assert_recovers(device, backends, whole)


async def test_an_open_extent_whose_data_is_unreadable_is_skipped_and_kept(
        device: Path, backends: list[FileBackend], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An I/O error is not absence: the files stay for the operator, the node still starts.
    whole = await crashed_extent(device, backends, SIZES)
    store = open_store(device, backends)
    store.recover()
    async with serving(store):
        await store.create(meta(EXT + 1))
    again = open_store(device, backends)
    real = again.backend.data_size

    def failing(extent_id: int) -> int:
        if extent_id == EXT + 1:
            raise OSError(5, "Input/output error")
        return real(extent_id)
    monkeypatch.setattr(again.backend, "data_size", failing)
    assert again.recover() == [EXT]
    assert f"skipping open extent {EXT + 1}" in caplog.text
    assert [s["extent_id"] for s in again.all_extents()] == [EXT]
    assert again.recovering() == [(EXT, len(whole))]
    assert list(device.rglob(f"{EXT + 1:016x}.*"))  # nothing removed
    monkeypatch.undo()
    # Data without its checksum file cannot be verified, but it is not absent either: kept.
    (sums,) = device.rglob(f"{EXT + 1:016x}.sum")
    sums.unlink()
    caplog.clear()
    third = open_store(device, backends)
    assert third.recover() == [EXT]
    assert f"skipping open extent {EXT + 1}" in caplog.text
    assert list(device.rglob(f"{EXT + 1:016x}.dat"))


async def test_read_with_an_older_placement_epoch_is_refused(tmp_path):
    """A client holding an outdated extent map is told to refresh it (stale_epoch)."""
    backend = FileBackend(tmp_path)
    store = ExtentStore(backend, reserve_bytes=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.create(ExtentMeta(extent_id=77, stream_id=1, epoch=3, index=0))
        await store.append(77, 0, b"x" * 100, checksum(b"x" * 100), _NoStarted())
        with pytest.raises(ExtentError) as err:
            await store.read(77, 0, 10, epoch=2)
        assert err.value.code == "stale_epoch" and err.value.details["epoch"] == 3
        _start, data, _entries = await store.read(77, 0, 10, epoch=3)
        assert data[:10] == b"x" * 10
        nursery.cancel_scope.cancel()


class _NoStarted:
    def started(self) -> None:
        pass


async def test_a_commit_waits_for_writes_in_flight_to_join_it(device: Path, backends: list[FileBackend]) -> None:
    """Pipelined appends whose writes are already in the device lane share one flush (the
    lane's threads: inline writes finish before the commit looks)."""
    store = open_store(device, backends, commit_wait_s=5.0, commit_bytes=1 << 30, inline_write_bytes=0)
    store.recover()
    async with serving(store):
        await store.create(meta())
        pieces = [payload(3000, seed=i) for i in range(6)]
        before = store.stats["commits"]
        async with trio.open_nursery() as nursery:
            offset = 0
            for data in pieces:
                started = Started()
                nursery.start_soon(store.append, EXT, offset, data, checksum(data), started)
                await started.event.wait()
                offset += len(data)
        assert store.stat(EXT)["durable"] == sum(map(len, pieces))
        # The first commit may start before the rest are queued; the others join one commit.
        assert store.stats["commits"] - before <= 2
        await assert_reads_verify(store, b"".join(pieces))


async def test_without_waiting_a_commit_takes_what_is_done(device: Path, backends: list[FileBackend]) -> None:
    """commit_wait_s=0 is the plain group commit: it never waits, appends still all land."""
    store = open_store(device, backends, commit_wait_s=0.0)
    store.recover()
    async with serving(store):
        await store.create(meta())
        for i in range(3):
            data = payload(100, seed=i)
            await store.append(EXT, i * 100, data, checksum(data), Started())
        assert store.stats["commits"] >= 3  # sequential appends: one commit each
