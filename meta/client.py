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
"""

from __future__ import annotations

import functools
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from appendfs.db import is_sqlite, make_engine
from appendfs.meta import check, data, listing, ops, schema
from appendfs.meta import slices as sl
from appendfs.meta.errors import FsError
from appendfs.meta.txn import IdAllocator, MetaConfig, Runner
from appendfs.meta.types import Attr, DirEntry, ListResult, StatFs

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
        self.engine.dispose()

    # --- plumbing ------------------------------------------------------------------------

    def _write(self, what: str, fn: Callable[[sa.Connection], T]) -> T:
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
    ) -> Attr:
        n = ops.check_name(name)
        attrs = {ops.check_xattr_name(k): bytes(v) for k, v in (xattrs or {}).items()}
        new = ops.NewInode(self._inos.next(), kind, mode, uid, gid, rdev, target)
        if open_sid is None and not attrs:
            return self._write(what, lambda c: ops.make(c, parent, n, new, time.time_ns(), self._gran))

        def make_open(c: sa.Connection) -> Attr:
            a = ops.make(c, parent, n, new, time.time_ns(), self._gran)
            if attrs:
                c.execute(schema.xattr.insert(), [{"ino": a.ino, "name": k, "value": v} for k, v in attrs.items()])
            if open_sid is not None:
                data.hold_new(c, open_sid, a.ino)
            return a

        a = self._write(what, make_open)
        if open_sid is not None:
            with self._open_lock:
                self._open_counts[(open_sid, a.ino)] = 1
        return a

    def mknod(
        self, parent: int, name: bytes | str, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Attr:
        """Create a non-directory named by ``mode``'s S_IFMT (0 means a regular file)."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in schema.KINDS or kind in (stat.S_IFDIR, stat.S_IFLNK):
            raise FsError(ops.errno.EINVAL, f"mknod of kind {kind:o}")
        return self._make("mknod", parent, name, kind, mode, uid, gid, rdev)

    def create(
        self, parent: int, name: bytes | str, mode: int, uid: int, gid: int, *,
        open_sid: int | None = None, xattrs: dict[bytes, bytes] | None = None,
    ) -> Attr:
        """Create a regular file; with ``open_sid`` it is also opened (as by :meth:`open`) in
        the same transaction, and ``xattrs`` are set in it too (inherited policies) — one
        commit for create-and-open instead of several."""
        return self._make("create", parent, name, stat.S_IFREG, mode, uid, gid, open_sid=open_sid, xattrs=xattrs)

    def mkdir(
        self, parent: int, name: bytes | str, mode: int, uid: int, gid: int, *,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> Attr:
        return self._make("mkdir", parent, name, stat.S_IFDIR, mode, uid, gid, xattrs=xattrs)

    def symlink(
        self, parent: int, name: bytes | str, target: bytes | str, uid: int, gid: int
    ) -> Attr:
        t = ops.to_bytes(target)
        if not t or b"\0" in t:
            raise FsError(ops.errno.ENOENT if not t else ops.errno.EINVAL, "bad symlink target")
        if len(t) >= ops.PATH_MAX:
            raise FsError(ops.errno.ENAMETOOLONG, f"symlink target of {len(t)} bytes")
        return self._make("symlink", parent, name, stat.S_IFLNK, 0o777, uid, gid, target=t)

    def link(self, ino: int, new_parent: int, new_name: bytes | str) -> Attr:
        n = ops.check_name(new_name)
        return self._write("link", lambda c: ops.link(c, ino, new_parent, n, time.time_ns()))

    # --- removal and rename --------------------------------------------------------------

    def unlink(self, parent: int, name: bytes | str) -> None:
        n = ops.check_name(name)
        self._write("unlink", lambda c: ops.unlink(c, parent, n, time.time_ns(), self._gran))

    def rmdir(self, parent: int, name: bytes | str) -> None:
        n = ops.check_name(name)
        self._write("rmdir", lambda c: ops.rmdir(c, parent, n, time.time_ns()))

    def rename(
        self, parent: int, name: bytes | str, new_parent: int, new_name: bytes | str, flags: int = 0
    ) -> None:
        """rename/renameat2: flags 0, RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2)."""
        a, b = ops.check_name(name), ops.check_name(new_name)
        self._write(
            "rename", lambda c: ops.rename(c, parent, a, new_parent, b, flags, time.time_ns())
        )

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
        with self._open_lock:
            n = self._open_counts.get(key, 0)
            self._open_counts[key] = n + 1
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
        """:meth:`release` of several inodes in one transaction (batched closes)."""
        last = sorted({ino for ino in inos if self._forget((sid, ino)) <= 0})
        if not last:
            return
        now = time.time_ns()

        def fn(c: sa.Connection) -> None:
            for ino in last:  # ascending: the lock order of every transaction
                data.release_file(c, sid, ino, now)

        self._write("release_many", fn)

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

    # --- checking ------------------------------------------------------------------------

    def check_invariants(self) -> list[str]:
        """Problems found (empty when sound); see :mod:`appendfs.meta.check`."""
        return self._read("check_invariants", check.check_invariants)


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
