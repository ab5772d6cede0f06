"""Namespace transactions: each public function here is the body of ONE transaction.

They take a connection already inside a transaction (see :mod:`appendfs.meta.txn`), read
and write the tables of :mod:`appendfs.meta.schema`, and raise
:class:`~appendfs.meta.errors.FsError` for POSIX errors (the runner then rolls back, so a
failed call changes nothing) or :class:`~appendfs.meta.txn.Retry` when a conditional
update finds the row changed (the runner reruns the whole function).

Locking rules (PostgreSQL; SQLite serializes writers so the clauses are no-ops there):

* Inode rows are locked ``FOR UPDATE`` in ascending ``ino`` order, by one statement
  ``... WHERE ino IN (...) ORDER BY ino FOR UPDATE`` (PostgreSQL locks in output order).
  Entries are read first without locks, then re-verified under the locks; a change in
  between raises Retry.
* A create only takes ``FOR KEY SHARE`` on its parent: concurrent creates in one
  directory do not conflict, while rmdir (``FOR UPDATE`` on the directory) waits for them
  and they fail with ENOENT after it. The parent's mtime is rewritten only when older
  than ``dir_mtime_granularity_ns`` (a ``NO KEY UPDATE`` lock, which KEY SHARE allows).
* A cross-directory move of a directory first locks the ``rename_lock`` counter row, so
  its cycle check walks a tree no other directory move can change.
* Every inode update matches ``(ino, gen)`` and sets ``gen = gen + 1``; a rowcount other
  than 1 raises Retry.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from appendfs.meta import schema
from appendfs.meta.errors import FsError
from appendfs.meta.fastsql import Stmt
from appendfs.meta.txn import Retry
from appendfs.meta.types import Attr, DirEntry, Made, Replaced, StatFs

I = schema.inode  # noqa: E741 - the table names read best short
D = schema.dentry
S = schema.slice_
X = schema.xattr

NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
#: renameat2 flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: setxattr flags (linux/xattr.h), same values as os.XATTR_CREATE / os.XATTR_REPLACE.
XATTR_CREATE = 1
XATTR_REPLACE = 2
#: Deeper than this, an ancestor walk means the tree is corrupt (cycle).
MAX_DEPTH = 100_000

_ATTR_FIELDS = Attr._fields
_ATTR_COLS = [
    I.c.ino,
    I.c.kind,
    I.c.mode,
    I.c.uid,
    I.c.gid,
    I.c.nlink,
    I.c.size,
    I.c.atime_ns,
    I.c.mtime_ns,
    I.c.ctime_ns,
    I.c.rdev,
    I.c.parent,
    I.c.gen,
    I.c.slice_seq,
]
# Hot statements build Attr(*row) from these columns: they must stay in Attr's field order.
assert tuple(c.key for c in _ATTR_COLS) == _ATTR_FIELDS


# --- hot-path statements (built and compiled once; see appendfs.meta.fastsql) --------------
# Result columns of the attr statements are exactly Attr's fields, in order: Attr(*row).

_bp = sa.bindparam


def _attr_select(lock: str | None) -> Stmt:
    def build(_dialect: str) -> Any:
        q = sa.select(*_ATTR_COLS).where(I.c.ino == _bp("b_ino"))
        if lock == "key_share":
            q = q.with_for_update(read=True, key_share=True)
        elif lock == "write":
            q = q.with_for_update(key_share=True)
        elif lock == "delete":
            q = q.with_for_update()
        return q

    return Stmt(build)


_GET_ATTR = {lock: _attr_select(lock) for lock in (None, "key_share", "write", "delete")}


def _lookup_in_dir(_dialect: str) -> Any:
    """The parent's kind, then the child's Attr columns (NULL when the name is absent): a
    negative lookup — the kernel sends one before every create — answers ENOENT or ENOTDIR
    in this one round trip, where a second query for the parent used to follow (~0.3 ms
    on PostgreSQL)."""
    p, c = I.alias("p"), I.alias("c")
    named = sa.and_(D.c.parent == p.c.ino, D.c.name == _bp("b_name"))
    return (
        sa.select(p.c.kind, *(c.c[col.key] for col in _ATTR_COLS))
        .select_from(p.outerjoin(D, named).outerjoin(c, c.c.ino == D.c.ino))
        .where(p.c.ino == _bp("b_parent"))
    )


_LOOKUP = Stmt(_lookup_in_dir)
_GET_DENTRY = Stmt(
    lambda _d: sa.select(D.c.ino, D.c.kind).where(
        D.c.parent == _bp("b_parent"), D.c.name == _bp("b_name")
    )
)


# Names are >= 1 byte, so ``name > b""`` is the first page.
def _readdir_plus(dialect: str) -> Any:
    cond = (D.c.parent == _bp("b_parent"), D.c.name > _bp("b_after"))
    limit = _bp("b_limit", type_=sa.Integer)
    if dialect == "sqlite":
        # SQLite walks the (parent, name) index in order and looks each inode up: no sort.
        return (
            sa.select(D.c.name, D.c.kind, *_ATTR_COLS)
            .select_from(D.join(I, I.c.ino == D.c.ino))
            .where(*cond)
            .order_by(D.c.name)
            .limit(limit)
        )
    # PostgreSQL: the page is cut from the (parent, name) key first and only then joined,
    # so the work is bounded by the page whatever the statistics say (with the stale
    # statistics of a just-filled directory the flat join was planned as a bitmap scan +
    # sort of the whole directory for every page: 21 ms instead of 8 ms per 5,000).
    page = (
        sa.select(D.c.name, D.c.kind, D.c.ino)
        .where(*cond)
        .order_by(D.c.name)
        .limit(limit)
        .subquery("page")
    )
    return (
        sa.select(page.c.name, page.c.kind, *_ATTR_COLS)
        .select_from(page.join(I, I.c.ino == page.c.ino))
        .order_by(page.c.name)
    )


_READDIR_PLUS = Stmt(_readdir_plus)
_READDIR = Stmt(
    lambda _d: (
        sa.select(D.c.name, D.c.ino, D.c.kind)
        .where(D.c.parent == _bp("b_parent"), D.c.name > _bp("b_after"))
        .order_by(D.c.name)
        .limit(_bp("b_limit", type_=sa.Integer))
    )
)
_INSERT_INODE = Stmt(lambda _d: I.insert())  # every column, bound by its own name
_INSERT_DENTRY_IGNORE = Stmt(
    lambda d: (
        (postgresql.insert if d == "postgresql" else sqlite.insert)(D)
        .on_conflict_do_nothing()
        .returning(D.c.ino)
    )
)
_TOUCH_DIR = Stmt(
    lambda _d: (
        sa.update(I)
        .where(I.c.ino == _bp("b_ino"), I.c.mtime_ns < _bp("b_cutoff"))
        .values(mtime_ns=_bp("b_now"), ctime_ns=_bp("b_now"), gen=I.c.gen + 1)
    )
)
_TOUCH_DIR_ALWAYS = Stmt(
    lambda _d: (
        sa.update(I)
        .where(I.c.ino == _bp("b_ino"))
        .values(mtime_ns=_bp("b_now"), ctime_ns=_bp("b_now"), gen=I.c.gen + 1)
    )
)


# --- helpers -------------------------------------------------------------------------------


def to_bytes(name: bytes | str) -> bytes:
    return os.fsencode(name) if isinstance(name, str) else bytes(name)


def check_name(name: bytes | str) -> bytes:
    """A valid directory entry name, or FsError (EINVAL / ENAMETOOLONG)."""
    raw = to_bytes(name)
    if b"/" in raw or b"\0" in raw:
        raise FsError(errno.EINVAL, f"name {raw[:64]!r} contains '/' or NUL")
    if raw in (b"", b".", b".."):
        raise FsError(errno.EINVAL, f"name {raw!r} is not a valid entry name")
    if len(raw) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(raw)} bytes (max {NAME_MAX})")
    return raw


def row_attr(row: Any) -> Attr:
    return Attr(
        row.ino,
        row.kind,
        row.mode,
        row.uid,
        row.gid,
        row.nlink,
        row.size,
        row.atime_ns,
        row.mtime_ns,
        row.ctime_ns,
        row.rdev,
        row.parent,
        row.gen,
        row.slice_seq,
    )


def get_attr(conn: sa.Connection, ino: int, lock: str | None = None) -> Attr | None:
    """Read one inode, optionally locking it.

    ``lock``: "key_share" (we only need it to keep existing: creates in a directory),
    "write" (FOR NO KEY UPDATE: we update it; creates inside it may go on) or "delete"
    (FOR UPDATE: we may delete it; blocks creates inside it and opens of it).
    """
    row = _GET_ATTR[lock].first(conn, b_ino=ino)
    return None if row is None else Attr(*row)


def lock_inodes(
    conn: sa.Connection, inos: Iterable[int], delete: Iterable[int] = ()
) -> dict[int, Attr]:
    """Lock the existing rows among ``inos`` in ascending order; return them.

    Rows in ``delete`` are locked FOR UPDATE (we may delete them), others FOR NO KEY UPDATE.
    """
    strong = set(delete)
    out: dict[int, Attr] = {}
    for ino in sorted(set(inos)):
        a = get_attr(conn, ino, lock="delete" if ino in strong else "write")
        if a is not None:
            out[ino] = a
    return out


_UPDATE_INODE: dict[tuple[str, ...], Stmt] = {}  # prebuilt per set of columns updated


def _update_stmt(columns: tuple[str, ...]) -> Stmt:
    st = _UPDATE_INODE.get(columns)
    if st is None:  # two threads may both build one: the same statement, either wins
        st = _UPDATE_INODE[columns] = Stmt(
            lambda _d: (
                sa.update(I)
                .where(I.c.ino == _bp("b_ino"), I.c.gen == _bp("b_gen"))
                .values(**{c: _bp(f"v_{c}") for c in columns})
            )
        )
    return st


def update_inode(conn: sa.Connection, a: Attr, **values: Any) -> Attr:
    """Full-identity update of one inode: matches (ino, gen), bumps gen, checks rowcount.

    Prebuilt per set of columns (a slice commit, a chmod …: a handful of shapes), since this
    runs in most writes (a slice commit's statement cost ~0.4 ms when built each time).
    Values are plain integers (the inode table has no U64 column), bound as they are."""
    values["gen"] = a.gen + 1
    params = {f"v_{c}": v for c, v in values.items()}
    changed = _update_stmt(tuple(sorted(values))).rowcount(conn, b_ino=a.ino, b_gen=a.gen, **params)
    if changed != 1:
        raise Retry(f"inode {a.ino} changed under us")
    return a._replace(**values)


def insert_ignore(conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING; returns the number of rows inserted (0 or 1)."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    # RETURNING, not rowcount: psycopg reports -1 for INSERT ... ON CONFLICT DO NOTHING.
    col = next(iter(table.primary_key.columns))
    stmt = dialect_insert(table).values(**values).on_conflict_do_nothing().returning(col)
    return 0 if conn.execute(stmt).first() is None else 1


def insert_inode(conn: sa.Connection, a: Attr) -> None:
    """INSERT the inode row ``a`` (prebuilt statement: the create paths' hot insert)."""
    _INSERT_INODE.rowcount(conn, **{f: getattr(a, f) for f in _ATTR_FIELDS})


_INSERT_XATTR = Stmt(lambda _d: X.insert().values(ino=_bp("ino"), name=_bp("name"), value=_bp("value")))


def insert_xattrs(conn: sa.Connection, ino: int, attrs: dict[bytes, bytes]) -> None:
    """INSERT the extended attributes of a new inode (prebuilt: a created file inherits its
    directory's redundancy policy this way)."""
    for name, value in attrs.items():
        _INSERT_XATTR.rowcount(conn, ino=ino, name=name, value=value)


def insert_dentry(conn: sa.Connection, parent: int, name: bytes, ino: int, kind: int) -> bool:
    """INSERT one entry unless ``name`` exists in ``parent`` (ON CONFLICT DO NOTHING,
    prebuilt); False when it does."""
    return _INSERT_DENTRY_IGNORE.first(conn, parent=parent, name=name, ino=ino, kind=kind) is not None


def get_dentry(conn: sa.Connection, parent: int, name: bytes) -> tuple[int, int] | None:
    row = _GET_DENTRY.first(conn, b_parent=parent, b_name=name)
    return None if row is None else (row[0], row[1])


def require_dir(conn: sa.Connection, ino: int, a: Attr | None = None) -> Attr:
    """The attributes of directory ``ino``, or ENOENT / ENOTDIR."""
    if a is None:
        a = get_attr(conn, ino)
    if a is None:
        raise FsError(errno.ENOENT, f"directory inode {ino} does not exist")
    if not a.is_dir:
        raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
    return a


def missing_entry(conn: sa.Connection, parent: int, name: bytes) -> FsError:
    """The error for a name not found in ``parent`` (ENOTDIR when parent is no directory)."""
    require_dir(conn, parent)
    return FsError(errno.ENOENT, f"no entry {name[:64]!r} in directory {parent}")


def dir_is_empty(conn: sa.Connection, ino: int) -> bool:
    return conn.execute(sa.select(D.c.name).where(D.c.parent == ino).limit(1)).first() is None


def touch_dir(conn: sa.Connection, parent: int, now: int, granularity_ns: int) -> None:
    """Set a directory's mtime/ctime to now unless it is already newer than the granularity."""
    if granularity_ns > 0:
        _TOUCH_DIR.rowcount(conn, b_ino=parent, b_cutoff=now - granularity_ns, b_now=now)
    else:
        _TOUCH_DIR_ALWAYS.rowcount(conn, b_ino=parent, b_now=now)


_SS, _SE = schema.sustained, schema.session
SESSION_ALIVE = Stmt(
    lambda _d: sa.select(_SE.c.sid).where(_SE.c.sid == _bp("b_sid")).with_for_update(read=True, key_share=True)
)
INSERT_HOLD = Stmt(lambda _d: _SS.insert().values(sid=_bp("sid"), ino=_bp("ino")))
HELD_BY = Stmt(lambda _d: sa.select(_SS.c.sid).where(_SS.c.sid == _bp("b_sid"), _SS.c.ino == _bp("b_ino")))
_HELD = Stmt(lambda _d: sa.select(_SS.c.sid).where(_SS.c.ino == _bp("b_ino")).limit(1))


def is_open(conn: sa.Connection, ino: int) -> bool:
    return _HELD.first(conn, b_ino=ino) is not None


def destroy_inode(conn: sa.Connection, a: Attr, now: int) -> None:
    """Remove an inode nobody names or holds open; a file's slices go to the delete queue.

    Rows that only describe the inode go with it: xattrs, symlink target, its S3 view
    (``s3_object``) and, for a bucket's directory, the bucket and its uploads.
    """
    conn.execute(sa.delete(X).where(X.c.ino == a.ino))
    if a.kind in (stat.S_IFREG, stat.S_IFDIR):
        conn.execute(sa.delete(schema.s3_object).where(schema.s3_object.c.ino == a.ino))
    if a.kind == stat.S_IFDIR:
        drop_bucket(conn, a.ino)
    if a.kind == stat.S_IFLNK:
        conn.execute(sa.delete(schema.symlink).where(schema.symlink.c.ino == a.ino))
    if a.kind == stat.S_IFREG:
        conn.execute(schema.delfile.insert().values(ino=a.ino, size=a.size, queued_ns=now))
    res = conn.execute(sa.delete(I).where(I.c.ino == a.ino, I.c.gen == a.gen))
    if res.rowcount != 1:
        raise Retry(f"inode {a.ino} changed under us")


def drop_bucket(conn: sa.Connection, ino: int) -> None:
    """Delete the bucket whose directory is ``ino`` (if any) with its uploads."""
    B, U = schema.s3_bucket, schema.s3_upload
    # FOR UPDATE: an upload being created holds the row FOR KEY SHARE; we wait for it and
    # then see (and delete) its upload, or it finds no bucket after us.
    q = sa.select(B.c.name).where(B.c.ino == ino).with_for_update()
    name = conn.execute(q).scalar_one_or_none()
    if name is None:
        return
    ids = conn.execute(sa.select(U.c.upload_id).where(U.c.bucket == name)).scalars().all()
    delete_uploads(conn, list(ids))
    conn.execute(sa.delete(B).where(B.c.name == name))


def delete_uploads(conn: sa.Connection, upload_ids: Sequence[str]) -> None:
    """Delete multipart uploads with their parts (their store bytes become garbage)."""
    P, PS, U = schema.s3_part, schema.s3_part_slice, schema.s3_upload
    for i in range(0, len(upload_ids), 500):  # bounded IN lists
        chunk = list(upload_ids[i : i + 500])
        conn.execute(sa.delete(PS).where(PS.c.upload_id.in_(chunk)))
        conn.execute(sa.delete(P).where(P.c.upload_id.in_(chunk)))
        conn.execute(sa.delete(U).where(U.c.upload_id.in_(chunk)))


def hold_orphan(conn: sa.Connection, sid: int, ino: int) -> bool:
    """Make session ``sid`` hold ``ino`` (about to lose its last name) as if open; False
    when the session is gone (then nothing is held and the caller goes on without)."""
    if SESSION_ALIVE.first(conn, b_sid=sid) is None:
        return False
    if HELD_BY.first(conn, b_sid=sid, b_ino=ino) is None:
        INSERT_HOLD.rowcount(conn, sid=sid, ino=ino)
    return True


def drop_link(conn: sa.Connection, a: Attr, now: int, hold_sid: int | None = None) -> bool:
    """A non-directory lost one dentry (already deleted): decrement nlink, maybe destroy.

    With ``hold_sid``, an inode losing its last name is kept, held by that session, instead
    of destroyed: a mount does so for inodes the kernel still knows (see
    ``FileSystem.unlink``). Returns True when this call took such a hold."""
    if a.nlink > 1:
        update_inode(conn, a, nlink=a.nlink - 1, ctime_ns=now)
    elif hold_sid is not None and hold_orphan(conn, hold_sid, a.ino):
        update_inode(conn, a, nlink=0, ctime_ns=now)
        return True
    elif is_open(conn, a.ino):
        update_inode(conn, a, nlink=0, ctime_ns=now)
    else:
        destroy_inode(conn, a, now)
    return False


def delete_dentry(conn: sa.Connection, parent: int, name: bytes, ino: int) -> None:
    res = conn.execute(sa.delete(D).where(D.c.parent == parent, D.c.name == name, D.c.ino == ino))
    if res.rowcount != 1:
        raise Retry(f"entry {name!r} in {parent} changed under us")


def point_dentry(conn: sa.Connection, parent: int, name: bytes, old_ino: int, new: Attr) -> None:
    res = conn.execute(
        sa.update(D)
        .where(D.c.parent == parent, D.c.name == name, D.c.ino == old_ino)
        .values(ino=new.ino, kind=new.kind)
    )
    if res.rowcount != 1:
        raise Retry(f"entry {name!r} in {parent} changed under us")


# --- reads ---------------------------------------------------------------------------------


def getattr_(conn: sa.Connection, ino: int) -> Attr:
    a = get_attr(conn, ino)
    if a is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    return a


def lookup(conn: sa.Connection, parent: int, name: bytes) -> Attr:
    row = _LOOKUP.first(conn, b_parent=parent, b_name=name)
    if row is None:
        raise FsError(errno.ENOENT, f"directory inode {parent} does not exist")
    if row[0] != stat.S_IFDIR:
        raise FsError(errno.ENOTDIR, f"inode {parent} is not a directory")
    if row[1] is None:
        raise FsError(errno.ENOENT, f"no entry {name[:64]!r} in directory {parent}")
    return Attr(*row[1:])


def readlink(conn: sa.Connection, ino: int) -> bytes:
    t = schema.symlink
    row = conn.execute(sa.select(t.c.target).where(t.c.ino == ino)).first()
    if row is None:
        a = getattr_(conn, ino)
        raise FsError(errno.EINVAL, f"inode {a.ino} is not a symlink")
    return bytes(row.target)


def readdir(
    conn: sa.Connection, ino: int, after: bytes | None, limit: int, plus: bool
) -> list[DirEntry]:
    # One indexed range scan of the (parent, name) primary key, joined to the inodes for
    # plus; rows are plain tuples turned positionally into DirEntry/Attr.
    stmt = _READDIR_PLUS if plus else _READDIR
    rows = stmt.rows(conn, b_parent=ino, b_after=b"" if after is None else after, b_limit=limit)
    if not rows:
        require_dir(conn, ino)
        return []
    if plus:
        return [DirEntry(bytes(r[0]), r[2], r[1], Attr(*r[2:])) for r in rows]
    return [DirEntry(bytes(r[0]), r[1], r[2]) for r in rows]


def statfs(conn: sa.Connection) -> StatFs:
    inodes, used = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(I.c.size), 0))
    ).one()
    dt = schema.delfile
    pending = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(dt.c.size), 0))).scalar_one()
    return StatFs(int(inodes), int(used), int(pending))


