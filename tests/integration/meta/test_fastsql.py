"""The hot-path statements (appendfs.meta.fastsql) and the Runner's kept connections.

Stmt runs compiled SQL on the DBAPI cursor, so it must raise exactly what SQLAlchemy
would (the Runner's retry rules read SQLSTATEs and ``connection_invalidated``), and a
connection the server dropped while idle in the Runner must be replaced, not reused.
"""

from __future__ import annotations

import stat
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from appendfs.db import is_retryable, is_unreachable, sqlstate
from appendfs.meta import ROOT_INO, FsError, Meta, schema
from appendfs.meta.fastsql import Stmt

I, D = schema.inode, schema.dentry  # noqa: E741


def test_stmt_binds_fixed_values_and_returns_tuples(meta: Meta) -> None:
    d = meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    bump = Stmt(
        lambda _d: (
            sa.update(I).where(I.c.ino == sa.bindparam("b_ino")).values(gen=I.c.gen + 7)
        )  # the 7 is a parameter the caller never passes
    )
    get = Stmt(lambda _d: sa.select(I.c.ino, I.c.gen).where(I.c.ino == sa.bindparam("b_ino")))
    with meta.engine.begin() as conn:
        assert bump.rowcount(conn, b_ino=d.ino) == 1
        assert bump.rowcount(conn, b_ino=d.ino + 1000) == 0
        assert get.rows(conn, b_ino=d.ino) == [(d.ino, d.gen + 7)]
        assert get.first(conn, b_ino=d.ino + 1000) is None
    assert meta.getattr(d.ino).gen == d.gen + 7


def test_stmt_refuses_expanding_parameters(meta: Meta) -> None:
    many = Stmt(lambda _d: sa.select(I.c.ino).where(I.c.ino.in_(sa.bindparam("b", expanding=True))))
    with meta.engine.connect() as conn, pytest.raises(ValueError, match="expanding"):
        many.rows(conn, b=[1])


def test_stmt_wraps_driver_errors_like_sqlalchemy(meta: Meta) -> None:
    ins = Stmt(lambda _d: D.insert())
    row = {"parent": ROOT_INO, "name": b"x", "ino": ROOT_INO, "kind": 0o040000}
    with meta.engine.connect() as conn:
        with conn.begin():
            ins.rowcount(conn, **row)
        with pytest.raises(sa.exc.IntegrityError) as e, conn.begin():
            ins.rowcount(conn, **row)  # duplicate primary key
        assert not is_retryable(e.value) and not is_unreachable(e.value)
        if conn.dialect.name == "postgresql":
            assert sqlstate(e.value) == "23505"
        with conn.begin():
            conn.execute(sa.delete(D).where(D.c.name == b"x"))


def _kill_other_backends(pg_url: str) -> int:
    admin = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with admin.connect() as c:
            killed = c.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
            c.commit()
        return int(killed)
    finally:
        admin.dispose()


