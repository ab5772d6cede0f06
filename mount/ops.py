"""The pyfuse3 adapter: one handler per FUSE operation, each a thin call into fs/.

Handlers translate between the kernel's vocabulary (inode numbers, ``EntryAttributes``,
``RequestContext``) and :class:`~appendfs.fs.FileSystem`; they hold no file state of their
own beyond directory-listing cursors and lookup counts. Every handler is wrapped by
:func:`~appendfs.mount.errors.fuse_errors`, the single place errors become errno.

The mount runs with ``default_permissions``: the kernel checks permissions against the
attributes we return, so handlers do not re-check them (``access`` answers from the same
rules for access(2)). Inode numbers are the namespace's ``ino`` (root = 1 =
``pyfuse3.ROOT_INODE``); they are never reused, so the generation is always 0.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pyfuse3

from appendfs.fs import FileSystem
from appendfs.meta import Attr, DirEntry, FsError
from appendfs.mount.errors import fuse_errors
from appendfs.mount.opstats import OpStats

log = logging.getLogger(__name__)

_READDIR_PAGE = 512
#: st_blksize: the unit programs such as cp size their buffers by; large requests are cheap.
_BLKSIZE = 1 << 20


@dataclass
class _DirCursor:
    ino: int
    pos: int = 0  # index of the next entry to send
    after: bytes | None = None  # name of the entry at pos - 1


#: xattr namespaces kept for files; system.* (POSIX ACLs) is refused by the handlers.
_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


def check_xattr_namespace(name: bytes) -> None:
    """What the VFS checks for a local file system, but forwards unchecked to FUSE (whose
    xattr handler claims every prefix): a known namespace (else EOPNOTSUPP) and a name
    after the prefix (else EINVAL)."""
    for prefix in _XATTR_NAMESPACES:
        if name.startswith(prefix):
            if len(name) == len(prefix):
                raise pyfuse3.FUSEError(errno.EINVAL)
            return
    raise pyfuse3.FUSEError(errno.EOPNOTSUPP)


def access_ok(attr: Attr, want: int, uid: int, in_group: bool) -> bool:
    """access(2) rules: root may read/write anything and execute if any x bit is set."""
    if uid == 0:
        return not (want & os.X_OK) or attr.is_dir or bool(attr.mode & 0o111)
    if uid == attr.uid:
        bits = (attr.mode >> 6) & 7
    elif in_group:
        bits = (attr.mode >> 3) & 7
    else:
        bits = attr.mode & 7
    return (want & bits) == want


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem, slow_request_s: float = 0.0, direct_io: bool = False) -> None:
        super().__init__()
        self.fs = fs
        self.direct_io = direct_io  # read-only opens bypass the kernel's page cache ([mount] direct_io)
        self.attr_timeout_s = fs.cfg.attr_timeout_s
        self.entry_timeout_s = fs.cfg.entry_timeout_s
        self._lookups: dict[int, int] = {}
        self._dirs: dict[int, _DirCursor] = {}
        self._removed_dirs: dict[int, Attr] = {}  # rmdir'ed here, still held by the kernel
        self._next_dir = 1
        self.op_stats = OpStats(slow_request_s)  # filled by fuse_errors, read by /metrics

    # ---- helpers --------------------------------------------------------------------

    def _entry(self, attr: Attr, count_lookup: bool = True) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = self.entry_timeout_s
        e.attr_timeout = self.attr_timeout_s
        e.st_mode = attr.kind | attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = _BLKSIZE
        e.st_blocks = (attr.size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        if count_lookup:
            self._lookups[attr.ino] = self._lookups.get(attr.ino, 0) + 1
        return e

    async def _owner(self, parent: int, ctx: pyfuse3.RequestContext, mode: int,
                     is_dir: bool = False) -> tuple[int, int, int]:
        """(mode, uid, gid) of a new inode: umask applied; in a setgid directory the group
        is the directory's and subdirectories stay setgid (the kernel leaves this to us)."""
        mode &= ~ctx.umask & 0o7777
        gid = ctx.gid
        p, _ = await self.fs.parent_info(parent)
        if p.mode & stat.S_ISGID:
            gid = p.gid
            if is_dir:
                mode |= stat.S_ISGID
        return mode, ctx.uid, gid

    # ---- lookups and attributes -----------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Kernel contract: a positive answer adds one to the inode's lookup count."""
        if name == b".":
            return self._entry(await self._getattr(parent_inode))
        if name == b"..":
            a = await self._getattr(parent_inode)
            return self._entry(await self.fs.getattr(a.parent or parent_inode))
        return self._entry(await self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Kernel contract: drop ``n`` lookups; must not fail (no reply is sent)."""
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                self._removed_dirs.pop(ino, None)
                self.fs.forget(ino)

    async def _getattr(self, ino: int) -> Attr:
        """fs.getattr, except that a directory removed through this mount but still held
        by the kernel (an open descriptor, a process's cwd) answers as itself with nlink 0
        until forgotten, as POSIX asks of rmdir (its inode is gone from the namespace)."""
        try:
            return await self.fs.getattr(ino)
        except FsError as exc:
            gone = self._removed_dirs.get(ino)
            if gone is None or exc.errno != errno.ENOENT:
                raise
            return gone

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """An inode that no longer exists answers ESTALE (see :func:`_stale`)."""
        async with _stale():
            return self._entry(await self._getattr(inode), count_lookup=False)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """chmod/chown/truncate/utimens; ctime moves with any change (the namespace sets it)."""
        changes: dict[str, Any] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode & 0o7777
            if changes["mode"] & stat.S_ISGID and ctx.uid != 0:
                gid = attr.st_gid if fields.update_gid else (await self.fs.getattr(inode)).gid
                if not self._in_group(gid, ctx):
                    # Setgid stays only for root or a member of the file's group. The kernel
                    # strips it from chmod, but when it clears privileges after another user's
                    # write, FUSE's client keeps setgid on files without group exec.
                    changes["mode"] &= ~stat.S_ISGID
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_size:
            changes["size"] = attr.st_size
            if not fields.update_mtime:
                # The kernel leaves a truncation's timestamps to us, and ftruncate(2) stamps
                # mtime even when the size stays the same (POSIX).
                changes["mtime_ns"] = time.time_ns()
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            changes["ctime_ns"] = attr.st_ctime_ns
        if not changes:
            return self._entry(await self.fs.getattr(inode), count_lookup=False)
        return self._entry(await self.fs.setattr(inode, **changes), count_lookup=False)

    @staticmethod
    def _in_group(gid: int, ctx: pyfuse3.RequestContext) -> bool:
        if gid == ctx.gid:
            return True
        try:
            return gid in pyfuse3.get_sup_groups(ctx.pid)
        except OSError:  # the process is gone already
            return False

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        attr = await self.fs.getattr(inode)
        in_group = ctx.uid != 0 and attr.uid != ctx.uid and self._in_group(attr.gid, ctx)
        return access_ok(attr, mode, ctx.uid, in_group)

    # ---- namespace ------------------------------------------------------------------

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        perm, uid, gid = await self._owner(parent_inode, ctx, mode)
        return self._entry(await self.fs.mknod(parent_inode, name, stat.S_IFMT(mode) | perm, uid, gid, rdev))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        perm, uid, gid = await self._owner(parent_inode, ctx, mode, is_dir=True)
        return self._entry(await self.fs.mkdir(parent_inode, name, perm, uid, gid))

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        _, uid, gid = await self._owner(parent_inode, ctx, 0o777)
        return self._entry(await self.fs.symlink(parent_inode, name, target, uid, gid))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.readlink(inode)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.link(inode, new_parent_inode, new_name))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """A file losing its last name stays (unlinked, held) until the kernel forgets it:
        FUSE_OPEN may still come for it (see :meth:`FileSystem.unlink`)."""
        self._keep_until_forgotten(await self.fs.unlink(parent_inode, name, kernel_held=True))

    def _keep_until_forgotten(self, held: int | None) -> None:
        if held is not None and self._lookups.get(held, 0) == 0:  # the kernel never had it
            self.fs.forget(held)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        attr = await self.fs.lookup(parent_inode, name)
        await self.fs.rmdir(parent_inode, name)
        if attr.is_dir:
            self._removed(attr._replace(nlink=0))

    def _removed(self, gone: Attr) -> None:
        """A directory this mount removed (rmdir, or replaced by a rename) answers as itself
        while the kernel still knows it (see :meth:`_getattr`)."""
        if gone.ino in self._lookups:
            self._removed_dirs[gone.ino] = gone

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        """renameat2: 0, RENAME_NOREPLACE or RENAME_EXCHANGE; RENAME_WHITEOUT is EINVAL."""
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        done = await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, kernel_held=True)
        self._keep_until_forgotten(done.held)
        if done.removed_dir is not None:
            self._removed(done.removed_dir)

    # ---- directories ----------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        attr = await self._getattr(inode)
        if not attr.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = _DirCursor(inode)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries after ``start_id`` (an index); each one sent counts as a lookup (readdirplus).

        The cursor remembers the name at its position, so a listing continues by name from
        the namespace's index; a seek elsewhere re-scans from the start."""
        cur = self._dirs[fh]
        if cur.ino in self._removed_dirs:  # removed while open: empty for good
            return
        if start_id != cur.pos:
            cur.pos, cur.after = 0, None
            while cur.pos < start_id:  # telldir/seekdir: walk to the position again
                page = await self.fs.readdir(cur.ino, cur.after, min(_READDIR_PAGE, start_id - cur.pos))
                if not page:
                    return
                cur.pos += len(page)
                cur.after = page[-1].name
        # Lookups and the cursor are counted when the reply goes out: a handler that raises
        # sends the error alone (pyfuse3 drops the entries already in the buffer), and
        # counted anyway, those lookups would never be forgotten — nor their inodes released.
        placed: list[DirEntry] = []
        try:
            while True:
                page = await self.fs.readdir(cur.ino, placed[-1].name if placed else cur.after, _READDIR_PAGE)
                if not page:
                    break
                full = False
                for e in page:
                    assert e.attr is not None
                    if not pyfuse3.readdir_reply(token, e.name, self._entry(e.attr, count_lookup=False),
                                                 cur.pos + len(placed) + 1):
                        full = True
                        break
                    placed.append(e)
                if full:
                    break
        except Exception:
            if not placed:
                raise
            # The entries placed go out; the next call asks again from the last of them.
            log.debug("readdir of inode %d: a later page failed; sending the %d entries placed",
                      cur.ino, len(placed), exc_info=True)
        for e in placed:
            self._lookups[e.ino] = self._lookups.get(e.ino, 0) + 1
        if placed:
            cur.pos += len(placed)
            cur.after = placed[-1].name

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Namespace changes are durable when their transaction commits: nothing to do."""

    # ---- files ----------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Close-to-open: keep the page cache only if no other client changed the file.

        With ``[mount] direct_io`` an open for reading only bypasses the page cache
        (FOPEN_DIRECT_IO): each read(2) becomes one FUSE read of the caller's size, answered
        from our block cache and readahead, and copied once, into the caller's buffer. Opens
        that may write keep the page cache, so a MAP_SHARED mmap of them works (the kernel
        refuses one of a direct open with ENODEV: libfuse 3.14 cannot ask for
        FUSE_DIRECT_IO_ALLOW_MMAP).

        libfuse 3 negotiates atomic O_TRUNC: the kernel sends no setattr before an
        ``open(O_TRUNC)`` of an existing file, the flag arrives here and truncating is ours."""
        async with _stale():
            fh, keep = await self.fs.open(inode, flags)
        if flags & os.O_TRUNC:
            try:
                a = await self.fs.setattr(inode, size=0, mtime_ns=time.time_ns())  # even if empty
                if ctx.uid != 0 and a.mode & (stat.S_ISUID | stat.S_ISGID):
                    # the truncation the kernel skips would have cleared them for non-root
                    mode = a.mode & ~stat.S_ISUID
                    if a.mode & stat.S_IXGRP or not self._in_group(a.gid, ctx):
                        mode &= ~stat.S_ISGID
                    if mode != a.mode:
                        await self.fs.setattr(inode, mode=mode)
            except BaseException:
                await self.fs.release(fh)
                raise
        if not keep:
            # Another client changed the file. Dropping the page cache is not enough: the
            # kernel may still trust the size it cached (attr TTL) and not read past it, so
            # a file grown elsewhere would read short. Make it ask for attributes again.
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError as exc:
                log.debug("open: invalidating attributes of inode %d: %s", inode, exc)
        direct = self.direct_io and (flags & os.O_ACCMODE) == os.O_RDONLY
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=direct)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        perm, uid, gid = await self._owner(parent_inode, ctx, mode)
        fh, attr = await self.fs.create(parent_inode, name, perm, uid, gid, flags)
        return pyfuse3.FileInfo(fh=fh), self._entry(attr)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:  # type: ignore[override]  # pyfuse3 takes any buffer
        data = await self.fs.read(fh, off, size)
        self.op_stats.read_bytes += len(data)
        return data

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Buffers only (DESIGN §4); errors of the store surface at flush/fsync."""
        n = await self.fs.write(fh, off, buf)
        self.op_stats.write_bytes += n
        return n

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """close(2): commit this file's data; deferred write errors are reported here."""
        await self.fs.flush(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.flush(fh)

    @fuse_errors
    async def release(self, fh: int) -> None:
        """Last close of a handle: errors here reach nobody (they are logged by fs/)."""
        await self.fs.release(fh)

    # ---- xattrs and statfs ----------------------------------------------------------

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name.startswith(b"system."):  # POSIX ACLs are not supported: tools fall back to mode bits
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        check_xattr_namespace(name)
        await self.fs.setxattr(inode, name, value)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name.startswith(b"system."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        check_xattr_namespace(name)
        return await self.fs.getxattr(inode, name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """trusted.* names are listed to root only, as local file systems do (the kernel
        already refuses the values to others with ENODATA)."""
        names = await self.fs.listxattr(inode)
        if ctx.uid != 0:
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not name.startswith(b"system."):
            check_xattr_namespace(name)
        await self.fs.removexattr(inode, name)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = await self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = _BLKSIZE
        out.f_frsize = 4096
        out.f_blocks = s["total_bytes"] // 4096
        out.f_bfree = s["free_bytes"] // 4096
        out.f_bavail = s["free_bytes"] // 4096
        out.f_files = s["used_inodes"] + s["free_inodes"]
        out.f_ffree = s["free_inodes"]
        out.f_favail = s["free_inodes"]
        out.f_namemax = 255
        return out


@asynccontextmanager
async def _stale() -> AsyncIterator[None]:
    """ENOENT for an inode the kernel still caches under a name becomes ESTALE: the name now
    points elsewhere (another client replaced the file — an S3 PUT does so atomically — or
    removed it). On ESTALE the kernel walks the path again with LOOKUP_REVAL, which makes
    FUSE look the name up afresh: open() and stat() then reach the new file, or fail with
    ENOENT if the name is really gone. Without this, replaced files could not be opened by
    name until the entry TTL expired."""
    try:
        yield
    except FsError as exc:
        if exc.errno == errno.ENOENT:
            raise FsError(errno.ESTALE, exc.detail) from None
        raise
