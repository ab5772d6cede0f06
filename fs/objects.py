"""Whole-object data paths for the S3 gateway: write bytes before any namespace change,
read a committed file by range without holding it open.

The mount writes through open files (:mod:`appendfs.fs.files`): buffers become slices of
an existing inode. An S3 PUT is different (DESIGN §5): the object's bytes are appended to
the store *first*, and only then does one metadata transaction create or replace the
key with those slices — readers see the old object or the new one, never a mix.

* :class:`ObjectWriter` buffers a body into ``chunk_bytes`` appends on the client's
  streams (owner ``fs`` for objects, ``s3-part`` for multipart parts), takes the shared
  write budget for every byte in flight (so many concurrent uploads are bounded like
  the mount's dirty data), re-sends chunks whose stream broke (bounded), and returns the
  acknowledged :class:`~appendfs.meta.NewSlice` list. Nothing is in the namespace yet:
  a failed or abandoned upload leaves only unreferenced extent bytes (garbage by the
  DESIGN §8 rule, no bookkeeping).
* :class:`RangeReader` streams ``[start, end)`` of a slice map snapshot with a bounded
  window of block reads in flight, in order. It takes no open hold: slices point at
  immutable extent bytes, so a snapshot stays readable while a concurrent PUT replaces
  the key (the GC's grace period will cover readers once it exists).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from appendfs.meta import NewSlice, Segment
from appendfs.store.client import StoreClient, Ticket
from appendfs.store.errors import NoSpace, StoreError

if TYPE_CHECKING:
    from appendfs.fs.budget import ByteBudget
    from appendfs.fs.streams import StreamPool

log = logging.getLogger(__name__)

_MAX_RESENDS = 3


@dataclass(eq=False)
class _Piece:
    off: int  # offset within the object
    data: bytearray  # the writer's buffer, handed over whole: never changed after
    ticket: Ticket | None = None


@dataclass(eq=False)
class ObjectWriter:
    """Append one object's (or part's) bytes to the store; :meth:`finish` returns its slices.

    Use as ``async with fs.object_writer(...) as w: await w.write(b); slices = await w.finish()``;
    leaving the block without ``finish`` (an error, a client that went away) releases the
    budget and abandons the appended bytes.
    """

    streams: StreamPool
    budget: ByteBudget
    redundancy: str
    chunk_bytes: int
    stream_key: int
    nursery: trio.Nursery
    size: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _sent: deque[_Piece] = field(default_factory=deque)
    _held: int = 0
    _slices: list[NewSlice] = field(default_factory=list)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            room = self.chunk_bytes - len(self._buf)
            take = view[:room]
            if self._buf and self.budget.used + len(take) > self.budget.total:
                # Never wait for budget while sitting on a partial buffer: with many uploads
                # at once, partial buffers alone could hold all of it and nobody would send.
                await self._send()
            await self.budget.take(len(take))
            self._held += len(take)
            self._buf += take
            view = view[room:]
            if len(self._buf) >= self.chunk_bytes:
                await self._send()
            await self._reap(block=False)

    async def _send(self) -> None:
        if not self._buf:
            return
        p = _Piece(self.size, self._buf)  # handed over, not copied: the writer starts a new one
        self._buf = bytearray()
        self.size += len(p.data)
        await self._append(p)
        self._sent.append(p)
        # The budget comes back when the store acknowledges, not when this writer next looks:
        # a writer blocked on the budget must not hold acknowledged bytes.
        self.nursery.start_soon(self._give_on_ack, p)

    async def _give_on_ack(self, p: _Piece) -> None:
        assert p.ticket is not None
        await p.ticket.done.wait()
        self._give(len(p.data))

    def _give(self, n: int) -> None:
        n = min(n, self._held)  # after abandon() everything was given back already
        self._held -= n
        self.budget.give(n)

    async def _append(self, p: _Piece) -> None:
        stream = await self.streams.stream_for(self.redundancy, self.stream_key)
        p.ticket = await stream.append(p.data, frozen=True)  # a piece never changes

    async def _reap(self, *, block: bool) -> None:
        """Turn acknowledged pieces (in order) into slices and give their budget back."""
        while self._sent:
            p = self._sent[0]
            assert p.ticket is not None
            if not block and not p.ticket.done.is_set():
                return
            pieces = await self._acked(p)
            off = p.off
            for extent_id, ext_off, length in pieces:
                self._slices.append(NewSlice(off, length, extent_id, ext_off))
                off += length
            self._sent.popleft()

    async def _acked(self, p: _Piece) -> list[tuple[int, int, int]]:
        for attempt in itertools.count():
            assert p.ticket is not None
            try:
                return [(x.extent_id, x.ext_off, x.length) for x in await p.ticket.wait()]
            except StoreError as exc:
                if isinstance(exc, NoSpace) or attempt >= _MAX_RESENDS:
                    raise
                log.warning("object piece at %d: stream failed (%s); sending it again", p.off, exc)
                await self._append(p)
        raise AssertionError("unreachable")

    async def finish(self) -> list[NewSlice]:
        """Append what is buffered, wait until every byte is durable; the object's slices."""
        if len(self._buf):
            await self._send()
        await self._reap(block=True)
        return list(self._slices)

    def abandon(self) -> None:
        self.budget.give(self._held)
        self._held = 0
        self._buf.clear()
        self._sent.clear()