def test_a_dropped_idle_connection_is_replaced(
    pg_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    """The server ends the Runner's idle connections (restart, idle timeout): calls go on."""
    m = open_meta_fn(pg_url, unreachable_timeout_s=5.0)
    d = m.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    m.getattr(d.ino)  # the reader and the writer each keep a connection now
    assert _kill_other_backends(pg_url) >= 2
    assert m.getattr(d.ino).ino == d.ino  # the fast path saw the disconnect and retried
    m.create(d.ino, b"f", 0o644, 0, 0)
    assert [e.name for e in m.readdir(d.ino)] == [b"f"]
    with pytest.raises(FsError):
        m.lookup(d.ino, b"missing")
    assert m.check_invariants() == []


def test_failed_calls_leave_no_connection_in_a_transaction(meta: Meta) -> None:
    """A call that failed (EEXIST after an insert) rolls back before its connection is reused."""
    d = meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    meta.create(d.ino, b"f", 0o644, 0, 0)
    for _ in range(3):
        with pytest.raises(FsError):
            meta.create(d.ino, b"f", 0o644, 0, 0)  # its inode INSERT ran, then EEXIST
    assert [e.name for e in meta.readdir(d.ino)] == [b"f"]
    g = meta.create(d.ino, b"g", 0o644, 0, 0)
    assert meta.getattr(g.ino).nlink == 1


def test_stmt_invalidates_a_connection_the_server_dropped(
    pg_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    m = open_meta_fn(pg_url)
    get = Stmt(lambda _d: sa.select(I.c.ino).where(I.c.ino == sa.bindparam("b_ino")))
    with m.engine.connect() as conn:
        assert get.rows(conn, b_ino=ROOT_INO) == [(ROOT_INO,)]
        m.close()  # only `conn` stays connected
        assert _kill_other_backends(pg_url) == 1
        with pytest.raises(sa.exc.DBAPIError) as e:
            get.rows(conn, b_ino=ROOT_INO)
        assert e.value.connection_invalidated and conn.invalidated
        assert is_unreachable(e.value)


def test_create_rewrites_dir_mtime_only_past_the_granularity(
    meta_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    """create skips the parent's mtime UPDATE when the row it read is recent enough."""
    m = open_meta_fn(meta_url, dir_mtime_granularity_ns=10**18)  # ~31 years
    d = m.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    m.create(d.ino, b"a", 0o644, 0, 0)
    assert m.getattr(d.ino).mtime_ns == d.mtime_ns  # recent: left alone
    m.setattr(d.ino, mtime_ns=1)  # far in the past
    before = m.getattr(d.ino)
    m.create(d.ino, b"b", 0o644, 0, 0)
    after = m.getattr(d.ino)
    assert after.mtime_ns > 10**18 and after.gen == before.gen + 1
    exact = open_meta_fn(meta_url, dir_mtime_granularity_ns=0)
    exact.create(d.ino, b"c", 0o644, 0, 0)
    assert exact.getattr(d.ino).gen == after.gen + 1  # 0: every create rewrites it


def test_make_and_unlink_answer_the_parent_row_only_when_they_left_it_unchanged(
    meta_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    """Made.parent (and unlink's answer) is what a client may answer for the directory after."""
    m = open_meta_fn(meta_url, dir_mtime_granularity_ns=10**18)
    d = m.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    for kind, extra in ((stat.S_IFREG, {}), (stat.S_IFLNK, {"target": b"t"}), (stat.S_IFIFO, {})):
        made = m.make(kind, d.ino, f"k{kind}".encode(), 0o644, 0, 0, **extra)
        assert made.attr.kind == kind and made.parent == m.getattr(d.ino)
    assert m.make(stat.S_IFDIR, d.ino, b"sub", 0o755, 0, 0).parent is None  # nlink + 1
    m.setattr(d.ino, mtime_ns=1)
    assert m.make(stat.S_IFREG, d.ino, b"late", 0o644, 0, 0).parent is None  # mtime rewritten
    assert m.make(stat.S_IFREG, d.ino, b"next", 0o644, 0, 0).parent == m.getattr(d.ino)
    assert m.unlink(d.ino, b"next") == m.getattr(d.ino)  # unlink: the same rule
    m.setattr(d.ino, mtime_ns=1)
    assert m.unlink(d.ino, b"late") is None


def test_readdir_plus_pages_match_readdir_and_getattr(meta: Meta) -> None:
    """Both readdir statements (plus joins per page) agree, page by page, in byte order."""
    d = meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    names = [b"\xff", b"a", b"B", b"a\x01", b"ab", b"z" * 255] + [b"n%03d" % i for i in range(20)]
    for i, n in enumerate(names):
        if i % 5 == 0:
            meta.mkdir(d.ino, n, 0o700, 0, 0)
        else:
            meta.create(d.ino, n, 0o600, i, i)
    for limit in (1, 3, 7, 1000):
        plain: list[bytes] = []
        plus: list[bytes] = []
        for out, want_plus in ((plain, False), (plus, True)):
            after = None
            while page := meta.readdir(d.ino, after, limit=limit, plus=want_plus):
                assert len(page) <= limit
                for e in page:
                    assert (e.attr is not None) == want_plus
                    if e.attr is not None:
                        assert e.attr == meta.getattr(e.ino) and e.kind == e.attr.kind
                out.extend(e.name for e in page)
                after = page[-1].name
        assert plain == plus == sorted(names)


def test_a_sqlite_writer_lock_held_elsewhere_gives_unavailable_then_clears(
    sqlite_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    """BEGIN IMMEDIATE runs on the driver's connection (appendfs.db): a busy database must
    still reach the runner as SQLAlchemy's error, so it is retried within the budget and
    then reported as MetaUnavailable — never a raw sqlite3 error — and works once free."""
    import sqlite3

    from appendfs.db import make_engine
    from appendfs.meta import MetaConfig, MetaUnavailable

    open_meta_fn(sqlite_url).mkdir(ROOT_INO, b"d", 0o755, 0, 0)  # creates the schema
    m = Meta(make_engine(sqlite_url, pool_size=2, pre_ping=False, busy_timeout_s=0.2),
             MetaConfig(unreachable_timeout_s=0.6))
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
        with pytest.raises(MetaUnavailable, match="busy"):
            m.mkdir(ROOT_INO, b"e", 0o755, 0, 0)
        assert m.lookup(ROOT_INO, b"d").ino > 0  # snapshot reads never wait for the writer
        other.execute("ROLLBACK")
        assert m.mkdir(ROOT_INO, b"e", 0o755, 0, 0).ino > 0
    finally:
        other.close()
        m.close()
