"""Transactions for file data maps, open-file sessions, the delete queue and GC queries.

Same contract as :mod:`appendfs.meta.ops`: each public function is the body of one
transaction run by :class:`appendfs.meta.txn.Runner`.

Data flow: the file layer appends bytes to a LogStream, waits until every replica has
them durable, then calls :func:`commit_slices` — one transaction adds the slice rows and
moves size/mtime/gen (DESIGN §3). Reads load the slice list and resolve it with the pure
functions of :mod:`appendfs.meta.slices`. When the last name and the last open handle of
a file are gone, its inode row is deleted and a ``delfile`` row queues its slices; the
GC purges them with :func:`purge_deleted` and computes garbage per sealed extent as
sealed length - :func:`live_bytes`.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from appendfs.meta import schema
from appendfs.meta import slices as sl
from appendfs.meta.errors import FsError, SessionExpired
from appendfs.meta.fastsql import Stmt
from appendfs.meta.ops import (
    HELD_BY,
    INSERT_HOLD,
    SESSION_ALIVE,
    destroy_inode,
    get_attr,
    is_open,
    update_inode,
)
from appendfs.meta.txn import Retry
from appendfs.meta.types import Attr

S = schema.slice_
SS = schema.sustained
SE = schema.session
DF = schema.delfile

_SLICE_COLS = [S.c.id, S.c.ino, S.c.seq, S.c.file_off, S.c.length, S.c.extent_id, S.c.ext_off]

# Prebuilt statements of the per-file hot path (create-and-open, slice commit, release):
# see appendfs.meta.fastsql. extent_id is a U64 column: bound through schema.u64_to_db.
_bp = sa.bindparam
_INSERT_SLICE = Stmt(
    lambda _d: S.insert().values(
        ino=_bp("ino"), seq=_bp("seq"), file_off=_bp("file_off"), length=_bp("length"),
        extent_id=_bp("extent_id"), ext_off=_bp("ext_off"),
    )
)
_DELETE_HOLD = Stmt(lambda _d: sa.delete(SS).where(SS.c.sid == _bp("b_sid"), SS.c.ino == _bp("b_ino")))


def _row_slice(r: sa.Row[Any]) -> sl.Slice:
    return sl.Slice(r.seq, r.file_off, r.length, r.extent_id, r.ext_off, r.id)


def _file_for_write(conn: sa.Connection, ino: int) -> Attr:
    a = get_attr(conn, ino, lock="write")
    if a is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    if a.kind != stat.S_IFREG:
        raise FsError(
            errno.EISDIR if a.is_dir else errno.EINVAL, f"inode {ino} is not a regular file"
        )
    return a


def insert_slices(conn: sa.Connection, a: Attr, new: Sequence[sl.NewSlice]) -> int:
    """Insert ``new`` with seqs after a.slice_seq (later in the list wins); return last seq."""
    for i, s in enumerate(new):
        _INSERT_SLICE.rowcount(
            conn, ino=a.ino, seq=a.slice_seq + i + 1, file_off=s.file_off, length=s.length,
            extent_id=schema.u64_to_db(s.extent_id), ext_off=s.ext_off,
        )
    return a.slice_seq + len(new)


def commit_slices(
    conn: sa.Connection, ino: int, new: Sequence[sl.NewSlice], mtime_ns: int, now: int
) -> Attr:
    a = _file_for_write(conn, ino)
    seq = insert_slices(conn, a, new)
    size = max([a.size, *(s.file_off + s.length for s in new)])
    return update_inode(conn, a, size=size, mtime_ns=mtime_ns, ctime_ns=now, slice_seq=seq)


def load_slices(conn: sa.Connection, ino: int) -> tuple[Attr, list[sl.Slice]]:
    a = get_attr(conn, ino)
    if a is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    rows = conn.execute(sa.select(*_SLICE_COLS).where(S.c.ino == ino).order_by(S.c.seq))
    return a, [_row_slice(r) for r in rows]


def compact(conn: sa.Connection, ino: int, now: int) -> tuple[int, int]:
    """Replace a file's slice list by its resolved, non-overlapping form (metadata only)."""
    a = _file_for_write(conn, ino)
    _, old = load_slices(conn, ino)
    new = sl.compact(old)
    if len(new) >= len(old):
        return len(old), len(old)
    conn.execute(sa.delete(S).where(S.c.ino == ino))
    seq = insert_slices(conn, a, new)
    update_inode(conn, a, slice_seq=seq)
    return len(old), len(new)


