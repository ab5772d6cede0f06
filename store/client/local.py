"""Short-circuit reads: a client on the same host as a DataNode reads sealed extents itself.

A read through a DataNode costs a round trip between two processes; on this kind of host
that is ~300 µs of wake-ups, half the time of a 4 KiB random read through the mount
(docs/benchmarks.md). HDFS answers the same problem with short-circuit local reads; this
is the simple form of it: the client opens the extent's files by path and verifies the
bytes against the block checksums itself, exactly as it verifies a DataNode's answer.

When a copy qualifies:

* the DataNode's ``ping`` names a ``local_dir`` (the `file` backend does), and that
  directory's ``node.json`` carries the node id and cluster id of the node we asked: the
  same host, the same view of the filesystem, the same cluster — checked once per node;
* this process can open the files (the DataNode's are mode 0600: in practice both run as
  the same user; anything else simply fails to open and reads go through the DataNode);
* the extent is **sealed** in the caller's map and the copy's own record (``.meta``) says
  it is sealed too; reads stop at the sealed length it records. Sealed bytes never
  change: a copy that moved, was transcoded or deleted after we opened it still holds the
  same verified bytes under the same id; a rebuild in progress under that id is not sealed.

Anything unexpected — a missing file, a short read, an entry that does not verify — makes
:meth:`LocalReads.read` return None and the caller reads through the DataNode, which is
authoritative (it reports corruption; a short circuit never does). Small reads run on the
event loop (a 4 KiB pread is a few µs from the page cache, ~100 µs from this disk: less
than a thread hand-off), larger ones in a worker thread; both through descriptors the
event loop keeps open per copy (:class:`_Copy`).

The large ones read with ``O_DIRECT`` (``direct``, the default) into a page-aligned part of
a fresh ``bytearray``, which is then returned as it is: no page-cache copy in the kernel
and none in Python. The DataNode writes extents with ``O_DIRECT`` too, so the page cache
holds nothing of a new extent that a buffered read could have found, and a sequential
reader reads each block once. Measured here (docs/benchmarks.md): the client's CPU per
GiB read 1.2-1.35 → 0.8-0.9 s, the mount's 2.6-3.3 → 2.1-2.3 s. A filesystem that
refuses ``O_DIRECT`` (tmpfs) turns it off for the process; small reads stay buffered, so
hot 4 KiB random reads keep the page cache.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
from collections import OrderedDict
from pathlib import Path

import trio

from appendfs.store.buffers import ALIGN, address_of, new_bytearray
from appendfs.store.codec import BLOCK_BYTES, ENTRY_BYTES, BlockError, verify_blocks
from appendfs.store.datanode.backend import META_FORMAT_VERSION

log = logging.getLogger(__name__)
#: Copies whose descriptors are kept open (up to three each; fewer where the process may
#: open few files: an eighth of its soft RLIMIT_NOFILE at most).
_COPIES_MAX = 256
#: A cached copy not read for this long is closed (LocalReads.expire): an open descriptor
#: keeps a deleted extent's blocks allocated, so an idle client must not hold them.
FDS_IDLE_S = 30.0
_RETRY_S = 30.0  # a DataNode that did not answer the ping is asked again after this
_Files = tuple[int, int, int, int]  # data and checksum descriptors; the copy record's index, sealed length
assert BLOCK_BYTES % ALIGN == 0


def _copies_max() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _COPIES_MAX if soft == resource.RLIM_INFINITY else max(8, min(_COPIES_MAX, soft // 8))


class _Copy:
    """The open files of one sealed copy, shared by the small reads made on the event loop
    and the large ones made in worker threads.

    Only the event loop opens and closes them. A worker thread reads through descriptors
    of a copy held for it (``users``); a copy dropped from the cache while held is closed
    when its last reader returns, so no thread ever reads a closed (or reused) descriptor.
    The data file is opened twice at most, buffered for small reads and ``O_DIRECT`` for
    large ones, each when first needed.
    """

    __slots__ = ("buffered", "direct", "dropped", "index", "sealed_length", "sums", "used_at", "users")

    def __init__(self, sums: int, index: int, sealed_length: int) -> None:
        self.sums, self.index, self.sealed_length = sums, index, sealed_length
        self.buffered = self.direct = -1  # not open yet
        self.used_at = 0.0  # when last read (trio clock): LocalReads.expire
        self.users = 0  # reads in worker threads using these descriptors now
        self.dropped = False  # out of the cache: closed once users is 0

    def files(self, direct: bool) -> _Files:
        return self.direct if direct else self.buffered, self.sums, self.index, self.sealed_length

    def close(self) -> None:
        for fd in (self.buffered, self.direct, self.sums):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.buffered = self.direct = self.sums = -1


class LocalReads:
    """Per-process short-circuit reader; one per StoreClient. The files of recently read
    copies stay open for the next read (:class:`_Copy`): a sequential reader reads one
    block at a time in a worker thread, and opening the files and parsing the copy's
    record for each block cost ~10% of the mount's CPU per GiB read (docs/benchmarks.md).
    Copies idle for FDS_IDLE_S are closed by :meth:`expire`, which the client calls
    periodically; a large read that reaches a copy's end closes it at once (a sequential
    reader is done with it), so deleted extents do not stay pinned by a reader that moved
    on."""

    def __init__(self, cluster_id: str, *, inline_bytes: int, stats: dict[str, int], direct: bool = True) -> None:
        self.cluster_id = cluster_id
        self.inline_bytes = inline_bytes
        self.direct = direct  # reads in worker threads use O_DIRECT (until a filesystem refuses it)
        self._dirs: dict[str, tuple[str, Path] | None] = {}  # address -> (node id, directory); None: not local
        self._copies: OrderedDict[tuple[str, int], _Copy] = OrderedDict()  # least recently used first
        self._copies_max = _copies_max()
        self._retry_at: dict[str, float] = {}  # address -> when to ask a node that did not answer again
        self.stats = stats  # the client's counters (its metrics)
        stats.update(local_reads=0, local_read_bytes=0, local_fallbacks=0, local_nodes=0)

    def should_ask(self, address: str, now: float) -> bool:
        """Whether the client should ``ping`` this DataNode for its directory now: never
        asked, and not one that failed to answer less than ``_RETRY_S`` ago."""
        return address not in self._dirs and self._retry_at.get(address, 0.0) <= now

    def unanswered(self, address: str, now: float) -> None:
        self._retry_at[address] = now + _RETRY_S

    def learn(self, address: str, node_id: str, local_dir: str | None) -> Path | None:
        """Record what a DataNode's ``ping`` said; the directory if reads may short-circuit."""
        found: Path | None = None
        if local_dir:
            path = Path(local_dir)
            try:
                stamp = json.loads((path / "node.json").read_text())
                if stamp.get("node_id") == node_id and stamp.get("cluster_id") == self.cluster_id \
                        and os.access(path / "extents", os.R_OK | os.X_OK):
                    found = path
            except (OSError, ValueError):
                pass
        self._dirs[address] = None if found is None else (node_id, found)
        self.stats["local_nodes"] = sum(1 for d in self._dirs.values() if d is not None)
        if found is not None:
            log.info("reads of sealed extents on DataNode %s (%s) short-circuit to %s", node_id, address, found)
        return found

    async def read(self, address: str, node_id: str, extent_id: int, offset: int, length: int,
                   index: int | None = None) -> bytes | bytearray | None:
        """Verified bytes of [offset, offset+length) of the sealed copy ``extent_id`` (the id
        the DataNode stores it under), or None: read it through the DataNode instead. With
        ``index`` (an EC fragment), the copy's record must name that index."""
        known = self._dirs.get(address)
        if known is None or known[0] != node_id:  # not local, or another node answers there now
            return None
        key = (address, extent_id)
        large = length > self.inline_bytes
        # EC fragments (``index``) stay buffered: the decoder and pyeclib want bytes.
        direct = large and self.direct and index is None
        got: bytes | bytearray | None = None
        try:
            copy = self._hold(key, known[1], extent_id, direct)
            direct = direct and self.direct  # (the open may just have found O_DIRECT refused)
            if not large:
                got = _read(copy.files(False), offset, length, index)
            else:
                copy.users += 1
                try:
                    got = await trio.to_thread.run_sync(_read_quietly, copy.files(direct), offset, length, index,
                                                        direct)
                finally:
                    copy.users -= 1
                    if copy.dropped and not copy.users:
                        copy.close()
        except OSError:
            pass
        if key in self._copies and (got is None or (large and offset + length >= self._copies[key].sealed_length)):
            self._drop(key)  # failed (maybe a copy re-created since: reopen next time), or read to its end
        if got is None:
            self.stats["local_fallbacks"] += 1
        else:
            self.stats["local_reads"] += 1
            self.stats["local_read_bytes"] += length
        return got

    def _hold(self, key: tuple[str, int], root: Path, extent_id: int, direct: bool) -> _Copy:
        """The cached copy ``key`` with the data descriptor this read needs; what is
        missing is opened now (on the event loop: a few µs from the page cache, once per
        copy). Raises OSError when the copy cannot be read here."""
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = _open(root, extent_id)
            while len(self._copies) > self._copies_max:
                self._drop(next(iter(self._copies)))
        else:
            self._copies.move_to_end(key)
        copy.used_at = trio.current_time()
        if (copy.direct if direct else copy.buffered) >= 0:
            return copy  # (the common case, for every 4 KiB random read: no path built)
        dat = f"{_base(root, extent_id)}.dat"
        try:
            if direct:
                try:
                    copy.direct = os.open(dat, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
                    return copy
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    log.info("%s refuses O_DIRECT: short-circuit reads stay buffered", root)
                    self.direct = False
            if copy.buffered < 0:
                copy.buffered = os.open(dat, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._drop(key)
            raise
        return copy

    def _drop(self, key: tuple[str, int]) -> None:
        copy = self._copies.pop(key)
        copy.dropped = True
        if not copy.users:
            copy.close()

    def expire(self, now: float, idle_s: float = FDS_IDLE_S) -> int:
        """Close the cached copies not read since ``now - idle_s`` (event loop only: the
        cache's thread); how many. The cache is in least-recently-used order."""
        closed = 0
        while self._copies:
            key, copy = next(iter(self._copies.items()))
            if now - copy.used_at < idle_s:
                break
            self._drop(key)
            closed += 1
        return closed

    def close(self) -> None:
        while self._copies:
            self._drop(next(iter(self._copies)))


def _base(root: Path, extent_id: int) -> str:
    return str(root / "extents" / f"{extent_id:016x}")


def _open(root: Path, extent_id: int) -> _Copy:
    """A sealed copy's record checked and its checksum file opened (the data file is
    opened by :meth:`LocalReads._hold`, buffered or not, as reads need it)."""
    base = _base(root, extent_id)
    try:
        rec = json.loads(Path(f"{base}.meta").read_bytes())
        index, sealed, version = int(rec["index"]), rec["state"] == "sealed", rec["version"]
        length = int(rec["sealed_length"])
    except (ValueError, KeyError, TypeError):
        raise OSError(f"extent record {base}.meta unreadable") from None
    if not sealed or version != META_FORMAT_VERSION:
        raise OSError(f"extent {extent_id:x} is not sealed here (or a record version we do not know)")
    return _Copy(os.open(f"{base}.sum", os.O_RDONLY | os.O_CLOEXEC), index, length)


def _read(files: _Files, offset: int, length: int, index: int | None,
          direct: bool = False) -> bytes | bytearray | None:
    """Verified [offset, offset+length) from a sealed copy's data and checksum files
    (``direct``: the data descriptor was opened O_DIRECT)."""
    dat, ents, stored_index, sealed_length = files
    if index is not None and index != stored_index:
        return None  # through the DataNode, which names the index, so the reader refuses it
    if offset + length > sealed_length:
        return None
    start = offset - offset % BLOCK_BYTES
    first = start // BLOCK_BYTES
    count = -(-(offset + length - start) // BLOCK_BYTES)
    want = min(count * BLOCK_BYTES, sealed_length - start)
    skip = offset - start
    if direct:
        return _read_direct(dat, ents, start, want, count, skip, length)
    data = os.pread(dat, want, start)
    if len(data) < skip + length or not _verifies(data, ents, first, count):
        return None
    return data[skip:skip + length] if (skip or len(data) != length) else data


def _verifies(data: bytes | memoryview, ents: int, first: int, count: int) -> bool:
    """Whether ``data`` (blocks ``first``.. of a copy) matches the copy's checksum entries."""
    try:
        verify_blocks(data, os.pread(ents, count * ENTRY_BYTES, first * ENTRY_BYTES), first, check_entries=False)
    except BlockError:
        return False
    return True


def _read_direct(dat: int, ents: int, start: int, want: int, count: int, skip: int,
                 length: int) -> bytes | bytearray | None:
    """:func:`_read` through an O_DIRECT descriptor: whole aligned blocks into an aligned
    window of a new bytearray, verified, and returned without a copy when the caller wants
    exactly those bytes (a sequential reader does)."""
    span = count * BLOCK_BYTES  # whole blocks: the last one may end past EOF (a short read)
    buf = new_bytearray(span + ALIGN)  # not zeroed: only read bytes are returned
    pad = -address_of(buf) % ALIGN
    with memoryview(buf) as whole, whole[pad:pad + span] as view:
        got = os.preadv(dat, [view], start)
        if min(got, want) < skip + length:
            return None
        with view[:min(got, want)] as data:
            if not _verifies(data, ents, start // BLOCK_BYTES, count):
                return None
            if skip or len(data) != length:
                return bytes(data[skip:skip + length])
    del buf[:pad]  # a bytearray drops leading bytes by moving its start: no copy
    del buf[length:]
    return buf


def _read_quietly(files: _Files, offset: int, length: int, index: int | None,
                  direct: bool) -> bytes | bytearray | None:
    """:func:`_read` in a worker thread: a failing read is a fallback, not an error."""
    try:
        return _read(files, offset, length, index, direct)
    except OSError:
        return None