def resolve_path(conn: sa.Connection, path: bytes, root: int, follow_last: bool) -> Attr:
    """Walk ``path`` (relative to ``root``; '/'-separated) following symlinks (ELOOP > 40)."""
    parts = [p for p in path.split(b"/") if p]
    cur = getattr_(conn, root)
    hops = 0
    stack: list[Attr] = []
    while parts:
        part = parts.pop(0)
        if part == b".":
            continue
        if not cur.is_dir:
            raise FsError(errno.ENOTDIR, f"{path[:200]!r}: a component is not a directory")
        if part == b"..":
            cur = stack.pop() if stack else cur
            continue
        nxt = lookup(conn, cur.ino, check_name(part))
        if nxt.kind == stat.S_IFLNK and (parts or follow_last):
            hops += 1
            if hops > 40:
                raise FsError(errno.ELOOP, f"{path[:200]!r}: too many levels of symbolic links")
            target = readlink(conn, nxt.ino)
            parts = [p for p in target.split(b"/") if p] + parts
            if target.startswith(b"/"):
                cur, stack = getattr_(conn, root), []
            continue
        stack.append(cur)
        cur = nxt
    return cur


# --- creation ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NewInode:
    ino: int
    kind: int
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    target: bytes | None = None


def make(
    conn: sa.Connection, parent: int, name: bytes, new: NewInode, now: int, granularity_ns: int
) -> Made:
    """mknod/create/mkdir/symlink: one new inode and its entry in ``parent``.

    ``Made.parent`` is the parent's row as read here when this transaction leaves it
    unchanged (a non-directory, and the row's mtime within the granularity); else None."""
    p = require_dir(conn, parent, get_attr(conn, parent, lock="key_share"))
    is_dir = new.kind == stat.S_IFDIR
    size = len(new.target) if new.target is not None else 0
    a = Attr(
        new.ino,
        new.kind,
        new.mode & 0o7777,
        new.uid,
        new.gid,
        2 if is_dir else 1,
        size,
        now,
        now,
        now,
        new.rdev,
        parent if is_dir else 0,
        0,
        0,
    )
    insert_inode(conn, a)
    if not insert_dentry(conn, parent, name, a.ino, a.kind):
        raise FsError(errno.EEXIST, f"{name[:64]!r} exists in directory {parent}")
    if new.target is not None:
        conn.execute(schema.symlink.insert().values(ino=a.ino, target=new.target))
    if is_dir:
        # nlink + 1 for the new '..'; a relative update so concurrent mkdirs just queue.
        conn.execute(
            sa.update(I)
            .where(I.c.ino == parent)
            .values(nlink=I.c.nlink + 1, mtime_ns=now, ctime_ns=now, gen=I.c.gen + 1)
        )
        return Made(a, None)
    if granularity_ns == 0 or p.mtime_ns < now - granularity_ns:
        # Skipped when the row we just read is recent enough: the UPDATE's own condition
        # would then match nothing (a concurrent change orders after this create).
        touch_dir(conn, parent, now, granularity_ns)
        return Made(a, None)
    return Made(a, p)  # the parent as it stays


