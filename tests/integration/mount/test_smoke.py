"""First contact with a real mount: files, directories and big data round-trip."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cluster import Cluster, files_equal, random_file
from mounts import Mount


def test_write_read_list(mounted: Mount, tmp_path: Path) -> None:
    root = mounted.path
    (root / "a.txt").write_bytes(b"hello\n")
    assert (root / "a.txt").read_bytes() == b"hello\n"
    (root / "d" / "e").mkdir(parents=True)
    src = random_file(tmp_path / "src", 20 << 20, seed=1)
    dst = root / "d" / "e" / "big"
    dst.write_bytes(src.read_bytes())
    assert files_equal(src, dst)
    assert sorted(os.listdir(root)) == ["a.txt", "d"]
    assert os.stat(dst).st_size == 20 << 20


def test_module_mount_serves(module_mount: Mount) -> None:
    d = module_mount.path / "smoke"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 5000)
    assert (d / "f").stat().st_size == 5000


def test_a_database_lock_held_elsewhere_delays_writes_but_not_reads(
        tmp_path: Path, make_cluster: Callable[..., Cluster], make_mount: Callable[..., Mount]) -> None:
    """On SQLite the mount runs its writes on its event loop, where a wait would stall
    every request: a write that would wait must go to a thread instead. So while another
    process holds the database's writer lock, a create waits, and lookups and reads go on
    (bounded by 20 s; a stalled loop answers only after the 30 s busy timeout)."""
    db = tmp_path / "meta.db"
    m = make_mount(make_cluster(f"sqlite:///{db}"))
    root = m.path
    (root / "a").write_bytes(b"x" * 5000)
    (root / "d").mkdir()
    created = threading.Event()
    failure: list[BaseException] = []

    def create() -> None:
        try:
            (root / "d" / "b").write_bytes(b"y" * 100)
            created.set()
        except BaseException as exc:  # reported below
            failure.append(exc)

    other = sqlite3.connect(db, isolation_level=None, timeout=30)
    other.execute("BEGIN IMMEDIATE")  # another process's writer
    t = threading.Thread(target=create)
    try:
        t.start()
        deadline = time.monotonic() + 20
        for i in range(50):  # negative lookups are never cached: each one asks the mount
            assert not (root / f"none-{i}").exists()
        assert (root / "a").read_bytes() == b"x" * 5000
        assert time.monotonic() < deadline, "reads waited for another process's database lock"
        assert not created.is_set() and not failure  # the create waits for the lock meanwhile
    finally:
        other.execute("ROLLBACK")
        other.close()
        t.join(60)
    assert not failure and created.is_set()
    assert (root / "d" / "b").read_bytes() == b"y" * 100
