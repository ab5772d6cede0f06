"""The `file` backend: one data file, one checksum file and one record per extent.

Layout under the device directory ``DIR/extents/``::

    <extent id, 16 hex>.dat   extent bytes at their offsets
    <extent id, 16 hex>.sum   16-byte block entries, entry i at offset 16*i
    <extent id, 16 hex>.meta  JSON ExtentMeta, replaced atomically (tmp, fsync, rename, fsync dir)

File descriptors of recently used extents are cached (bounded, least recently used out);
each call holds a reference to the descriptor it uses, and an evicted one is closed only
when its last user is done, so a long fdatasync or read in one thread never ends up on a
number that another thread's open reused. ``capacity_bytes``, when
set, caps the device below the filesystem's size (several DataNodes can share one disk,
and tests can fill a device without filling the disk).

Data is written with O_DIRECT (``direct_io``, the default) from a reused page-aligned
staging buffer: whole 4 KiB blocks, the partial edge blocks completed from the bytes
already there (the block at the logical end is kept in memory, so an append never reads).
An append of whole blocks at a block boundary whose bytes already sit in a page-aligned
buffer — a large append as the wire protocol receives it (``store/buffers.py``) — is
written from there, without the staging copy.
Buffered writes made every append copy into the page cache and then stall in the
kernel's dirty-page throttling; profiles showed that write lane as the bottleneck
(docs/benchmarks.md). The file may then extend past the logical end with zeros up to the
next 4 KiB boundary: those bytes have no checksum entry, are never read (reads are clipped
to the logical end) and are cut by recovery and by seal. Reads stay buffered (page cache,
readahead). Filesystems that refuse O_DIRECT (tmpfs) fall back to buffered writes.

Zeros ahead of small appends: a small append (≤ ``_ZERO_AHEAD_MAX``) that would grow the
data file writes, in the same O_DIRECT write, zeros up to the next ``_ZERO_AHEAD`` boundary.
The appends after it overwrite blocks the file already has, so their ``fdatasync`` is a
cache flush without a journal commit (block allocation, size): ~0.1-0.2 ms less per small
append here, one larger write every 64 appends of 4 KiB (docs/benchmarks.md, session 24).
The checksum file is prewritten the same way at create. Those zeros are padding like the
4 KiB edge above: no entries, clipped from reads, cut by recovery and seal; they count as
used, so a device with ``capacity_bytes`` gets them only while they fit under it. Large
appends do not get them: there the zeros would double the bytes written for no saved commit.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from appendfs.errors import VersionMismatch
from appendfs.store.buffers import ALIGN, is_aligned
from appendfs.store.codec import ENTRY_BYTES
from appendfs.store.datanode.backend import (
    META_FORMAT_VERSION,
    Backend,
    BackendError,
    ExtentMeta,
    ExtentMissing,
    Usage,
)

_MAX_OPEN_EXTENTS = 256
_SUM_PREWRITE_BYTES = 256 * 1024  # entries of a 64 MiB extent
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
_ALIGN = ALIGN  # O_DIRECT offset/length/buffer alignment (>= the device's logical block size)
_ZERO_AHEAD = 256 * 1024  # a small append growing the data file writes zeros up to a multiple of this
_ZERO_AHEAD_MAX = 32 * 1024  # appends up to this size get them (past it the zeros cost more than they save)


@dataclass(eq=False)
class _Fd:
    """A cached descriptor and the number of calls using it right now (see _retire)."""

    fd: int
    refs: int = 0
    retired: bool = False


class _Use:
    """``with backend._using(...) as fd``: a plain class, not ``@contextmanager`` — the
    generator machinery cost ~6% of a DataNode's CPU per small append (four uses each)."""

    __slots__ = ("_backend", "_h")

    def __init__(self, backend: FileBackend, h: _Fd) -> None:
        self._backend = backend
        self._h = h

    def __enter__(self) -> int:
        return self._h.fd

    def __exit__(self, *exc: object) -> None:
        self._backend._release(self._h)