def link(conn: sa.Connection, ino: int, parent: int, name: bytes, now: int) -> Attr:
    locked = lock_inodes(conn, (ino, parent))
    a = locked.get(ino)
    if a is None or a.nlink == 0:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    if a.is_dir:
        raise FsError(errno.EPERM, "hard links to directories are not allowed")
    require_dir(conn, parent, locked.get(parent))
    if not insert_dentry(conn, parent, name, ino, a.kind):
        raise FsError(errno.EEXIST, f"{name[:64]!r} exists in directory {parent}")
    a = update_inode(conn, a, nlink=a.nlink + 1, ctime_ns=now)
    update_inode(conn, locked[parent], mtime_ns=now, ctime_ns=now)
    return a


# --- removal -------------------------------------------------------------------------------


def unlink(
    conn: sa.Connection, parent: int, name: bytes, now: int, granularity_ns: int,
    hold_sid: int | None = None,
) -> tuple[Attr | None, int | None]:
    """Remove a non-directory's entry. Returns the parent's row as read here when this
    transaction leaves it unchanged (its mtime within the granularity), else None; and the
    inode ``hold_sid`` now holds in place of destroying it (:func:`drop_link`), else None."""
    found = get_dentry(conn, parent, name)
    if found is None:
        raise missing_entry(conn, parent, name)
    ino, kind = found
    if kind == stat.S_IFDIR:
        raise FsError(errno.EISDIR, f"{name[:64]!r} is a directory (use rmdir)")
    p = get_attr(conn, parent)
    touch = p is not None and (granularity_ns == 0 or p.mtime_ns < now - granularity_ns)
    locked = lock_inodes(conn, (ino, parent) if touch else (ino,), delete=(ino,))
    a = locked.get(ino)
    if a is None:
        raise Retry("inode vanished before we locked it")
    delete_dentry(conn, parent, name, ino)
    held = ino if drop_link(conn, a, now, hold_sid) else None
    if touch and parent in locked:
        update_inode(conn, locked[parent], mtime_ns=now, ctime_ns=now)
    return (None if touch else p), held