def replace_slices(
    conn: sa.Connection, ino: int, expect_slice_seq: int, new: Sequence[sl.NewSlice]
) -> bool:
    """Swap the whole slice list for ``new`` (compaction by copy) unless the file changed.

    The caller read the file at ``expect_slice_seq`` and copied its visible bytes; any write
    or truncate since then makes this a no-op returning False (the copy is garbage).
    """
    a = _file_for_write(conn, ino)
    if a.slice_seq != expect_slice_seq or any(s.file_off + s.length > a.size for s in new):
        return False
    conn.execute(sa.delete(S).where(S.c.ino == ino))
    update_inode(conn, a, slice_seq=insert_slices(conn, a, new))
    return True


def repoint_slice(
    conn: sa.Connection, old: sl.Slice, ino: int, new_extent_id: int, new_ext_off: int
) -> bool:
    """GC: move one slice to a copy of its bytes, only if the row is exactly as read."""
    res = conn.execute(
        sa.update(S)
        .where(
            S.c.id == old.id,
            S.c.ino == ino,
            S.c.seq == old.seq,
            S.c.file_off == old.file_off,
            S.c.length == old.length,
            S.c.extent_id == old.extent_id,
            S.c.ext_off == old.ext_off,
        )
        .values(extent_id=new_extent_id, ext_off=new_ext_off)
    )
    return res.rowcount == 1


def slices_in_extent(conn: sa.Connection, extent_id: int) -> list[tuple[int, sl.Slice]]:
    rows = conn.execute(sa.select(*_SLICE_COLS).where(S.c.extent_id == extent_id).order_by(S.c.id))
    return [(r.ino, _row_slice(r)) for r in rows]


def referenced_bytes(conn: sa.Connection, extent_ids: Iterable[int]) -> dict[int, int]:
    """Sum of slice lengths per extent: an upper bound of live bytes (exact when compacted)."""
    ids = list(extent_ids)
    q = (
        sa.select(S.c.extent_id, sa.func.sum(S.c.length))
        .where(S.c.extent_id.in_(ids))
        .group_by(S.c.extent_id)
    )
    out = dict.fromkeys(ids, 0)
    out.update({int(e): int(n) for e, n in conn.execute(q)})
    return out


def live_bytes(conn: sa.Connection, extent_ids: Iterable[int]) -> dict[int, int]:
    """Exact visible bytes per extent: resolves every file that has a slice in them.

    Files in the delete queue contribute nothing (their bytes are garbage already).
    """
    ids = set(extent_ids)
    out = dict.fromkeys(ids, 0)
    inos = conn.execute(sa.select(S.c.ino).where(S.c.extent_id.in_(ids)).distinct()).scalars().all()
    for ino in inos:
        if conn.execute(sa.select(DF.c.ino).where(DF.c.ino == ino)).first() is not None:
            continue
        rows = conn.execute(sa.select(*_SLICE_COLS).where(S.c.ino == ino))
        for ext, n in sl.live_bytes([_row_slice(r) for r in rows]).items():
            if ext in ids:
                out[ext] += n
    return out


def delete_queue(conn: sa.Connection, limit: int) -> list[tuple[int, int, int]]:
    q = (
        sa.select(DF.c.ino, DF.c.size, DF.c.queued_ns)
        .order_by(DF.c.queued_ns, DF.c.ino)
        .limit(limit)
    )
    return [(r.ino, r.size, r.queued_ns) for r in conn.execute(q)]


