"""Open files of one client: write buffers → slices, and reads that see them (DESIGN §4).

Data flow of a write::

    write(off, data) ─► OpenFile.dirty (one growing Chunk per file, in memory)
                          │ full (chunk_bytes), aged (flush_age_s), or flush/fsync/close
                          ▼
                        LogStream.append  (bounded window per stream: backpressure)
                          │ ticket: acknowledged durable by every replica
                          ▼
                        commit loop (one per file, in the FileSystem's nursery)
                          └─► Meta.commit_slices(ino, slices)  — data first, then metadata

Every byte between ``write`` and its commit holds the client's :class:`ByteBudget`, so a
fast writer waits instead of growing memory. A file's chunks go to one stream (chosen by
inode), so their tickets complete in write order and commits are applied in that order:
later writes get later slice seqs and win (DESIGN §3).

Errors after ``write`` returned (a broken stream, no space, an unreachable database) are
*deferred*: they are kept on the file and raised by the next ``flush``/``fsync`` (close
calls flush), the places POSIX lets a program learn about them.

Reads snapshot the file's pending chunks *before* loading the committed slice map, so a
chunk committed in between is seen at least once; pending chunks are laid over the
committed bytes oldest first, the dirty chunk last.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import trio

from appendfs.meta import Attr, NewSlice, Segment
from appendfs.store.client import Ticket

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Chunk:
    """Contiguous bytes written at ``file_off`` (dirty, then sent, then committed)."""

    file_off: int
    data: bytearray
    ticket: Ticket | None = None  # set when sent to a stream

    @property
    def end(self) -> int:
        return self.file_off + len(self.data)


@dataclass(eq=False)
class SegmentMap:
    """The committed, resolved layout of a file: segments over ``[0, size)``."""

    size: int
    segments: list[Segment]
    starts: list[int]
    gen: int

    @classmethod
    def build(cls, attr: Attr, segments: list[Segment]) -> SegmentMap:
        return cls(attr.size, segments, [s.file_off for s in segments], attr.gen)

    def covering(self, off: int, end: int) -> list[Segment]:
        """Segments that intersect ``[off, end)`` (clipped to it)."""
        end = min(end, self.size)
        out: list[Segment] = []
        i = max(bisect.bisect_right(self.starts, off) - 1, 0)
        while i < len(self.segments) and self.segments[i].file_off < end:
            s = self.segments[i]
            lo, hi = max(s.file_off, off), min(s.end, end)
            if lo < hi:
                ext_off = s.ext_off + (lo - s.file_off) if s.extent_id is not None else 0
                out.append(Segment(lo, hi - lo, s.extent_id, ext_off))
            i += 1
        return out


@dataclass(eq=False)
class OpenFile:
    """What this client holds for one inode while handles are open (or data is pending)."""

    ino: int
    attr: Attr
    redundancy: str
    handles: int = 0
    dirty: Chunk | None = None
    dirty_since: float = 0.0
    sending: Chunk | None = None  # taken from dirty, being handed to a stream (not in sent yet)
    sent: deque[Chunk] = field(default_factory=deque)
    error: BaseException | None = None
    resends: int = 0  # consecutive re-sends after broken streams (bounded)
    committing: bool = False
    idle: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)
    local_size: int = 0  # size including bytes not committed yet
    last_write_ns: int = 0
    segmap: SegmentMap | None = None

    def __post_init__(self) -> None:
        self.local_size = self.attr.size
        self.idle.set()

    @property
    def pending(self) -> bool:
        return self.dirty is not None or self.sending is not None or bool(self.sent) or self.committing

    def pending_chunks(self) -> list[Chunk]:
        """Uncommitted chunks, oldest first (the dirty one last)."""
        chunks = list(self.sent)
        if self.sending is not None:
            chunks.append(self.sending)
        if self.dirty is not None:
            chunks.append(self.dirty)
        return chunks

    def view(self, attr: Attr) -> Attr:
        """``attr`` as this client sees it: uncommitted writes count for size and mtime."""
        if not self.pending:
            return attr
        size = max(attr.size, self.local_size)
        mtime = max(attr.mtime_ns, self.last_write_ns)
        return attr._replace(size=size, mtime_ns=mtime, ctime_ns=max(attr.ctime_ns, mtime))

    def adopt(self, attr: Attr) -> None:
        """Take fresh committed attributes (after a commit, setattr or reopen)."""
        if self.segmap is not None and self.segmap.gen != attr.gen:
            self.segmap = None
        self.attr = attr
        if not self.pending:
            self.local_size = attr.size

    def note_write(self, end: int) -> None:
        self.local_size = max(self.local_size, end)
        self.last_write_ns = time.time_ns()

    def mark_busy(self) -> None:
        if self.idle.is_set():
            self.idle = trio.Event()


def place_pieces(chunk: Chunk, pieces: list[tuple[int, int, int]]) -> list[NewSlice]:
    """Slices for ``chunk`` whose bytes landed as consecutive (extent, ext_off, length) pieces."""
    out: list[NewSlice] = []
    off = chunk.file_off
    for extent_id, ext_off, length in pieces:
        out.append(NewSlice(off, length, extent_id, ext_off))
        off += length
    if off != chunk.end:
        raise AssertionError(f"pieces cover {off - chunk.file_off} of {len(chunk.data)} bytes")
    return out


def overlay(buf: bytearray, off: int, chunks: list[Chunk]) -> None:
    """Lay the bytes of ``chunks`` (oldest first) over ``buf``, which holds ``[off, off+len)``."""
    end = off + len(buf)
    for c in chunks:
        lo, hi = max(off, c.file_off), min(end, c.end)
        if lo < hi:
            buf[lo - off:hi - off] = c.data[lo - c.file_off:hi - c.file_off]
