"""The namespace API: :class:`Meta`, one object per client process (mount, S3 gateway, fsck).

Callers pass inode numbers and raw-byte names; every method is one transaction
(:mod:`appendfs.meta.ops`, :mod:`appendfs.meta.data`) run with bounded retries by
:class:`appendfs.meta.txn.Runner`. Errors: :class:`~appendfs.meta.errors.FsError` (errno),
:class:`~appendfs.meta.errors.MetaUnavailable` (temporary), nothing from SQLAlchemy.

Thread safety: every method may be called from any thread concurrently (the trio side
uses ``trio.to_thread.run_sync`` with a CapacityLimiter sized to the engine's pool). The
only shared mutable state — the id batches and the per-session open counts — is guarded
by locks.

Reads (getattr, lookup, readdir …) run in autocommit mode on PostgreSQL (under READ
COMMITTED a transaction would add round trips and no consistency) and in a deferred
snapshot on SQLite (no write lock, so readers never wait for writers). Writes run in explicit transactions (BEGIN IMMEDIATE on SQLite).

Inline writes (SQLite): :meth:`Meta.run_inline` runs a call on the caller's thread — an
event loop — with writes that never wait (:meth:`~appendfs.meta.txn.Runner.run_once`)
and commit without an fsync; it returns the WAL position the caller must make durable
with :meth:`Meta.sync_wal` (in a thread, shared between callers) before answering. A
thread hop per write cost more CPU than the write itself and, under load, kept the
writer lock held while the worker waited for the GIL (docs/namespace.md). Only calls
that are safe to run twice may go inline: on :class:`~appendfs.meta.txn.WouldBlock` the
caller runs the whole call again in a thread.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from appendfs.db import is_sqlite, make_engine
from appendfs.meta import check, data, listing, ops, s3, schema
from appendfs.meta import slices as sl
from appendfs.meta.errors import CommitOutcomeUnknown, FsError, MetaError, S3Error
from appendfs.meta.txn import IdAllocator, MetaConfig, Runner, WalSync, WouldBlock
from appendfs.meta.types import (
    Attr,
    DirEntry,
    ListResult,
    Made,
    PutConditions,
    Replaced,
    S3Bucket,
    S3Key,
    S3Object,
    S3Part,
    S3Tenant,
    S3Upload,
    StatFs,
)

T = TypeVar("T")
I, D = schema.inode, schema.dentry  # noqa: E741


class Meta:
    """A namespace client over one database (see the module docstring)."""

    def __init__(
        self, engine: Engine, config: MetaConfig | None = None, *, check_version: bool = True
    ) -> None:
        self.engine = engine
        self.config = config or MetaConfig()
        if check_version:
            schema.check_schema(engine)
        #: True on SQLite: reads are local snapshot reads that never wait for writers.
        self.is_sqlite = is_sqlite(engine)
        self._runner = Runner(engine, self.config)
        # PostgreSQL: autocommit (no BEGIN/COMMIT round trips; READ COMMITTED gives no more).
        # SQLite: a deferred snapshot (BEGIN, not BEGIN IMMEDIATE) that never takes the lock.
        read_opts = (
            {"appendfs_read_only": True} if is_sqlite(engine) else {"isolation_level": "AUTOCOMMIT"}
        )
        self._reader = Runner(engine.execution_options(**read_opts), self.config, writer=False)
        self._inos = IdAllocator(self._runner, schema.NEXT_INO, self.config.ino_batch)
        self._sids = IdAllocator(self._runner, schema.NEXT_SID, 1)
        self._open_lock = threading.Lock()
        self._open_counts: dict[tuple[int, int], int] = {}
        self._tls = threading.local()
        self._inline: Runner | None = None
        self.wal: WalSync | None = None
        #: inline calls run, and those that would have waited (run again in a thread)
        self.inline_stats = {"inline_writes": 0, "inline_would_block": 0}

    @classmethod
    def from_url(cls, url: str, config: MetaConfig | None = None, *, pool_size: int = 8) -> Meta:
        """Open META_URL; no pre-ping (the runner retries on unreachable errors itself).

        SQLite's busy timeout is the unreachable budget (at most 30 s): a write waiting
        for another process's lock fails within the budget instead of hanging."""
        budget_s = (config or MetaConfig()).unreachable_timeout_s
        return cls(make_engine(url, pool_size=pool_size, pre_ping=False, busy_timeout_s=min(30.0, budget_s)),
                   config)

    def close(self) -> None:
        self._runner.close()
        self._reader.close()
        if self._inline is not None:
            self._inline.close()
            self._inline.engine.dispose()
        self.engine.dispose()

    # --- inline writes (SQLite) ----------------------------------------------------------

    def run_inline(self, fn: Callable[..., T], *args: Any, **kw: Any) -> tuple[T, int]:
        """Run the Meta call ``fn(*args, **kw)`` on this thread with writes that never wait.

        Returns its result and the WAL position to pass to :meth:`sync_wal` (0: nothing to
        sync) before the result is acted on. Raises
        :class:`~appendfs.meta.txn.WouldBlock` when a write would wait (the call changed
        nothing: run it again in a thread) and whatever ``fn`` raises. SQLite only.
        """
        if self._inline is None:
            if not self.is_sqlite or not self.engine.url.database:
                raise WouldBlock("inline writes need SQLite")
            # No busy timeout (never wait for another process), NORMAL (the fsync is
            # sync_wal's), no checkpoint at commit (checkpoint() runs them in a thread).
            engine = make_engine(self.engine.url.render_as_string(hide_password=False), pool_size=2,
                                 pre_ping=False, busy_timeout_s=0, relaxed_durability=True,
                                 sqlite_autocheckpoint=False)
            raw = engine.raw_connection()  # the file as SQLite names it (its WAL is NAME-wal)
            try:
                rows = raw.cursor().execute("PRAGMA database_list").fetchall()
                path = next(str(r[2]) for r in rows if r[1] == "main")
            finally:
                raw.close()
            self._inline = Runner(engine, self.config)
            self.wal = WalSync(path)
        self._tls.inline = True
        self._tls.seq = 0
        try:
            result = fn(*args, **kw)
        except WouldBlock:
            self.inline_stats["inline_would_block"] += 1
            raise
        finally:
            self._tls.inline = False
        self.inline_stats["inline_writes"] += 1
        return result, self._tls.seq

    def _inline_now(self) -> bool:
        return getattr(self._tls, "inline", False)

    def sync_wal(self, seq: int) -> None:
        """Make inline commits up to ``seq`` durable (blocking: call it in a thread)."""
        if self.wal is not None and self.wal.synced < seq:
            self.wal.sync()

    def checkpoint(self) -> tuple[int, int, int]:
        """A PASSIVE WAL checkpoint (inline connections never checkpoint at commit):
        (busy, frames in the WAL, frames checkpointed)."""
        raw = self.engine.raw_connection()  # outside any transaction: a checkpoint cannot run in one
        try:
            row = raw.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            raw.close()
        return int(row[0]), int(row[1]), int(row[2])

    # --- plumbing ------------------------------------------------------------------------

    def _write(self, what: str, fn: Callable[[sa.Connection], T]) -> T:
        if self._inline is not None and self._inline_now():
            assert self.wal is not None
            result = self._inline.run_once(fn, what)
            self._tls.seq = self.wal.note_commit()
            return result
        return self._runner.run(fn, what)

    def _read(self, what: str, fn: Callable[[sa.Connection], T]) -> T:
        return self._reader.run(fn, what)

    @property
    def _gran(self) -> int:
        return self.config.dir_mtime_granularity_ns

    # --- lookups -------------------------------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        return self._read("getattr", lambda c: ops.getattr_(c, ino))

    def lookup(self, parent: int, name: bytes | str) -> Attr:
        n = ops.check_name(name)
        return self._read("lookup", lambda c: ops.lookup(c, parent, n))

    def resolve_path(
        self, path: bytes | str, *, root: int = schema.ROOT_INO, follow_last: bool = True
    ) -> Attr:
        p = ops.to_bytes(path)
        if len(p) >= ops.PATH_MAX:
            raise FsError(ops.errno.ENAMETOOLONG, f"path of {len(p)} bytes")
        return self._read("resolve_path", lambda c: ops.resolve_path(c, p, root, follow_last))

    def readlink(self, ino: int) -> bytes:
        return self._read("readlink", lambda c: ops.readlink(c, ino))

    def readdir(
        self, ino: int, after: bytes | None = None, limit: int = 1000, *, plus: bool = False
    ) -> list[DirEntry]:
        """Entries of directory ``ino`` with name > ``after`` in bytewise name order.

        Pass the last name returned as ``after`` to continue: an entry that exists during
        the whole listing is returned exactly once, whatever is created or deleted meanwhile.
        """
        return self._read("readdir", lambda c: ops.readdir(c, ino, after, limit, plus))

    def statfs(self) -> StatFs:
        return self._read("statfs", ops.statfs)

    # --- creation ------------------------------------------------------------------------

    def make(
        self,
        kind: int,
        parent: int,
        name: bytes | str,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes | str | None = None,
        open_sid: int | None = None,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> Made:
        """Create an inode of ``kind`` named ``name`` in directory ``parent``: what
        :meth:`create`, :meth:`mknod`, :meth:`mkdir` and :meth:`symlink` (``target``) do,
        answering also how the directory was left (:class:`~appendfs.meta.types.Made`)."""
        if kind == stat.S_IFDIR:
            return self._make("mkdir", parent, name, kind, mode, uid, gid, xattrs=xattrs)
        if kind == stat.S_IFLNK:
            t = ops.to_bytes(target if target is not None else b"")
            if not t or b"\0" in t:
                raise FsError(ops.errno.ENOENT if not t else ops.errno.EINVAL, "bad symlink target")
            if len(t) >= ops.PATH_MAX:
                raise FsError(ops.errno.ENAMETOOLONG, f"symlink target of {len(t)} bytes")
            return self._make("symlink", parent, name, kind, 0o777, uid, gid, target=t)
        if kind == stat.S_IFREG and not rdev:
            return self._make("create", parent, name, kind, mode, uid, gid, open_sid=open_sid, xattrs=xattrs)
        if kind not in schema.KINDS:
            raise FsError(ops.errno.EINVAL, f"mknod of kind {kind:o}")
        return self._make("mknod", parent, name, kind, mode, uid, gid, rdev)

    def _make(
        self,
        what: str,
        parent: int,
        name: bytes | str,
        kind: int,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
        open_sid: int | None = None,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> Made:
        n = ops.check_name(name)
        attrs = {ops.check_xattr_name(k): bytes(v) for k, v in (xattrs or {}).items()}
        new = ops.NewInode(self._inos.next(wait=not self._inline_now()), kind, mode, uid, gid, rdev, target)
        if open_sid is None and not attrs:
            return self._write(what, lambda c: ops.make(c, parent, n, new, time.time_ns(), self._gran))

        def make_open(c: sa.Connection) -> Made:
            made = ops.make(c, parent, n, new, time.time_ns(), self._gran)
            if attrs:
                ops.insert_xattrs(c, made.attr.ino, attrs)
            if open_sid is not None:
                data.hold_new(c, open_sid, made.attr.ino)
            return made

        made = self._write(what, make_open)
        if open_sid is not None:
            with self._open_lock:
                self._open_counts[(open_sid, made.attr.ino)] = 1
        return made

    def mknod(
        self, parent: int, name: bytes | str, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Attr:
        """Create a non-directory named by ``mode``'s S_IFMT (0 means a regular file)."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind in (stat.S_IFDIR, stat.S_IFLNK):
            raise FsError(ops.errno.EINVAL, f"mknod of kind {kind:o}")
        return self.make(kind, parent, name, mode, uid, gid, rdev=rdev).attr

    def create(
        self, parent: int, name: bytes | str, mode: int, uid: int, gid: int, *,
        open_sid: int | None = None, xattrs: dict[bytes, bytes] | None = None,
    ) -> Attr:
        """Create a regular file; with ``open_sid`` it is also opened (as by :meth:`open`) in
        the same transaction, and ``xattrs`` are set in it too (inherited policies) — one
        commit for create-and-open instead of several."""
        return self.make(stat.S_IFREG, parent, name, mode, uid, gid, open_sid=open_sid, xattrs=xattrs).attr

    def mkdir(
        self, parent: int, name: bytes | str, mode: int, uid: int, gid: int, *,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> Attr:
        return self.make(stat.S_IFDIR, parent, name, mode, uid, gid, xattrs=xattrs).attr

    def symlink(
        self, parent: int, name: bytes | str, target: bytes | str, uid: int, gid: int
    ) -> Attr:
        return self.make(stat.S_IFLNK, parent, name, 0o777, uid, gid, target=target).attr

    def link(self, ino: int, new_parent: int, new_name: bytes | str) -> Attr:
        n = ops.check_name(new_name)
        return self._write("link", lambda c: ops.link(c, ino, new_parent, n, time.time_ns()))

    # --- removal and rename --------------------------------------------------------------

    def unlink(self, parent: int, name: bytes | str) -> Attr | None:
        """Remove a non-directory's entry (the inode goes with its last link and open).
        Returns the directory's attributes when the unlink left them unchanged (its mtime is
        rewritten only past ``dir_mtime_granularity_ns``), else None: see :class:`Made`."""
        return self.unlink_holding(parent, name, None)[0]

    def unlink_holding(
        self, parent: int, name: bytes | str, hold_sid: int | None
    ) -> tuple[Attr | None, int | None]:
        """:meth:`unlink`; with ``hold_sid``, an inode losing its last name is not destroyed
        but held by that session as if open one more time (its number is returned second):
        a mount keeps the inodes the kernel still knows until it forgets them. The caller
        drops that hold with :meth:`release` or :meth:`release_many`, like an open's."""
        n = ops.check_name(name)
        row, held = self._write(
            "unlink", lambda c: ops.unlink(c, parent, n, time.time_ns(), self._gran, hold_sid)
        )
        if held is not None and hold_sid is not None:
            self._count_hold(hold_sid, held)
        return row, held

    def _count_hold(self, sid: int, ino: int) -> int:
        """One more hold of ``ino`` by ``sid`` (an open, or a kept unlinked inode); returns
        how many there were before (0: the namespace has no hold row for it yet)."""
        with self._open_lock:
            n = self._open_counts.get((sid, ino), 0)
            self._open_counts[(sid, ino)] = n + 1
            return n

    def rmdir(self, parent: int, name: bytes | str) -> None:
        n = ops.check_name(name)
        self._write("rmdir", lambda c: ops.rmdir(c, parent, n, time.time_ns()))

    def rename(
        self, parent: int, name: bytes | str, new_parent: int, new_name: bytes | str, flags: int = 0,
        hold_sid: int | None = None,
    ) -> Replaced:
        """rename/renameat2: flags 0, RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2). Returns
        what was removed at the target. With ``hold_sid``, a replaced file losing its last
        name is held, not destroyed: see :meth:`unlink_holding`."""
        a, b = ops.check_name(name), ops.check_name(new_name)
        done: Replaced = self._write(
            "rename",
            lambda c: ops.rename(c, parent, a, new_parent, b, flags, time.time_ns(), hold_sid),
        )
        if done.held is not None and hold_sid is not None:
            self._count_hold(hold_sid, done.held)
        return done

    # --- attributes and xattrs -----------------------------------------------------------

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attr:
        ch = ops.SetAttr(mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns)
        return self._write("setattr", lambda c: ops.setattr_(c, ino, ch, time.time_ns()))

    def getxattr(self, ino: int, name: bytes | str) -> bytes:
        n = ops.check_xattr_name(name)
        return self._read("getxattr", lambda c: ops.getxattr(c, ino, n))

    def listxattr(self, ino: int) -> list[bytes]:
        return self._read("listxattr", lambda c: ops.listxattr(c, ino))

    def setxattr(self, ino: int, name: bytes | str, value: bytes, flags: int = 0) -> None:
        n = ops.check_xattr_name(name)
        v = bytes(value)
        self._write("setxattr", lambda c: ops.setxattr(c, ino, n, v, flags, time.time_ns()))

    def removexattr(self, ino: int, name: bytes | str) -> None:
        n = ops.check_xattr_name(name)
        self._write("removexattr", lambda c: ops.removexattr(c, ino, n, time.time_ns()))

    # --- file data -----------------------------------------------------------------------

    def commit_slices(
        self, ino: int, new: Sequence[sl.NewSlice], *, mtime_ns: int | None = None
    ) -> Attr:
        """Add slices (already durable in the store) and grow size/mtime, atomically.

        Later slices in ``new`` win over earlier ones and over everything committed before.
        """
        items = list(new)

        def fn(c: sa.Connection) -> Attr:
            now = time.time_ns()
            return data.commit_slices(c, ino, items, now if mtime_ns is None else mtime_ns, now)

        return self._write("commit_slices", fn)

    def slices(self, ino: int) -> tuple[Attr, list[sl.Slice]]:
        """The inode and its slice list (in seq order) for reads and the GC."""
        return self._read("slices", lambda c: data.load_slices(c, ino))

    def read_map(self, ino: int, offset: int, length: int) -> list[sl.Segment]:
        """Segments to read for ``[offset, offset+length)``, clipped at EOF, holes included."""
        a, items = self.slices(ino)
        end = min(a.size, offset + length)
        return sl.resolve(items, offset, max(0, end - offset))

    def compact(self, ino: int) -> tuple[int, int]:
        """Drop shadowed slice pieces; returns (slices before, slices after)."""
        return self._write("compact", lambda c: data.compact(c, ino, time.time_ns()))

    def replace_slices(self, ino: int, expect_slice_seq: int, new: Sequence[sl.NewSlice]) -> bool:
        items = list(new)
        return self._write(
            "replace_slices", lambda c: data.replace_slices(c, ino, expect_slice_seq, items)
        )

    def repoint_slice(self, ino: int, old: sl.Slice, new_extent_id: int, new_ext_off: int) -> bool:
        return self._write(
            "repoint_slice", lambda c: data.repoint_slice(c, old, ino, new_extent_id, new_ext_off)
        )

    def slices_in_extent(self, extent_id: int) -> list[tuple[int, sl.Slice]]:
        return self._read("slices_in_extent", lambda c: data.slices_in_extent(c, extent_id))

    def referenced_bytes(self, extent_ids: Sequence[int]) -> dict[int, int]:
        ids = list(extent_ids)
        return self._read("referenced_bytes", lambda c: data.referenced_bytes(c, ids))

    def live_bytes(self, extent_ids: Sequence[int]) -> dict[int, int]:
        ids = list(extent_ids)
        return self._read("live_bytes", lambda c: data.live_bytes(c, ids))

    def delete_queue(self, limit: int = 100) -> list[tuple[int, int, int]]:
        """(ino, size, queued_ns) of deleted files whose slices still wait to be purged."""
        return self._read("delete_queue", lambda c: data.delete_queue(c, limit))

    def purge_deleted(self, ino: int, batch: int = 10_000) -> bool:
        return self._write("purge_deleted", lambda c: data.purge_deleted(c, ino, batch))

    # --- sessions ------------------------------------------------------------------------

    def _ttl_ns(self) -> int:
        return int(self.config.session_ttl_s * 1e9)

    def open_session(self, owner: str | None = None) -> int:
        sid = self._sids.next()
        who = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._write(
            "open_session", lambda c: data.open_session(c, sid, who, time.time_ns(), self._ttl_ns())
        )
        return sid

    def heartbeat(self, sid: int) -> None:
        self._write("heartbeat", lambda c: data.heartbeat(c, sid, time.time_ns(), self._ttl_ns()))

    def open(self, sid: int, ino: int) -> Attr:
        """Count one more open handle of ``ino`` in session ``sid`` (keeps it alive unlinked)."""
        key = (sid, ino)
        n = self._count_hold(sid, ino)
        try:
            return (
                self._write("open", lambda c: data.open_file(c, sid, ino))
                if n == 0
                else self.getattr(ino)
            )
        except BaseException:
            self._forget(key)
            raise

    def _forget(self, key: tuple[int, int]) -> int:
        with self._open_lock:
            n = self._open_counts.get(key, 0) - 1
            if n <= 0:
                self._open_counts.pop(key, None)
            else:
                self._open_counts[key] = n
            return n

    def release(self, sid: int, ino: int) -> None:
        """Drop one open handle; the last one lets an unlinked inode go to the delete queue."""
        if self._forget((sid, ino)) <= 0:
            self._write("release", lambda c: data.release_file(c, sid, ino, time.time_ns()))

    def release_many(self, sid: int, inos: Sequence[int]) -> None:
        """:meth:`release` of several inodes in one transaction (batched closes). Safe to
        run again after :class:`~appendfs.meta.txn.WouldBlock` (the counts are restored)."""
        counted = []  # handles this call dropped from the counts (undone if it would block)
        with self._open_lock:
            for ino in inos:
                key = (sid, ino)
                n = self._open_counts.get(key, 0)
                if n > 0:
                    counted.append(key)
                if n <= 1:
                    self._open_counts.pop(key, None)
                else:
                    self._open_counts[key] = n - 1
            last = sorted({ino for ino in inos if (sid, ino) not in self._open_counts})
        if not last:
            return
        now = time.time_ns()

        def fn(c: sa.Connection) -> None:
            for ino in last:  # ascending: the lock order of every transaction
                data.release_file(c, sid, ino, now)

        try:
            self._write("release_many", fn)
        except WouldBlock:
            with self._open_lock:
                for key in counted:
                    self._open_counts[key] = self._open_counts.get(key, 0) + 1
            raise

    def close_session(self, sid: int) -> None:
        with self._open_lock:
            for key in [k for k in self._open_counts if k[0] == sid]:
                del self._open_counts[key]
        self._write(
            "close_session",
            lambda c: data.end_session(c, sid, time.time_ns(), only_if_expired=False),
        )

    def clean_dead_sessions(self, now_ns: int | None = None, limit: int = 100) -> int:
        """End sessions whose heartbeat deadline passed; returns how many this call ended."""
        now = time.time_ns() if now_ns is None else now_ns
        done = 0
        for sid in self._read("expired_sessions", lambda c: data.expired_sessions(c, now, limit)):
            done += int(
                self._write("clean_session", functools.partial(_end_expired, sid=sid, now=now))
            )
        return done

    # --- S3 listing ----------------------------------------------------------------------

    def list_subtree(
        self,
        dir_ino: int,
        *,
        prefix: bytes = b"",
        delimiter: bytes | None = None,
        start_after: bytes | None = None,
        max_keys: int = 1000,
    ) -> ListResult:
        """List regular files under ``dir_ino`` as keys in byte order (S3 ListObjectsV2)."""
        return self._read(
            "list_subtree",
            lambda c: listing.list_page(
                _SqlSource(c), dir_ino, prefix, delimiter, start_after, max_keys
            ),
        )

    # --- S3: tenants and access keys (bodies in appendfs.meta.s3) ------------------------

    def s3_tenant_set(
        self, name: str, uid: int, gid: int, file_mode: int = 0o644, dir_mode: int = 0o755
    ) -> S3Tenant:
        """Create or update a tenant: the POSIX identity its S3 requests create things as."""
        t = S3Tenant(name, uid, gid, file_mode, dir_mode)
        s3.check_tenant(t)
        return self._write("s3_tenant_set", lambda c: s3.tenant_set(c, t, time.time_ns()))

    def s3_tenant(self, name: str) -> S3Tenant | None:
        return self._read("s3_tenant", lambda c: s3.tenant_get(c, name))

    def s3_tenants(self) -> list[S3Tenant]:
        return self._read("s3_tenants", s3.tenants)

    def s3_key_create(
        self, tenant: str, access_key: str | None = None, secret_key: str | None = None
    ) -> S3Key:
        """Add an access key of ``tenant`` (generated unless given); InvalidArgument if the
        tenant does not exist or the access key is taken."""
        access = access_key if access_key is not None else s3.new_access_key(secrets)
        secret = secret_key if secret_key is not None else s3.new_secret_key(secrets)
        s3.check_credentials(access, secret)
        return self._write(
            "s3_key_create", lambda c: s3.key_create(c, tenant, access, secret, time.time_ns())
        )

    def s3_key(self, access_key: str) -> S3Key | None:
        return self._read("s3_key", lambda c: s3.key_get(c, access_key))

    def s3_keys(self, tenant: str | None = None) -> list[S3Key]:
        """Access keys in access-key order (of one tenant, or all)."""
        return self._read("s3_keys", lambda c: s3.keys(c, tenant))

    def s3_key_delete(self, access_key: str) -> bool:
        return self._write("s3_key_delete", lambda c: s3.key_delete(c, access_key))

    # --- S3: buckets ---------------------------------------------------------------------

    def s3_bucket_create(
        self, name: str, tenant: str, *, inherit_xattrs: Sequence[bytes] = ()
    ) -> S3Bucket:
        """mkdir /``name`` as the tenant (uid, gid, dir_mode) and register it as its bucket.

        BucketAlreadyOwnedByYou / BucketAlreadyExists (another tenant's, or a top-level
        entry that is not a bucket); InvalidBucketName; InvalidArgument without the tenant.
        """
        s3.check_bucket_name(name)
        inherit = tuple(ops.check_xattr_name(x) for x in inherit_xattrs)
        ino = self._inos.next()
        return self._write(
            "s3_bucket_create",
            lambda c: s3.bucket_create(c, name, tenant, inherit, ino, time.time_ns(), self._gran),
        )

    def s3_bucket(self, name: str) -> S3Bucket | None:
        return self._read("s3_bucket", lambda c: s3.bucket_get(c, name))

    def s3_buckets(self, tenant: str) -> list[S3Bucket]:
        """The tenant's buckets in name order."""
        return self._read("s3_buckets", lambda c: s3.buckets(c, tenant))

    def s3_bucket_delete(self, name: str, tenant: str) -> None:
        """Remove the tenant's empty bucket and abort its uploads (NoSuchBucket,
        BucketNotEmpty)."""
        self._write("s3_bucket_delete", lambda c: s3.bucket_delete(c, name, tenant, time.time_ns()))

    # --- S3: objects ---------------------------------------------------------------------

    def _with_ids(self, n: int, what: str, fn: Callable[[sa.Connection, s3.IdPool], T]) -> T:
        """Run a write that needs up to ``n`` new inode numbers; unused ones go back."""
        pool = s3.IdPool([self._inos.next() for _ in range(n)])
        try:
            result = self._write(what, lambda c: fn(c, pool))
        except CommitOutcomeUnknown:
            raise  # the ids may be in use
        except MetaError:
            pool.restart()  # rolled back: none is used
            self._inos.give_back(pool.unused())
            raise
        self._inos.give_back(pool.unused())
        return result

    def s3_put_object(
        self,
        bucket_ino: int,
        key: bytes,
        slices: Sequence[sl.NewSlice],
        size: int,
        *,
        uid: int,
        gid: int,
        file_mode: int,
        dir_mode: int,
        etag: str | None,
        headers: dict[str, str],
        cond: PutConditions | None = None,
        inherit_xattrs: Sequence[bytes] = (),
        mtime_ns: int | None = None,
    ) -> S3Object:
        """Create or atomically replace the object at ``key`` in one transaction.

        The slices (file offsets; holes allowed) are already durable in the store. Missing
        directories of the key are created (uid, gid, dir_mode, xattrs ``inherit_xattrs``
        copied from the parent — the new file copies them too). A key ending in '/' makes
        sure that directory exists (no data). The old file at the key loses its link as
        with rename-over. S3Error: InvalidKey, KeyConflict, NoSuchBucket, conditions
        (PreconditionFailed, NoSuchKey for If-Match without an object, EtagUnknown).
        """
        path = s3.split_key(bytes(key))
        items = tuple(slices)
        if path.is_dir and (items or size):
            raise S3Error("InvalidArgument", "a key ending in '/' is a directory: no data")
        s3.check_slices(items, size)
        owner = _owner(uid, gid, file_mode, dir_mode, inherit_xattrs)
        body = s3.Body(items, size, etag, s3.clean_headers(headers), mtime_ns)
        put = s3.Put(bucket_ino, bytes(key), path, body, owner, cond)
        n = len(path.dirs) + (0 if path.is_dir else 1)
        return self._with_ids(
            n, "s3_put_object",
            lambda c, ids: s3.put_object(c, put, ids, time.time_ns(), self._gran),
        )

    def s3_get_object(self, bucket_ino: int, key: bytes) -> S3Object:
        """The object at ``key`` (NoSuchKey, NoSuchBucket); etag None if unknown for its gen."""
        return self._read("s3_get_object", lambda c: s3.get_object(c, bucket_ino, bytes(key)))

    def s3_read_object(self, bucket_ino: int, key: bytes) -> tuple[S3Object, list[sl.Slice]]:
        """The object and its slice rows in one snapshot: a GET's two reads in one."""

        def fn(c: sa.Connection) -> tuple[S3Object, list[sl.Slice]]:
            obj = s3.get_object(c, bucket_ino, bytes(key))
            return obj, ([] if obj.is_dir else data.load_slices(c, obj.attr.ino)[1])

        return self._read("s3_read_object", fn)

    def s3_object_by_ino(self, ino: int) -> S3Object | None:
        """The S3 view of inode ``ino`` (its key is not known: b""), None if it is gone."""
        return self._read("s3_object_by_ino", lambda c: s3.object_by_ino(c, ino))

    def s3_etags(self, inos: Sequence[int]) -> dict[int, str]:
        """ETags known for the current generation of these inodes (listings)."""
        items = list(inos)
        return self._read("s3_etags", lambda c: s3.etags(c, items))

    def s3_set_etag(self, ino: int, gen: int, etag: str) -> bool:
        """Store a computed ETag for generation ``gen``; False if the file changed or is gone."""
        return self._write("s3_set_etag", lambda c: s3.set_etag(c, ino, gen, etag))

    def s3_delete_object(self, bucket_ino: int, key: bytes) -> bool:
        """Remove the object (False if none); then the directories of the key left empty."""
        k = bytes(key)
        return self._write(
            "s3_delete_object",
            lambda c: s3.delete_object(c, bucket_ino, k, time.time_ns(), self._gran),
        )

    # --- S3: multipart uploads -----------------------------------------------------------

    def s3_upload_create(self, bucket: str, key: bytes, headers: dict[str, str]) -> S3Upload:
        """Start a multipart upload (InvalidKey, also for a directory key; NoSuchBucket)."""
        k = bytes(key)
        if s3.split_key(k).is_dir:
            raise S3Error("InvalidKey", "a key ending in '/' is a directory: no multipart upload")
        text = s3.headers_json(s3.clean_headers(headers))
        upload_id = secrets.token_hex(16)
        return self._write(
            "s3_upload_create",
            lambda c: s3.upload_create(c, upload_id, bucket, k, text, time.time_ns()),
        )

    def s3_upload(self, upload_id: str) -> S3Upload:
        return self._read("s3_upload", lambda c: s3.upload_get(c, upload_id))

    def s3_part_put(
        self,
        upload_id: str,
        part_number: int,
        size: int,
        etag: str,
        pieces: Sequence[sl.NewSlice],
    ) -> None:
        """Store part ``part_number`` (replacing one of that number). ``pieces``' file_off
        is the offset within the part; the bytes are durable in s3-part streams."""
        s3.check_part_number(part_number)
        items = list(pieces)
        s3.check_pieces(items, size)
        e = s3.check_md5(etag)
        self._write(
            "s3_part_put",
            lambda c: s3.part_put(c, upload_id, part_number, size, e, items, time.time_ns()),
        )

    def s3_parts(
        self, upload_id: str, after_part: int = 0, max_parts: int = 1000
    ) -> tuple[list[S3Part], bool]:
        """Parts after ``after_part`` in number order and whether more follow."""
        return self._read("s3_parts", lambda c: s3.parts(c, upload_id, after_part, max_parts))

    def s3_uploads(
        self,
        bucket: str,
        prefix: bytes = b"",
        key_marker: bytes | None = None,
        upload_id_marker: str | None = None,
        max_uploads: int = 1000,
    ) -> tuple[list[S3Upload], bool]:
        """In-progress uploads of ``bucket`` by (key, initiation); whether more follow."""
        return self._read(
            "s3_uploads",
            lambda c: s3.uploads(
                c, bucket, bytes(prefix), key_marker, upload_id_marker, max_uploads
            ),
        )

    def s3_upload_complete(
        self,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        *,
        min_part_bytes: int,
        uid: int,
        gid: int,
        file_mode: int,
        dir_mode: int,
        inherit_xattrs: Sequence[bytes] = (),
        cond: PutConditions | None = None,
        mtime_ns: int | None = None,
    ) -> S3Object:
        """Complete an upload: the listed parts' slices, concatenated (no data copy), become
        the object at its key exactly as :meth:`s3_put_object` would put it; the upload is
        gone afterwards. NoSuchUpload, MalformedXML (no parts), InvalidPartOrder,
        InvalidPart, EntityTooSmall, and the errors of s3_put_object."""
        owner = _owner(uid, gid, file_mode, dir_mode, inherit_xattrs)
        req = s3.Complete(upload_id, tuple(parts), min_part_bytes, owner, cond, mtime_ns)
        up = self.s3_upload(upload_id)  # for the number of ids the key may need
        n = len(s3.split_key(up.key).dirs) + 1
        return self._with_ids(
            n, "s3_upload_complete",
            lambda c, ids: s3.upload_complete(c, req, ids, time.time_ns(), self._gran),
        )

    def s3_upload_abort(self, upload_id: str) -> None:
        self._write("s3_upload_abort", lambda c: s3.upload_abort(c, upload_id))

    def s3_uploads_expire(self, older_than_ns: int) -> int:
        """Abort the uploads initiated before ``older_than_ns``; returns how many."""
        return self._write("s3_uploads_expire", lambda c: s3.uploads_expire(c, older_than_ns))

    # --- checking ------------------------------------------------------------------------

    def check_invariants(self) -> list[str]:
        """Problems found (empty when sound); see :mod:`appendfs.meta.check`."""
        return self._read("check_invariants", check.check_invariants)


def _owner(
    uid: int, gid: int, file_mode: int, dir_mode: int, inherit: Sequence[bytes]
) -> s3.Owner:
    return s3.Owner(uid, gid, file_mode, dir_mode, tuple(ops.check_xattr_name(x) for x in inherit))


def _end_expired(conn: sa.Connection, *, sid: int, now: int) -> bool:
    return data.end_session(conn, sid, now, only_if_expired=True)


class _SqlSource:
    """:class:`appendfs.meta.listing.Source` over the dentry index."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn

    def _q(self) -> sa.Select[Any]:
        return sa.select(D.c.name, D.c.ino, D.c.kind, I.c.size, I.c.mtime_ns).select_from(
            D.join(I, I.c.ino == D.c.ino)
        )

    def page(self, dir_ino: int, lo: bytes, inclusive: bool, limit: int) -> list[listing.Entry]:
        cond = D.c.name >= lo if inclusive else D.c.name > lo
        rows = self.conn.execute(
            self._q().where(D.c.parent == dir_ino, cond).order_by(D.c.name).limit(limit)
        )
        return [listing.Entry(bytes(r.name), r.ino, r.kind, r.size, r.mtime_ns) for r in rows]

    def named(self, dir_ino: int, names: Sequence[bytes]) -> list[listing.Entry]:
        rows = self.conn.execute(self._q().where(D.c.parent == dir_ino, D.c.name.in_(list(names))))
        return [listing.Entry(bytes(r.name), r.ino, r.kind, r.size, r.mtime_ns) for r in rows]
