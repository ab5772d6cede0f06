"""ByteBudget: backpressure bytes are never leaked by a cancelled take. BlockCache: eviction order."""

from __future__ import annotations

import trio
import trio.testing

from appendfs.fs.budget import BlockCache, ByteBudget, _Fetch


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


async def test_try_take_takes_only_what_needs_no_wait_and_never_jumps_the_queue() -> None:
    b = ByteBudget(100)
    assert b.try_take(60) and b.used == 60
    assert not b.try_take(50) and b.used == 60  # would exceed the total
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.take, 50)  # queued: 60 + 50 > 100
        await trio.testing.wait_all_tasks_blocked()
        assert not b.try_take(10)  # there is room, but a waiter came first
        b.give(60)  # the waiter gets its 50
    assert b.used == 50 and b.try_take(50) and b.used == 100


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


def test_readahead_room_counts_unread_and_in_flight_blocks() -> None:
    """Readahead may fill the cache only with what no reader is waiting to read: unread
    blocks and blocks in flight take room, a block read to its end gives it back, and an
    evicted unread block stops counting."""
    bb = 4096
    cache = BlockCache(capacity_bytes=4 * bb, block_bytes=bb)
    assert cache.readahead_room() == 3 * bb  # one block kept for a reader's own fetch
    cache.put(7, 0, b"\x00" * bb)
    cache.put(7, bb, b"\x01" * bb)
    assert cache.unread_bytes == 2 * bb and cache.readahead_room() == bb
    cache.inflight[(7, 2)] = _Fetch()
    assert cache.readahead_room() == 0
    del cache.inflight[(7, 2)]
    cache.done_with(7, 0)
    cache.done_with(7, 0)  # twice: counted once
    assert cache.unread_bytes == bb and cache.readahead_room() == 2 * bb
    for block in (2, 3, 4):  # block 0 (read) is evicted by the last one
        cache.put(7, block * bb, bytes([block]) * bb)
    assert cache.get(7, 0, bb) is None and cache.unread_bytes == 4 * bb
    cache.put(7, 5 * bb, b"\x05" * bb)  # now an unread block (1) goes: it stops counting
    assert cache.get(7, bb, 2 * bb) is None and cache.unread_bytes == 4 * bb
    cache.put(7, 2 * bb, b"\x02" * bb)  # replacing an entry does not count it twice
    assert cache.unread_bytes == 4 * bb and cache.used_bytes == 4 * bb
    cache.clear()
    assert cache.unread_bytes == 0 and cache.readahead_room() == 3 * bb


def test_present_sees_cached_and_in_flight_blocks_without_counting_or_reordering() -> None:
    """Readahead's presence check must not look like reader traffic: no hit or miss
    counted, and the entry keeps its eviction place."""
    bb = 4096
    cache = BlockCache(capacity_bytes=2 * bb, block_bytes=bb)
    cache.put(7, 0, b"\x00" * bb)
    cache.put(7, bb, b"\x01" * bb)
    assert cache.present(7, 0, bb) and cache.present(7, 100, 200) and not cache.present(7, 2 * bb, 3 * bb)
    cache.inflight[(7, 2)] = _Fetch()
    assert cache.present(7, 2 * bb, 3 * bb)
    assert cache.hits == 0 and cache.misses == 0
    cache.put(7, 3 * bb, b"\x03" * bb)  # block 0 is still the least recently used: it goes
    assert not cache.present(7, 0, bb) and cache.present(7, bb, 2 * bb)


def test_a_block_is_done_once_its_readers_took_all_of_it_in_any_order() -> None:
    """The kernel's readahead requests may be answered out of order: a read reaching a
    block's end can come before one of its middle. The block stays unread (and keeps its
    place) until every byte was taken, then goes first; a block readers took only part of
    stays unread."""
    bb = 4096
    cache = BlockCache(capacity_bytes=3 * bb, block_bytes=bb)
    for block in (0, 1, 2):
        cache.put(7, block * bb, bytes([block]) * bb)
    assert not cache.taken(7, 0, bb // 2)  # its second half first
    assert cache.unread_bytes == 3 * bb
    cache.put(7, 3 * bb, b"\x03" * bb)  # full: the LRU block 0 goes (nobody said it was done)
    assert cache.get(7, 0, bb) is None and cache.unread_bytes == 3 * bb
    assert not cache.taken(7, 1, bb // 2)
    assert cache.taken(7, 1, bb // 2)  # the other half: done, first to go, no longer unread
    assert cache.unread_bytes == 2 * bb
    cache.put(7, 4 * bb, b"\x04" * bb)
    assert cache.get(7, bb, 2 * bb) is None
    assert all(cache.get(7, b * bb, (b + 1) * bb) == bytes([b]) * bb for b in (2, 3, 4))
    assert cache.taken(7, 99, 1)  # not cached: nothing to wait for


def test_taken_bytes_are_forgotten_with_their_entry() -> None:
    """A block evicted half-read and fetched again starts counting from zero; replacing an
    entry by a wider one keeps what readers took of it."""
    bb = 4096
    cache = BlockCache(capacity_bytes=2 * bb, block_bytes=bb)
    cache.put(7, 0, b"\x00" * bb)
    assert not cache.taken(7, 0, bb - 1)
    cache.put(7, bb, b"\x01" * bb)
    cache.put(7, 2 * bb, b"\x02" * bb)  # block 0 evicted
    cache.put(7, 0, b"\x00" * bb)  # fetched again
    assert not cache.taken(7, 0, 1)  # 1 of 4096, not 4096 of 4096
    cache.put(7, 2 * bb + 100, b"\x02" * 100)  # a narrower put keeps the wider entry
    assert not cache.taken(7, 2, bb - 1)
    cache.put(7, 2 * bb, b"\x02" * bb)  # replaced by an entry as wide: the count stays
    assert cache.taken(7, 2, 1)