def rmdir(conn: sa.Connection, parent: int, name: bytes, now: int) -> None:
    found = get_dentry(conn, parent, name)
    if found is None:
        raise missing_entry(conn, parent, name)
    ino, kind = found
    if kind != stat.S_IFDIR:
        raise FsError(errno.ENOTDIR, f"{name[:64]!r} is not a directory")
    locked = lock_inodes(conn, (ino, parent), delete=(ino,))
    if ino not in locked or parent not in locked:
        raise Retry("directory vanished before we locked it")
    if not dir_is_empty(conn, ino):
        raise FsError(errno.ENOTEMPTY, f"directory {name[:64]!r} is not empty")
    delete_dentry(conn, parent, name, ino)
    destroy_inode(conn, locked[ino], now)
    p = locked[parent]
    update_inode(conn, p, nlink=p.nlink - 1, mtime_ns=now, ctime_ns=now)


# --- rename --------------------------------------------------------------------------------


def is_ancestor(conn: sa.Connection, anc: int, ino: int) -> bool:
    """True when directory ``anc`` is ``ino`` or one of its ancestors."""
    cur = ino
    for _ in range(MAX_DEPTH):
        if cur == anc:
            return True
        if cur == schema.ROOT_INO:
            return False
        nxt = conn.execute(sa.select(I.c.parent).where(I.c.ino == cur)).scalar_one_or_none()
        if nxt is None:
            raise Retry(f"ancestor {cur} vanished during the walk")
        cur = nxt
    raise FsError(errno.ELOOP, "directory tree deeper than MAX_DEPTH (corrupt?)")


