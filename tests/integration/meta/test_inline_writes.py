"""Inline namespace writes on SQLite (Meta.run_inline, Runner.run_once, WalSync).

The mount runs its per-file writes on the event loop: one attempt that never waits, a
commit without fsync, then an fdatasync of the WAL before anyone is answered. These tests
hold the properties that make that safe: a write that would wait changes nothing and says
so (WouldBlock) quickly; errors of the call itself pass through; a call rerun after
WouldBlock does not count twice; WAL syncs are shared; checkpoints still happen.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import pytest

from appendfs.meta import FsError, Meta
from appendfs.meta.slices import NewSlice
from appendfs.meta.txn import WouldBlock, _sqlite_lock

ROOT_INO = 1


def _holds(url: str, ino: int) -> int:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        return int(db.execute("SELECT count(*) FROM sustained WHERE ino = ?", (ino,)).fetchone()[0])


def test_an_inline_write_commits_and_one_wal_sync_covers_every_commit_before_it(
    sqlite_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    m = open_meta_fn(sqlite_url)
    sid = m.open_session("test")
    m.mkdir(ROOT_INO, b"warm", 0o755, 0, 0)  # the thread path fills the inode batch
    a, seq1 = m.run_inline(m.create, ROOT_INO, b"f", 0o644, 0, 0, open_sid=sid)
    b, seq2 = m.run_inline(m.commit_slices, a.ino, [NewSlice(0, 4096, 77, 0)])
    assert 0 < seq1 < seq2 and b.size == 4096
    assert m.wal is not None and m.wal.synced < seq1  # committed, not yet made durable
    # Committed: another connection sees both changes at once.
    other = open_meta_fn(sqlite_url)
    assert other.lookup(ROOT_INO, b"f").size == 4096
    m.sync_wal(seq1)
    assert m.wal.synced >= seq2 and m.wal.syncs == 1  # one fdatasync for both commits
    m.sync_wal(seq2)
    assert m.wal.syncs == 1
    assert m.inline_stats["inline_writes"] == 2


def test_an_inline_write_that_would_wait_changes_nothing_and_says_so_at_once(
    sqlite_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    m = open_meta_fn(sqlite_url)  # its thread path waits up to 30 s for the lock
    m.mkdir(ROOT_INO, b"warm", 0o755, 0, 0)
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the database
        t0 = time.monotonic()
        with pytest.raises(WouldBlock):
            m.run_inline(m.create, ROOT_INO, b"f", 0o644, 0, 0)
        assert time.monotonic() - t0 < 0.5
        other.execute("ROLLBACK")
    finally:
        other.close()
    with pytest.raises(FsError):
        m.lookup(ROOT_INO, b"f")
    # Another thread of this process holds the writer lock: the same answer.
    lock = _sqlite_lock(m.engine)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        held.wait(10)
        with pytest.raises(WouldBlock):
            m.run_inline(m.unlink, ROOT_INO, b"warm")
    finally:
        release.set()
        t.join()
    assert m.lookup(ROOT_INO, b"warm").ino > 0
    assert m.inline_stats["inline_would_block"] == 2
    # Free again: inline works.
    attr, seq = m.run_inline(m.create, ROOT_INO, b"f", 0o644, 0, 0)
    assert seq > 0 and m.lookup(ROOT_INO, b"f").ino == attr.ino


def test_errors_of_the_call_itself_pass_through_inline(sqlite_url: str, open_meta_fn: Callable[..., Meta]) -> None:
    m = open_meta_fn(sqlite_url)
    m.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    with pytest.raises(FsError) as e:
        m.run_inline(m.mkdir, ROOT_INO, b"d", 0o755, 0, 0)
    assert e.value.errno == 17  # EEXIST, not WouldBlock
    with pytest.raises(FsError) as e:
        m.run_inline(m.rmdir, ROOT_INO, b"missing")
    assert e.value.errno == 2


def test_an_inode_batch_refill_is_never_run_inline(sqlite_url: str, open_meta_fn: Callable[..., Meta]) -> None:
    m = open_meta_fn(sqlite_url, ino_batch=2)
    m.mkdir(ROOT_INO, b"a", 0o755, 0, 0)  # takes the batch: one id left
    m.run_inline(m.mkdir, ROOT_INO, b"b", 0o755, 0, 0)
    with pytest.raises(WouldBlock):  # the refill is a transaction that may wait
        m.run_inline(m.mkdir, ROOT_INO, b"c", 0o755, 0, 0)
    m.mkdir(ROOT_INO, b"c", 0o755, 0, 0)  # in a thread it refills
    m.run_inline(m.mkdir, ROOT_INO, b"d", 0o755, 0, 0)
    assert m.check_invariants() == []


def test_release_many_that_would_wait_leaves_the_open_counts_as_they_were(
    sqlite_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    """Rerun after WouldBlock, a release must count once."""
    m = open_meta_fn(sqlite_url)
    sid = m.open_session("test")
    a = m.create(ROOT_INO, b"f", 0o644, 0, 0, open_sid=sid)
    m.open(sid, a.ino)  # a second handle
    assert _holds(sqlite_url, a.ino) == 1
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(WouldBlock):  # both handles: the hold must go, which would wait
            m.run_inline(m.release_many, sid, [a.ino, a.ino])
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert _holds(sqlite_url, a.ino) == 1
    m.release_many(sid, [a.ino])  # one handle (had the failed call counted, this was the last)
    assert _holds(sqlite_url, a.ino) == 1
    m.run_inline(m.release_many, sid, [a.ino])
    assert _holds(sqlite_url, a.ino) == 0


def test_inline_commits_are_checkpointed_by_the_checkpoint_call(
    sqlite_url: str, open_meta_fn: Callable[..., Meta]
) -> None:
    """Inline connections never checkpoint at commit (it would stall the event loop)."""
    m = open_meta_fn(sqlite_url)
    m.mkdir(ROOT_INO, b"warm", 0o755, 0, 0)
    m.checkpoint()
    for i in range(20):
        m.run_inline(m.mkdir, ROOT_INO, b"d%d" % i, 0o755, 0, 0)
    busy, frames, done = m.checkpoint()
    assert busy == 0 and frames > 0 and done == frames


def test_inline_writes_are_refused_on_postgresql(pg_url: str, open_meta_fn: Callable[..., Meta]) -> None:
    m = open_meta_fn(pg_url)
    with pytest.raises(WouldBlock):
        m.run_inline(m.mkdir, ROOT_INO, b"d", 0o755, 0, 0)
    assert m.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino > 0
