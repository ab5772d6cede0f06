"""Counting primitives of the file layer: a byte budget (backpressure) and a block cache.

:class:`ByteBudget` bounds the file data a client holds between ``write()`` and the commit
of its slice (dirty buffers, bytes in flight to DataNodes, acknowledged but uncommitted):
a writer that would exceed it waits until commits give bytes back. :class:`BlockCache` is
a byte-bounded LRU of verified extent bytes keyed by ``(extent_id, block)``; extent bytes
below the acknowledged length never change (append-only), so entries need no
invalidation, only eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import trio


class ByteBudget:
    """A weighted semaphore over bytes, fair in arrival order."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: list[tuple[int, trio.Event]] = []

    async def take(self, n: int) -> None:
        n = min(n, self.total)  # one request larger than everything waits for an empty budget
        if not self._waiters and self.used + n <= self.total:
            # Cancelled here, the caller must not hold the bytes: check first, then take
            # them with a checkpoint that cannot raise (trio's checkpoint pattern).
            await trio.lowlevel.checkpoint_if_cancelled()
            self.used += n
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        ev = trio.Event()
        item = (n, ev)
        self._waiters.append(item)
        try:
            await ev.wait()
        except BaseException:
            if item in self._waiters:
                self._waiters.remove(item)
            else:  # granted just as we were cancelled: give it back
                self.give(n)
            raise

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if that needs no wait (nobody queued, room left); never yields."""
        n = min(n, self.total)
        if self._waiters or self.used + n > self.total:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - min(n, self.total))
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            need, ev = self._waiters.pop(0)
            self.used += need
            ev.set()


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | bytearray = b""
    lo: int = 0
    error: BaseException | None = None


class BlockCache:
    """LRU of extent byte ranges ``[lo, lo+len(data))`` inside block ``(extent_id, n)``."""

    def __init__(self, capacity_bytes: int, block_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.block_bytes = block_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[tuple[int, int], tuple[int, bytes | bytearray]] = OrderedDict()
        # Entries no reader has taken all of yet -> the bytes their readers took so far.
        self._unread: dict[tuple[int, int], int] = {}
        self.unread_bytes = 0
        self.inflight: dict[tuple[int, int], _Fetch] = {}
        self.hits = 0
        self.misses = 0

    def get(self, extent_id: int, lo: int, hi: int) -> memoryview | None:
        """Bytes ``[lo, hi)`` of the extent if one cached entry holds them all, as a view
        into the entry: no copy (a 1 MiB slice copied per FUSE read was ~10% of the
        mount's CPU in a cold sequential read). Entries are never modified in place."""
        key = (extent_id, lo // self.block_bytes)
        entry = self._entries.get(key)
        if entry is None or entry[0] > lo or entry[0] + len(entry[1]) < hi:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        start = lo - entry[0]
        return memoryview(entry[1])[start:start + hi - lo]

    def present(self, extent_id: int, lo: int, hi: int) -> bool:
        """Whether ``[lo, hi)`` is cached whole or its block is being fetched: readahead's
        check, which neither counts as a hit or miss nor refreshes the entry's LRU place."""
        key = (extent_id, lo // self.block_bytes)
        if key in self.inflight:
            return True
        entry = self._entries.get(key)
        return entry is not None and entry[0] <= lo and entry[0] + len(entry[1]) >= hi

    def put(self, extent_id: int, lo: int, data: bytes | bytearray) -> None:
        if len(data) > self.capacity_bytes:
            return
        key = (extent_id, lo // self.block_bytes)
        taken = self._unread.get(key, 0)  # (a replaced entry keeps what its readers took)
        old = self._drop(key)
        if old is not None and old[0] <= lo and old[0] + len(old[1]) >= lo + len(data):
            data, lo = old[1], old[0]  # keep the wider entry
        self._entries[key] = (lo, data)
        self.used_bytes += len(data)
        self._unread[key] = taken
        self.unread_bytes += len(data)
        while self.used_bytes > self.capacity_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, int]) -> tuple[int, bytes | bytearray] | None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= len(old[1])
            if self._unread.pop(key, None) is not None:
                self.unread_bytes -= len(old[1])
        return old

    def taken(self, extent_id: int, block: int, n: int) -> bool:
        """A sequential reader took ``n`` more bytes of this block's entry. Once its readers
        took as many bytes as the entry holds, the block is done with (:meth:`done_with`)
        and True is returned (also when it is not cached, or done already).

        Counted, not "a read reached the entry's end": the kernel's readahead has several
        requests of a window in flight and the mount's tasks may answer them out of order,
        so the read that reaches a block's end can come before one of its middle. Marked
        done at the end, the block was the first to go when the middle's read came: 6-16
        blocks of every GiB read sequentially were fetched twice, each a stall of the reader.
        """
        key = (extent_id, block)
        if key not in self._unread:
            return True
        taken = self._unread[key] + n
        if taken < len(self._entries[key][1]):
            self._unread[key] = taken
            return False
        self.done_with(extent_id, block)
        return True

    def done_with(self, extent_id: int, block: int) -> None:
        """Readers are done with this block (took all of it, or closed): make it the first to go
        (drop-behind). Least-recently-used order alone would evict the blocks readahead
        fetched *earliest* — the next ones the reader needs — once several readers'
        windows together approach the capacity, while consumed blocks (which the kernel's
        page cache holds for re-reads anyway) stayed."""
        key = (extent_id, block)
        if key in self._entries:
            self._entries.move_to_end(key, last=False)
            if self._unread.pop(key, None) is not None:
                self.unread_bytes -= len(self._entries[key][1])

    def readahead_room(self) -> int:
        """Bytes readahead may still fetch without evicting blocks fetched for readers
        that have not read them yet (what it fetched earliest: the next ones needed), one
        block kept free for a reader's own fetch. Several readers share the cache this way
        instead of each assuming a whole window of it."""
        in_flight = len(self.inflight) * self.block_bytes
        return self.capacity_bytes - self.unread_bytes - in_flight - self.block_bytes

    def clear(self) -> None:
        self._entries.clear()
        self._unread.clear()
        self.used_bytes = self.unread_bytes = 0