@dataclasses.dataclass
class _Rename:
    sp: int
    sn: bytes
    dp: int
    dn: bytes
    flags: int
    src: tuple[int, int]
    dst: tuple[int, int] | None


def _rename_checks(r: _Rename) -> bool:
    """Flag checks that need no locks; False when the rename is a successful no-op."""
    if r.flags & RENAME_EXCHANGE and r.dst is None:
        raise FsError(errno.ENOENT, f"RENAME_EXCHANGE: no entry {r.dn[:64]!r} in {r.dp}")
    if r.dst is not None and r.flags & RENAME_NOREPLACE:
        raise FsError(errno.EEXIST, f"RENAME_NOREPLACE: {r.dn[:64]!r} exists in {r.dp}")
    if (r.sp, r.sn) == (r.dp, r.dn):
        return False
    # POSIX: renaming onto another link of the same file does nothing.
    return not (r.dst is not None and r.dst[0] == r.src[0])


def rename(
    conn: sa.Connection, sp: int, sn: bytes, dp: int, dn: bytes, flags: int, now: int,
    hold_sid: int | None = None,
) -> Replaced:
    """Returns what the rename removed at its target (:class:`Replaced`); a file losing its
    last name is held by ``hold_sid`` in place of destroyed (:func:`drop_link`)."""
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
        raise FsError(errno.EINVAL, f"bad rename flags {flags:#x}")
    src = get_dentry(conn, sp, sn)
    if src is None:
        raise missing_entry(conn, sp, sn)
    require_dir(conn, dp)
    r = _Rename(sp, sn, dp, dn, flags, src, get_dentry(conn, dp, dn))
    if not _rename_checks(r):
        return Replaced()
    moves_dir = sp != dp and (
        src[1] == stat.S_IFDIR
        or (flags & RENAME_EXCHANGE and r.dst is not None and r.dst[1] == stat.S_IFDIR)
    )
    if moves_dir:
        c = schema.counter
        conn.execute(
            sa.select(c.c.value).where(c.c.name == schema.RENAME_LOCK).with_for_update()
        ).one()
    inos = {sp, dp, src[0]} | ({r.dst[0]} if r.dst else set())
    locked = lock_inodes(
        conn, inos, delete=(r.dst[0],) if r.dst and not flags & RENAME_EXCHANGE else ()
    )
    if (
        get_dentry(conn, sp, sn) != src
        or get_dentry(conn, dp, dn) != r.dst
        or not inos <= locked.keys()
    ):
        raise Retry("entries changed before we locked them")
    if moves_dir:
        if src[1] == stat.S_IFDIR and is_ancestor(conn, src[0], dp):
            raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
        if (
            r.dst is not None
            and flags & RENAME_EXCHANGE
            and r.dst[1] == stat.S_IFDIR
            and is_ancestor(conn, r.dst[0], sp)
        ):
            raise FsError(errno.EINVAL, "cannot move a directory into its own subtree")
    if flags & RENAME_EXCHANGE:
        assert r.dst is not None
        _exchange(conn, r, locked, now)
        return Replaced()
    return _move(conn, r, locked, now, hold_sid)


