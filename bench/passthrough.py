#!/usr/bin/env python3
"""A minimal pyfuse3 passthrough of a local directory: the ceiling of a Python FUSE layer.

    python bench/passthrough.py SRC MOUNTPOINT [--timeout-s 1.0]

Every request is one or two system calls on the source directory, done in the trio
thread (no worker threads, no caching of our own): lookups ``lstat`` the path, reads and
writes are ``os.pread``/``os.pwrite`` on a real file descriptor opened with the kernel's
flags. Inode numbers are the source's ``st_ino`` (the root is ``ROOT_INODE``); a map from
inode to path is kept while the kernel holds a lookup reference, as in pyfuse3's
``examples/passthroughfs.py``. A file opened with ``O_DIRECT`` stays direct underneath,
through one page-aligned buffer (what O_DIRECT needs).

Used by ``bench/mount_bench.py``; the kernel caches attributes and entries for
``--timeout-s`` seconds (default 1, like appendfs's mount) and no writeback cache is
asked for (appendfs does not ask either). SIGTERM/SIGINT unmount cleanly; files are
created as the mounting user (root in the benchmark), like appendfs's root-run mounts.
"""

from __future__ import annotations

import argparse
import errno
import functools
import mmap
import os
import signal
import stat
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

P = ParamSpec("P")
T = TypeVar("T")
FUSEError = pyfuse3.FUSEError


def oserrors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """An OSError of the source directory becomes the same errno for the kernel."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None

    return wrapper


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: str, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.root_ino = os.lstat(source).st_ino
        self._path: dict[int, str] = {pyfuse3.ROOT_INODE: source}  # inode -> a path of it
        self._lookups: dict[int, int] = {}
        self._dirs: dict[int, tuple[str, list[str]]] = {}  # dir handle -> (path, names)
        self._next_dir = 1
        self._direct: set[int] = set()  # fds opened with O_DIRECT
        self._abuf = mmap.mmap(-1, 1 << 20)  # page-aligned, for O_DIRECT reads and writes

    # ---- inodes and paths -----------------------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino

    def _entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._ino(st)
        e.generation = 0
        e.entry_timeout = self.timeout_s
        e.attr_timeout = self.timeout_s
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _remember(self, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """A positive lookup-like answer: the kernel now holds one more reference."""
        e = self._entry(st)
        ino = e.st_ino
        self._path[ino] = path
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return e

    def _child(self, parent: int, name: bytes) -> str:
        try:
            return os.path.join(self._path[parent], os.fsdecode(name))
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def _of(self, ino: int) -> str:
        try:
            return self._path[ino]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                if ino != pyfuse3.ROOT_INODE:
                    self._path.pop(ino, None)

    # ---- attributes -----------------------------------------------------------------

    @oserrors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b"." or (name == b".." and parent_inode == pyfuse3.ROOT_INODE):
            path = self._of(parent_inode)
        else:
            path = os.path.normpath(self._child(parent_inode, name))
        return self._remember(path, os.lstat(path))

    @oserrors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(os.lstat(self._of(inode)))

    @oserrors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._of(inode)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode), follow_symlinks=False)
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1,
                     follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns), follow_symlinks=False)
        return self._entry(os.lstat(path))

    @oserrors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = os.statvfs(self._path[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                     "f_namemax"):
            setattr(out, name, getattr(s, name))
        return out

    # ---- namespace ------------------------------------------------------------------

    @oserrors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mkdir(path, mode & ~ctx.umask)
        return self._remember(path, os.lstat(path))

    @oserrors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(self._child(parent_inode, name))

    @oserrors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(self._child(parent_inode, name))

    @oserrors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise FUSEError(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE: not needed by the benchmark
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        os.rename(old, new)
        prefix = old + os.sep
        for ino, path in list(self._path.items()):  # the renamed entry and, for a directory, below it
            if path == old:
                self._path[ino] = new
            elif path.startswith(prefix):
                self._path[ino] = new + path[len(old):]

    # ---- directories ----------------------------------------------------------------

    @oserrors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._of(inode)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = (path, sorted(os.listdir(path)))
        return fh

    @oserrors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries from index ``start_id`` of the listing taken at opendir (readdirplus)."""
        path, names = self._dirs[fh]
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._entry(st), i + 1):
                return
            self._remember(child, st)  # an accepted entry counts as a lookup

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # ---- files ----------------------------------------------------------------------

    def _opened(self, fd: int, flags: int) -> pyfuse3.FileInfo:
        if flags & os.O_DIRECT:
            self._direct.add(fd)
        return pyfuse3.FileInfo(fh=fd)

    @oserrors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return self._opened(os.open(self._of(inode), flags & ~os.O_CREAT), flags)

    @oserrors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT, mode & ~ctx.umask)
        return self._opened(fd, flags), self._remember(path, os.fstat(fd))

    def _aligned(self, size: int) -> mmap.mmap:
        if len(self._abuf) < size:
            self._abuf.close()
            self._abuf = mmap.mmap(-1, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)
        return self._abuf

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]  # any buffer works
        try:
            if fh in self._direct:  # the buffer is reused: the reply is sent before any other request runs
                view = memoryview(self._aligned(size))[:size]
                return view[:os.preadv(fh, [view], off)]
            return os.pread(fh, size, off)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            if fh in self._direct:
                view = memoryview(self._aligned(len(buf)))[:len(buf)]
                view[:] = buf
                return os.pwritev(fh, [view], off)
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor: nothing to do, as for a local file (data is in the page cache)."""

    @oserrors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    @oserrors
    async def release(self, fh: int) -> None:
        self._direct.discard(fh)
        os.close(fh)


async def serve(ops: Passthrough, mountpoint: str) -> None:
    pyfuse3.init(ops, mountpoint, {*pyfuse3.default_options, "fsname=passthrough", "subtype=passthrough"})
    try:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="local directory to pass through")
    ap.add_argument("mountpoint")
    ap.add_argument("--timeout-s", type=float, default=1.0, help="kernel attribute and entry cache time [1]")
    args = ap.parse_args()
    source = os.path.abspath(args.source)
    os.umask(0)  # the kernel hands us modes with the caller's umask not yet applied; we apply ctx.umask
    if not os.path.isdir(source):
        sys.exit(f"passthrough: {source} is not a directory")
    trio.run(serve, Passthrough(source, args.timeout_s), args.mountpoint)


if __name__ == "__main__":
    main()
