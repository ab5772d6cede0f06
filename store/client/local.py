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
than a thread hand-off), larger ones in a worker thread.

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
from collections import OrderedDict
from pathlib import Path

import trio

from appendfs.store.buffers import ALIGN, address_of, new_bytearray
from appendfs.store.codec import BLOCK_BYTES, ENTRY_BYTES, BlockError, verify_blocks
from appendfs.store.datanode.backend import META_FORMAT_VERSION

log = logging.getLogger(__name__)
_FDS_MAX = 256  # open extents (two descriptors each)
#: A cached copy not read for this long is closed (LocalReads.expire): an open descriptor
#: keeps a deleted extent's blocks allocated, so an idle client must not hold them.
FDS_IDLE_S = 30.0
_RETRY_S = 30.0  # a DataNode that did not answer the ping is asked again after this
_Files = tuple[int, int, int, int]  # data and checksum descriptors; the copy record's index, sealed length
assert BLOCK_BYTES % ALIGN == 0


class LocalReads:
    """Per-process short-circuit reader; one per StoreClient. Descriptors of recently read
    extents are cached for the small reads made on the event loop (only that thread opens,
    uses and closes them; those idle for FDS_IDLE_S are closed by :meth:`expire`, which
    the client calls periodically); reads in worker threads open and close their own."""

    def __init__(self, cluster_id: str, *, inline_bytes: int, stats: dict[str, int], direct: bool = True) -> None:
        self.cluster_id = cluster_id
        self.inline_bytes = inline_bytes
        self.direct = direct  # reads in worker threads use O_DIRECT (until a filesystem refuses it)
        self._dirs: dict[str, tuple[str, Path] | None] = {}  # address -> (node id, directory); None: not local
        self._fds: OrderedDict[tuple[str, int], _Files] = OrderedDict()  # least recently used first
        self._used_at: dict[tuple[str, int], float] = {}  # when each was last read (trio clock)
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
        root = known[1]
        if length <= self.inline_bytes:
            key = (address, extent_id)
            try:
                fds = self._fds.get(key)
                if fds is None:
                    fds = self._fds[key] = _open(root, extent_id)
                    while len(self._fds) > _FDS_MAX:
                        self._drop(next(iter(self._fds)))
                else:
                    self._fds.move_to_end(key)
                self._used_at[key] = trio.current_time()
                got = _read(fds, offset, length, index)
            except OSError:
                got = None
            if got is None and key in self._fds:  # maybe a copy re-created since: reopen next time
                self._drop(key)
        else:
            # EC fragments (``index``) stay buffered: the decoder and pyeclib want bytes.
            direct = self.direct and index is None
            try:
                got = await trio.to_thread.run_sync(_read_once, root, extent_id, offset, length, index, direct)
            except _DirectRefused:
                log.info("%s refuses O_DIRECT: short-circuit reads stay buffered", root)
                self.direct = False
                got = await trio.to_thread.run_sync(_read_once, root, extent_id, offset, length, index, False)
        if got is None:
            self.stats["local_fallbacks"] += 1
        else:
            self.stats["local_reads"] += 1
            self.stats["local_read_bytes"] += length
        return got

    def _drop(self, key: tuple[str, int]) -> None:
        _close(self._fds.pop(key))
        self._used_at.pop(key, None)

    def expire(self, now: float, idle_s: float = FDS_IDLE_S) -> int:
        """Close the cached copies not read since ``now - idle_s`` (event loop only: the
        cache's thread); how many. The cache is in least-recently-used order."""
        closed = 0
        while self._fds:
            key = next(iter(self._fds))
            if now - self._used_at.get(key, now) < idle_s:
                break
            self._drop(key)
            closed += 1
        return closed

    def close(self) -> None:
        while self._fds:
            self._drop(next(iter(self._fds)))


class _DirectRefused(Exception):
    """The filesystem of a copy does not support O_DIRECT opens (EINVAL)."""


def _open(root: Path, extent_id: int, direct: bool = False) -> _Files:
    base = root / "extents" / f"{extent_id:016x}"
    try:
        rec = json.loads(Path(f"{base}.meta").read_bytes())
        index, sealed, version = int(rec["index"]), rec["state"] == "sealed", rec["version"]
        length = int(rec["sealed_length"])
    except (ValueError, KeyError, TypeError):
        raise OSError(f"extent record {base}.meta unreadable") from None
    if not sealed or version != META_FORMAT_VERSION:
        raise OSError(f"extent {extent_id:x} is not sealed here (or a record version we do not know)")
    try:
        dat = os.open(f"{base}.dat", os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            raise _DirectRefused from None
        raise
    try:
        return dat, os.open(f"{base}.sum", os.O_RDONLY | os.O_CLOEXEC), index, length
    except OSError:
        os.close(dat)
        raise


def _close(files: _Files) -> None:
    for fd in files[:2]:
        try:
            os.close(fd)
        except OSError:
            pass


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
        verify_blocks(data, os.pread(ents, count * ENTRY_BYTES, first * ENTRY_BYTES), first)
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


def _read_once(root: Path, extent_id: int, offset: int, length: int, index: int | None,
               direct: bool = False) -> bytes | bytearray | None:
    """One read in a worker thread; raises :class:`_DirectRefused` when ``direct`` cannot
    be had on this filesystem."""
    try:
        fds = _open(root, extent_id, direct)
    except OSError:  # (not _DirectRefused: it goes to the caller)
        return None
    try:
        return _read(fds, offset, length, index, direct)
    except OSError:
        return None
    finally:
        _close(fds)
