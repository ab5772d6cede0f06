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


#: A write that extends a chunk by at least this much is kept as the ``bytes`` object FUSE
#: handed in, no copy; smaller ones are gathered into ``bytearray`` parts of up to the
#: store's append size. (Each part becomes at least one append: parts much smaller than
#: the append size would cost the DataNodes an append each.)
KEEP_BYTES = 512 << 10


@dataclass(eq=False)
class Chunk:
    """Contiguous bytes written at ``file_off`` (dirty, then sent, then committed).

    Held as parts, in order: the ``bytes`` of large writes as FUSE handed them in, and
    ``bytearray`` parts that gather small writes (up to ``part_bytes`` each) and take
    overwrites. Once sent, a chunk never changes again: the store keeps its parts, without
    copying them, until every replica has acknowledged them (``LogStream.append``'s
    ``frozen``). A sequential 1 MiB writer's bytes are thus copied only by the kernel and
    pyfuse3 on their way in and by the socket on their way out.
    """

    file_off: int
    parts: list[bytes | bytearray] = field(default_factory=list)
    length: int = 0
    ticket: Ticket | None = None  # set when sent to a stream

    @classmethod
    def of(cls, file_off: int, data: bytes | bytearray | memoryview, part_bytes: int) -> Chunk:
        c = cls(file_off)
        c.write(0, data, part_bytes)
        return c

    @property
    def end(self) -> int:
        return self.file_off + self.length

    def write(self, rel: int, data: bytes | bytearray | memoryview, part_bytes: int) -> None:
        """Put ``data`` at ``rel`` bytes into the chunk (``rel <= length``): overwrite what
        it covers in place, extend the chunk with the rest."""
        if not 0 <= rel <= self.length:
            raise ValueError(f"write at {rel} of a chunk of {self.length} bytes")
        n = len(data)
        inside = min(n, self.length - rel)
        if inside:
            self._overwrite(rel, memoryview(data)[:inside])
        if inside < n:
            self._extend(data if inside == 0 else memoryview(data)[inside:], part_bytes)

    def _extend(self, data: bytes | bytearray | memoryview, part_bytes: int) -> None:
        n = len(data)
        last = self.parts[-1] if self.parts else None
        if isinstance(data, bytes) and n >= KEEP_BYTES:
            self.parts.append(data)  # immutable: kept as it is
        elif isinstance(last, bytearray) and len(last) + n <= part_bytes:
            last += data
        else:
            self.parts.append(bytearray(data))
        self.length += n

    def _overwrite(self, rel: int, data: memoryview) -> None:
        end = rel + len(data)
        lo = 0
        for i, part in enumerate(self.parts):
            hi = lo + len(part)
            a, b = max(lo, rel), min(hi, end)
            if a < b:
                if isinstance(part, bytes):
                    part = self.parts[i] = bytearray(part)  # copy one part, not the chunk
                part[a - lo:b - lo] = data[a - rel:b - rel]
            if hi >= end:
                return
            lo = hi

    def copy_into(self, buf: bytearray, at: int, lo: int, hi: int) -> None:
        """Copy the chunk's bytes ``[lo, hi)`` (relative to ``file_off``) into ``buf`` at ``at``."""
        start = 0
        for part in self.parts:
            stop = start + len(part)
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                buf[at + a - lo:at + b - lo] = part[a - start:b - start]
            if stop >= hi:
                return
            start = stop

    def tobytes(self) -> bytes:
        return b"".join(self.parts)


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
    # The last deferred write error and how many there were: each handle reports each one
    # once (Handle.error_seen; like the kernel's errseq_t), not the first caller for all.
    error: BaseException | None = None
    error_seq: int = 0
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

    def note_error(self, exc: BaseException) -> None:
        """A write of this file was lost: every handle open now reports ``exc`` once."""
        self.error = exc
        self.error_seq += 1

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
        raise AssertionError(f"pieces cover {off - chunk.file_off} of {chunk.length} bytes")
    return out


def overlay(buf: bytearray, off: int, chunks: list[Chunk]) -> None:
    """Lay the bytes of ``chunks`` (oldest first) over ``buf``, which holds ``[off, off+len)``."""
    end = off + len(buf)
    for c in chunks:
        lo, hi = max(off, c.file_off), min(end, c.end)
        if lo < hi:
            c.copy_into(buf, lo - off, lo - c.file_off, hi - c.file_off)
