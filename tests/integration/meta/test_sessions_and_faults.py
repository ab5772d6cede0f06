"""Open-file sessions (unlink while open), bad input, and the database going away."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from appendfs.meta import (
    ROOT_INO,
    FsError,
    Meta,
    MetaUnavailable,
    NewSlice,
    Segment,
    SessionExpired,
)


def test_unlinked_open_file_stays_readable_until_close(
    meta: Meta, meta_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    other = open_meta_fn(meta_url)  # a second client on the same database
    f = meta.create(ROOT_INO, b"f", 0o644, 0, 0)
    meta.commit_slices(f.ino, [NewSlice(0, 4096, 42, 0)])
    sid_a = meta.open_session("a")
    sid_b = other.open_session("b")
    meta.open(sid_a, f.ino)
    meta.open(sid_a, f.ino)  # two handles in one client
    other.open(sid_b, f.ino)
    other.unlink(ROOT_INO, b"f")
    with pytest.raises(FsError):
        meta.lookup(ROOT_INO, b"f")
    assert meta.getattr(f.ino).nlink == 0
    assert meta.read_map(f.ino, 0, 4096) == [Segment(0, 4096, 42, 0)]
    meta.commit_slices(f.ino, [NewSlice(4096, 10, 43, 0)])  # still writable too
    with pytest.raises(FsError) as e:  # but nobody may open it anew
        other.open(other.open_session("c"), f.ino)
    assert e.value.errno == errno.ENOENT
    other.release(sid_b, f.ino)
    meta.release(sid_a, f.ino)
    assert meta.getattr(f.ino).nlink == 0 and meta.delete_queue() == []
    meta.release(sid_a, f.ino)  # last handle anywhere
    with pytest.raises(FsError):
        meta.getattr(f.ino)
    assert [q[0] for q in meta.delete_queue()] == [f.ino]
    assert meta.check_invariants() == []


def test_create_can_open_in_the_same_transaction_and_release_many_batches_closes(meta: Meta) -> None:
    sid = meta.open_session("a")
    f = meta.create(ROOT_INO, b"f", 0o644, 0, 0, open_sid=sid)  # held open from birth
    g = meta.create(ROOT_INO, b"g", 0o644, 0, 0, open_sid=sid)
    meta.open(sid, g.ino)  # a second handle of g
    meta.unlink(ROOT_INO, b"f")
    meta.unlink(ROOT_INO, b"g")
    assert meta.getattr(f.ino).nlink == 0 and meta.getattr(g.ino).nlink == 0  # both survive: held
    meta.release_many(sid, [f.ino, g.ino])  # f's last handle, g still has one
    with pytest.raises(FsError):
        meta.getattr(f.ino)
    assert meta.getattr(g.ino).nlink == 0
    meta.release_many(sid, [g.ino])
    with pytest.raises(FsError):
        meta.getattr(g.ino)
    assert sorted(q[0] for q in meta.delete_queue()) == [f.ino, g.ino]
    meta.close_session(sid)
    with pytest.raises(SessionExpired):  # a create cannot hold a file for a dead session
        meta.create(ROOT_INO, b"h", 0o644, 0, 0, open_sid=sid)
    with pytest.raises(FsError):  # and nothing was created
        meta.lookup(ROOT_INO, b"h")
    assert meta.check_invariants() == []


def test_dead_session_is_cleaned_by_a_live_client(
    meta: Meta, meta_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    dying = open_meta_fn(meta_url, session_ttl_s=0.2)
    f = meta.create(ROOT_INO, b"f", 0o644, 0, 0)
    g = meta.create(ROOT_INO, b"g", 0o644, 0, 0)
    sid = dying.open_session("dying")
    dying.open(sid, f.ino)
    dying.open(sid, g.ino)
    meta.unlink(ROOT_INO, b"f")
    assert meta.clean_dead_sessions() == 0  # still alive
    assert meta.getattr(f.ino).nlink == 0
    time.sleep(0.3)  # no heartbeat: the session expires
    assert meta.clean_dead_sessions() == 1
    with pytest.raises(FsError):
        meta.getattr(f.ino)
    assert [q[0] for q in meta.delete_queue()] == [f.ino]
    assert meta.getattr(g.ino).nlink == 1  # linked files are untouched
    with pytest.raises(SessionExpired):
        dying.heartbeat(sid)
    live = meta.open_session("live")
    meta.heartbeat(live)
    assert meta.clean_dead_sessions() == 0
    meta.close_session(live)


def test_bad_names_are_refused_without_change(meta: Meta) -> None:
    before = meta.readdir(ROOT_INO)
    cases = [
        (b"a/b", errno.EINVAL),
        (b"a\0b", errno.EINVAL),
        (b"", errno.EINVAL),
        (b".", errno.EINVAL),
        (b"..", errno.EINVAL),
        (b"x" * 256, errno.ENAMETOOLONG),
    ]
    for name, code in cases:
        for op in (
            lambda n: meta.create(ROOT_INO, n, 0o644, 0, 0),
            lambda n: meta.mkdir(ROOT_INO, n, 0o755, 0, 0),
            lambda n: meta.symlink(ROOT_INO, n, b"t", 0, 0),
            lambda n: meta.rename(ROOT_INO, b"zz", ROOT_INO, n),
        ):
            with pytest.raises(FsError) as e:
                op(name)
            assert e.value.errno == code, name
    assert meta.create(ROOT_INO, b"x" * 255, 0o644, 0, 0).nlink == 1  # the limit itself is fine
    f = meta.create(ROOT_INO, b"file", 0o644, 0, 0)
    with pytest.raises(FsError) as e:
        meta.mkdir(f.ino, b"sub", 0o755, 0, 0)  # a path through a file
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        meta.resolve_path(b"file/sub")
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        meta.symlink(ROOT_INO, b"l", b"x" * 4096, 0, 0)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(FsError) as e:
        meta.mknod(ROOT_INO, b"d", 0o040755, 0, 0)
    assert e.value.errno == errno.EINVAL
    after = {e.name for e in meta.readdir(ROOT_INO)}
    assert after == {e.name for e in before} | {b"x" * 255, b"file"}


def test_database_down_gives_clear_temporary_error_then_recovers(
    stoppable_pg: Any, pg_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    server = stoppable_pg
    m = open_meta_fn(pg_url, unreachable_timeout_s=1.0)
    d = m.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(MetaUnavailable, match="unreachable") as e:
            m.create(d.ino, b"f", 0o644, 0, 0)
        assert e.value.temporary and time.monotonic() - t0 < 10
        with pytest.raises(MetaUnavailable):
            m.getattr(d.ino)
    finally:
        server.resume()
    assert m.readdir(d.ino) == []  # nothing half-applied
    m.create(d.ino, b"f", 0o644, 0, 0)
    assert m.check_invariants() == []


def test_database_stopped_mid_transaction(
    stoppable_pg: Any, pg_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    """A rename blocked on a row lock when the server stops: all or nothing, never half."""
    server = stoppable_pg
    m = open_meta_fn(pg_url, unreachable_timeout_s=0.5)
    a = m.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    b = m.mkdir(ROOT_INO, b"b", 0o755, 0, 0)
    f = m.create(a.ino, b"f", 0o644, 0, 0)
    blocker = m.engine.connect()
    blocker.begin()
    blocker.execute(sa.text("SELECT 1 FROM inode WHERE ino = :i FOR UPDATE"), {"i": f.ino})
    outcome: list[object] = []

    def mover() -> None:
        try:
            m.rename(a.ino, b"f", b.ino, b"f")  # reads, then waits for the lock on f
            outcome.append("ok")
        except MetaUnavailable as e:
            outcome.append(e)

    t = threading.Thread(target=mover)
    t.start()
    time.sleep(0.5)
    server.pause()
    try:
        t.join(30)
    finally:
        server.resume()
        blocker.invalidate()
        blocker.close()
    assert not t.is_alive() and outcome and isinstance(outcome[0], MetaUnavailable), outcome
    assert str(outcome[0])
    in_a = [e.name for e in m.readdir(a.ino)]
    in_b = [e.name for e in m.readdir(b.ino)]
    assert sorted(in_a + in_b) == [b"f"]  # exactly one name: all or nothing
    assert m.check_invariants() == []
    m.rename(a.ino, b"f", b.ino, b"f")  # works again