def _parents_update(
    conn: sa.Connection, locked: dict[int, Attr], deltas: dict[int, int], now: int
) -> None:
    for ino, delta in sorted(deltas.items()):
        p = locked[ino]
        update_inode(conn, p, nlink=p.nlink + delta, mtime_ns=now, ctime_ns=now)


def _move(
    conn: sa.Connection, r: _Rename, locked: dict[int, Attr], now: int, hold_sid: int | None
) -> Replaced:
    a = locked[r.src[0]]
    replaced = Replaced()
    deltas = {r.sp: 0, r.dp: 0}
    if r.dst is not None:
        b = locked[r.dst[0]]
        if a.is_dir and not b.is_dir:
            raise FsError(
                errno.ENOTDIR, f"cannot replace non-directory {r.dn[:64]!r} by a directory"
            )
        if b.is_dir and not a.is_dir:
            raise FsError(
                errno.EISDIR, f"cannot replace directory {r.dn[:64]!r} by a non-directory"
            )
        if b.is_dir and not dir_is_empty(conn, b.ino):
            raise FsError(errno.ENOTEMPTY, f"directory {r.dn[:64]!r} is not empty")
        delete_dentry(conn, r.sp, r.sn, a.ino)
        point_dentry(conn, r.dp, r.dn, b.ino, a)
        if b.is_dir:
            destroy_inode(conn, b, now)
            deltas[r.dp] -= 1
            replaced = Replaced(removed_dir=b._replace(nlink=0, ctime_ns=now))
        elif drop_link(conn, b, now, hold_sid):
            replaced = Replaced(held=b.ino)
    else:
        delete_dentry(conn, r.sp, r.sn, a.ino)
        conn.execute(D.insert().values(parent=r.dp, name=r.dn, ino=a.ino, kind=a.kind))
    if a.is_dir and r.sp != r.dp:
        deltas[r.sp] -= 1
        deltas[r.dp] += 1
        update_inode(conn, a, parent=r.dp, ctime_ns=now)
    else:
        update_inode(conn, a, ctime_ns=now)
    _parents_update(conn, locked, deltas, now)
    return replaced


