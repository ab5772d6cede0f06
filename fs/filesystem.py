"""FileSystem: the POSIX file layer over the namespace (meta/) and the store client.

One object per client process (the mount, an S3 gateway). It owns

* a :class:`~appendfs.meta.Meta` (sync SQL, called through ``trio.to_thread`` with a
  CapacityLimiter sized to its pool — DESIGN §3) and a namespace *session* kept alive by
  heartbeats, so files unlinked while open here stay readable until released;
* a :class:`~appendfs.store.client.StoreClient` and a :class:`~appendfs.fs.streams.StreamPool`
  (owner ``fs``) that file data is appended to;
* the open files (:mod:`appendfs.fs.files`), the write budget and the block cache;
* background tasks in its nursery: commit loops, the aged-buffer flusher, heartbeats and
  maintenance (dead sessions of other clients, slices of deleted files).

Every method is ``async`` and raises the namespace's :class:`~appendfs.meta.FsError`
(errno), :class:`~appendfs.meta.MetaUnavailable`, a :class:`~appendfs.store.errors.StoreError`
or ``trio.TooSlowError``; callers (``mount/``, ``s3/``) translate them in one place.

Consistency (DESIGN §3): close-to-open. ``open`` reads fresh attributes; when another
client changed the file since this one last saw it, the caller is told not to keep its
page cache and the slice map is reloaded. Within one client, everything written is
visible at once (reads overlay uncommitted chunks).
"""

from __future__ import annotations

import bisect
import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from appendfs.fs.budget import BlockCache, ByteBudget, _Fetch
from appendfs.fs.config import FsConfig
from appendfs.fs.files import Chunk, OpenFile, SegmentMap, overlay, place_pieces
from appendfs.fs.objects import ObjectWriter, RangeReader, read_range
from appendfs.fs.streams import StreamPool
from appendfs.meta import (
    Attr,
    DirEntry,
    FsError,
    Meta,
    MetaConfig,
    Replaced,
    SessionExpired,
    resolve,
)
from appendfs.meta.slices import Segment
from appendfs.meta.txn import WouldBlock
from appendfs.store.client import ClientConfig, StoreClient
from appendfs.store.ec import Layout, LayoutError
from appendfs.store.errors import NoSpace, StoreError
from appendfs.store.placement import PolicyError, parse_policy

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Directory (and file) xattr naming the redundancy of new files below it.
POLICY_XATTR = b"user.appendfs.redundancy"
_SEEN_MAX = 100_000
_CAPS_XATTR = b"security.capability"
PART_OWNER = "s3-part"  # owner of the streams multipart parts go to (DESIGN §8)
_MAX_RESENDS = 3  # times a file's chunks are sent again after their stream broke, in a row
_RELEASE_LINGER_S = 0.05  # closes released together (see _releaser)
_DIR_AFTER_S = 0.1  # how long a directory's row as our create or unlink left it answers a getattr
_CHECKPOINT_EVERY = 500  # inline commits between WAL checkpoints (SQLite's own default: 1000 pages)


class _HoldGate:
    """Unlinks and renames that may keep an inode for the kernel (any number at once)
    against release batches (one at a time, alone). Hold counts live in the client
    (``Meta._open_counts``): a batch decides from them which holds it drops, so an unlink
    adding to an inode's count meanwhile could have its hold dropped by the batch."""

    def __init__(self) -> None:
        self._in_flight: set[trio.Event] = set()
        self._batch: trio.Event | None = None  # set when the running batch ends

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._batch is not None:
            await self._batch.wait()
        done = trio.Event()
        self._in_flight.add(done)
        try:
            yield
        finally:
            self._in_flight.discard(done)
            done.set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        while self._batch is not None:
            await self._batch.wait()
        self._batch = ended = trio.Event()  # from now on new unlinks wait
        try:
            await self.settle()
            yield
        finally:
            self._batch = None
            ended.set()

    async def settle(self) -> None:
        """Wait for the unlinks and renames in flight now."""
        for done in list(self._in_flight):
            await done.wait()


@dataclass(eq=False)
class Handle:
    """One open file description (FUSE ``fh``); tracks sequential reading for readahead."""

    fh: int
    of: OpenFile
    flags: int
    next_off: int = -1
    streak: int = 0
    ra_next: int = 0
    window: int = 0
    # Blocks fetched for this handle (by readahead, or begun by its reads) that it has not
    # read all of: they count as unread in the block cache until then, or until the handle
    # is closed.
    ahead: set[tuple[int, int]] = field(default_factory=set)
    error_seen: int = 0  # the file's error_seq this handle has reported (or found at open)


