"""Scrub over a real ExtentStore (file backend), with a hand-driven clock and a fake MetaNode."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from appendfs.store.codec import checksum
from appendfs.store.datanode.backend import ExtentMeta
from appendfs.store.datanode.extents import ExtentStore
from appendfs.store.datanode.filebackend import FileBackend
from appendfs.store.datanode.scrub import Scrubber

MiB = 1 << 20
INTERVAL = 100.0


class NoStart:
    def started(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class MetaNode:
    """Collects report_bad calls; ``up`` False makes them fail."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, str]] = []
        self.up = True

    async def report(self, extent_id: int, reason: str) -> bool:
        if self.up:
            self.reports.append((extent_id, reason))
        return self.up


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ExtentStore]:
    backend = FileBackend(tmp_path / "dev", capacity_bytes=256 * MiB)
    s = ExtentStore(backend, reserve_bytes=0)
    s.recover()
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        yield s
        nursery.cancel_scope.cancel()
    backend.close()


async def sealed_extent(store: ExtentStore, extent_id: int, length: int, epoch: int = 1) -> bytes:
    data = random.Random(extent_id).randbytes(length)
    await store.create(ExtentMeta(extent_id, 7, epoch, 0))
    for off in range(0, length, MiB):
        piece = data[off:off + MiB]
        await store.append(extent_id, off, piece, checksum(piece), NoStart())
    await store.seal(extent_id, length)
    return data


def flip(tmp_path: Path, extent_id: int, offset: int) -> None:
    with open(tmp_path / "dev" / "extents" / f"{extent_id:016x}.dat", "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def scrubber(store: ExtentStore, meta: MetaNode, clock: Clock, state: Path | None = None) -> Scrubber:
    return Scrubber(store, meta.report, rate_bytes_s=1 << 40, interval_s=INTERVAL, chunk_bytes=64 * 1024,
                    state_path=state, clock=clock)


async def test_verifies_sealed_extents_once_per_interval(store: ExtentStore) -> None:
    await sealed_extent(store, 1, 3 * MiB + 1234)  # ends in a partial block
    await sealed_extent(store, 2, 0)
    await store.create(ExtentMeta(3, 7, 1, 0))  # open: never scrubbed
    meta, clock = MetaNode(), Clock()
    s = scrubber(store, meta, clock)
    assert await s.scrub_pass() == 0  # first seen: just checksummed on the way in
    clock.now += INTERVAL / 2
    assert await s.scrub_pass() == 0
    clock.now += INTERVAL / 2
    assert await s.scrub_pass() == 2
    assert store.stats["scrub_extents"] == 2 and store.stats["scrub_bytes"] == 3 * MiB + 1234
    assert store.stats["scrub_passes"] == 1 and store.stats["scrub_errors"] == 0
    assert await s.scrub_pass() == 0  # not due again yet
    assert meta.reports == []


async def test_a_flipped_byte_is_reported_once_per_pass(store: ExtentStore, tmp_path: Path) -> None:
    await sealed_extent(store, 5, 2 * MiB + 100)
    await sealed_extent(store, 6, MiB)
    meta, clock = MetaNode(), Clock()
    s = scrubber(store, meta, clock)
    await s.scrub_pass()
    flip(tmp_path, 5, 2 * MiB + 50)  # inside the last, partial block
    clock.now += INTERVAL
    assert await s.scrub_pass() == 2
    assert len(meta.reports) == 1
    extent_id, reason = meta.reports[0]
    assert extent_id == 5 and "block 512" in reason and "checksum mismatch" in reason
    assert store.stats["scrub_errors"] == 1
    clock.now += INTERVAL / 2
    await s.scrub_pass()
    assert len(meta.reports) == 1  # not again before the extent is due again
    clock.now += INTERVAL / 2
    await s.scrub_pass()
    assert [r[0] for r in meta.reports] == [5, 5]


async def test_a_failed_report_is_retried_until_the_extent_is_rebuilt(store: ExtentStore, tmp_path: Path) -> None:
    await sealed_extent(store, 9, MiB)
    meta, clock = MetaNode(), Clock()
    s = scrubber(store, meta, clock)
    await s.scrub_pass()
    flip(tmp_path, 9, 10)
    meta.up = False
    clock.now += INTERVAL
    await s.scrub_pass()
    assert meta.reports == [] and store.stats["scrub_errors"] == 1
    await s._retry_reports()
    assert meta.reports == []
    meta.up = True
    await s._retry_reports()
    assert [r[0] for r in meta.reports] == [9]
    await s._retry_reports()
    assert len(meta.reports) == 1
    # A pending report is dropped once the extent is re-created (rebuilt elsewhere or here).
    meta.up = False
    clock.now += INTERVAL
    await s.scrub_pass()
    await store.delete(9)
    await sealed_extent(store, 9, MiB, epoch=2)
    meta.up = True
    await s._retry_reports()
    assert len(meta.reports) == 1
    # ... and the new copy counts as just verified.
    assert await s.scrub_pass() == 0


async def test_truncated_data_file_is_reported(store: ExtentStore, tmp_path: Path) -> None:
    await sealed_extent(store, 11, MiB + 4096)
    meta, clock = MetaNode(), Clock()
    s = scrubber(store, meta, clock)
    await s.scrub_pass()
    os.truncate(tmp_path / "dev" / "extents" / f"{11:016x}.dat", MiB)
    store.backend._sizes.pop(11, None)  # type: ignore[attr-defined]  # as after a restart
    clock.now += INTERVAL
    await s.scrub_pass()
    assert [r[0] for r in meta.reports] == [11]
    assert "holds" in meta.reports[0][1]


async def test_an_extent_deleted_while_scrubbed_is_skipped(store: ExtentStore) -> None:
    await sealed_extent(store, 12, MiB)
    meta, clock = MetaNode(), Clock()
    s = scrubber(store, meta, clock)
    ((extent_id, m),) = store.sealed_extents()
    await store.delete(extent_id)
    assert await s.scrub_extent(extent_id, m) is None
    assert meta.reports == [] and store.stats["scrub_errors"] == 0


async def test_verification_times_survive_a_restart(store: ExtentStore, tmp_path: Path) -> None:
    await sealed_extent(store, 13, MiB)
    state = tmp_path / "scrub.json"
    meta, clock = MetaNode(), Clock()
    s = scrubber(store, meta, clock, state)
    await s.scrub_pass()
    clock.now += INTERVAL
    assert await s.scrub_pass() == 1
    assert state.exists()
    again = scrubber(store, meta, clock, state)
    again._load()
    clock.now += INTERVAL / 2
    assert await again.scrub_pass() == 0  # verified half an interval ago, says the file
    clock.now += INTERVAL / 2
    assert await again.scrub_pass() == 1
    state.write_text("{not json")
    broken = scrubber(store, meta, clock, state)
    broken._load()  # ignored with a warning: extents count as first seen
    assert await broken.scrub_pass() == 0
