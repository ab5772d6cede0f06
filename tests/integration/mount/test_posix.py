"""POSIX behaviour of the mount, operation by operation, compared with a local directory.

Each test is a scenario (see :mod:`posix_harness`) run as root once in a fresh local
directory and once in a fresh directory of the mount (``module_mount``: SQLite and
PostgreSQL); results, stat fields, timestamp relations and errno must agree. Where
appendfs deliberately differs (documented limits) the test asserts our behaviour on the
mount alone, with a comment. Unprivileged behaviour is in ``test_posix_users.py``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounts import Mount
from posix_harness import (
    OTHER_GID,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    TICK_S,
    Recorder,
    Scenario,
    renameat2,
    run_both,
)

Run = Callable[[Scenario], dict[str, Recorder]]
RDWR_CREAT = os.O_RDWR | os.O_CREAT
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


@pytest.fixture
def posix(module_mount: Mount, request: pytest.FixtureRequest) -> Iterator[Run]:
    """run(scenario): the scenario on the mount and in a local directory, compared."""
    local = Path(tempfile.mkdtemp(prefix="posix-", dir="/tmp"))
    os.chmod(local, 0o755)
    name = request.node.originalname
    yield lambda scenario: run_both(module_mount.path, local, name, scenario)
    shutil.rmtree(local, ignore_errors=True)


def _link_fd(fd: int, name: str) -> None:
    """linkat(fd, "", AT_FDCWD, name, AT_EMPTY_PATH): give an open file a name (root)."""
    if _libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(name), _AT_EMPTY_PATH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), name)


def _ftruncate(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


# ---- lookup, getattr, mkdir, rmdir, mknod ----------------------------------------------


def test_lookup_and_getattr(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "d", 0o755)
        r.write("d/f", b"hello")
        r.stat("d")
        r.stat("d/f")
        r.stat("d/missing", expect="!ENOENT")
        r.stat("d/f/x", expect="!ENOTDIR")
        r.stat("d/f/", expect="!ENOTDIR")
        r.do(os.mkdir, "d/sub")
        r.stat("d")  # nlink 3: '.', the entry in the parent, 'sub/..'
        r.same_file("d/sub/..", "d")
        r.same_file("./d/./sub/../f", "d/f")
        r.same_file("..", "../" + r.root.name + "/..")
        r.listdir("d")
        r.do(os.path.exists, "d/f")
        r.do(os.path.isdir, "d/sub")

    posix(s)


def test_mkdir_and_rmdir(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "a", 0o750)
        r.do(os.mkdir, "b", 0o777)  # umask 022 → 0755
        r.do(os.mkdir, "sticky", 0o1777)
        r.do(os.mkdir, "allbits", 0o7777)  # only permissions and sticky reach the file system
        r.stat("allbits")
        r.stat("a")
        r.stat("b")
        r.stat("sticky")
        r.do(os.mkdir, "a", expect="!EEXIST")
        r.write("a/f", b"x")
        r.do(os.mkdir, "a/f", expect="!EEXIST")
        r.do(os.mkdir, "a/f/x", expect="!ENOTDIR")
        r.do(os.mkdir, "missing/x", expect="!ENOENT")
        r.do(os.rmdir, "a", expect="!ENOTEMPTY")
        r.do(os.rmdir, "a/f", expect="!ENOTDIR")
        r.do(os.unlink, "b", expect="!EISDIR")
        r.do(os.rmdir, "missing", expect="!ENOENT")
        r.do(os.rmdir, "b/.", expect="!EINVAL")
        r.do(os.rmdir, "b/..", expect="!ENOTEMPTY")
        r.do(os.mkdir, "b/c")
        r.stat("b")
        r.stat(".")
        r.do(os.rmdir, "b/c")
        r.stat("b")
        r.do(os.rmdir, "b")
        r.stat("b", expect="!ENOENT")
        r.stat(".")
        r.listdir()
        # removed while open, or while a process's working directory: it lives on, empty
        # and with nothing to be created in it, until the last reference goes
        r.do(os.mkdir, "gone")
        r.write("gone/f", b"x")
        fd = r.open("gone", os.O_RDONLY | os.O_DIRECTORY)
        assert fd is not None
        r.do(os.unlink, "gone/f")
        r.do(os.rmdir, "gone")
        r.do(os.fstat, fd)
        r.do(os.listdir, fd, expect=[])
        r.do(os.open, "x", os.O_WRONLY | os.O_CREAT, dir_fd=fd, expect="!ENOENT")
        r.do(os.mkdir, "y", dir_fd=fd, expect="!ENOENT")
        r.close(fd)
        r.do(os.mkdir, "cwd")
        os.chdir("cwd")
        try:
            r.do(os.rmdir, "../cwd")
            r.stat(".")
            r.listdir(".", expect=[])
            r.do(os.mkdir, "z", expect="!ENOENT")
        finally:
            os.chdir(r.root)
        r.listdir()

    posix(s)


def test_mknod_fifo_and_devices(posix: Run, module_mount: Mount) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkfifo, "fifo", 0o640)
        r.stat("fifo")
        r.do(os.mkfifo, "fifo", expect="!EEXIST")
        r.do(os.mknod, "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        r.stat("null")
        r.do(os.mknod, "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
        r.stat("blk")
        r.do(os.mknod, "reg", 0o640 | stat.S_IFREG)
        r.stat("reg")
        r.do(os.mknod, "reg", 0o640, expect="!EEXIST")
        r.do(os.mknod, "nodir/x", 0o640, expect="!ENOENT")
        # A FIFO on the mount is a kernel pipe like any other.
        fd = r.open("fifo", os.O_RDWR | os.O_NONBLOCK)
        if fd is not None:
            r.do(os.write, fd, b"through the pipe")
            r.do(os.read, fd, 100)
            r.do(os.read, fd, 100, expect="!EAGAIN")
            r.close(fd)
        r.stat("fifo")  # size stays 0
        r.do(os.unlink, "fifo")
        r.listdir()

    recs = posix(s)
    # The mount is nodev (libfuse's default, like nosuid): device nodes can be made and
    # listed but not opened. Locally /dev/null's twin opens; on the mount it is EACCES.
    assert "nodev" in _mount_options(module_mount.path)
    with pytest.raises(OSError) as exc:
        os.open(recs["mount"].root / "null", os.O_WRONLY)
    assert exc.value.errno == errno.EACCES
    fd = os.open(recs["local"].root / "null", os.O_WRONLY)
    assert os.write(fd, b"discarded") == 9
    os.close(fd)


def _mount_options(path: Path) -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[3].split(",")
    raise AssertionError(f"{path} is not in /proc/mounts")


# ---- symlinks and hard links ---------------------------------------------------------------


def test_symlinks(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.write("t", b"target")
        r.do(os.mkdir, "dir")
        r.write("dir/inner", b"inner")
        r.do(os.symlink, "t", "l")
        r.stat("l", follow=False)
        r.stat("l")
        r.do(os.readlink, "l")
        r.read("l")
        r.same_file("l", "t")
        r.do(os.readlink, "t", expect="!EINVAL")
        r.do(os.readlink, "missing", expect="!ENOENT")
        r.do(os.symlink, "x", "t", expect="!EEXIST")
        r.do(os.symlink, "dir", "ldir")
        r.listdir("ldir")
        r.read("ldir/inner")
        r.do(os.symlink, "nowhere", "dangling")
        r.stat("dangling", expect="!ENOENT")
        r.stat("dangling", follow=False)
        r.do(os.symlink, "/an/absolute/target", "abs")
        r.do(os.readlink, "abs")
        r.do(os.symlink, "loop2", "loop1")
        r.do(os.symlink, "loop1", "loop2")
        r.stat("loop1", expect="!ELOOP")
        r.open("l", os.O_RDONLY | os.O_NOFOLLOW, expect="!ELOOP")
        r.open("dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL, expect="!EEXIST")
        fd = r.open("dangling", os.O_WRONLY | os.O_CREAT, 0o600)  # creates the target
        if fd is not None:
            r.close(fd)
        r.stat("nowhere")
        long_target = "a/" * 2047 + "b"  # 4095 bytes: the longest a symlink may hold
        r.do(os.symlink, long_target, "long")
        r.do(lambda: len(os.readlink("long")), label="len(readlink('long'))")
        r.stat("long", follow=False)
        r.do(os.symlink, long_target + "c", "toolong", expect="!ENAMETOOLONG")
        r.do(os.utime, "l", ns=(7_000_000_000, 8_000_000_000), follow_symlinks=False)
        st_l, st_t = os.lstat("l"), os.stat("t")
        r.note("lutimes times of the link", (st_l.st_atime_ns, st_l.st_mtime_ns),
               expect=(7_000_000_000, 8_000_000_000))
        r.note("lutimes leaves the target", st_t.st_mtime_ns == 8_000_000_000, expect=False)
        r.do(os.chown, "l", 65534, 65534, follow_symlinks=False)
        r.stat("l", follow=False)
        r.stat("t")
        r.do(os.unlink, "l")
        r.stat("t")
        r.listdir()

    posix(s)


def test_hard_links(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.write("a", b"one")
        r.do(os.link, "a", "b")
        r.stat("a")
        r.stat("b")
        r.same_file("a", "b")
        r.write("b", b"two", os.O_WRONLY | os.O_TRUNC)
        r.read("a")
        r.do(os.mkdir, "d")
        r.do(os.link, "a", "d/c")
        r.stat("a")
        r.do(os.link, "d", "dlink", expect="!EPERM")
        r.do(os.link, "a", "b", expect="!EEXIST")
        r.do(os.link, "missing", "m", expect="!ENOENT")
        r.do(os.link, "a", "nodir/x", expect="!ENOENT")
        r.do(os.unlink, "a")
        r.stat("b")
        r.read("d/c")
        # link and unlink change the inode's ctime, not its mtime
        r.set_past("b")
        before = r.times("b")
        r.do(os.link, "b", "e")
        after = r.times("b")
        r.relation("link", before, after, "ctime", "advanced")
        r.relation("link", before, after, "mtime", "unchanged")
        r.do(os.unlink, "e")
        r.relation("unlink", after, r.times("b"), "ctime", "advanced")
        # a hard link to a symlink or a FIFO links that inode itself
        r.do(os.symlink, "b", "sl")
        r.do(os.link, "sl", "sl2", follow_symlinks=False)
        r.stat("sl2", follow=False)
        r.same_file("sl", "sl2", follow=False)
        r.do(os.mkfifo, "p")
        r.do(os.link, "p", "p2")
        r.stat("p2")
        # linking a file whose writes are still buffered
        fd = r.open("w", RDWR_CREAT)
        if fd is not None:
            r.do(os.write, fd, b"buffered")
            r.do(os.link, "w", "w2")
            r.stat("w2")
            r.close(fd)
        r.read("w2")
        r.do(os.unlink, "missing", expect="!ENOENT")
        r.do(os.unlink, "w2/", expect="!ENOTDIR")
        r.do(os.unlink, "nodir/x", expect="!ENOENT")
        r.listdir()
        r.listdir("d")

    posix(s)


# ---- rename ------------------------------------------------------------------------------


def test_rename_files(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.write("a", b"AAA")
        r.write("b", b"BB")
        ino_a = os.stat("a").st_ino
        keep = r.open("b", os.O_RDONLY)  # the replaced file stays readable through its fd
        r.do(os.rename, "a", "b")
        r.note("b is a's inode", os.stat("b").st_ino == ino_a)
        r.read("b")
        r.stat("a", expect="!ENOENT")
        if keep is not None:
            r.do(os.pread, keep, 10, 0)
            r.close(keep)
        r.do(os.rename, "b", "b")  # to itself: nothing happens
        r.stat("b")
        # onto another link of the same file: POSIX says do nothing, both names stay
        r.do(os.link, "b", "b2")
        r.do(os.rename, "b", "b2")
        r.stat("b")
        r.stat("b2")
        # replacing one link of a multiply linked file drops only that link
        r.write("x", b"x")
        r.do(os.rename, "x", "b2")
        r.stat("b")
        r.read("b2")
        # the replaced file still has writes buffered on an open descriptor
        r.write("victim", b"old")
        fd = r.open("victim", os.O_RDWR)
        if fd is not None:
            r.do(os.pwrite, fd, b"buffered", 3)
            r.do(os.rename, "b2", "victim")
            r.do(os.pwrite, fd, b"!", 0)
            r.do(os.fstat, fd)
            r.do(os.pread, fd, 100, 0)
            r.close(fd)
        r.read("victim")
        r.do(os.rename, "missing", "y", expect="!ENOENT")
        r.do(os.rename, "b", "nodir/y", expect="!ENOENT")
        r.do(os.rename, "b/", "y", expect="!ENOTDIR")
        r.do(os.mkdir, "d")
        r.do(os.rename, "b", "d", expect="!EISDIR")
        r.do(os.rename, "d", "b", expect="!ENOTDIR")
        # across directories, with an open descriptor following the file
        fd = r.open("b", os.O_RDWR)
        r.do(os.rename, "b", "d/moved")
        if fd is not None:
            r.do(os.pwrite, fd, b"!", 0)
            r.close(fd)
        r.read("d/moved")
        r.listdir()
        r.listdir("d")

    posix(s)


def test_rename_directories(posix: Run) -> None:
    def s(r: Recorder) -> None:
        for d in ("d1", "d2", "d3", "d3/sub", "p1", "p2", "p1/child", "p1/child/grand"):
            r.do(os.mkdir, d)
        r.write("d3/f", b"f")
        r.write("file", b"file")
        r.do(os.rename, "d1", "d2")  # over an empty directory
        r.stat("d1", expect="!ENOENT")
        r.stat("d2")
        r.do(os.rename, "d2", "d3", expect="!ENOTEMPTY")
        r.do(os.rename, "d3", "d3/sub/x", expect="!EINVAL")
        r.do(os.rename, "d3", "d3/sub", expect="!EINVAL")
        r.do(os.rename, "file", "d2", expect="!EISDIR")
        r.do(os.rename, "d2", "file", expect="!ENOTDIR")
        r.do(os.rename, "d2", "d2/.", expect="!EBUSY")
        r.do(os.rename, ".", "x", expect="!EBUSY")
        r.stat("p1")
        r.stat("p2")
        r.do(os.rename, "p1/child", "p2/child")
        r.stat("p1")  # nlink 2: lost child/..
        r.stat("p2")  # nlink 3
        r.same_file("p2/child/..", "p2")
        r.same_file("p2/child/grand/../..", "p2")
        r.listdir("p2/child")
        # a directory over an empty directory of another parent
        for d in ("q1", "q2", "q1/sub", "q2/sub", "q1/sub/inner"):
            r.do(os.mkdir, d)
        r.do(os.rename, "q1/sub", "q2/sub")
        r.stat("q1")
        r.stat("q2")
        r.listdir("q2/sub")
        # a directory replaced while open lives on, empty and removed, like one rmdir'ed
        r.do(os.mkdir, "victim")
        r.do(os.mkdir, "mover")
        fd = r.open("victim", os.O_RDONLY | os.O_DIRECTORY)
        assert fd is not None
        r.do(os.rename, "mover", "victim")
        r.do(os.fstat, fd)
        r.do(os.listdir, fd, expect=[])
        r.do(os.mkdir, "y", dir_fd=fd, expect="!ENOENT")
        r.close(fd)
        r.listdir("victim")
        # directory and file timestamps: both parents change, the moved file's ctime too
        r.write("p1/f", b"f")
        r.set_past("p1", "p2", "p1/f")
        b1, b2, bf = r.times("p1"), r.times("p2"), r.times("p1/f")
        r.do(os.rename, "p1/f", "p2/f")
        a1, a2, af = r.times("p1"), r.times("p2"), r.times("p2/f")
        r.relation("rename source dir", b1, a1, "mtime", "advanced")
        r.relation("rename source dir", b1, a1, "ctime", "advanced")
        r.relation("rename target dir", b2, a2, "mtime", "advanced")
        r.relation("renamed file", bf, af, "ctime", "advanced")
        r.relation("renamed file", bf, af, "mtime", "unchanged")
        r.set_past("p2/child")
        before = r.times("p2/child")
        r.do(os.rename, "p2/child", "p1/child")
        after = r.times("p1/child")
        r.relation("directory moved to another parent", before, after, "ctime", "advanced")
        r.relation("directory moved to another parent", before, after, "mtime", None)
        r.listdir()

    posix(s)


def test_renameat2_flags(posix: Run, module_mount: Mount) -> None:
    def s(r: Recorder) -> None:
        r.write("a", b"A")
        r.write("b", b"B")
        r.do(os.mkdir, "d")
        r.write("d/inner", b"inner")
        r.do(renameat2, "a", "b", RENAME_NOREPLACE, expect="!EEXIST")
        r.do(renameat2, "a", "c", RENAME_NOREPLACE, expect=None)
        r.read("c")
        r.stat("a", expect="!ENOENT")
        r.do(renameat2, "c", "d", RENAME_EXCHANGE, expect=None)  # a file and a directory swap names
        r.stat("c")
        r.stat("d")
        r.read("d")
        r.read("c/inner")
        r.do(renameat2, "b", "missing", RENAME_EXCHANGE, expect="!ENOENT")
        r.do(renameat2, "b", "d", RENAME_EXCHANGE | RENAME_NOREPLACE, expect="!EINVAL")
        r.do(renameat2, "b", "d", 1 << 7, expect="!EINVAL")
        # across directories: each parent's nlink follows the directory that moved
        for d in ("p1", "p2", "p1/x", "p1/x/y"):
            r.do(os.mkdir, d)
        r.write("p2/y", b"y")
        r.do(renameat2, "p1/x", "p2/y", RENAME_EXCHANGE)
        r.stat("p1")
        r.stat("p2")
        r.read("p1/x")
        r.same_file("p2/y/..", "p2")
        for d in ("q1", "q2", "q1/a", "q2/b", "q2/b/c"):  # two directories, two parents
            r.do(os.mkdir, d)
        r.do(renameat2, "q1/a", "q2/b", RENAME_EXCHANGE)
        r.stat("q1")
        r.stat("q2")
        r.listdir("q1/a")
        r.same_file("q1/a/..", "q1")
        r.same_file("q2/b/..", "q2")
        r.do(renameat2, "p2", "p2/y/y", RENAME_EXCHANGE, expect="!EINVAL")  # into its own subtree
        r.do(renameat2, "p2/y/y", "p2", RENAME_EXCHANGE, expect="!EINVAL")
        r.listdir()

    posix(s)
    # RENAME_WHITEOUT (overlayfs's flag, root only) is not supported on the mount
    # (mount/ops.py rename: EINVAL); ext4 implements it, so this is checked on the mount alone.
    d = module_mount.path / "test_renameat2_flags"
    cwd = os.getcwd()
    os.chdir(d)
    try:
        with pytest.raises(OSError) as exc:
            renameat2("b", "whiteout", RENAME_WHITEOUT)
        assert exc.value.errno == errno.EINVAL
        assert os.path.exists("b")
    finally:
        os.chdir(cwd)


# ---- open, create, read, write -------------------------------------------------------------


def test_open_and_create(posix: Run) -> None:
    def s(r: Recorder) -> None:
        fd = r.open("new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        if fd is not None:
            r.close(fd)
        r.stat("new")
        r.open("new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, expect="!EEXIST")
        r.open("missing", os.O_RDONLY, expect="!ENOENT")
        r.open("nodir/f", os.O_WRONLY | os.O_CREAT, expect="!ENOENT")
        r.open("newdir/", os.O_WRONLY | os.O_CREAT, expect="!EISDIR")
        r.open("new/", os.O_RDONLY, expect="!ENOTDIR")
        r.do(os.mkdir, "d")
        r.open("d", os.O_WRONLY, expect="!EISDIR")
        r.open("d", os.O_RDWR, expect="!EISDIR")
        r.open("d", os.O_WRONLY | os.O_CREAT, expect="!EISDIR")
        r.open("new", os.O_RDONLY | os.O_DIRECTORY, expect="!ENOTDIR")
        fd = r.open("d", os.O_RDONLY | os.O_DIRECTORY)
        if fd is not None:
            r.do(os.read, fd, 10, expect="!EISDIR")
            r.close(fd)
        r.open("exec", os.O_WRONLY | os.O_CREAT, 0o777)
        r.open("secret", os.O_WRONLY | os.O_CREAT, 0o600)
        r.open("suid", os.O_WRONLY | os.O_CREAT, 0o6777)
        r.open("newd", os.O_RDONLY | os.O_CREAT | os.O_DIRECTORY, expect="!EINVAL")
        r.stat("exec")
        r.stat("secret")
        r.stat("suid")
        r.write("full", b"0123456789")
        fd = r.open("full", os.O_WRONLY)
        if fd is not None:
            r.do(os.read, fd, 10, expect="!EBADF")
            r.close(fd)
        fd = r.open("full", os.O_RDONLY)
        if fd is not None:
            r.do(os.write, fd, b"x", expect="!EBADF")
            r.close(fd)
        fd = r.open("full", os.O_RDWR | os.O_TRUNC)
        if fd is not None:
            r.do(os.fstat, fd)
            r.close(fd)
        r.stat("full")
        r.listdir()

    posix(s)


def test_read_and_write(posix: Run) -> None:
    big = bytes(range(256)) * (5 * 4096 + 3)  # ~5 MiB: more than one write buffer (4 MiB)

    def s(r: Recorder) -> None:
        fd = r.open("f", RDWR_CREAT)
        assert fd is not None
        r.do(os.write, fd, b"0123456789")
        r.do(os.pread, fd, 4, 3)
        r.do(os.pread, fd, 100, 8)
        r.do(os.pread, fd, 10, 100)
        r.do(os.pwrite, fd, b"abc", 5)
        r.do(os.pread, fd, 100, 0)
        r.do(os.lseek, fd, 0, os.SEEK_CUR)
        r.do(os.lseek, fd, 0, os.SEEK_END)
        r.do(os.lseek, fd, -3, os.SEEK_END)
        r.do(os.read, fd, 100)
        r.do(os.read, fd, 100)
        r.do(os.write, fd, b"")
        r.do(os.lseek, fd, -1, os.SEEK_SET, expect="!EINVAL")
        r.do(os.fstat, fd)
        other = r.open("f", os.O_RDONLY)  # a second descriptor sees the writes before close
        if other is not None:
            r.do(os.read, other, 100)
            r.close(other)
        r.close(fd)
        r.read("f")
        # large writes, then overwrite a range that straddles the first buffer's end
        r.write("big", big)
        r.stat("big")
        fd = r.open("big", os.O_RDWR)
        if fd is not None:
            r.do(os.pwrite, fd, b"X" * 10000, (4 << 20) - 5000)
            r.do(os.pread, fd, 20, (4 << 20) - 5010)
            r.close(fd)
        r.read("big")

    posix(s)


def test_sparse_files_and_holes(posix: Run) -> None:
    def s(r: Recorder) -> None:
        fd = r.open("sparse", RDWR_CREAT)
        assert fd is not None
        r.do(os.pwrite, fd, b"end", 3 << 20)
        r.do(os.pwrite, fd, b"start", 0)
        r.do(os.fstat, fd)
        r.do(os.pread, fd, 16, 4096)  # inside the hole: zeros
        r.do(os.pread, fd, 8, (3 << 20) - 5)  # across the hole's end
        r.do(os.lseek, fd, (3 << 20) + 3, os.SEEK_DATA, expect="!ENXIO")  # at EOF
        r.close(fd)
        r.read("sparse")
        r.stat("sparse")
        # a hole in the middle of written data
        fd = r.open("middle", RDWR_CREAT)
        assert fd is not None
        r.do(os.write, fd, b"a" * 1000)
        r.do(os.pwrite, fd, b"b" * 1000, 9000)
        r.do(os.pread, fd, 8, 996)
        r.close(fd)
        r.read("middle")
        # a hole made by truncating up, then data written past it
        r.write("grown", b"0123456789")
        r.do(os.truncate, "grown", 5000)
        fd = r.open("grown", os.O_WRONLY)
        if fd is not None:
            r.do(os.pwrite, fd, b"tail", 8000)
            r.close(fd)
        r.read("grown")
        r.stat("grown")
        # offsets past 4 GiB (never read whole)
        fd = r.open("huge", RDWR_CREAT)
        if fd is not None:
            r.do(os.pwrite, fd, b"far", (5 << 30) + 7)
            r.do(os.pread, fd, 16, (5 << 30))
            r.do(os.pread, fd, 16, 3 << 30)
            r.do(os.fstat, fd)
            r.close(fd)
        r.stat("huge")
        r.do(os.truncate, "huge", (5 << 30) + 8)
        fd = r.open("huge", os.O_RDONLY)
        if fd is not None:
            r.do(os.pread, fd, 16, (5 << 30))
            r.close(fd)

    posix(s)


def test_truncate(posix: Run) -> None:
    pattern = bytes(range(100))

    def s(r: Recorder) -> None:
        r.write("f", pattern)
        r.do(os.truncate, "f", 10)
        r.read("f")
        r.do(os.truncate, "f", 50)  # up: zeros after the old end
        r.read("f")
        r.do(os.truncate, "f", 0)
        r.stat("f")
        r.do(os.truncate, "f", -1, expect="!EINVAL")
        r.do(os.mkdir, "d")
        r.do(os.truncate, "d", 0, expect="!EISDIR")
        r.do(os.truncate, "missing", 0, expect="!ENOENT")
        r.do(os.symlink, "f", "link")
        r.do(os.truncate, "link", 7)  # follows the symlink
        r.stat("f")
        # ftruncate with writes still buffered, then a write past the new end
        fd = r.open("g", RDWR_CREAT)
        assert fd is not None
        r.do(os.write, fd, pattern[:20])
        r.do(os.ftruncate, fd, 5)
        r.do(os.fstat, fd)
        r.do(os.pread, fd, 100, 0)
        r.do(os.pwrite, fd, b"xyz", 10)
        r.do(os.pread, fd, 100, 0)
        r.do(os.ftruncate, fd, 1 << 20)
        r.do(os.pread, fd, 8, (1 << 20) - 8)
        r.close(fd)
        r.read("g")
        # truncate by name while another descriptor has writes buffered
        fd = r.open("p", RDWR_CREAT)
        if fd is not None:
            r.do(os.write, fd, pattern)
            r.do(os.truncate, "p", 50)
            r.do(os.fstat, fd)
            r.do(os.pwrite, fd, b"after", 200)
            r.close(fd)
        r.read("p")
        fd = r.open("g", os.O_RDONLY)
        if fd is not None:
            r.do(os.ftruncate, fd, 0, expect="!EINVAL")  # not open for writing
            r.close(fd)
        # truncation changes mtime and ctime
        r.set_past("g")
        before = r.times("g")
        r.do(os.truncate, "g", 100)
        after = r.times("g")
        r.relation("truncate down", before, after, "mtime", "advanced")
        r.relation("truncate down", before, after, "ctime", "advanced")
        r.set_past("g")
        before = r.times("g")
        fd = r.open("g", os.O_WRONLY | os.O_TRUNC)
        if fd is not None:
            r.close(fd)
        after = r.times("g")
        r.stat("g")
        r.relation("open O_TRUNC", before, after, "mtime", "advanced")
        r.relation("open O_TRUNC", before, after, "ctime", "advanced")
        # to the same size, ftruncate(2) and O_TRUNC still stamp mtime and ctime (POSIX;
        # for truncate(2) it is up to the file system: ext4 stamps, tmpfs does not)
        for what, op in (("O_TRUNC of an empty file", lambda: os.close(os.open("g", os.O_WRONLY | os.O_TRUNC))),
                         ("ftruncate same size", lambda: _ftruncate("g", 0))):
            r.set_past("g")
            before = r.times("g")
            r.do(op, label=what)
            after = r.times("g")
            r.relation(what, before, after, "mtime", "advanced")
            r.relation(what, before, after, "ctime", "advanced")

    posix(s)


def test_o_append(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.write("f", b"start")
        fd = r.open("f", os.O_WRONLY | os.O_APPEND)
        assert fd is not None
        r.do(os.write, fd, b"-a")
        r.do(os.lseek, fd, 0, os.SEEK_SET)
        r.do(os.write, fd, b"-b")  # still at the end
        r.do(os.lseek, fd, 0, os.SEEK_CUR)
        r.do(os.pwrite, fd, b"-c", 0)  # Linux: pwrite on O_APPEND appends too
        other = r.open("f", os.O_WRONLY | os.O_APPEND)
        plain = r.open("f", os.O_WRONLY)
        if other is not None and plain is not None:
            r.do(os.write, other, b"-d")
            r.do(os.write, fd, b"-e")
            r.do(os.pwrite, plain, b"S", 0)  # a plain descriptor writes where it is told
            r.do(os.write, other, b"-f")
            r.do(os.lseek, other, 0, os.SEEK_CUR)
            r.close(other)
            r.close(plain)
        r.close(fd)
        r.read("f")
        # the end an appender writes at includes another descriptor's buffered writes
        plain = r.open("f", os.O_WRONLY)
        fd = r.open("f", os.O_WRONLY | os.O_APPEND)
        if plain is not None and fd is not None:
            r.do(os.pwrite, plain, b"<grown>", 17)
            r.do(os.write, fd, b"<appended>")
            r.close(plain)
            r.close(fd)
        r.read("f")
        fd = r.open("rw", os.O_RDWR | os.O_APPEND | os.O_CREAT)
        if fd is not None:
            r.do(os.write, fd, b"one")
            r.do(os.write, fd, b"two")
            r.do(os.pread, fd, 100, 0)
            r.do(os.lseek, fd, 1, os.SEEK_SET)
            r.do(os.read, fd, 2)
            r.close(fd)
        r.read("rw")

    posix(s)


def test_unlink_while_open(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.write("f", b"data")
        fd = r.open("f", os.O_RDWR)
        assert fd is not None
        r.do(os.unlink, "f")
        r.stat("f", expect="!ENOENT")
        r.listdir()
        r.do(os.fstat, fd)  # nlink 0
        r.do(os.pread, fd, 100, 0)
        r.do(os.pwrite, fd, b"more", 4)
        r.do(os.fsync, fd)
        r.do(os.pread, fd, 100, 0)
        r.do(os.fchmod, fd, 0o600)
        r.do(os.ftruncate, fd, 6)
        r.do(os.fstat, fd)
        r.do(_link_fd, fd, "revived", expect="!ENOENT")  # an unlinked file cannot get a name back
        r.write("f", b"new")  # the name is free for a new, separate file
        r.read("f")
        r.do(os.pread, fd, 100, 0)
        r.close(fd)
        r.read("f")
        # unlinked with its data still buffered
        fd = r.open("g", RDWR_CREAT)
        assert fd is not None
        r.do(os.write, fd, b"pending")
        r.do(os.unlink, "g")
        r.do(os.pread, fd, 100, 0)
        r.do(os.fstat, fd)
        r.close(fd)
        # the last link of a hard-linked open file
        r.write("h", b"hh")
        r.do(os.link, "h", "h2")
        fd = r.open("h", os.O_RDONLY)
        r.do(os.unlink, "h")
        r.do(os.unlink, "h2")
        if fd is not None:
            r.do(os.fstat, fd)
            r.do(os.read, fd, 10)
            r.close(fd)
        r.listdir()

    posix(s)


def test_flush_fsync_release(posix: Run) -> None:
    def s(r: Recorder) -> None:
        fd = r.open("f", RDWR_CREAT)
        assert fd is not None
        r.do(os.write, fd, b"abc")
        r.do(os.fsync, fd)
        r.do(os.fdatasync, fd)
        dup = r.adopt(os.dup(fd), "dup")
        r.do(os.write, fd, b"def")
        r.close(dup)  # flush of one descriptor commits the file
        r.read("f")
        r.do(os.write, fd, b"ghi")
        r.close(fd)
        r.do(os.close, fd, expect="!EBADF")
        r.read("f")
        fd = r.open("f", os.O_RDONLY)
        if fd is not None:
            r.do(os.fsync, fd)
            r.close(fd)
        fd = r.open(".", os.O_RDONLY | os.O_DIRECTORY)
        if fd is not None:
            r.do(os.fsync, fd)  # fsyncdir
            r.close(fd)
        with open("py", "wb") as f:  # buffered writes reach the file by close
            f.write(b"x" * 100_000)
            f.flush()
            r.do(os.fstat, f.fileno())
        r.stat("py")

    posix(s)


# ---- attributes: mode, owner, times --------------------------------------------------------


def test_chmod_chown_as_root(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.write("f", b"#!/bin/sh\n")
        for mode in (0o7777, 0o4755, 0o2755, 0o1644, 0o000, 0o640):
            r.do(os.chmod, "f", mode)
            r.stat("f")
        r.do(os.chown, "f", 65534, 65534)
        r.stat("f")
        r.do(os.chown, "f", -1, OTHER_GID)
        r.stat("f")
        r.do(os.chown, "f", 0, -1)
        r.stat("f")
        r.do(os.chmod, "missing", 0o644, expect="!ENOENT")
        # chown drops set-user-ID, and set-group-ID when group-executable, even for root
        r.do(os.chmod, "f", 0o6755)
        r.do(os.chown, "f", 65534, -1)
        r.stat("f")
        r.do(os.chmod, "f", 0o6745)  # setgid without group exec: a locking mark, kept for root
        r.do(os.chown, "f", 0, 0)
        r.stat("f")
        # root writing and truncating keeps them (CAP_FSETID)
        r.do(os.chmod, "f", 0o6755)
        r.write("f", b"more", os.O_WRONLY | os.O_APPEND)
        r.do(os.truncate, "f", 2)
        r.stat("f")
        # directories
        r.do(os.mkdir, "d")
        r.do(os.chmod, "d", 0o3777)
        r.do(os.chown, "d", 65534, OTHER_GID)
        r.stat("d")
        fd = r.open("f", os.O_RDONLY)
        if fd is not None:
            r.do(os.fchmod, fd, 0o604)
            r.do(os.fchown, fd, 1, 2)
            r.do(os.fstat, fd)
            r.close(fd)
        r.do(os.symlink, "f", "l")
        r.do(os.chmod, "l", 0o600)  # follows the link
        r.stat("f")
        r.stat("l", follow=False)

    posix(s)


def test_setgid_directory_as_root(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "g")
        r.do(os.chown, "g", 0, OTHER_GID)
        r.do(os.chmod, "g", 0o2775)
        r.do(os.mkdir, "g/sub")
        r.stat("g/sub")  # group of the directory, and setgid too
        r.write("g/f", b"x")
        r.stat("g/f")
        r.do(os.mkfifo, "g/fifo")
        r.stat("g/fifo")
        r.do(os.symlink, "f", "g/l")
        r.stat("g/l", follow=False)
        r.do(os.mkdir, "g/sub/deeper")
        r.stat("g/sub/deeper")

    posix(s)


def test_root_access(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.write("none", b"x", mode=0o000)
        r.do(os.chmod, "none", 0o000)
        r.write("x_other", b"x")
        r.do(os.chmod, "x_other", 0o001)
        r.do(os.mkdir, "dir", 0o000)
        r.do(os.chmod, "dir", 0o000)
        for path in ("none", "x_other", "dir", "missing"):
            for name, mode in (("F", os.F_OK), ("R", os.R_OK), ("W", os.W_OK), ("X", os.X_OK),
                               ("RWX", os.R_OK | os.W_OK | os.X_OK)):
                r.do(os.access, path, mode, label=f"access({path!r}, {name})")
        r.read("none")  # root reads and writes whatever the mode
        r.write("none", b"y", os.O_WRONLY | os.O_APPEND)
        r.read("none")
        r.write("dir/f", b"in a 000 dir")
        r.listdir("dir")

    posix(s)


def test_times(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "d")
        r.write("d/f", b"x")
        r.set_past("d", "d/f")
        d0, f0 = r.times("d"), r.times("d/f")
        # write: mtime and ctime of the file; not the directory
        fd = r.open("d/f", os.O_WRONLY)
        assert fd is not None
        r.do(os.write, fd, b"more")
        f1 = r.times("d/f")
        r.relation("write (still open)", f0, f1, "mtime", "advanced")
        r.relation("write (still open)", f0, f1, "ctime", "advanced")
        r.close(fd)
        f2 = r.times("d/f")
        r.relation("close after write", f1, f2, "mtime", "unchanged")
        r.relation("write", d0, r.times("d"), "mtime", "unchanged")
        # read changes neither mtime nor ctime
        r.set_past("d/f")
        f0 = r.times("d/f")
        r.read("d/f")
        f1 = r.times("d/f")
        r.relation("read", f0, f1, "mtime", "unchanged")
        r.relation("read", f0, f1, "ctime", "unchanged")
        # chmod, chown, setxattr: ctime only
        for what, op in (("chmod", lambda: os.chmod("d/f", 0o600)), ("chown", lambda: os.chown("d/f", 1, 1)),
                         ("setxattr", lambda: os.setxattr("d/f", "user.t", b"v"))):
            before = r.times("d/f")
            time.sleep(TICK_S)
            r.do(op, label=what)
            after = r.times("d/f")
            r.relation(what, before, after, "ctime", "advanced")
            r.relation(what, before, after, "mtime", "unchanged")
        # utime: explicit times are kept exactly; utime(None) means now
        r.do(os.utime, "d/f", ns=(1_234_567_891_000, 2_345_678_912_000))
        st = r.times("d/f")
        r.note("explicit times", (st.st_atime_ns, st.st_mtime_ns), expect=(1_234_567_891_000, 2_345_678_912_000))
        # explicit times set while writes are buffered win over those writes (cp -p)
        fd = r.open("d/f", os.O_WRONLY)
        if fd is not None:
            r.do(os.write, fd, b"buffered")
            r.do(os.utime, fd, ns=(3_000_000_000, 4_000_000_000))
            r.close(fd)
        st = r.times("d/f")
        r.note("explicit times after buffered writes", (st.st_atime_ns, st.st_mtime_ns),
               expect=(3_000_000_000, 4_000_000_000))
        r.do(os.utime, "d/f", None)
        r.relation("utime(None)", st, r.times("d/f"), "mtime", "advanced")
        r.relation("utime(None)", st, r.times("d/f"), "ctime", "advanced")
        # entries made and removed: the directory's mtime and ctime
        for what, op in (("create", lambda: open("d/new", "wb").close()), ("mkdir", lambda: os.mkdir("d/sub")),
                         ("symlink", lambda: os.symlink("x", "d/sym")), ("link", lambda: os.link("d/f", "d/f2")),
                         ("unlink", lambda: os.unlink("d/f2")), ("rmdir", lambda: os.rmdir("d/sub")),
                         ("rename within", lambda: os.rename("d/new", "d/new2"))):
            r.set_past("d")
            before = r.times("d")
            r.do(op, label=what)
            after = r.times("d")
            r.relation(f"{what}: directory", before, after, "mtime", "advanced")
            r.relation(f"{what}: directory", before, after, "ctime", "advanced")

    recs = posix(s)
    # appendfs does not update atime on read (as if mounted noatime: a read must not become
    # a metadata write); ext4's relatime does, so this is asserted on the mount alone.
    mount_root = recs["mount"].root
    p = mount_root / "d" / "f"
    os.utime(p, ns=(5_000_000_000, 6_000_000_000))
    p.read_bytes()
    assert os.stat(p).st_atime_ns == 5_000_000_000


# ---- directories ---------------------------------------------------------------------------


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


def _read_names(dirp: int, n: int | None) -> list[str]:
    out: list[str] = []
    while n is None or len(out) < n:
        ent = _libc.readdir(dirp)
        if not ent:
            break
        name = ent.contents.d_name.decode()
        if name not in (".", ".."):  # POSIX lets a file system omit them; the mount does
            out.append(name)
    return out


def test_readdir(posix: Run) -> None:
    names = [f"{i:04d}-{'x' * (i % 50)}" for i in range(300)]  # several kernel readdir pages

    def s(r: Recorder) -> None:
        r.do(os.mkdir, "big")
        for n in names:
            os.close(os.open(f"big/{n}", os.O_WRONLY | os.O_CREAT, 0o644))
        r.listdir("big")
        r.do(os.mkdir, "kinds")
        r.write("kinds/file", b"f")
        r.do(os.mkdir, "kinds/dir")
        r.do(os.symlink, "file", "kinds/link")
        r.do(os.mkfifo, "kinds/fifo")
        r.do(os.mknod, "kinds/chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        r.do(lambda: sorted((e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                             e.is_symlink()) for e in os.scandir("kinds")), label="scandir types")
        r.listdir("kinds/file", expect="!ENOTDIR")
        r.listdir("missing", expect="!ENOENT")
        r.listdir("kinds/dir", expect=[])
        # telldir / seekdir / rewinddir
        dirp = _libc.opendir(b"big")
        assert dirp
        try:
            first = _read_names(dirp, 100)
            pos = _libc.telldir(dirp)
            ahead = _read_names(dirp, 50)
            _libc.seekdir(dirp, pos)
            again = _read_names(dirp, 50)
            r.note("seekdir(telldir()) continues at the same entry", again == ahead and len(ahead) == 50,
                   expect=True)
            rest = _read_names(dirp, None)
            r.note("one pass lists every entry once", sorted(first + ahead + rest) == sorted(names), expect=True)
            _libc.rewinddir(dirp)
            r.note("rewinddir lists them again", sorted(_read_names(dirp, None)) == sorted(names), expect=True)
        finally:
            _libc.closedir(dirp)
        # entries removed during a listing: the others are still listed exactly once
        it = os.scandir("big")
        seen = [next(it).name for _ in range(10)]
        for n in names[200:250]:
            os.unlink(f"big/{n}")
        seen += [e.name for e in it]
        it.close()
        kept = set(names[:200] + names[250:])
        r.note("listing during unlinks", kept <= set(seen) and len(seen) == len(set(seen)), expect=True)

    posix(s)


# ---- names ---------------------------------------------------------------------------------


def test_name_lengths(posix: Run) -> None:
    n255 = "n" * 255
    euro255 = "€" * 85  # 3 bytes each: 255 bytes
    mixed255 = "é" * 127 + "x"
    n256 = "n" * 256
    euro258 = "€" * 86

    def s(r: Recorder) -> None:
        for n in (n255, euro255, mixed255):
            r.write(n, n.encode())
            r.stat(n)
            r.read(n)
        r.do(os.mkdir, "d")
        r.do(os.mkdir, "d/" + n255)
        r.do(os.rename, n255, "d/" + n255 + "/" + "m" * 255)
        r.do(os.symlink, euro255, "s" * 255)
        r.read("s" * 255)
        r.do(os.link, mixed255, "d/" + "l" * 255)
        r.listdir()
        r.listdir("d")
        for n in (n256, euro258):
            r.open(n, os.O_WRONLY | os.O_CREAT, expect="!ENAMETOOLONG")
            r.stat(n, expect="!ENAMETOOLONG")
            r.do(os.mkdir, n, expect="!ENAMETOOLONG")
            r.do(os.mkfifo, n, expect="!ENAMETOOLONG")
            r.do(os.symlink, "x", n, expect="!ENAMETOOLONG")
            r.do(os.link, euro255, n, expect="!ENAMETOOLONG")
            r.do(os.rename, euro255, n, expect="!ENAMETOOLONG")
            r.do(os.unlink, n, expect="!ENAMETOOLONG")
            r.do(os.rmdir, n, expect="!ENAMETOOLONG")
        r.stat(n256 + "/x", expect="!ENAMETOOLONG")
        r.do(os.symlink, n256, "to_long")
        r.stat("to_long", expect="!ENAMETOOLONG")
        for n in ("a\nb", "\udcff\udcfe", " ", "-x", "*?[", "\t"):  # any byte but '/' and NUL
            r.write(n, os.fsencode(n))
            r.read(n)
        r.do(lambda: sorted(os.listdir(b".")), label="listdir(b'.')")
        r.do(os.setxattr, euro255, "user." + "a" * 250, b"v")
        r.do(os.getxattr, euro255, "user." + "a" * 250)
        r.do(os.setxattr, euro255, "user." + "a" * 251, b"v", expect="!ERANGE")
        r.listdir()

    posix(s)


# ---- xattrs --------------------------------------------------------------------------------


def test_xattrs(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.write("f", b"f")
        r.do(os.mkdir, "d")
        r.do(os.listxattr, "f", expect=[])
        r.do(os.setxattr, "f", "user.a", b"1")
        r.do(os.getxattr, "f", "user.a", expect=b"1")
        r.do(os.setxattr, "f", "user.empty", b"")
        r.do(os.getxattr, "f", "user.empty", expect=b"")
        r.do(os.setxattr, "f", "user.bin", bytes(range(256)) * 4)
        r.do(os.getxattr, "f", "user.bin")
        r.do(lambda p: sorted(os.listxattr(p)), "f", label="listxattr(f)")
        r.do(os.setxattr, "f", "user.a", b"22")
        r.do(os.getxattr, "f", "user.a", expect=b"22")
        r.do(os.setxattr, "f", "user.a", b"3", os.XATTR_CREATE, expect="!EEXIST")
        r.do(os.setxattr, "f", "user.none", b"3", os.XATTR_REPLACE, expect="!ENODATA")
        r.do(os.setxattr, "f", "user.a", b"4", os.XATTR_REPLACE)
        r.do(os.setxattr, "f", "user.new", b"5", os.XATTR_CREATE)
        r.do(os.getxattr, "f", "user.a", expect=b"4")
        r.do(os.getxattr, "f", "user.none", expect="!ENODATA")
        r.do(os.removexattr, "f", "user.none", expect="!ENODATA")
        r.do(os.removexattr, "f", "user.a")
        r.do(os.getxattr, "f", "user.a", expect="!ENODATA")
        r.do(lambda p: sorted(os.listxattr(p)), "f", label="listxattr(f)")
        r.do(os.setxattr, "d", "user.dir", b"on a directory")
        r.do(os.getxattr, "d", "user.dir")
        r.do(os.listxattr, "d")
        r.do(os.getxattr, "missing", "user.a", expect="!ENOENT")
        r.do(os.setxattr, "f", "", b"x", expect="!ERANGE")
        r.do(os.setxattr, "f", "user.", b"x", expect="!EINVAL")
        # user.* is for files and directories only
        r.do(os.symlink, "f", "l")
        r.do(os.setxattr, "l", "user.x", b"x", follow_symlinks=False, expect="!EPERM")
        r.do(os.setxattr, "l", "user.via", b"target")  # follows to f
        r.do(os.getxattr, "f", "user.via")
        r.do(os.mkfifo, "p")
        r.do(os.setxattr, "p", "user.x", b"x", expect="!EPERM")
        # trusted.* for root; names outside the known namespaces are refused
        r.do(os.setxattr, "f", "trusted.t", b"root only")
        r.do(os.getxattr, "f", "trusted.t")
        r.do(os.setxattr, "f", "nonamespace", b"x", expect="!EOPNOTSUPP")
        r.do(os.setxattr, "f", "other.ns", b"x", expect="!EOPNOTSUPP")
        r.do(os.getxattr, "f", "other.ns", expect="!EOPNOTSUPP")
        r.do(os.removexattr, "f", "other.ns", expect="!EOPNOTSUPP")
        r.do(os.getxattr, "f", "user.", expect="!EINVAL")
        r.do(os.removexattr, "f", "user.", expect="!EINVAL")
        r.do(os.getxattr, "f", "system.posix_acl_access", expect="!ENODATA")
        r.do(lambda p: sorted(os.listxattr(p)), "f", label="listxattr(f)")
        # xattrs go with the inode: through a hard link, and gone with it
        r.do(os.link, "f", "f2")
        r.do(os.getxattr, "f2", "user.new")
        r.do(os.unlink, "f")
        r.do(os.unlink, "f2")
        r.write("f", b"again")
        r.do(os.listxattr, "f", expect=[])

    recs = posix(s)
    f = recs["mount"].root / "f"
    # POSIX ACLs are not supported (mount/ops.py setxattr): setting one is EOPNOTSUPP, so
    # tools such as cp -a and rsync -A fall back to the mode bits. ext4 would accept it.
    acl = (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + (0xFFFFFFFF).to_bytes(4, "little")
        for tag, perm in ((0x01, 6), (0x04, 4), (0x20, 4)))
    with pytest.raises(OSError) as exc:
        os.setxattr(f, "system.posix_acl_access", acl)
    assert exc.value.errno == errno.EOPNOTSUPP
    # values up to the kernel's XATTR_SIZE_MAX (64 KiB; ext4 stops at a block)
    os.setxattr(f, "user.big", b"v" * 65536)
    assert os.getxattr(f, "user.big") == b"v" * 65536
    with pytest.raises(OSError) as exc:
        os.setxattr(f, "user.toobig", b"v" * 65537)
    assert exc.value.errno == errno.E2BIG


def test_redundancy_xattr_is_inherited(module_mount: Mount) -> None:
    """appendfs's own xattr (DESIGN §4): a directory's policy goes to new files and subdirectories."""
    d = module_mount.path / "test_redundancy_xattr_is_inherited"
    d.mkdir()
    key = "user.appendfs.redundancy"
    with pytest.raises(OSError) as exc:
        os.getxattr(d, key)
    assert exc.value.errno == errno.ENODATA
    (d / "before").write_bytes(b"made before the policy")
    os.setxattr(d, key, b"rep:2")
    assert os.getxattr(d, key) == b"rep:2"
    (d / "f").write_bytes(b"x" * 10000)
    assert os.getxattr(d / "f", key) == b"rep:2"
    assert key in os.listxattr(d / "f")
    assert (d / "f").read_bytes() == b"x" * 10000
    (d / "sub").mkdir()
    assert os.getxattr(d / "sub", key) == b"rep:2"
    (d / "sub" / "g").write_bytes(b"g")
    assert os.getxattr(d / "sub" / "g", key) == b"rep:2"
    with pytest.raises(OSError) as exc:
        os.getxattr(d / "before", key)
    assert exc.value.errno == errno.ENODATA
    for bad in (b"rep:x", b"", b"rep:", b"mirror", b"\xff"):
        with pytest.raises(OSError) as exc:
            os.setxattr(d, key, bad)
        assert exc.value.errno == errno.EINVAL, bad
    with pytest.raises(OSError) as exc:  # more fragments than the erasure code supports (fs.check_policy)
        os.setxattr(d, key, b"ec:30+3")
    assert exc.value.errno == errno.EINVAL
    assert os.getxattr(d, key) == b"rep:2"
    os.setxattr(d, key, b"ec:4+2")  # accepted (files written here need 6 DataNodes: tests/integration/store/test_ec.py)
    assert os.getxattr(d, key) == b"ec:4+2"
    os.setxattr(d, key, b"rep:1")
    (d / "h").write_bytes(b"h")
    assert os.getxattr(d / "h", key) == b"rep:1"
    os.removexattr(d, key)
    (d / "k").write_bytes(b"k")
    with pytest.raises(OSError) as exc:
        os.getxattr(d / "k", key)
    assert exc.value.errno == errno.ENODATA


# ---- statfs --------------------------------------------------------------------------------


def test_statfs(module_mount: Mount) -> None:
    d = module_mount.path / "test_statfs"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 100_000)
    for target in (module_mount.path, d, d / "f"):
        st = os.statvfs(target)
        assert st.f_namemax == 255
        assert st.f_bsize > 0 and st.f_frsize > 0
        assert st.f_blocks > 0
        assert 0 <= st.f_bavail <= st.f_bfree <= st.f_blocks
        assert 0 < st.f_ffree <= st.f_files
        assert st.f_favail <= st.f_ffree
    assert os.pathconf(d, "PC_NAME_MAX") == 255
    with open(d / "f", "rb") as f:
        assert os.fstatvfs(f.fileno()).f_namemax == 255
    # the mount's size is the cluster's usable space: no more than the disks behind it
    local = os.statvfs(module_mount.cluster.root)
    assert st.f_blocks * st.f_frsize <= local.f_blocks * local.f_frsize