def purge_deleted(conn: sa.Connection, ino: int, batch: int) -> bool:
    """Delete up to ``batch`` slices of a queued inode; True once the queue row is gone too."""
    if conn.execute(sa.select(DF.c.ino).where(DF.c.ino == ino).with_for_update()).first() is None:
        return True
    ids = conn.execute(sa.select(S.c.id).where(S.c.ino == ino).limit(batch)).scalars().all()
    if ids:
        conn.execute(sa.delete(S).where(S.c.id.in_(ids)))
    if len(ids) < batch:
        conn.execute(sa.delete(DF).where(DF.c.ino == ino))
        return True
    return False


# --- sessions --------------------------------------------------------------------------------


def open_session(conn: sa.Connection, sid: int, owner: str, now: int, ttl_ns: int) -> None:
    conn.execute(
        SE.insert().values(sid=sid, owner=owner[:255], started_ns=now, expires_ns=now + ttl_ns)
    )


def heartbeat(conn: sa.Connection, sid: int, now: int, ttl_ns: int) -> None:
    if (
        conn.execute(sa.update(SE).where(SE.c.sid == sid).values(expires_ns=now + ttl_ns)).rowcount
        != 1
    ):
        raise SessionExpired(f"session {sid} was declared dead and cleaned up; reopen files")


def open_file(conn: sa.Connection, sid: int, ino: int) -> Attr:
    """Record that session ``sid`` holds ``ino`` open (idempotent)."""
    a = get_attr(conn, ino, lock="key_share")
    if a is None:
        raise FsError(errno.ENOENT, f"inode {ino} does not exist")
    held = HELD_BY.first(conn, b_sid=sid, b_ino=ino) is not None
    if a.nlink == 0 and not held:
        raise FsError(errno.ENOENT, f"inode {ino} was unlinked")
    if not held:
        hold_new(conn, sid, ino)
    return a


def hold_new(conn: sa.Connection, sid: int, ino: int) -> None:
    """Record that ``sid`` holds ``ino`` open: the inode it is creating in this
    transaction, or one :func:`open_file` found it does not hold yet."""
    if SESSION_ALIVE.first(conn, b_sid=sid) is None:
        raise SessionExpired(f"session {sid} was declared dead and cleaned up")
    INSERT_HOLD.rowcount(conn, sid=sid, ino=ino)


def release_file(conn: sa.Connection, sid: int, ino: int, now: int) -> None:
    """Session ``sid`` closed its last handle of ``ino``; an unlinked inode may now go."""
    a = get_attr(conn, ino, lock="delete")
    _DELETE_HOLD.rowcount(conn, b_sid=sid, b_ino=ino)
    if a is not None and a.nlink == 0 and not is_open(conn, ino):
        destroy_inode(conn, a, now)


def end_session(conn: sa.Connection, sid: int, now: int, only_if_expired: bool) -> bool:
    """Release everything ``sid`` holds and delete it; False if it is alive or gone."""
    q = sa.select(SE.c.expires_ns).where(SE.c.sid == sid).with_for_update()
    row = conn.execute(q).first()
    if row is None or (only_if_expired and row.expires_ns >= now):
        return False
    inos = (
        conn.execute(sa.select(SS.c.ino).where(SS.c.sid == sid).order_by(SS.c.ino)).scalars().all()
    )
    for ino in inos:
        release_file(conn, sid, ino, now)
    if conn.execute(sa.delete(SE).where(SE.c.sid == sid)).rowcount != 1:
        raise Retry(f"session {sid} vanished")
    return True


def expired_sessions(conn: sa.Connection, now: int, limit: int) -> list[int]:
    q = sa.select(SE.c.sid).where(SE.c.expires_ns < now).order_by(SE.c.expires_ns).limit(limit)
    return [int(s) for s in conn.execute(q).scalars()]
