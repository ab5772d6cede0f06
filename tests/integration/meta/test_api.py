"""The namespace API on both engines: each POSIX operation, its errors, data maps, listing."""

from __future__ import annotations

import errno
import stat

import pytest
import sqlalchemy as sa

from appendfs.db import make_engine
from appendfs.errors import NotFormatted, VersionMismatch
from appendfs.meta import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    SCHEMA_VERSION,
    XATTR_CREATE,
    XATTR_REPLACE,
    FsError,
    Meta,
    NewSlice,
    Segment,
    check_schema,
    create_schema,
)


def err(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.errno


def test_schema_version_is_checked(meta_url: str) -> None:
    engine = make_engine(meta_url)
    with pytest.raises(NotFormatted, match="appendfs format"):
        check_schema(engine)
    with pytest.raises(NotFormatted):
        Meta(engine)
    create_schema(engine)
    create_schema(engine)  # idempotent
    check_schema(engine)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE meta_schema SET version = :v"), {"v": SCHEMA_VERSION + 1})
    with pytest.raises(VersionMismatch, match=f"version {SCHEMA_VERSION + 1}"):
        check_schema(engine)
    with pytest.raises(VersionMismatch):
        create_schema(engine)
    engine.dispose()


def test_create_lookup_getattr_readdir(meta: Meta) -> None:
    d = meta.mkdir(ROOT_INO, b"dir", 0o40755, 1000, 1000)
    assert d.is_dir and d.mode == 0o755 and d.nlink == 2 and d.parent == ROOT_INO
    assert meta.getattr(ROOT_INO).nlink == 3
    f = meta.create(d.ino, b"file", 0o644, 1000, 100)
    assert f.kind == stat.S_IFREG and f.nlink == 1 and (f.uid, f.gid) == (1000, 100)
    assert meta.lookup(d.ino, b"file") == f == meta.getattr(f.ino)
    with pytest.raises(FsError) as e:
        meta.create(d.ino, b"file", 0o644, 0, 0)
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        meta.lookup(d.ino, b"nope")
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        meta.lookup(f.ino, b"x")
    assert err(e) == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        meta.lookup(10**12, b"x")  # no such directory at all (one statement answers all three cases)
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        meta.create(f.ino, b"x", 0o644, 0, 0)
    assert err(e) == errno.ENOTDIR
    fifo = meta.mknod(d.ino, b"fifo", stat.S_IFIFO | 0o600, 0, 0)
    dev = meta.mknod(d.ino, b"dev", stat.S_IFCHR | 0o600, 0, 0, rdev=0x0103)
    assert fifo.kind == stat.S_IFIFO and dev.rdev == 0x0103
    names = [e.name for e in meta.readdir(d.ino)]
    assert names == [b"dev", b"fifo", b"file"]
    plus = meta.readdir(d.ino, plus=True)
    assert [e.attr for e in plus] == [meta.getattr(e.ino) for e in plus]
    with pytest.raises(FsError) as e:
        meta.readdir(f.ino)
    assert err(e) == errno.ENOTDIR
    assert meta.statfs().used_inodes == 5


def test_readdir_cursor_survives_inserts_and_deletes(meta: Meta) -> None:
    d = meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    names = [b"%03d" % i for i in range(0, 60, 2)]
    for n in names:
        meta.create(d.ino, n, 0o644, 0, 0)
    seen: list[bytes] = []
    after = None
    i = 0
    while True:
        page = meta.readdir(d.ino, after, limit=7)
        if not page:
            break
        seen += [e.name for e in page]
        after = page[-1].name
        meta.create(d.ino, b"%03d" % (2 * i + 1), 0o644, 0, 0)  # new names on both sides
        meta.unlink(d.ino, b"%03d" % (58 - 2 * i))  # delete entries not yet listed
        i += 1
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    survivors = [n for n in names if n not in {b"%03d" % (58 - 2 * k) for k in range(i)}]
    assert set(survivors) <= set(seen)


def test_unlink_rmdir(meta: Meta) -> None:
    d = meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    sub = meta.mkdir(d.ino, b"sub", 0o755, 0, 0)
    meta.create(sub.ino, b"f", 0o644, 0, 0)
    with pytest.raises(FsError) as e:
        meta.rmdir(d.ino, b"sub")
    assert err(e) == errno.ENOTEMPTY
    with pytest.raises(FsError) as e:
        meta.unlink(d.ino, b"sub")
    assert err(e) == errno.EISDIR
    with pytest.raises(FsError) as e:
        meta.rmdir(sub.ino, b"f")
    assert err(e) == errno.ENOTDIR
    meta.unlink(sub.ino, b"f")
    assert meta.getattr(d.ino).nlink == 3
    meta.rmdir(d.ino, b"sub")
    assert meta.getattr(d.ino).nlink == 2
    with pytest.raises(FsError) as e:
        meta.getattr(sub.ino)
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        meta.unlink(d.ino, b"sub")
    assert err(e) == errno.ENOENT


def test_symlink_link(meta: Meta) -> None:
    s = meta.symlink(ROOT_INO, b"s", b"../target/x", 0, 0)
    assert s.kind == stat.S_IFLNK and s.size == len(b"../target/x")
    assert meta.readlink(s.ino) == b"../target/x"
    f = meta.create(ROOT_INO, b"f", 0o644, 0, 0)
    with pytest.raises(FsError) as e:
        meta.readlink(f.ino)
    assert err(e) == errno.EINVAL
    a = meta.link(f.ino, ROOT_INO, b"g")
    assert a.nlink == 2 and meta.lookup(ROOT_INO, b"g").ino == f.ino
    with pytest.raises(FsError) as e:
        meta.link(f.ino, ROOT_INO, b"s")
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        meta.link(ROOT_INO, ROOT_INO, b"x")
    assert err(e) == errno.EPERM
    meta.unlink(ROOT_INO, b"f")
    assert meta.getattr(f.ino).nlink == 1
    meta.unlink(ROOT_INO, b"s")
    with pytest.raises(FsError):
        meta.readlink(s.ino)


def test_resolve_path(meta: Meta) -> None:
    a = meta.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    b = meta.mkdir(a.ino, b"b", 0o755, 0, 0)
    f = meta.create(b.ino, b"f", 0o644, 0, 0)
    meta.symlink(ROOT_INO, b"l", b"a/b", 0, 0)
    meta.symlink(ROOT_INO, b"loop", b"loop", 0, 0)
    assert meta.resolve_path(b"/a/b/f").ino == f.ino
    assert meta.resolve_path(b"l/f").ino == f.ino
    assert meta.resolve_path(b"a/b/../b/./f").ino == f.ino
    with pytest.raises(FsError) as e:
        meta.resolve_path(b"a/b/f/x")
    assert err(e) == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        meta.resolve_path(b"loop/x")
    assert err(e) == errno.ELOOP
    with pytest.raises(FsError) as e:
        meta.resolve_path(b"a/nope/f")
    assert err(e) == errno.ENOENT


def test_rename(meta: Meta) -> None:
    a = meta.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    b = meta.mkdir(ROOT_INO, b"b", 0o755, 0, 0)
    f = meta.create(a.ino, b"f", 0o644, 0, 0)
    g = meta.create(b.ino, b"g", 0o644, 0, 0)
    meta.rename(a.ino, b"f", b.ino, b"f2")
    assert meta.lookup(b.ino, b"f2").ino == f.ino
    with pytest.raises(FsError) as e:
        meta.rename(b.ino, b"f2", b.ino, b"g", RENAME_NOREPLACE)
    assert err(e) == errno.EEXIST
    meta.rename(b.ino, b"f2", b.ino, b"g", RENAME_EXCHANGE)
    assert meta.lookup(b.ino, b"g").ino == f.ino and meta.lookup(b.ino, b"f2").ino == g.ino
    meta.rename(b.ino, b"f2", b.ino, b"g")  # replace: g (== f) loses its last link
    assert meta.lookup(b.ino, b"g").ino == g.ino
    with pytest.raises(FsError):
        meta.getattr(f.ino)
    assert [q[0] for q in meta.delete_queue()] == [f.ino]
    # directories: move, replace empty dir, refuse non-empty, own subtree, EXCHANGE across
    c = meta.mkdir(a.ino, b"c", 0o755, 0, 0)
    meta.rename(a.ino, b"c", b.ino, b"c")
    assert meta.getattr(c.ino).parent == b.ino
    assert (meta.getattr(a.ino).nlink, meta.getattr(b.ino).nlink) == (2, 3)
    with pytest.raises(FsError) as e:
        meta.rename(ROOT_INO, b"b", c.ino, b"x")
    assert err(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        meta.rename(ROOT_INO, b"b", b.ino, b"x")
    assert err(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        meta.rename(ROOT_INO, b"a", b.ino, b"g")
    assert err(e) == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        meta.rename(b.ino, b"g", ROOT_INO, b"a")
    assert err(e) == errno.EISDIR
    meta.create(a.ino, b"x", 0o644, 0, 0)
    with pytest.raises(FsError) as e:
        meta.rename(b.ino, b"c", ROOT_INO, b"a")
    assert err(e) == errno.ENOTEMPTY
    with pytest.raises(FsError) as e:
        meta.rename(ROOT_INO, b"a", c.ino, b"a", RENAME_EXCHANGE)
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        meta.rename(ROOT_INO, b"a", ROOT_INO, b"z", RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert err(e) == errno.EINVAL
    meta.rename(ROOT_INO, b"a", b.ino, b"g", RENAME_EXCHANGE)  # dir a <-> file g across dirs
    assert meta.getattr(a.ino).parent == b.ino and meta.lookup(ROOT_INO, b"a").ino == g.ino
    assert (meta.getattr(ROOT_INO).nlink, meta.getattr(b.ino).nlink) == (3, 4)
    e2 = meta.mkdir(ROOT_INO, b"e", 0o755, 0, 0)
    meta.rename(b.ino, b"c", ROOT_INO, b"e")  # replace the empty dir e by c
    assert meta.lookup(ROOT_INO, b"e").ino == c.ino
    with pytest.raises(FsError):
        meta.getattr(e2.ino)
    meta.rename(ROOT_INO, b"e", ROOT_INO, b"e")  # no-op


def test_setattr_and_truncate(meta: Meta) -> None:
    f = meta.create(ROOT_INO, b"f", 0o644, 0, 0)
    a = meta.setattr(f.ino, mode=0o100600, uid=5, gid=6, atime_ns=11, mtime_ns=22)
    assert (a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns) == (0o600, 5, 6, 11, 22)
    assert a.gen > f.gen and a.ctime_ns >= f.ctime_ns
    meta.commit_slices(f.ino, [NewSlice(0, 100, 7, 0), NewSlice(100, 100, 8, 0)])
    assert meta.getattr(f.ino).size == 200
    meta.setattr(f.ino, size=150)
    assert meta.read_map(f.ino, 0, 1000) == [Segment(0, 100, 7, 0), Segment(100, 50, 8, 0)]
    meta.setattr(f.ino, size=300)  # extending leaves a hole that reads as zeros
    assert meta.read_map(f.ino, 140, 20) == [Segment(140, 10, 8, 40), Segment(150, 10, None)]
    meta.setattr(f.ino, size=50)
    assert [s.length for s in meta.slices(f.ino)[1]] == [50]
    d = meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    with pytest.raises(FsError) as e:
        meta.setattr(d.ino, size=0)
    assert err(e) == errno.EISDIR
    with pytest.raises(FsError) as e:
        meta.setattr(999_999, mode=0)
    assert err(e) == errno.ENOENT


def test_slices_later_wins_compact_gc(meta: Meta) -> None:
    f = meta.create(ROOT_INO, b"f", 0o644, 0, 0)
    meta.commit_slices(f.ino, [NewSlice(0, 1000, 1, 0)])
    a = meta.commit_slices(f.ino, [NewSlice(100, 100, 2, 0), NewSlice(150, 100, 2, 500)])
    assert a.size == 1000 and a.slice_seq == 3
    assert meta.read_map(f.ino, 0, 1000) == [
        Segment(0, 100, 1, 0),
        Segment(100, 50, 2, 0),
        Segment(150, 100, 2, 500),
        Segment(250, 750, 1, 250),
    ]
    assert meta.referenced_bytes([1, 2, 3]) == {1: 1000, 2: 200, 3: 0}
    assert meta.live_bytes([1, 2, 3]) == {1: 850, 2: 150, 3: 0}
    assert meta.compact(f.ino) == (3, 3)  # 4 visible pieces, so no gain
    meta.commit_slices(f.ino, [NewSlice(0, 1000, 3, 0)])
    assert meta.compact(f.ino) == (4, 1)
    assert meta.referenced_bytes([1, 2, 3]) == {1: 0, 2: 0, 3: 1000}
    [(ino, s)] = meta.slices_in_extent(3)
    assert ino == f.ino
    assert meta.repoint_slice(f.ino, s, 9, 4096)
    assert not meta.repoint_slice(f.ino, s, 10, 0)  # identity changed: refused
    assert meta.read_map(f.ino, 0, 10) == [Segment(0, 10, 9, 4096)]
    _, _cur = meta.slices(f.ino)
    seq = meta.getattr(f.ino).slice_seq
    assert meta.replace_slices(f.ino, seq, [NewSlice(0, 1000, 11, 0)])
    assert not meta.replace_slices(f.ino, seq, [NewSlice(0, 1000, 12, 0)])
    assert meta.read_map(f.ino, 0, 1000) == [Segment(0, 1000, 11, 0)]
    big = (1 << 64) - 5  # u64 extent ids survive the signed column
    meta.commit_slices(f.ino, [NewSlice(0, 10, big, 0)])
    assert meta.read_map(f.ino, 0, 10) == [Segment(0, 10, big, 0)]
    assert meta.live_bytes([big]) == {big: 10}
    d = meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    with pytest.raises(FsError) as e:
        meta.commit_slices(d.ino, [NewSlice(0, 1, 1, 0)])
    assert err(e) == errno.EISDIR
    meta.unlink(ROOT_INO, b"f")
    assert meta.live_bytes([11, big]) == {11: 0, big: 0}
    assert meta.statfs().pending_delete_bytes == 1000
    while not meta.purge_deleted(f.ino, batch=1):
        pass
    assert meta.delete_queue() == [] and meta.referenced_bytes([11]) == {11: 0}


def test_xattrs(meta: Meta) -> None:
    f = meta.create(ROOT_INO, b"f", 0o644, 0, 0)
    meta.setxattr(f.ino, b"user.a", b"1")
    with pytest.raises(FsError) as e:
        meta.setxattr(f.ino, b"user.a", b"2", XATTR_CREATE)
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        meta.setxattr(f.ino, b"user.b", b"2", XATTR_REPLACE)
    assert err(e) == errno.ENODATA
    meta.setxattr(f.ino, b"user.a", b"3", XATTR_REPLACE)
    meta.setxattr(f.ino, b"user.b", b"", XATTR_CREATE)
    assert meta.getxattr(f.ino, b"user.a") == b"3" and meta.getxattr(f.ino, b"user.b") == b""
    assert meta.listxattr(f.ino) == [b"user.a", b"user.b"]
    meta.removexattr(f.ino, b"user.a")
    with pytest.raises(FsError) as e:
        meta.getxattr(f.ino, b"user.a")
    assert err(e) == errno.ENODATA
    with pytest.raises(FsError) as e:
        meta.removexattr(f.ino, b"user.a")
    assert err(e) == errno.ENODATA
    with pytest.raises(FsError) as e:
        meta.setxattr(f.ino, b"x" * 256, b"")
    assert err(e) == errno.ERANGE
    with pytest.raises(FsError) as e:
        meta.setxattr(f.ino, b"user.big", b"x" * 65537)
    assert err(e) == errno.E2BIG
    with pytest.raises(FsError) as e:
        meta.getxattr(12345678, b"user.a")
    assert err(e) == errno.ENOENT
    meta.unlink(ROOT_INO, b"f")


def test_list_subtree(meta: Meta) -> None:
    bucket = meta.mkdir(ROOT_INO, b"bucket", 0o755, 0, 0)
    want = []
    for path in [b"a.txt", b"a/x", b"a/y/z", b"a0", b"b/c", b"empty/"]:
        cur = bucket.ino
        *dirs, leaf = path.split(b"/")
        for d in dirs:
            try:
                cur = meta.lookup(cur, d).ino
            except FsError:
                cur = meta.mkdir(cur, d, 0o755, 0, 0).ino
        if leaf:
            meta.create(cur, leaf, 0o644, 0, 0)
            want.append(path)
    r = meta.list_subtree(bucket.ino)
    assert [o.key for o in r.objects] == sorted(want) == [b"a.txt", b"a/x", b"a/y/z", b"a0", b"b/c"]
    r = meta.list_subtree(bucket.ino, delimiter=b"/")
    assert [o.key for o in r.objects] == [b"a.txt", b"a0"] and r.common_prefixes == [b"a/", b"b/"]
    r = meta.list_subtree(bucket.ino, prefix=b"a/", delimiter=b"/")
    assert [o.key for o in r.objects] == [b"a/x"] and r.common_prefixes == [b"a/y/"]
    r = meta.list_subtree(bucket.ino, start_after=b"a/x", max_keys=2)
    assert (
        [o.key for o in r.objects] == [b"a/y/z", b"a0"]
        and r.is_truncated
        and r.next_start_after == b"a0"
    )
    assert meta.list_subtree(bucket.ino, prefix=b"nope/").objects == []