class FileBackend(Backend):
    kind = "file"

    def __init__(self, root: Path, capacity_bytes: int | None = None, direct_io: bool = True) -> None:
        self.dir = Path(root) / "extents"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.direct_io = direct_io
        self._fds: OrderedDict[tuple[int, str], _Fd] = OrderedDict()  # LRU, at most _MAX_OPEN_EXTENTS
        self._lock = threading.Lock()
        self._used = sum(p.stat().st_size for p in self.dir.glob("*.dat"))
        self._sizes: dict[int, int] = {}  # logical end of each extent's data (the file may be padded)
        self._phys: dict[int, int] = {}  # size of each data file: what `used` counts
        self._tails: dict[int, bytes] = {}  # bytes of the partial block at the logical end
        self._staging: mmap.mmap | None = None  # page-aligned buffer for direct writes
        self._staging_lock = threading.Lock()

    def _path(self, extent_id: int, suffix: str) -> Path:
        return self.dir / f"{extent_id:016x}.{suffix}"

    def _acquire(self, extent_id: int, suffix: str, *, open_missing: bool = True) -> _Fd | None:
        """The cached descriptor of one file of an extent, with a reference taken (give it
        back with :meth:`_release`); opened if needed unless ``open_missing`` is False."""
        key = (extent_id, suffix)
        with self._lock:
            h = self._fds.get(key)
            if h is not None:
                self._fds.move_to_end(key)
                h.refs += 1
                return h
        if not open_missing:
            return None
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if suffix == "dio" else 0)
        try:
            fd = os.open(self._path(extent_id, "dat" if suffix == "dio" else suffix), flags)
        except FileNotFoundError:
            raise ExtentMissing(f"extent {extent_id} not found") from None
        with self._lock:
            other = self._fds.get(key)
            if other is not None:
                os.close(fd)
                other.refs += 1
                return other
            h = self._fds[key] = _Fd(fd, 1)
            while len(self._fds) > _MAX_OPEN_EXTENTS:
                _, old = self._fds.popitem(last=False)
                self._retire(old)
        return h

    def _release(self, h: _Fd) -> None:
        with self._lock:
            h.refs -= 1
            if h.retired and h.refs == 0:
                os.close(h.fd)

    def _retire(self, h: _Fd) -> None:
        """Close an evicted or forgotten descriptor — once nobody uses it. Closed under a
        thread's feet, its number could be reused by the next open, and that thread's
        pwrite or fdatasync would hit another extent's file. (Call with ``_lock`` held.)"""
        h.retired = True
        if h.refs == 0:
            os.close(h.fd)

    def _using(self, extent_id: int, suffix: str) -> _Use:
        """A descriptor of one file of an extent, valid for the ``with`` block (``dio``: the
        data file opened O_DIRECT)."""
        h = self._acquire(extent_id, suffix)
        assert h is not None
        return _Use(self, h)

    def _forget(self, extent_id: int) -> None:
        with self._lock:
            self._tails.pop(extent_id, None)
            for suffix in ("dat", "sum", "dio"):
                h = self._fds.pop((extent_id, suffix), None)
                if h is not None:
                    self._retire(h)

    @property
    def local_dir(self) -> str | None:
        return str(self.dir.parent.resolve())

    def create(self, meta: ExtentMeta) -> None:
        for suffix in ("dat", "sum"):
            fd = os.open(self._path(meta.extent_id, suffix), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if suffix == "sum":
                # Written zeros, not a hole: later entry writes overwrite allocated blocks in
                # place, so their fdatasync needs no journal commit (a zero entry is 'absent').
                os.pwrite(fd, bytes(_SUM_PREWRITE_BYTES), 0)
            os.fsync(fd)
            os.close(fd)
        with self._lock:
            self._sizes[meta.extent_id] = 0
            self._phys[meta.extent_id] = 0
        self.set_meta(meta)  # fsyncs the directory, which also makes the new files durable

    def _logical_end(self, extent_id: int) -> int:
        known = self._sizes.get(extent_id)
        if known is None:  # first use since start: the file's size (recovery truncates padding)
            with self._using(extent_id, "dat") as fd:
                known = os.fstat(fd).st_size
            with self._lock:
                self._sizes.setdefault(extent_id, known)
        return known

    def write_data(self, extent_id: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        known = self._logical_end(extent_id)
        end = offset + len(data)
        phys_before = self._physical(extent_id)
        phys_after = max(phys_before, end)
        if self.direct_io:
            pad_from = phys_before if self._room_for_zeros(end, phys_before) else None
            try:
                try:
                    written_end = self._write_direct(extent_id, offset, data, known, pad_from)
                except OSError as exc:
                    if pad_from is None or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise
                    # The zeros ahead may not fit where the append itself does.
                    written_end = self._write_direct(extent_id, offset, data, known, None)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_io = False  # this filesystem refuses O_DIRECT: stay buffered from now on
            else:
                phys_after = max(phys_before, written_end)
        if not self.direct_io:
            with self._using(extent_id, "dat") as fd:
                written = os.pwrite(fd, data, offset)
            if written != len(data):
                raise BackendError(f"short write on extent {extent_id}: {written} of {len(data)}")
        with self._lock:
            self._sizes[extent_id] = max(known, end)
            self._phys[extent_id] = phys_after
            self._used += phys_after - phys_before

    def _room_for_zeros(self, end: int, phys: int) -> bool:
        """Whether zeros ahead of an append ending at ``end`` stay within ``capacity_bytes``
        (the filesystem's own limit is found by trying: ENOSPC, then without them)."""
        if self.capacity_bytes is None:
            return True
        with self._lock:
            used = self._used
        return self.capacity_bytes - used >= -(-end // _ZERO_AHEAD) * _ZERO_AHEAD - phys

    def _physical(self, extent_id: int) -> int:
        size = self._phys.get(extent_id)
        if size is None:
            with self._using(extent_id, "dat") as fd:
                size = os.fstat(fd).st_size
            with self._lock:
                self._phys.setdefault(extent_id, size)
        return size

    def _write_direct(self, extent_id: int, offset: int, data: bytes | bytearray | memoryview, known: int,
                      phys: int | None) -> int:
        """Write [offset, offset+len) as whole aligned blocks through O_DIRECT; a small
        append growing the file (past ``phys``; None: never) also writes zeros ahead
        (module docstring). Returns the end of what was written."""
        start = offset - offset % _ALIGN
        end = offset + len(data)
        stop = -(-end // _ALIGN) * _ALIGN
        new_end = max(known, end)
        need = stop  # what must be written; zeros ahead past it may come up short
        if phys is not None and stop > phys and len(data) <= _ZERO_AHEAD_MAX:
            stop = -(-end // _ZERO_AHEAD) * _ZERO_AHEAD
        elif start == offset and stop == end and is_aligned(data):
            # Whole blocks from a page-aligned buffer (a large append as the wire protocol
            # receives it): the device reads them where they are, no staging copy.
            with self._using(extent_id, "dio") as fd:
                written = os.pwrite(fd, data, start)
            if written != stop - start:
                raise BackendError(f"short direct write on extent {extent_id}: {written} of {stop - start}")
            if new_end == end:
                with self._staging_lock:  # (where _tails is otherwise written and read)
                    self._tails[extent_id] = b""
            return stop
        with self._staging_lock:
            buf = self._staging
            if buf is None or len(buf) < stop - start:
                if buf is not None:
                    buf.close()
                buf = self._staging = mmap.mmap(-1, max(stop - start, 1 << 20))
            with memoryview(buf) as view:
                if offset > start:
                    view[: offset - start] = self._existing(extent_id, start, offset - start, known)
                view[offset - start:end - start] = data
                if end < stop:
                    view[end - start:stop - start] = self._existing(extent_id, end, stop - end, known)
                with self._using(extent_id, "dio") as fd:
                    written = os.pwrite(fd, view[: stop - start], start)
                if written != stop - start:
                    if stop == need:
                        raise BackendError(f"short direct write on extent {extent_id}: {written} of {stop - start}")
                    if start + written < need:  # the device filled up in the zeros: the caller retries without
                        raise OSError(errno.ENOSPC, f"no room for zeros ahead on extent {extent_id}")
                    stop = start + written
                last = new_end - new_end % _ALIGN
                if new_end % _ALIGN == 0:
                    self._tails[extent_id] = b""
                elif start <= last < stop:
                    self._tails[extent_id] = bytes(view[last - start:new_end - start])
        return stop

    def _existing(self, extent_id: int, at: int, length: int, known: int) -> bytes:
        """The ``length`` bytes now at ``at`` (zeros past the logical end), to complete a block."""
        if at >= known:
            return bytes(length)
        tail = self._tails.get(extent_id)
        if tail is not None and at == known - len(tail) and length >= len(tail):
            return tail + bytes(length - len(tail))
        with self._using(extent_id, "dat") as fd:
            got = os.pread(fd, min(length, known - at), at)
        return got + bytes(length - len(got))

    def sync_data(self, extent_ids: list[int]) -> None:
        for extent_id in extent_ids:
            with self._using(extent_id, "dat") as fd:
                os.fdatasync(fd)

    def write_checksums(self, extent_id: int, first_block: int, entries: bytes) -> None:
        with self._using(extent_id, "sum") as fd:
            os.pwrite(fd, entries, first_block * ENTRY_BYTES)

    def sync_checksums(self, extent_ids: list[int]) -> None:
        for extent_id in extent_ids:
            with self._using(extent_id, "sum") as fd:
                os.fdatasync(fd)

    def read_data(self, extent_id: int, offset: int, length: int) -> bytes:
        limit = self._sizes.get(extent_id)
        if limit is not None:  # never hand out the zero padding of a direct write
            length = max(0, min(length, limit - offset))
        with self._using(extent_id, "dat") as fd:
            return os.pread(fd, length, offset)

    def read_checksums(self, extent_id: int, first_block: int, count: int) -> bytes:
        with self._using(extent_id, "sum") as fd:
            got = os.pread(fd, count * ENTRY_BYTES, first_block * ENTRY_BYTES)
        # The prewritten zeros past the last entry are not entries: cut them like a short read.
        end = len(got)
        while end >= ENTRY_BYTES and not any(got[end - ENTRY_BYTES:end]):
            end -= ENTRY_BYTES
        return got[:end]

    def read_cached(self, extent_id: int, offset: int, length: int, first_block: int,
                    count: int) -> tuple[bytes, bytes] | None:
        """RWF_NOWAIT reads: the page cache answers at once or says EAGAIN (Linux ≥ 4.14)."""
        if _RWF_NOWAIT is None:
            return None
        # Only descriptors already open: opening one may block.
        dh = self._acquire(extent_id, "dat", open_missing=False)
        if dh is None:
            return None
        try:
            sh = self._acquire(extent_id, "sum", open_missing=False)
            if sh is None:
                return None
            try:
                return self._read_nowait(extent_id, dh.fd, sh.fd, offset, length, first_block, count)
            finally:
                self._release(sh)
        finally:
            self._release(dh)

    def _read_nowait(self, extent_id: int, dfd: int, sfd: int, offset: int, length: int, first_block: int,
                     count: int) -> tuple[bytes, bytes] | None:
        assert _RWF_NOWAIT is not None
        limit = self._sizes.get(extent_id)
        if limit is not None:
            length = max(0, min(length, limit - offset))
        want = count * ENTRY_BYTES
        data, sums = bytearray(length), bytearray(want)
        try:
            if os.preadv(dfd, [data], offset, _RWF_NOWAIT) != length or \
                    os.preadv(sfd, [sums], first_block * ENTRY_BYTES, _RWF_NOWAIT) != want:
                return None  # short: past the end, or only partly cached — the slow path decides
        except (BlockingIOError, OSError):
            return None
        end = want
        while end >= ENTRY_BYTES and not any(sums[end - ENTRY_BYTES:end]):
            end -= ENTRY_BYTES
        return bytes(data), bytes(sums[:end])

    def data_size(self, extent_id: int) -> int:
        with self._using(extent_id, "dat") as fd:
            return os.fstat(fd).st_size

    def truncate(self, extent_id: int, length: int, blocks: int) -> None:
        old = self._physical(extent_id)
        with self._using(extent_id, "dat") as fd:
            os.ftruncate(fd, length)
            os.fsync(fd)
        with self._using(extent_id, "sum") as sfd:
            os.ftruncate(sfd, blocks * ENTRY_BYTES)
            os.fsync(sfd)
        with self._lock:
            self._sizes[extent_id] = length
            self._phys[extent_id] = length
            self._used -= old - length
            self._tails.pop(extent_id, None)

    def set_meta(self, meta: ExtentMeta) -> None:
        path = self._path(meta.extent_id, "meta")
        tmp = path.with_suffix(".meta.tmp")
        with open(tmp, "w") as f:
            json.dump(meta.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def get_meta(self, extent_id: int) -> ExtentMeta:
        try:
            with open(self._path(extent_id, "meta")) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ExtentMissing(f"extent {extent_id} not found") from None
        except (ValueError, OSError) as exc:
            raise BackendError(f"extent {extent_id}: unreadable record: {exc}") from None
        version = raw.get("version") if isinstance(raw, dict) else None
        if version != META_FORMAT_VERSION:
            raise VersionMismatch(f"extent record {self._path(extent_id, 'meta')}", META_FORMAT_VERSION,
                                  version if isinstance(version, int) else -1)
        try:
            return ExtentMeta(**raw)
        except TypeError as exc:
            raise BackendError(f"extent {extent_id}: malformed record: {exc}") from None

    def list(self) -> list[int]:
        return sorted(int(p.stem, 16) for p in self.dir.glob("*.meta"))

    def delete(self, extent_id: int) -> None:
        self._forget(extent_id)
        size = 0
        try:
            size = self._path(extent_id, "dat").stat().st_size
        except FileNotFoundError:
            pass
        # The record goes first: an extent without a record is invisible and its files
        # are swept at the next start; a record without files would be a lie.
        for suffix in ("meta", "dat", "sum"):
            try:
                self._path(extent_id, suffix).unlink()
            except FileNotFoundError:
                pass
        with self._lock:
            self._used -= size
            self._sizes.pop(extent_id, None)
            self._phys.pop(extent_id, None)

    def sweep_orphans(self) -> int:
        """Remove data/checksum files without a record (an interrupted create or delete)."""
        known = {p.stem for p in self.dir.glob("*.meta")}
        removed = 0
        for p in list(self.dir.glob("*.dat")) + list(self.dir.glob("*.sum")) + list(self.dir.glob("*.tmp")):
            # A .tmp is never a record: left by a set_meta interrupted before its rename.
            if p.suffix == ".tmp" or p.stem.split(".")[0] not in known:
                p.unlink(missing_ok=True)
                removed += 1
        self._used = sum(p.stat().st_size for p in self.dir.glob("*.dat"))
        return removed

    def usage(self) -> Usage:
        """Without ``capacity_bytes``, the filesystem as ``df`` counts it: used is every
        allocated block (ours and other files'), free is what this process may still
        allocate (``f_bavail``), capacity their sum. Blocks reserved for another user (ext4's
        reserved blocks, 5% by default and sometimes far more) are neither: counted as used,
        they pushed a disk with gigabytes free over the high-water mark. With
        ``capacity_bytes``, used is this device's extent files, and neither capacity nor
        free exceeds what the filesystem can still give."""
        st = os.statvfs(self.dir)
        fs_free = st.f_bavail * st.f_frsize
        fs_used = (st.f_blocks - st.f_bfree) * st.f_frsize
        with self._lock:
            used = self._used
        if self.capacity_bytes is None:
            return Usage(capacity_bytes=fs_used + fs_free, used_bytes=fs_used, free_bytes=fs_free)
        # A capacity beyond what the filesystem can still give is reported as what it can.
        free = max(0, min(self.capacity_bytes - used, fs_free))
        return Usage(capacity_bytes=min(self.capacity_bytes, used + fs_free), used_bytes=used, free_bytes=free)

    def close(self) -> None:
        with self._lock:
            for h in self._fds.values():
                self._retire(h)
            self._fds.clear()