class FileSystem:
    def __init__(self, meta: Meta, client: StoreClient, cfg: FsConfig, nursery: trio.Nursery) -> None:
        self.meta = meta
        self.client = client
        self.cfg = cfg
        self.streams = StreamPool(client, cfg.streams_per_policy)
        self.budget = ByteBudget(cfg.write_buffer_bytes)
        # Write buffers gather small writes in parts of the store's append size: one append each.
        self._part_bytes = client.cfg.append_bytes
        self.cache = BlockCache(cfg.cache_bytes, cfg.block_bytes)
        self.sid = 0
        self._nursery = nursery
        self._db_lane = trio.CapacityLimiter(cfg.meta_pool)
        self._inline_reads = cfg.inline_sqlite_reads and meta.is_sqlite
        self._inline_read_count = 0  # inline namespace reads so far (every 8th yields: _read)
        self._inline_writes = cfg.inline_sqlite_writes and meta.is_sqlite
        self._wal_syncing: trio.Event | None = None
        self._wal_sync_avg_s = 0.0
        self._wal_checkpointing = False
        self._wal_checkpoint_at = 0
        self._no_caps: dict[int, float] = {}  # ino → until when it surely has no security.capability
        self._ra_lane = trio.CapacityLimiter(cfg.readahead_parallel)
        self.read_fetch_bytes = 0  # bytes file reads asked the store for (blocks and uncached reads)
        self._files: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._seen_gen: OrderedDict[int, int] = OrderedDict()
        self._dir_cache: dict[int, tuple[Attr, str | None, float]] = {}
        self._dir_after: dict[int, tuple[Attr, float]] = {}  # see _left_unchanged
        self.dir_attrs_reused = 0  # getattrs answered by _left_unchanged's memory, not the namespace
        self._statfs: tuple[float, dict[str, int]] | None = None
        self._relieving = False
        self._session_lock = trio.Lock()
        self._release_q: list[int] = []
        self._releasing: set[int] = set()
        self._kernel_held: set[int] = set()  # unlinked or replaced, held until the kernel forgets them
        self._holds = _HoldGate()
        self._release_wake = trio.Event()
        self._released = trio.Event()
        self._part_streams: StreamPool | None = None
        self._object_seq = itertools.count()

    # ---- lifetime -------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(cls, meta_url: str, cfg: FsConfig | None = None,
                   client_cfg: ClientConfig | None = None, owner: str | None = None) -> AsyncIterator[FileSystem]:
        """Connect to META_URL and the cluster; on exit flush every file and release all."""
        cfg = cfg or FsConfig()
        mcfg = MetaConfig(unreachable_timeout_s=cfg.meta_timeout_s, session_ttl_s=cfg.session_ttl_s)
        meta = await trio.to_thread.run_sync(lambda: Meta.from_url(meta_url, mcfg, pool_size=cfg.meta_pool))
        try:
            async with StoreClient.connect(meta_url, client_cfg) as client, trio.open_nursery() as nursery:
                fs = cls(meta, client, cfg, nursery)
                fs.sid = await fs._meta(meta.open_session, owner)
                nursery.start_soon(fs._heartbeats)
                nursery.start_soon(fs._flusher)
                nursery.start_soon(fs._maintenance)
                nursery.start_soon(fs._releaser)
                try:
                    yield fs
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(60):
                        await fs._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            await trio.to_thread.run_sync(meta.close)

    async def _shutdown(self) -> None:
        for of in list(self._files.values()):
            before = of.error_seq
            try:
                await self._flush_file(of)
            except Exception as exc:  # (not expected: a failed send or commit is the file's error)
                of.note_error(exc)
            if of.error_seq != before:
                log.error("inode %d: data not committed at shutdown: %s", of.ino, of.error)
        await self.streams.close()
        if self._part_streams is not None:
            await self._part_streams.close()
        await self._release_batch()
        try:
            await self._meta(self.meta.close_session, self.sid)
        except Exception as exc:
            log.warning("closing session %d: %s (it expires by itself)", self.sid, exc)

    async def _meta(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=self._db_lane)

    async def _write(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A short namespace write of the per-file paths (create, commit, unlink …).

        On SQLite (``inline_sqlite_writes``) it runs right here, on the event loop. Handed
        to a worker thread, a create's transaction competed with this loop for the GIL
        statement by statement, and SQLite's writer lock stayed held about three times as
        long (four small-file writers: 3.1 ms of writer lock per file; docs/namespace.md).
        Nothing here waits: if the write would (another process or thread holds the lock),
        it runs in a thread as before. The commit skips its fsync; the answer waits for
        :meth:`_durable`. ``fn`` must be a :class:`~appendfs.meta.Meta` call that may run
        twice (see ``Meta.run_inline``)."""
        if self._inline_writes:
            try:
                result, seq = self.meta.run_inline(fn, *args, **kw)
            except WouldBlock:
                pass
            else:
                if seq:
                    await self._durable(seq)
                return result
        return await self._meta(fn, *args, **kw)

    async def _durable(self, seq: int) -> None:
        """Wait until inline commit ``seq`` is durable (an fdatasync of the WAL, which also
        covers every commit before it). The fsync runs on the loop while fsyncs average
        under ``inline_sync_s`` (a hop to a thread costs more than a fast one), else in a
        thread, one at a time, shared by every commit made meanwhile — so a slow disk
        sends syncs back to the thread by itself (as the DataNode's inline commit does)."""
        wal = self.meta.wal
        assert wal is not None
        while wal.synced < seq:
            if self._wal_syncing is not None:
                await self._wal_syncing.wait()
                continue
            if self._wal_sync_avg_s <= self.cfg.inline_sync_s and self.cfg.inline_sync_s > 0:
                t0 = time.perf_counter()
                wal.sync()
                self._note_sync(time.perf_counter() - t0)
                break
            done = self._wal_syncing = trio.Event()
            try:
                self._note_sync(await trio.to_thread.run_sync(_timed, wal.sync))
            finally:
                self._wal_syncing = None
                done.set()
        # Inline connections never checkpoint at commit (that would stall this loop): a
        # thread does, every _CHECKPOINT_EVERY inline commits.
        if wal.committed - self._wal_checkpoint_at >= _CHECKPOINT_EVERY and not self._wal_checkpointing:
            self._wal_checkpointing = True
            self._wal_checkpoint_at = wal.committed
            self._nursery.start_soon(self._checkpoint)

    def _note_sync(self, seconds: float) -> None:
        self._wal_sync_avg_s += (seconds - self._wal_sync_avg_s) * 0.2

    async def _checkpoint(self) -> None:
        try:
            await self._meta(self.meta.checkpoint)
        except Exception as exc:  # the next one retries; other connections checkpoint too
            log.warning("namespace WAL checkpoint: %s", exc)
        finally:
            self._wal_checkpointing = False

    async def _read(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A namespace read. On SQLite (``inline_sqlite_reads``) it runs right here: a WAL
        snapshot read takes ~50 µs and never waits for writers, while a hop to a worker
        thread costs several hundred µs of wake-up on a virtual machine. Writes (they may
        wait for another process's lock) and PostgreSQL (network) always go to threads."""
        if self._inline_reads:
            result = fn(*args, **kw)
            # Yield on every 8th only: a FUSE handler's worker yields for its next request
            # anyway (a yield here cost each small file two task switches), while a loop of
            # reads (a listing) still lets the other tasks run every ~0.5 ms.
            self._inline_read_count += 1
            if self._inline_read_count % 8 == 0:
                await trio.lowlevel.checkpoint()
            return result
        return await self._meta(fn, *args, **kw)

    # ---- attributes -----------------------------------------------------------------

    def _view(self, attr: Attr) -> Attr:
        of = self._files.get(attr.ino)
        return of.view(attr) if of is not None else attr

    async def _current(self, attr: Attr) -> Attr:
        """``attr`` as this client sees it, unless it predates a commit of this client (read
        while the commit landed): answered to the kernel, that older size would undo the
        size the kernel set after the write, and the file would read short until the
        attribute TTL ran out. Then it is read again."""
        if self._seen_gen.get(attr.ino, -1) > attr.gen:
            attr = await self._read(self.meta.getattr, attr.ino)
        return self._view(attr)

    async def getattr(self, ino: int) -> Attr:
        after = self._dir_after.pop(ino, None)
        if after is not None and after[1] > trio.current_time():
            self.dir_attrs_reused += 1
            return after[0]
        return await self._current(await self._read(self.meta.getattr, ino))

    def _left_unchanged(self, parent: int, row: Attr | None) -> None:
        """Remember a directory that a create or unlink of ours left unchanged, for one getattr.

        The kernel drops a directory's cached attributes after every create or unlink in
        it, and the next path walk through it asks for them again (its permission check):
        one namespace read and one FUSE round trip per file, ~5% of a small file's time.
        The transaction read that row anyway (``row``: :class:`~appendfs.meta.types.Made`'s
        ``parent``, or what ``Meta.unlink`` returns; None when it changed the row), so the
        one getattr that follows within ``_DIR_AFTER_S`` (never past the attribute TTL; 0
        turns this off) is answered with it: no staler than the copy the kernel dropped.
        Any other change of ours to a directory forgets it (:meth:`_dirs_changed`)."""
        ttl = min(self.cfg.attr_timeout_s, _DIR_AFTER_S)
        if row is None or ttl <= 0:
            self._dir_after.pop(parent, None)
        else:
            if len(self._dir_after) > 4096:
                self._dir_after.clear()
            self._dir_after[parent] = (row, trio.current_time() + ttl)

    def _dirs_changed(self, *inos: int) -> None:
        """Our own change to these directories ends their answer by :meth:`_left_unchanged`."""
        for ino in inos:
            self._dir_after.pop(ino, None)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        return await self._current(await self._read(self.meta.lookup, parent, name))

    async def setattr(self, ino: int, **changes: int | None) -> Attr:
        """chmod/chown/truncate/utimes. Pending writes are committed first, so an explicit
        mtime (``cp -p``) or a truncation is applied after them, not overtaken."""
        self._dir_cache.pop(ino, None)
        self._dirs_changed(ino)  # (and again after the commit, below)
        of = self._files.get(ino)
        if of is not None and of.pending:
            await self._flush_file(of)
        if of is not None and changes.get("size") is not None:
            async with of.lock:  # no write may slip between the flush and the truncation
                await self._flush_file(of, locked=True)
                attr = await self._meta(self.meta.setattr, ino, **changes)
                of.segmap = None
                of.adopt(attr)
                of.local_size = attr.size
        else:
            attr = await self._write(self.meta.setattr, ino, **changes)
            if of is not None:
                of.adopt(attr)
        self._dirs_changed(ino)  # after the commit: a create answered meanwhile read the row before it
        self._saw(attr)
        return self._view(attr)

    def _saw(self, attr: Attr) -> None:
        self._seen_gen[attr.ino] = attr.gen
        self._seen_gen.move_to_end(attr.ino)
        if len(self._seen_gen) > _SEEN_MAX:
            self._seen_gen.popitem(last=False)

    # ---- namespace ------------------------------------------------------------------

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        _, policy = await self.parent_info(parent)
        inherit = {POLICY_XATTR: policy.encode()} if policy is not None else None
        try:
            return await self._write(self.meta.mkdir, parent, name, mode, uid, gid, xattrs=inherit)
        finally:
            self._dirs_changed(parent)

    async def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int) -> Attr:
        try:
            return await self._write(self.meta.mknod, parent, name, mode, uid, gid, rdev)
        finally:
            self._dirs_changed(parent)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        return await self._make(stat.S_IFLNK, parent, name, 0o777, uid, gid, target=target)

    async def _make(self, kind: int, parent: int, name: bytes, mode: int, uid: int, gid: int,
                    **kw: Any) -> Attr:
        """``Meta.make``, remembering the directory's row when it was left unchanged."""
        try:
            made = await self._write(self.meta.make, kind, parent, name, mode, uid, gid, **kw)
        except BaseException:
            self._dirs_changed(parent)  # (a commit whose outcome is unknown may have changed it)
            raise
        self._left_unchanged(parent, made.parent)
        return made.attr

    async def readlink(self, ino: int) -> bytes:
        return await self._read(self.meta.readlink, ino)

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        try:
            return self._view(await self._write(self.meta.link, ino, new_parent, new_name))
        finally:
            self._dirs_changed(new_parent)

    async def unlink(self, parent: int, name: bytes, *, kernel_held: bool = False) -> int | None:
        """Remove a name. With ``kernel_held`` (the mount), a file losing its last name is
        kept, held by this client, until :meth:`forget` — the FUSE contract: the kernel
        resolved the name to the inode before the unlink and may still send FUSE_OPEN for
        it (another process's open racing the unlink), which must then open the unlinked
        file as a local filesystem would, not fail. Returns that inode's number, or None."""
        sid = self.sid if kernel_held else None
        try:
            async with self._holds.shared():
                row, held = await self._write(self.meta.unlink_holding, parent, name, sid)
        except BaseException:
            self._dirs_changed(parent)
            raise
        self._left_unchanged(parent, row)
        if held is not None:
            self._kernel_held.add(held)
        return held

    def forget(self, ino: int) -> None:
        """The kernel forgot ``ino``: drop the hold :meth:`unlink` or :meth:`rename` kept
        for it, if any (the inode goes if nothing else holds it)."""
        if ino in self._kernel_held:
            self._kernel_held.discard(ino)
            self._release_later(ino)

    async def rmdir(self, parent: int, name: bytes) -> None:
        try:
            await self._write(self.meta.rmdir, parent, name)
        finally:
            self._dir_after.clear()  # the parent, and the removed directory (unknown by number here)
        self._dir_cache.clear()

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0,
                     *, kernel_held: bool = False) -> Replaced:
        """Rename; a replaced file losing its last name is kept as :meth:`unlink` keeps it.
        Returns what the rename removed at its target."""
        sid = self.sid if kernel_held else None
        try:
            async with self._holds.shared():
                done: Replaced = await self._write(self.meta.rename, parent, name, new_parent, new_name, flags, sid)
        finally:
            self._dir_after.clear()  # both parents, and a moved directory's ctime and '..'
        if done.held is not None:
            self._kernel_held.add(done.held)
        return done

    async def readdir(self, ino: int, after: bytes | None, limit: int) -> list[DirEntry]:
        entries = await self._read(self.meta.readdir, ino, after, limit, plus=True)
        for i, e in enumerate(entries):
            if e.attr is not None and (e.ino in self._files or self._seen_gen.get(e.ino, -1) > e.attr.gen):
                try:
                    entries[i] = e._replace(attr=await self._current(e.attr))
                except FsError:  # removed meanwhile: the listing is a snapshot anyway
                    pass
        return entries

    # ---- xattrs and the redundancy policy -------------------------------------------

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        """The kernel asks for ``security.capability`` before every write (to drop file
        capabilities): its absence is cached per inode for the attribute TTL, so a stream
        of writes does not cost a database read each."""
        if name != _CAPS_XATTR:
            return await self._read(self.meta.getxattr, ino, name)
        now = trio.current_time()
        if self._no_caps.get(ino, 0.0) > now:
            raise FsError(errno.ENODATA, "no security.capability (cached)")
        try:
            return await self._read(self.meta.getxattr, ino, name)
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                self._note_no_caps(ino, now)
            raise

    def _note_no_caps(self, ino: int, now: float) -> None:
        if len(self._no_caps) > 100_000:
            self._no_caps.clear()
        self._no_caps[ino] = now + max(self.cfg.attr_timeout_s, 1.0)

    async def listxattr(self, ino: int) -> list[bytes]:
        return await self._read(self.meta.listxattr, ino)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._no_caps.pop(ino, None)
        if name == POLICY_XATTR:
            value = check_policy(value)
        await self._write(self.meta.setxattr, ino, name, value, flags)
        self._dirs_changed(ino)
        if name == POLICY_XATTR:
            self._dir_cache.pop(ino, None)
            of = self._files.get(ino)
            if of is not None:
                of.redundancy = value.decode()

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self._write(self.meta.removexattr, ino, name)
        self._dirs_changed(ino)
        if name == POLICY_XATTR:
            self._dir_cache.pop(ino, None)

    def _policy_sync(self, ino: int) -> str | None:
        """The inode's ``user.appendfs.redundancy``, or None (a sync namespace read)."""
        try:
            return self.meta.getxattr(ino, POLICY_XATTR).decode()
        except FsError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOENT):
                return None
            raise

    async def parent_info(self, ino: int) -> tuple[Attr, str | None]:
        """A directory's attributes and redundancy policy, for creating inside it (mode,
        setgid, inherited policy). Cached for the attribute TTL — the same staleness the
        kernel allows itself — and read in one namespace call when not."""
        now = trio.current_time()
        hit = self._dir_cache.get(ino)
        if hit is not None and hit[2] > now:
            return hit[0], hit[1]
        attr, policy = await self._read(lambda: (self.meta.getattr(ino), self._policy_sync(ino)))
        if len(self._dir_cache) > 10_000:
            self._dir_cache.clear()
        self._dir_cache[ino] = (attr, policy, now + max(self.cfg.attr_timeout_s, 0.1))
        return attr, policy

    # ---- open, create, release ------------------------------------------------------

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, flags: int) -> tuple[int, Attr]:
        _, policy = await self.parent_info(parent)
        # Created and held open in one transaction (one durable commit per new file).
        # The inherited policy is set in that transaction too.
        inherit = {POLICY_XATTR: policy.encode()} if policy is not None else None
        sid = self.sid
        try:
            attr = await self._make(stat.S_IFREG, parent, name, mode, uid, gid, open_sid=sid, xattrs=inherit)
        except SessionExpired:
            await self._renew_session(sid)
            attr = await self._make(stat.S_IFREG, parent, name, mode, uid, gid, open_sid=self.sid, xattrs=inherit)
        self._note_no_caps(attr.ino, trio.current_time())  # a new file has no capabilities
        fh, _ = await self._open(attr.ino, flags, policy or self.cfg.redundancy, held=attr)
        return fh, attr

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open ``ino``; returns (fh, keep_cache): keep_cache is False when another client
        changed the file since this one last saw it (close-to-open)."""
        return await self._open(ino, flags, None)

    async def _open(self, ino: int, flags: int, redundancy: str | None, held: Attr | None = None) -> tuple[int, bool]:
        attr = held
        if attr is None and ino in self._release_q:  # closed a moment ago: our hold was not dropped yet
            current = await self._read(self.meta.getattr, ino)
            if current.nlink == 0 and ino not in self._kernel_held:
                # An unlink of ours may have committed without having noted yet that it
                # keeps the inode for the kernel: wait for those in flight.
                await self._holds.settle()
            if ino in self._release_q:  # (still: the reads may have let the releaser run)
                if current.nlink == 0 and ino not in self._kernel_held:
                    # Only our lingering hold keeps it: another client removed or replaced
                    # the name (an S3 PUT). Opened by a name the kernel still caches, it must
                    # fail as if the hold were gone (the mount answers ESTALE and the kernel
                    # looks the name up again), or close-to-open would read the old file.
                    raise FsError(errno.ENOENT, f"inode {ino} was removed or replaced")
                self._release_q.remove(ino)
                attr = current
        if attr is None:
            while ino in self._releasing:
                await self._released.wait()
            sid = self.sid
            try:
                attr = await self._write(self.meta.open, sid, ino)
            except SessionExpired:
                await self._renew_session(sid)
                attr = await self._meta(self.meta.open, self.sid, ino)
        try:
            of = self._files.get(ino)
            if of is None:
                if redundancy is None:
                    redundancy = await self._read(self._policy_sync, ino) or self.cfg.redundancy
                of = self._files.get(ino)  # another open may have raced us through the await
                if of is None:
                    of = self._files[ino] = OpenFile(ino, attr, redundancy)
            keep = self._seen_gen.get(ino) == attr.gen
            # Never back to older attributes: a commit of ours may have landed since the open
            # read them (then a slice map loaded before that commit would pass for current).
            if not of.pending and attr.gen >= of.attr.gen:
                of.adopt(attr)
            if not keep:
                of.segmap = None
            if attr.gen >= self._seen_gen.get(ino, attr.gen):
                self._saw(attr)
        except BaseException:
            self._release_later(ino)
            raise
        of.handles += 1
        fh = next(self._fh)
        self._handles[fh] = Handle(fh, of, flags, error_seen=of.error_seq)  # earlier errors are not its own
        return fh, keep

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF, f"no open file handle {fh}") from None

    async def flush(self, fh: int) -> None:
        """close(2)/fsync(2): commit everything written so far; raise a deferred error
        this handle has not reported yet."""
        h = self.handle(fh)
        await self._flush_file(h.of)
        self._report(h)

    @staticmethod
    def _report(h: Handle) -> None:
        """Raise the file's deferred write error if this handle has not reported it: each
        handle open for writing when a write was lost reports it once (at its next write,
        fsync or close); a read-only handle's close reports nothing and takes nothing from
        the writers'."""
        of = h.of
        if h.error_seen < of.error_seq and of.error is not None:
            h.error_seen = of.error_seq
            if h.flags & os.O_ACCMODE != os.O_RDONLY:  # a reader's close reports no write error (as NFS)
                raise of.error

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        for extent_id, block in h.ahead:  # fetched for this reader, never read: not unread any more
            self.cache.done_with(extent_id, block)
        h.ahead.clear()
        of = h.of
        of.handles -= 1
        try:
            if of.handles == 0:
                await self._flush_file(of)
                try:
                    self._report(h)
                except Exception as exc:  # release has nobody to report to (DESIGN §4)
                    log.error("inode %d: write lost at release: %s", of.ino, exc)
                if of.handles == 0 and not of.pending:
                    self._files.pop(of.ino, None)
        finally:
            self._release_later(of.ino)

    def _release_later(self, ino: int) -> None:
        """Drop one namespace hold of ``ino``: queued, and released in batches by
        :meth:`_releaser` (a close costs no transaction of its own)."""
        self._release_q.append(ino)
        self._release_wake.set()

    async def _releaser(self) -> None:
        while True:
            await self._release_wake.wait()
            # Linger a moment so the closes of a burst share one transaction: released one
            # by one, every close's release competed with the next create for SQLite's
            # single writer (1.1 ms each, measured in small-file runs). A hold kept 50 ms
            # longer only delays the space reclaim of a file unlinked meanwhile.
            await trio.sleep(_RELEASE_LINGER_S)
            self._release_wake = trio.Event()
            await self._release_batch()

    async def _release_batch(self) -> None:
        batch, self._release_q = self._release_q, []
        if not batch:
            return
        sid = self.sid  # the session these holds are in, even if it is renewed meanwhile
        self._releasing = set(batch)
        try:
            # Alone (see _HoldGate): the counts change outside the transactions that write
            # the hold rows.
            async with self._holds.exclusive():
                await self._write(self.meta.release_many, sid, batch)
        except Exception as exc:  # the holds stay until the session ends; unlinked files wait for that
            log.warning("releasing %d closed files: %s", len(batch), exc)
        finally:
            self._releasing = set()
            self._released.set()
            self._released = trio.Event()

    # ---- writes ---------------------------------------------------------------------

    async def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handle(fh)
        self._report(h)  # an earlier write of the file was lost: say so now, once
        of = h.of
        n = len(data)
        if n == 0:
            return 0
        async with of.lock:
            d = of.dirty
            if (d is not None and d.file_off <= off <= d.end and off + n - d.file_off <= 2 * self.cfg.chunk_bytes
                    and self.budget.try_take(max(0, off + n - d.end))):
                d.write(off - d.file_off, data, self._part_bytes)
            else:
                # Out of budget (or not contiguous): send the dirty chunk before waiting.
                # A writer must never wait for budget while holding buffered bytes under its
                # lock: the relief skips locked files, so writers that all did would wait
                # for bytes only they could send (a deadlock of many concurrent writers).
                if d is not None:
                    await self._send(of)
                await self._take(n)
                of.dirty = Chunk.of(off, data, self._part_bytes)
                of.dirty_since = trio.current_time()
            of.note_write(off + n)
            if of.dirty is not None and of.dirty.length >= self.cfg.chunk_bytes:
                await self._send(of)
        return n

    async def _take(self, n: int) -> None:
        if n and self.budget.used + n > self.budget.total and not self._relieving:
            self._relieving = True
            self._nursery.start_soon(self._relieve)
        await self.budget.take(n)

    async def _relieve(self) -> None:
        """The write budget is exhausted: send every idle dirty buffer so commits free it."""
        try:
            for of in list(self._files.values()):
                if of.dirty is not None and not of.lock.locked():
                    async with of.lock:
                        await self._send(of)
        finally:
            self._relieving = False

    async def _send(self, of: OpenFile) -> None:
        """Hand the dirty chunk to the file's stream (call with ``of.lock`` held)."""
        d, of.dirty = of.dirty, None
        if d is None:
            return
        of.sending = d  # reads (and the size this client reports) must still see it meanwhile
        try:
            while True:
                stream = await self.streams.stream_for(of.redundancy, of.ino)
                try:
                    d.ticket = await stream.append(d.parts, frozen=True)  # a sent chunk never changes
                    break
                except StoreError as exc:
                    # The stream broke while this write waited for window space: like the
                    # chunks already sent (_resend), this one goes to a fresh stream.
                    if not self._may_resend(of, exc):
                        raise
                    of.resends += 1
                    log.warning("inode %d: stream failed (%s); sending %d bytes at %d on a new stream (try %d)",
                                of.ino, exc, d.length, d.file_off, of.resends)
        except Exception as exc:
            self.budget.give(d.length)
            log.error("inode %d: %d bytes at %d not stored: %s", of.ino, d.length, d.file_off, exc)
            of.note_error(exc)
            return
        except BaseException:
            # Cancelled (the mount is stopping): the bytes stay this file's dirty buffer, with
            # their budget, for the shutdown's flush to send; dropped here, written bytes would
            # be lost without an error anywhere. A copy: parts of the append may be queued in
            # the stream, which holds the chunk's buffers (frozen) until they are stored, and a
            # later write into the dirty buffer changes it in place. (of.dirty is still None:
            # we hold the lock.)
            of.dirty = Chunk.of(d.file_off, b"".join(d.parts), self._part_bytes)
            raise
        finally:
            of.sending = None
        of.sent.append(d)
        of.mark_busy()
        if not of.committing:
            of.committing = True
            self._nursery.start_soon(self._commit_loop, of)

    async def _commit_loop(self, of: OpenFile) -> None:
        """Commit acknowledged chunks of ``of`` in order, batching those already done."""
        try:
            while of.sent:
                first = of.sent[0]
                assert first.ticket is not None
                try:
                    await first.ticket.wait()
                except Exception as exc:
                    if await self._resend(of, exc):
                        continue
                    self._fail_pending(of, exc)
                    break
                batch = [first]
                for c in itertools.islice(of.sent, 1, None):
                    t = c.ticket
                    if t is None or not (t.done.is_set() and t.error is None):
                        break
                    batch.append(c)
                try:
                    # (inside: a ticket whose pieces did not cover its chunk — a bug — fails
                    # this file's writes; escaping, it would end the whole mount)
                    slices = [s for c in batch for s in place_pieces(c, _pieces(c))]
                    attr = await self._write(self.meta.commit_slices, of.ino, slices, mtime_ns=of.last_write_ns or None)
                except Exception as exc:
                    self._fail_pending(of, exc)
                    break
                for c in batch:
                    of.sent.popleft()
                    self.budget.give(c.length)
                of.resends = 0
                of.adopt(attr)
                self._saw(attr)
        finally:
            of.committing = False
            of.idle.set()
            if of.handles == 0 and not of.pending and self._files.get(of.ino) is of:
                self._files.pop(of.ino, None)

    async def _resend(self, of: OpenFile, exc: BaseException) -> bool:
        """The stream under some of ``of``'s chunks broke (a lease fenced after a database
        outage, no healthy DataNodes for too long): append those chunks again on a fresh
        stream — their bytes are still here — instead of failing the file. Bounded; never
        for a full cluster. False when the error stands."""
        if not self._may_resend(of, exc):
            return False
        of.resends += 1
        log.warning("inode %d: stream failed (%s); sending %d chunks again on a new stream (try %d)",
                    of.ino, exc, len(of.sent), of.resends)
        try:
            stream = await self.streams.stream_for(of.redundancy, of.ino)
            for c in list(of.sent):
                if c.ticket is None or c.ticket.error is not None:
                    c.ticket = await stream.append(c.parts, frozen=True)
        except Exception as again:
            log.error("inode %d: cannot send again: %s", of.ino, again)
            return False
        return True

    @staticmethod
    def _may_resend(of: OpenFile, exc: BaseException) -> bool:
        """Whether ``of``'s chunks go to a new stream after ``exc`` broke theirs: a store
        failure, not a full cluster, and not more than _MAX_RESENDS times in a row."""
        return isinstance(exc, StoreError) and not isinstance(exc, NoSpace) and of.resends < _MAX_RESENDS

    def _fail_pending(self, of: OpenFile, exc: BaseException) -> None:
        lost = sum(c.length for c in of.sent)
        log.error("inode %d: %d written bytes not committed: %s", of.ino, lost, exc)
        of.note_error(exc)
        for c in of.sent:
            self.budget.give(c.length)
        of.sent.clear()

    async def _flush_file(self, of: OpenFile, *, locked: bool = False) -> None:
        if locked:
            await self._send(of)
        else:
            async with of.lock:
                await self._send(of)
        while of.sent or of.committing:
            await of.idle.wait()

    async def _flusher(self) -> None:
        """Send write buffers nobody touched for ``flush_age_s`` (bounded staleness)."""
        period = min(1.0, self.cfg.flush_age_s / 2)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for of in list(self._files.values()):
                if of.dirty is not None and now - of.dirty_since >= self.cfg.flush_age_s and not of.lock.locked():
                    async with of.lock:
                        await self._send(of)

    # ---- reads ----------------------------------------------------------------------

    async def _segmap(self, of: OpenFile) -> SegmentMap:
        m = of.segmap
        if m is None:
            attr, items = await self._read(self.meta.slices, of.ino)
            m = SegmentMap.build(attr, resolve(items, 0, attr.size))
            # A commit (or truncation) of ours may have landed while the map loaded: then
            # the map predates of.attr and serves this read only, whose pending chunks were
            # taken before; cached, it would hide the committed chunk from later reads.
            if attr.gen >= of.attr.gen:
                if not of.pending:
                    of.adopt(attr)
                of.segmap = m
        return m

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        h = self.handle(fh)
        of = h.of
        chunks = of.pending_chunks()  # before the slice map: see the module docstring
        m = await self._segmap(of)
        end = min(off + size, max(m.size, of.local_size if chunks else 0))
        if end <= off:
            return b""
        # Sequential: at the start, where the last read ended, or — once a streak runs —
        # near there: the kernel's readahead has several requests of one window in flight
        # and our tasks may take them out of order. Counting those as random reads read
        # ~8% of a cold sequential read twice (uncached) and broke the readahead streak.
        # A random reader (no streak) must land exactly: near is not enough.
        near = h.streak > 0 and abs(off - h.next_off) <= max(2 * self.cache.block_bytes, h.window)
        h.streak = h.streak + 1 if (near or off == h.next_off or off == 0) else 0
        h.next_off = max(h.next_off, end) if near else end
        pieces = m.covering(off, end)
        if h.streak >= 2:
            self._readahead(h, m, end)
        if len(pieces) == 1 and pieces[0].extent_id is not None and pieces[0].file_off == off \
                and pieces[0].length == end - off and not any(c.file_off < end and c.end > off for c in chunks):
            return await self._read_segment(h, m, pieces[0], h.streak >= 1)
        buf = bytearray(end - off)
        for p in pieces:
            if p.extent_id is not None:
                data = await self._read_segment(h, m, p, h.streak >= 1)
                buf[p.file_off - off:p.end - off] = data
        overlay(buf, off, chunks)
        return bytes(buf)

    async def _read_segment(self, h: Handle, m: SegmentMap, p: Segment,
                            sequential: bool) -> bytes | bytearray | memoryview:
        assert p.extent_id is not None
        if not sequential:
            return await self._read_uncached(p.extent_id, p.ext_off, p.length)
        lo_ext, hi_ext = self._extent_span(m, p)
        parts: list[bytes | bytearray | memoryview] = []
        bb = self.cache.block_bytes
        pos, stop = p.ext_off, p.ext_off + p.length
        while pos < stop:
            block = pos // bb
            hi = min(stop, (block + 1) * bb)
            data = self.cache.get(p.extent_id, pos, hi)
            if data is None:
                data = await self._fetch_block(p.extent_id, block, pos, hi, lo_ext, hi_ext)
            if self.cache.taken(p.extent_id, block, hi - pos):  # all of it read: drop-behind
                h.ahead.discard((p.extent_id, block))  # (and no longer unread: BlockCache)
            else:  # (a reader that started in its middle never takes all: done at close)
                h.ahead.add((p.extent_id, block))
            parts.append(data)
            pos = hi
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_uncached(self, extent_id: int, lo: int, length: int) -> bytes | bytearray | memoryview:
        """A random read: from the block cache if a block there (or in flight) holds it all,
        else straight from the store without filling the cache."""
        hi = lo + length
        block = lo // self.cache.block_bytes
        if (hi - 1) // self.cache.block_bytes == block:
            hit = self.cache.get(extent_id, lo, hi)
            if hit is None:
                hit = await self._in_flight(extent_id, block, lo, hi)
            if hit is not None:
                return hit
        self.read_fetch_bytes += length
        return await self.client.read(extent_id, lo, length)

    @staticmethod
    def _extent_span(m: SegmentMap, p: Segment) -> tuple[int, int]:
        """The extent range of the whole committed segment holding ``p``: known to exist,
        so a block read may widen to it (never past it: beyond may be another writer's
        unacknowledged tail, or past the extent's end)."""
        whole = m.segments[bisect.bisect_right(m.starts, p.file_off) - 1]
        return whole.ext_off, whole.ext_off + whole.length

    async def _fetch_block(self, extent_id: int, block: int, need_lo: int, need_hi: int,
                           span_lo: int, span_hi: int) -> memoryview:
        key = (extent_id, block)
        bb = self.cache.block_bytes
        hit = await self._in_flight(extent_id, block, need_lo, need_hi)
        if hit is not None:
            return hit
        lo, hi = max(block * bb, span_lo, 0), min((block + 1) * bb, span_hi)
        lo, hi = min(lo, need_lo), max(hi, need_hi)
        f = _Fetch(lo=lo)
        self.cache.inflight[key] = f
        try:
            self.read_fetch_bytes += hi - lo
            f.data = await self.client.read(extent_id, lo, hi - lo)
            self.cache.put(extent_id, lo, f.data)
        except BaseException as exc:
            f.error = exc
            raise
        finally:
            f.done.set()
            if self.cache.inflight.get(key) is f:
                del self.cache.inflight[key]
        return memoryview(f.data)[need_lo - lo:need_hi - lo]

    async def _in_flight(self, extent_id: int, block: int, lo: int, hi: int) -> memoryview | None:
        """Bytes ``[lo, hi)`` from a fetch of this block already under way, once it is done;
        None when there is none, or it failed or does not cover them."""
        f = self.cache.inflight.get((extent_id, block))
        if f is None:
            return None
        await f.done.wait()
        if f.error is None and f.lo <= lo and f.lo + len(f.data) >= hi:
            return memoryview(f.data)[lo - f.lo:hi - f.lo]
        return None

    def _readahead(self, h: Handle, m: SegmentMap, end: int) -> None:
        """Start block reads for the next window of a sequential reader (in the background)."""
        if self.cache.capacity_bytes < 2 * self.cache.block_bytes:
            return
        h.window = min(self.cfg.readahead_bytes, max(2 * self.cache.block_bytes, h.window * 2))
        start = max(h.ra_next, end)
        target = min(m.size, end + h.window, start + self.cache.readahead_room())
        if start >= target:
            return  # (not ra_next: a later read issues the rest once there is room)
        h.ra_next = target
        bb = self.cache.block_bytes
        for p in m.covering(start, target):
            if p.extent_id is None:
                continue
            lo_ext, hi_ext = self._extent_span(m, p)
            pos = p.ext_off
            while pos < p.ext_off + p.length:
                block = pos // bb
                hi = min(p.ext_off + p.length, (block + 1) * bb)
                if not self.cache.present(p.extent_id, pos, hi):
                    h.ahead.add((p.extent_id, block))
                    self._nursery.start_soon(self._prefetch, h, p.extent_id, block, pos, hi, lo_ext, hi_ext)
                pos = hi

    async def _prefetch(self, h: Handle, extent_id: int, block: int, lo: int, hi: int, span_lo: int,
                        span_hi: int) -> None:
        async with self._ra_lane:
            if self.cache.present(extent_id, lo, hi):
                return
            try:
                await self._fetch_block(extent_id, block, lo, hi, span_lo, span_hi)
            except Exception as exc:  # the reader will fetch (and report) it itself
                log.debug("readahead of extent %d block %d failed: %s", extent_id, block, exc)
            if h.fh not in self._handles:  # closed meanwhile: nobody will read it
                self.cache.done_with(extent_id, block)

    # ---- whole objects (the S3 gateway, DESIGN §5) ----------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a :class:`~appendfs.meta.Meta` call in a thread of this client's database lane."""
        return await self._meta(fn, *args, **kw)

    async def read_call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A short namespace *read*: inline on SQLite, in a thread otherwise (see ``_read``)."""
        return await self._read(fn, *args, **kw)

    async def policy_of(self, dir_ino: int) -> str:
        """The redundancy new files in directory ``dir_ino`` get (its xattr or the default)."""
        _, policy = await self.parent_info(dir_ino)
        return policy or self.cfg.redundancy

    @asynccontextmanager
    async def object_writer(self, redundancy: str, *, part: bool = False) -> AsyncIterator[ObjectWriter]:
        """An :class:`~appendfs.fs.objects.ObjectWriter` for one object (or multipart part):
        its bytes go to the store before any namespace change; unfinished, they are abandoned."""
        if part and self._part_streams is None:
            self._part_streams = StreamPool(self.client, self.cfg.streams_per_policy, PART_OWNER)
        pool = self._part_streams if part and self._part_streams is not None else self.streams
        w = ObjectWriter(pool, self.budget, redundancy, self.cfg.chunk_bytes, next(self._object_seq), self._nursery)
        try:
            yield w
        finally:
            w.abandon()

    def read_range(self, segments: list[Segment], start: int, end: int) -> AbstractAsyncContextManager[RangeReader]:
        """Stream ``[start, end)`` of resolved ``segments`` in block-sized pieces, at most
        ``readahead_parallel`` in flight and ``readahead_bytes`` held (the reader keeps twice
        its window of pieces), so each concurrent S3 GET holds a bounded buffer."""
        cfg = self.cfg
        window = max(1, min(cfg.readahead_parallel, cfg.readahead_bytes // (2 * cfg.block_bytes)))
        return read_range(self.client, segments, start, end, piece_bytes=cfg.block_bytes, window=window)

    # ---- statfs ---------------------------------------------------------------------

    async def statfs(self) -> dict[str, int]:
        """Sizes for statvfs: usable bytes (raw ÷ default copies), inodes."""
        now = trio.current_time()
        if self._statfs is not None and now - self._statfs[0] < self.cfg.statfs_cache_s:
            return self._statfs[1]
        ns = await self._meta(self.meta.statfs)
        try:
            cap = await self.client.capacity()
        except Exception as exc:
            log.warning("statfs: capacity unknown (%s)", exc)
            cap = {"capacity_bytes": ns.used_bytes, "used_bytes": ns.used_bytes, "free_bytes": 0}
        policy = parse_policy(self.cfg.redundancy).final  # what the bytes end as
        raw, usable = (policy.width, policy.data) if policy.kind == "ec" else (max(1, policy.width), 1)
        out = {"total_bytes": cap["capacity_bytes"] * usable // raw, "free_bytes": cap["free_bytes"] * usable // raw,
               "used_inodes": ns.used_inodes, "free_inodes": 1 << 40}
        self._statfs = (now, out)
        return out

    # ---- background -----------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.cfg.session_ttl_s / 4)
            try:
                await self._meta(self.meta.heartbeat, self.sid)
            except SessionExpired:
                try:
                    await self._renew_session(self.sid)
                except Exception as exc:  # escaping, it would end the mount: the next beat retries
                    log.warning("session renewal failed (tried again at the next heartbeat): %s", exc)
            except Exception as exc:
                log.warning("session heartbeat failed: %s", exc)

    async def _renew_session(self, dead_sid: int) -> None:
        """Our session was declared dead (missed heartbeats, e.g. a long outage): open a
        new one and hold our open files in it again. Unlinked files that lost their hold
        meanwhile may be gone; their handles then fail with ENOENT/EIO."""
        async with self._session_lock:
            if self.sid != dead_sid:
                return  # another task renewed it already
            log.error("session %d was declared dead (missed heartbeats); opening a new one", dead_sid)
            self.sid = await self._meta(self.meta.open_session, None)
            self._release_q.clear()  # those holds died with the old session
            # One hold per open handle (each close drops one), and one per inode kept for
            # the kernel: held fewer times, the first close would drop the hold under the
            # other handles.
            holds = {ino: of.handles for ino, of in self._files.items() if of.handles}
            kernel, self._kernel_held = self._kernel_held, set()
            for ino in kernel:
                holds[ino] = holds.get(ino, 0) + 1
            for ino, n in holds.items():
                try:
                    for _ in range(n):
                        await self._meta(self.meta.open, self.sid, ino)
                except Exception as exc:
                    log.error("inode %d: cannot hold it open again: %s", ino, exc)
                    continue
                if ino in kernel:
                    self._kernel_held.add(ino)

    async def _maintenance(self) -> None:
        """Work any client may do: end dead sessions, purge slices of deleted files."""
        while True:
            await trio.sleep(self.cfg.maintenance_interval_s)
            try:
                await self._meta(self.meta.clean_dead_sessions)
                for ino, _, _ in await self._meta(self.meta.delete_queue, 20):
                    await self._meta(self.meta.purge_deleted, ino)
            except Exception as exc:
                log.warning("maintenance: %s", exc)

    def stats(self) -> dict[str, int]:
        wal = self.meta.wal
        return {"open_files": len(self._files), "handles": len(self._handles), "buffered_bytes": self.budget.used,
                "cache_bytes": self.cache.used_bytes, "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                "cache_unread_bytes": self.cache.unread_bytes, "read_fetch_bytes": self.read_fetch_bytes,
                "dir_attrs_reused": self.dir_attrs_reused,
                **self.meta.inline_stats, "wal_syncs": wal.syncs if wal is not None else 0}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _pieces(c: Chunk) -> list[tuple[int, int, int]]:
    assert c.ticket is not None
    return [(p.extent_id, p.ext_off, p.length) for p in c.ticket.pieces]


def check_policy(value: bytes) -> bytes:
    """Validate a ``user.appendfs.redundancy`` value (EINVAL with the reason if bad)."""
    try:
        text = value.decode().strip()
        p = parse_policy(text)
        if p.final.kind == "ec":
            Layout(p.final.data, p.final.parity)  # K+M within what the erasure code supports
    except (UnicodeDecodeError, PolicyError, LayoutError) as exc:
        raise FsError(errno.EINVAL, f"bad redundancy policy {value[:40]!r}: {exc}") from None
    return str(p).encode()

