"""Races on PostgreSQL with threads and processes, each followed by the invariant check.

Every worker records what it observed (successes, errnos); anything else — a deadlock or
serialization failure surfacing to a caller, a MetaUnavailable — fails the test. The
final state is checked against what the workers say happened.
"""

from __future__ import annotations

import errno
import multiprocessing
import threading
from collections import Counter
from typing import Any

from cluster import run_threads

from appendfs.db import make_engine
from appendfs.meta import ROOT_INO, FsError, Meta, MetaConfig


def test_concurrent_creates_in_one_directory(pg_meta: Meta) -> None:
    d = pg_meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)

    def worker(i: int) -> Counter[str]:
        c: Counter[str] = Counter()
        for k in range(60):
            name = b"n%d" % (k * 2 + i % 2)  # pairs of threads fight over the same names
            try:
                pg_meta.create(d.ino, name, 0o644, 0, 0) if k % 3 else pg_meta.mkdir(
                    d.ino, name, 0o755, 0, 0
                )
                c["made"] += 1
            except FsError as e:
                assert e.errno == errno.EEXIST
                c["exists"] += 1
        return c

    total: Counter[str] = sum(run_threads(6, worker), Counter())
    entries = pg_meta.readdir(d.ino, limit=10_000)
    assert total["made"] == len(entries) == 120
    assert pg_meta.getattr(d.ino).nlink == 2 + sum(1 for e in entries if e.kind == 0o040000)
    assert pg_meta.check_invariants() == []


def test_rmdir_versus_create_leaves_no_orphans(pg_meta: Meta) -> None:
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    for round_ in range(15):
        d = pg_meta.mkdir(ROOT_INO, b"r%d" % round_, 0o755, 0, 0)

        def worker(i: int, d_ino: int = d.ino, r: int = round_) -> None:
            try:
                if i == 0:
                    pg_meta.rmdir(ROOT_INO, b"r%d" % r)
                    key = "rmdir"
                else:
                    pg_meta.create(d_ino, b"f%d" % i, 0o644, 0, 0)
                    key = "create"
            except FsError as e:
                key = {errno.ENOENT: "create-enoent", errno.ENOTEMPTY: "rmdir-notempty"}[e.errno]
            with lock:
                outcomes[key] += 1

        run_threads(4, worker)
    assert pg_meta.check_invariants() == []
    assert outcomes["rmdir"] + outcomes["rmdir-notempty"] == 15


def test_opposite_renames_do_not_deadlock_callers(pg_meta: Meta) -> None:
    a = pg_meta.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    b = pg_meta.mkdir(ROOT_INO, b"b", 0o755, 0, 0)
    for i in range(20):
        pg_meta.create(a.ino, b"x%d" % i, 0o644, 0, 0)
        pg_meta.create(b.ino, b"y%d" % i, 0o644, 0, 0)

    def worker(i: int) -> None:
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        for k in range(20):
            name = b"x%d" % k if i % 2 == 0 else b"y%d" % k
            for _ in range(3):  # ping-pong the same files; ENOENT when the partner took it
                try:
                    pg_meta.rename(src.ino, name, dst.ino, name)
                except FsError as e:
                    assert e.errno == errno.ENOENT
                src, dst = dst, src

    run_threads(4, worker)
    assert len(pg_meta.readdir(a.ino, limit=100)) + len(pg_meta.readdir(b.ino, limit=100)) == 40
    assert pg_meta.check_invariants() == []


def test_directory_into_its_own_subtree_is_refused_under_races(pg_meta: Meta) -> None:
    a = pg_meta.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    b = pg_meta.mkdir(ROOT_INO, b"b", 0o755, 0, 0)

    def worker(i: int) -> Counter[int]:
        c: Counter[int] = Counter()
        me, other = (a, b) if i % 2 == 0 else (b, a)
        for _ in range(25):
            # Move `me` under `other` and back to the root; the partner does the reverse.
            for parent, name_from, new_parent in (
                (ROOT_INO, None, other.ino),
                (other.ino, None, ROOT_INO),
            ):
                del name_from
                try:
                    src_parent = pg_meta.getattr(me.ino).parent
                    pg_meta.rename(
                        src_parent, b"a" if me is a else b"b", new_parent, b"a" if me is a else b"b"
                    )
                    c[0] += 1
                except FsError as e:
                    c[e.errno] += 1
                del parent
        return c

    results: Counter[int] = sum(run_threads(4, worker), Counter())
    assert set(results) <= {0, errno.EINVAL, errno.ENOENT, errno.EEXIST}
    assert results[errno.EINVAL] > 0 and results[0] > 0
    assert pg_meta.check_invariants() == []


def test_link_unlink_storm(pg_meta: Meta) -> None:
    d = pg_meta.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    f = pg_meta.create(d.ino, b"f", 0o644, 0, 0)
    sid = pg_meta.open_session("storm")
    pg_meta.open(sid, f.ino)  # keeps the inode alive even if every name goes

    def worker(i: int) -> None:
        for k in range(40):
            name = b"l%d" % (k % 5)
            try:
                if (k + i) % 2:
                    pg_meta.link(f.ino, d.ino, name)
                else:
                    pg_meta.unlink(d.ino, name)
            except FsError as e:
                assert e.errno in (errno.EEXIST, errno.ENOENT)

    run_threads(6, worker)
    names = [e.name for e in pg_meta.readdir(d.ino) if e.ino == f.ino]
    assert pg_meta.getattr(f.ino).nlink == len(names)
    assert pg_meta.check_invariants() == []
    pg_meta.close_session(sid)


def _process_worker(url: str, d_ino: int, i: int, q: Any) -> None:
    m = Meta(make_engine(url), MetaConfig())
    made = 0
    try:
        for k in range(40):
            try:
                m.create(d_ino, b"p%d" % (k + 40 * (i // 2)), 0o644, 0, 0)  # pairs collide
                made += 1
            except FsError as e:
                assert e.errno == errno.EEXIST
            if k % 7 == 0:
                try:
                    m.rename(d_ino, b"p%d" % k, d_ino, b"q%d-%d" % (i, k))
                except FsError as e:
                    assert e.errno == errno.ENOENT
        q.put(("ok", made))
    except BaseException as e:
        q.put(("error", repr(e)))
    finally:
        m.close()


def test_several_processes(pg_url: str, sqlite_url: str) -> None:
    for url in (pg_url, sqlite_url):
        engine = make_engine(url)
        from appendfs.meta import create_schema

        create_schema(engine)
        m = Meta(engine)
        d = m.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_process_worker, args=(url, d.ino, i, q)) for i in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        assert all(r[0] == "ok" for r in results), results
        made = sum(r[1] for r in results)
        # Renames free names a partner may then create again, so >= 80 creates succeed;
        # every success is exactly one entry (renames neither add nor lose any).
        assert made >= 80 and made == len(m.readdir(d.ino, limit=1000))
        assert m.check_invariants() == []
        m.close()