@dataclass(eq=False)
class _Slot:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | bytearray = b""
    error: BaseException | None = None


class RangeReader:
    """Bytes ``[start, end)`` of a file from its resolved segments, ``window`` reads ahead.

    ``async for data in reader`` yields consecutive pieces of at most ``piece_bytes``;
    holes read as zeros. Errors of a piece surface when that piece is reached.
    """

    def __init__(self, client: StoreClient, segments: Sequence[Segment], start: int, end: int,
                 piece_bytes: int, window: int, nursery: trio.Nursery) -> None:
        self._client = client
        self._plan = list(_split(segments, start, end, piece_bytes))
        self._nursery = nursery
        self._window = window
        self._lane = trio.Semaphore(window)
        self._slots: deque[_Slot] = deque()
        self._next = 0

    def _fill(self) -> None:
        while self._next < len(self._plan) and len(self._slots) < 2 * self._window:
            seg = self._plan[self._next]
            self._next += 1
            slot = _Slot()
            self._slots.append(slot)
            if seg.extent_id is None:
                slot.data = bytes(seg.length)
                slot.done.set()
            else:
                self._nursery.start_soon(self._fetch, seg, slot)

    async def _fetch(self, seg: Segment, slot: _Slot) -> None:
        assert seg.extent_id is not None
        async with self._lane:
            try:
                slot.data = await self._client.read(seg.extent_id, seg.ext_off, seg.length)
            except Exception as exc:
                slot.error = exc
            finally:
                slot.done.set()

    def __aiter__(self) -> RangeReader:
        return self

    async def __anext__(self) -> bytes | bytearray:
        self._fill()
        if not self._slots:
            raise StopAsyncIteration
        slot = self._slots.popleft()
        await slot.done.wait()
        self._fill()
        if slot.error is not None:
            raise slot.error
        return slot.data


def _split(segments: Sequence[Segment], start: int, end: int, piece_bytes: int) -> list[Segment]:
    """Segments clipped to ``[start, end)`` and cut into pieces of at most ``piece_bytes``;
    gaps between segments (and after the last one, up to ``end``) become holes."""
    out: list[Segment] = []
    pos = start
    for s in segments:
        lo, hi = max(s.file_off, start), min(s.file_off + s.length, end)
        if hi <= lo:
            continue
        if lo > pos:
            out.extend(_cut(Segment(pos, lo - pos, None, 0), piece_bytes))
        shift = lo - s.file_off
        ext_off = 0 if s.extent_id is None else s.ext_off + shift
        out.extend(_cut(Segment(lo, hi - lo, s.extent_id, ext_off), piece_bytes))
        pos = hi
    if pos < end:
        out.extend(_cut(Segment(pos, end - pos, None, 0), piece_bytes))
    return out


def _cut(s: Segment, piece_bytes: int) -> list[Segment]:
    out = []
    for off in range(0, s.length, piece_bytes):
        n = min(piece_bytes, s.length - off)
        out.append(Segment(s.file_off + off, n, s.extent_id, s.ext_off + off if s.extent_id is not None else 0))
    return out


@asynccontextmanager
async def read_range(client: StoreClient, segments: Sequence[Segment], start: int, end: int, *,
                     piece_bytes: int, window: int) -> AsyncIterator[RangeReader]:
    """A :class:`RangeReader` whose block reads live in a nursery bounded by this block."""
    async with trio.open_nursery() as nursery:
        try:
            yield RangeReader(client, segments, start, end, piece_bytes, window, nursery)
        finally:
            nursery.cancel_scope.cancel()