def _exchange(conn: sa.Connection, r: _Rename, locked: dict[int, Attr], now: int) -> None:
    assert r.dst is not None
    a, b = locked[r.src[0]], locked[r.dst[0]]
    point_dentry(conn, r.sp, r.sn, a.ino, b)
    point_dentry(conn, r.dp, r.dn, b.ino, a)
    deltas = {r.sp: 0, r.dp: 0}
    if r.sp != r.dp:
        if a.is_dir:
            deltas[r.sp] -= 1
            deltas[r.dp] += 1
        if b.is_dir:
            deltas[r.dp] -= 1
            deltas[r.sp] += 1
    update_inode(conn, a, parent=r.dp if a.is_dir else 0, ctime_ns=now)
    update_inode(conn, b, parent=r.sp if b.is_dir else 0, ctime_ns=now)
    _parents_update(conn, locked, deltas, now)


# --- attributes ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SetAttr:
    """Fields to change; None leaves a field alone."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None


def truncate_slices(conn: sa.Connection, ino: int, new_size: int) -> None:
    """Delete slices past ``new_size`` and shorten those that cross it."""
    conn.execute(sa.delete(S).where(S.c.ino == ino, S.c.file_off >= new_size))
    conn.execute(
        sa.update(S)
        .where(S.c.ino == ino, S.c.file_off < new_size, S.c.file_off + S.c.length > new_size)
        .values(length=new_size - S.c.file_off)
    )


def setattr_(conn: sa.Connection, ino: int, ch: SetAttr, now: int) -> Attr:
    a = get_attr(conn, ino, lock="write")
    if a is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    values: dict[str, Any] = {"ctime_ns": now if ch.ctime_ns is None else ch.ctime_ns}
    if ch.size is not None:
        if a.is_dir:
            raise FsError(errno.EISDIR, f"inode {ino} is a directory")
        if a.kind != stat.S_IFREG or ch.size < 0:
            raise FsError(errno.EINVAL, f"cannot truncate inode {ino} to {ch.size}")
        if ch.size < a.size:
            truncate_slices(conn, ino, ch.size)
        if ch.size != a.size:
            values["mtime_ns"] = now
        values["size"] = ch.size
    if ch.mode is not None:
        values["mode"] = ch.mode & 0o7777
    for field in ("uid", "gid", "atime_ns", "mtime_ns"):
        value = getattr(ch, field)
        if value is not None:
            values[field] = value
    return update_inode(conn, a, **values)


# --- xattrs --------------------------------------------------------------------------------


def check_xattr_name(name: bytes | str) -> bytes:
    raw = to_bytes(name)
    if not raw or b"\0" in raw:
        raise FsError(errno.EINVAL, "empty xattr name or NUL in it")
    if len(raw) > XATTR_NAME_MAX:
        raise FsError(errno.ERANGE, f"xattr name of {len(raw)} bytes (max {XATTR_NAME_MAX})")
    return raw


def getxattr(conn: sa.Connection, ino: int, name: bytes) -> bytes:
    row = conn.execute(sa.select(X.c.value).where(X.c.ino == ino, X.c.name == name)).first()
    if row is None:
        getattr_(conn, ino)
        raise FsError(errno.ENODATA, f"inode {ino} has no xattr {name[:64]!r}")
    return bytes(row.value)


def listxattr(conn: sa.Connection, ino: int) -> list[bytes]:
    getattr_(conn, ino)
    return [
        bytes(n)
        for n in conn.execute(
            sa.select(X.c.name).where(X.c.ino == ino).order_by(X.c.name)
        ).scalars()
    ]


def setxattr(
    conn: sa.Connection, ino: int, name: bytes, value: bytes, flags: int, now: int
) -> None:
    if len(value) > XATTR_SIZE_MAX:
        raise FsError(errno.E2BIG, f"xattr value of {len(value)} bytes (max {XATTR_SIZE_MAX})")
    if flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == XATTR_CREATE | XATTR_REPLACE:
        raise FsError(errno.EINVAL, f"bad setxattr flags {flags:#x}")
    a = get_attr(conn, ino, lock="write")
    if a is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    res = conn.execute(sa.update(X).where(X.c.ino == ino, X.c.name == name).values(value=value))
    if res.rowcount == 1 and flags & XATTR_CREATE:
        raise FsError(errno.EEXIST, f"xattr {name[:64]!r} exists")
    if res.rowcount == 0:
        if flags & XATTR_REPLACE:
            raise FsError(errno.ENODATA, f"inode {ino} has no xattr {name[:64]!r}")
        conn.execute(X.insert().values(ino=ino, name=name, value=value))
    update_inode(conn, a, ctime_ns=now)


def removexattr(conn: sa.Connection, ino: int, name: bytes, now: int) -> None:
    a = get_attr(conn, ino, lock="write")
    if a is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    if conn.execute(sa.delete(X).where(X.c.ino == ino, X.c.name == name)).rowcount != 1:
        raise FsError(errno.ENODATA, f"inode {ino} has no xattr {name[:64]!r}")
    update_inode(conn, a, ctime_ns=now)


def sorted_unique(values: Sequence[int]) -> list[int]:
    return sorted(set(values))
