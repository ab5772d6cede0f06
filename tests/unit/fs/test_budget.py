"""ByteBudget: backpressure bytes are never leaked by a cancelled take. BlockCache: eviction order."""

from __future__ import annotations

import trio

from appendfs.fs.budget import BlockCache, ByteBudget


async def test_a_take_cancelled_before_it_returns_holds_nothing() -> None:
    b = ByteBudget(100)
    with trio.CancelScope() as scope:
        scope.cancel()
        await b.take(10)  # raises Cancelled: the bytes must not stay taken
    assert scope.cancelled_caught and b.used == 0
    await b.take(10)
    assert b.used == 10


async def test_a_waiting_take_cancelled_gives_its_place_up() -> None:
    b = ByteBudget(100)
    await b.take(90)
    with trio.move_on_after(0.05):
        await b.take(20)  # waits (90 + 20 > 100) until cancelled
    assert b.used == 90 and not b._waiters
    b.give(90)
    await b.take(100)
    assert b.used == 100


def test_block_cache_evicts_least_recently_used_first() -> None:
    cache = BlockCache(capacity_bytes=3 * 4096, block_bytes=4096)
    for block in range(3):
        cache.put(7, block * 4096, bytes([block]) * 4096)
    assert cache.get(7, 0, 4096) == bytes([0]) * 4096  # block 0 is now the most recent
    cache.put(7, 3 * 4096, b"\x03" * 4096)
    assert cache.get(7, 4096, 8192) is None  # block 1 went
    assert cache.get(7, 0, 10) == b"\x00" * 10 and cache.used_bytes == 3 * 4096


def test_a_block_read_to_its_end_is_evicted_before_prefetched_ones() -> None:
    """Drop-behind: readahead inserted blocks 1-3 before the reader consumed block 0; the
    next insertion must evict the consumed block, not block 1 (the reader's next one)."""
    cache = BlockCache(capacity_bytes=4 * 4096, block_bytes=4096)
    cache.put(7, 0, b"\x00" * 4096)
    for block in (1, 2, 3):
        cache.put(7, block * 4096, bytes([block]) * 4096)
    assert cache.get(7, 0, 4096) is not None
    cache.done_with(7, 0)
    cache.done_with(7, 99)  # not cached: nothing happens
    cache.put(7, 4 * 4096, b"\x04" * 4096)
    assert cache.get(7, 0, 4096) is None
    assert all(cache.get(7, b * 4096, (b + 1) * 4096) == bytes([b]) * 4096 for b in (1, 2, 3, 4))
