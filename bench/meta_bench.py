"""Namespace benchmark: appendfs.meta on PostgreSQL and SQLite beside the local filesystem.

Durable settings (DESIGN §8): PostgreSQL with fsync=on and synchronous_commit=on over
loopback, SQLite in WAL with synchronous=FULL; no client-side caching (every call is a
database round trip). The "local fs" column does the same operations with os.open /
os.stat / os.scandir in a temporary directory on the local disk.

Usage:
    .venv/bin/python bench/meta_bench.py [--pg URL] [--n N] [--readdir-entries N]

Without --pg (or APPENDFS_TEST_PG) a throwaway PostgreSQL is started with tests/pgserver.py.
Prints one table; tests never assert on these numbers.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from appendfs.db import make_engine
from appendfs.meta import ROOT_INO, Meta, MetaConfig, create_schema


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s"


def timed_threads(threads: int, per_thread: int, op: Callable[[int, int], object]) -> float:
    barrier = threading.Barrier(threads + 1)

    def body(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            op(t, i)

    ts = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def _create(m: Meta, parent: int, t: int, i: int) -> None:
    m.create(parent, b"f%d-%d" % (t, i), 0o644, 0, 0)


def bench_meta(m: Meta, n: int, entries: int, tag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for threads in (1, 4):
        d = m.mkdir(ROOT_INO, f"c{threads}-{tag}".encode(), 0o755, 0, 0)
        per = n // threads
        secs = timed_threads(threads, per, functools.partial(_create, m, d.ino))
        out[f"create, {threads} thread{'s' if threads > 1 else ''} (one dir)"] = rate(
            per * threads, secs
        )
    d = m.mkdir(ROOT_INO, f"g-{tag}".encode(), 0o755, 0, 0)
    inos = [m.create(d.ino, b"g%d" % i, 0o644, 0, 0).ino for i in range(200)]
    t0 = time.perf_counter()
    for i in range(n * 2):
        m.getattr(inos[i % len(inos)])
    out["getattr, 1 thread"] = rate(n * 2, time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n * 2):
        m.lookup(d.ino, b"g%d" % (i % len(inos)))
    out["lookup, 1 thread"] = rate(n * 2, time.perf_counter() - t0)
    big = m.mkdir(ROOT_INO, f"r-{tag}".encode(), 0o755, 0, 0)
    timed_threads(
        4, entries // 4, lambda t, i: m.create(big.ino, b"e%d-%06d" % (t, i), 0o644, 0, 0)
    )
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        after, count = None, 0
        while page := m.readdir(big.ino, after, limit=5000, plus=True):
            count += len(page)
            after = page[-1].name
        best = min(best, time.perf_counter() - t0)
        assert count == entries // 4 * 4
    out[f"readdir+attrs of {entries:,} entries"] = f"{best * 1000:.0f} ms"
    return out


def bench_local(n: int, entries: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_LOCAL_DIR", "/var/tmp")) as root:
        for threads in (1, 4):
            d = os.path.join(root, f"c{threads}")
            os.mkdir(d)
            per = n // threads

            def create(t: int, i: int, d: str = d) -> None:
                os.close(
                    os.open(
                        os.path.join(d, f"f{t}-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644
                    )
                )

            secs = timed_threads(threads, per, create)
            out[f"create, {threads} thread{'s' if threads > 1 else ''} (one dir)"] = rate(
                per * threads, secs
            )
        paths = [os.path.join(root, "c1", f"f0-{i}") for i in range(200)]
        t0 = time.perf_counter()
        for i in range(n * 2):
            os.stat(paths[i % len(paths)])
        out["getattr, 1 thread"] = rate(n * 2, time.perf_counter() - t0)
        out["lookup, 1 thread"] = out["getattr, 1 thread"] + " (stat)"
        big = os.path.join(root, "r")
        os.mkdir(big)
        for i in range(entries):
            os.close(os.open(os.path.join(big, f"e{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            with os.scandir(big) as it:
                count = sum(1 for e in it if e.stat())
            best = min(best, time.perf_counter() - t0)
            assert count == entries
        out[f"readdir+attrs of {entries:,} entries"] = f"{best * 1000:.0f} ms"
    return out


def pg_ceiling(url: str, n: int) -> dict[str, str]:
    """What the server and disk allow at all: bare round trips and bare durable commits."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as c:
        c.execute("CREATE TEMP TABLE _b (x int)")
        c.execute("CREATE TABLE IF NOT EXISTS _bench_commit (x int)")
        t0 = time.perf_counter()
        for _ in range(n):
            c.execute("SELECT 1").fetchone()
        rt = rate(n, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n // 4):
            c.execute("INSERT INTO _bench_commit VALUES (1)")  # one fsync'd commit each
        commit = rate(n // 4, time.perf_counter() - t0)
    return {"bare round trip (psycopg SELECT 1)": rt, "bare durable commit (1 INSERT)": commit}


def sqlite_ceiling(path: str, n: int) -> dict[str, str]:
    """What the disk allows a durable SQLite writer: one fsync'd WAL commit per INSERT."""
    import sqlite3

    c = sqlite3.connect(path, isolation_level=None)
    try:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("CREATE TABLE IF NOT EXISTS _bench_commit (x int)")
        t0 = time.perf_counter()
        for _ in range(n // 4):
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO _bench_commit VALUES (1)")
            c.execute("COMMIT")
        return {"bare durable commit (1 INSERT)": rate(n // 4, time.perf_counter() - t0)}
    finally:
        c.close()


def open_meta(url: str) -> Meta:
    engine = make_engine(url, pool_size=8, pre_ping=False)
    create_schema(engine)
    return Meta(engine, MetaConfig())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--pg", default=os.environ.get("APPENDFS_TEST_PG"), help="admin URL of a PostgreSQL server"
    )
    ap.add_argument("--n", type=int, default=2000, help="operations per measurement")
    ap.add_argument("--readdir-entries", type=int, default=10_000)
    args = ap.parse_args()

    import contextlib

    from pgserver import create_database, drop_database, postgres_server

    columns: dict[str, dict[str, str]] = {}
    with contextlib.ExitStack() as stack:
        admin = args.pg or stack.enter_context(postgres_server())[0]
        url = create_database(admin, prefix="bench")
        stack.callback(drop_database, admin, url)
        m = open_meta(url)
        stack.callback(m.close)
        columns["PostgreSQL (loopback)"] = bench_meta(
            m, args.n, args.readdir_entries, "pg"
        ) | pg_ceiling(url, args.n)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(dir="/var/tmp"))
        s = open_meta(f"sqlite:///{tmp}/meta.db")
        stack.callback(s.close)
        columns["SQLite (WAL, FULL)"] = bench_meta(
            s, args.n, args.readdir_entries, "sq"
        ) | sqlite_ceiling(f"{tmp}/ceiling.db", args.n)
        columns["local fs (os.*)"] = bench_local(args.n, args.readdir_entries)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]

    rows = list(dict.fromkeys(r for col in columns.values() for r in col))
    width = max(len(r) for r in rows) + 2
    print(f"{'operation':<{width}}" + "".join(f"{c:>24}" for c in columns))
    for r in rows:
        print(f"{r:<{width}}" + "".join(f"{columns[c].get(r, '-'):>24}" for c in columns))
    print(f"(host: {os.cpu_count()} CPUs, load average {' '.join(load)} at the end)")


if __name__ == "__main__":
    main()
