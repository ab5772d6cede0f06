"""Real programs on a real mount: git, tar, rsync, SQLite and pyarrow/Parquet.

Each program exercises a different mix of the POSIX surface the way users do: git
(O_EXCL lock files, rename over, hard links between clones, mmap'ed packs, fsync with
``core.fsync=all``), tar (many small files, symlinks, hard links, modes and mtimes set
after the data), rsync (temporary files renamed into place, ``--delete``, attribute-only
updates), SQLite (fcntl locks, fsync of the database and its directory, a journal that is
created and unlinked per transaction; WAL with its shared-memory ``-shm`` file mmap'ed
MAP_SHARED) and pyarrow (large sequential writes, footer-first random reads, mmap).

Every result is compared against the same program run on a local directory, or against
the input itself. The tests share one cluster and mount per engine (``module_mount``);
each works in a subdirectory named after itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import files_equal
from mounts import Mount, drop_page_cache

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]
SITE_PACKAGES = Path(next(p for p in sys.path if p.endswith("site-packages")))
#: Packages copied (with their __pycache__) into the source tree: ~50 files, ~1.5 MB.
PACKAGES = ("idna", "psutil")


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a program; fail the test with its stderr when it exits non-zero (or hangs)."""
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=300, check=False)
    assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr.decode(errors='replace')[-4000:]}"
    return p.stdout.decode(errors="replace")


def workdir(mount: Mount, request: pytest.FixtureRequest) -> Path:
    d = mount.path / request.node.originalname
    d.mkdir()
    return d


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root``: type, permission bits, mtime (s), size and content hash
    or link target, and for regular files the link count (hard links)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns // 10**9)
            else:
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_mtime_ns // 10**9, st.st_size, st.st_nlink, digest)
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    drop_page_cache(b)
    d = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True, timeout=300)
    assert d.returncode == 0 and d.stdout == b"", d.stdout.decode(errors="replace")[-4000:] + d.stderr.decode()
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    wrong = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
    assert not wrong, f"{len(wrong)} entries differ, e.g. {list(wrong.items())[:5]}"


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real source tree on local disk: this repository's tracked files (git archive),
    a few installed packages with their bytecode, and the awkward cases — symlinks
    (relative, absolute, dangling, to a directory), a hard link, modes, an empty
    directory, an empty file, a 255-byte name, a non-ASCII name, a 3 MiB binary."""
    root = tmp_path_factory.mktemp("source") / "tree"
    (root / "repo").mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root / "repo")], input=archive, check=True)
    for pkg in PACKAGES:
        shutil.copytree(SITE_PACKAGES / pkg, root / "site-packages" / pkg, symlinks=True)
    odd = root / "odd"
    (odd / "empty-dir").mkdir(parents=True)
    (odd / "empty-file").write_bytes(b"")
    (odd / ("n" * 255)).write_bytes(b"long name\n")
    (odd / "näme ünïcode ✓").write_bytes(b"unicode\n")
    (odd / "blob.bin").write_bytes(random.Random(7).randbytes(3 * MiB + 12345))
    (odd / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(odd / "script.sh", 0o755)
    (odd / "secret").write_text("private\n")
    os.chmod(odd / "secret", 0o600)
    os.link(odd / "blob.bin", odd / "blob-hardlink.bin")
    os.symlink("blob.bin", odd / "rel-link")
    os.symlink("/etc/hostname", odd / "abs-link")
    os.symlink("does/not/exist", odd / "dangling-link")
    os.symlink("../site-packages/psutil", odd / "dir-link")
    os.utime(odd / "secret", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    return root


@pytest.fixture(scope="module")
def source_tarball(source_tree: Path) -> Path:
    tarball = source_tree.parent / "tree.tar"
    run(["tar", "-C", str(source_tree), "-c", "-f", str(tarball), "."])
    return tarball


def git_env(home: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
            "LC_ALL": "C"}


def git(*args: str, cwd: Path, env: dict[str, str]) -> str:
    # core.fsync=all: git fsyncs objects, refs and the index, so FUSE fsync is exercised too
    return run(["git", "-c", "user.name=Appendfs Test", "-c", "user.email=test@appendfs.invalid",
                "-c", "core.fsync=all", "-c", "core.fsyncMethod=fsync", "-c", "init.defaultBranch=main",
                *args], cwd=cwd, env=env)


def test_git_init_commit_clone_fsck(module_mount: Mount, request: pytest.FixtureRequest, source_tree: Path,
                                    tmp_path: Path) -> None:
    d = workdir(module_mount, request)
    env = git_env(tmp_path)
    repo = d / "repo"
    git("init", "-q", str(repo), cwd=d, env=env)
    shutil.copytree(source_tree / "repo", repo, dirs_exist_ok=True, symlinks=True)
    git("add", "-A", cwd=repo, env=env)
    git("commit", "-q", "-m", "import the tree", cwd=repo, env=env)
    # a second commit: modify, delete, rename, add a binary
    readme = next(p for p in sorted(repo.iterdir()) if p.is_file())
    readme.write_bytes(readme.read_bytes() + b"\nappended on appendfs\n")
    victim = sorted((repo / "fs").glob("*.py"))[0]
    victim.unlink()
    git("mv", "pyproject.toml", "pyproject-renamed.toml", cwd=repo, env=env)
    (repo / "data.bin").write_bytes(random.Random(3).randbytes(MiB))
    git("add", "-A", cwd=repo, env=env)
    git("commit", "-q", "-m", "second", cwd=repo, env=env)
    git("gc", "-q", cwd=repo, env=env)  # packs loose objects: big sequential writes, renames, unlinks
    assert git("fsck", "--full", "--strict", cwd=repo, env=env).strip() == ""
    head = git("rev-parse", "HEAD", cwd=repo, env=env).strip()
    assert git("rev-list", "--count", "HEAD", cwd=repo, env=env).strip() == "2"
    assert git("status", "--porcelain", cwd=repo, env=env) == ""

    on_mount = d / "clone"  # local clone on the same filesystem: hard links into the source's objects
    local = tmp_path / "clone"
    git("clone", "-q", str(repo), str(on_mount), cwd=d, env=env)
    git("clone", "-q", "--no-local", str(repo), str(local), cwd=tmp_path, env=env)
    for clone in (on_mount, local):
        assert git("fsck", "--full", "--strict", cwd=clone, env=env).strip() == ""
        assert git("rev-parse", "HEAD", cwd=clone, env=env).strip() == head
        assert git("status", "--porcelain", cwd=clone, env=env) == ""
        d2 = subprocess.run(["diff", "-r", "--no-dereference", "-x", ".git", str(repo), str(clone)],
                            capture_output=True, timeout=300)
        assert d2.returncode == 0, d2.stdout.decode(errors="replace")[-3000:]
    # and back: a commit made in the local clone is pushed into the mount's repository
    (local / "pushed.txt").write_text("from local\n")
    git("add", "pushed.txt", cwd=local, env=env)
    git("commit", "-q", "-m", "third", cwd=local, env=env)
    git("push", "-q", str(on_mount), "HEAD:refs/heads/from-local", cwd=local, env=env)
    assert git("rev-parse", "from-local", cwd=on_mount, env=env).strip() == \
        git("rev-parse", "HEAD", cwd=local, env=env).strip()
    assert git("fsck", "--full", "--strict", cwd=on_mount, env=env).strip() == ""


def test_tar_extract_diff_and_create(module_mount: Mount, request: pytest.FixtureRequest, source_tree: Path,
                                     source_tarball: Path, tmp_path: Path) -> None:
    d = workdir(module_mount, request)
    local = tmp_path / "x"
    local.mkdir()
    (d / "x").mkdir()
    run(["tar", "-x", "-p", "-f", str(source_tarball), "-C", str(local)])
    run(["tar", "-x", "-p", "-f", str(source_tarball), "-C", str(d / "x")])
    assert_same_tree(local, d / "x")
    assert_same_tree(source_tree, d / "x")
    blob, twin = os.stat(d / "x" / "odd" / "blob.bin"), os.stat(d / "x" / "odd" / "blob-hardlink.bin")
    assert blob.st_ino == twin.st_ino and blob.st_nlink == 2

    # tar c back out of the mount: the same archive, byte for byte, as from the local copy
    # (names sorted; owner, modes, mtimes, hard links and symlinks are all in the archive)
    out_local, out_mount = tmp_path / "local.tar", tmp_path / "mount.tar"
    run(["tar", "-C", str(local), "--sort=name", "-c", "-f", str(out_local), "."])
    run(["tar", "-C", str(d / "x"), "--sort=name", "-c", "-f", str(out_mount), "."])
    listing_local = run(["tar", "-tv", "--full-time", "-f", str(out_local)])
    listing_mount = run(["tar", "-tv", "--full-time", "-f", str(out_mount)])
    assert listing_mount == listing_local
    assert files_equal(out_local, out_mount)
    run(["tar", "-d", "-f", str(out_mount), "-C", str(source_tree)])  # tar's own compare: exit 0 = same


def test_rsync_in_and_back(module_mount: Mount, request: pytest.FixtureRequest, source_tree: Path,
                           tmp_path: Path) -> None:
    d = workdir(module_mount, request)
    dst = d / "tree"
    run(["rsync", "-a", "-H", f"{source_tree}/", f"{dst}/"])
    assert_same_tree(source_tree, dst)
    # nothing left to do: sizes, mtimes, modes, links all match (checksums too)
    assert run(["rsync", "-a", "-H", "-n", "-i", "--checksum", f"{source_tree}/", f"{dst}/"]).strip() == ""

    # an incremental update: changed, new and deleted files (rsync writes temp files and
    # renames them over the old ones)
    src2 = tmp_path / "src2"
    run(["cp", "-a", str(source_tree), str(src2)])  # keeps the hard link, unlike copytree
    target = next(iter(sorted((src2 / "site-packages" / "psutil").glob("*.py"))))
    target.write_bytes(target.read_bytes() + b"# changed\n")
    (src2 / "odd" / "new-file").write_bytes(b"new\n" * 1000)
    (src2 / "odd" / "empty-file").unlink()
    shutil.rmtree(src2 / "site-packages" / "idna")
    run(["rsync", "-a", "-H", "--delete", f"{src2}/", f"{dst}/"])
    assert_same_tree(src2, dst)

    back = tmp_path / "back"
    run(["rsync", "-a", "-H", f"{dst}/", f"{back}/"])
    assert_same_tree(src2, back)


def _fill(db: sqlite3.Connection, start: int, count: int, rng: random.Random) -> None:
    db.executemany("INSERT INTO t (id, v, payload) VALUES (?, ?, ?)",
                   [(i, rng.randrange(10**9), rng.randbytes(rng.randrange(16, 64))) for i in range(start, start + count)])


def _digest(db: sqlite3.Connection) -> str:
    h = hashlib.sha256()
    for row in db.execute("SELECT id, v, payload FROM t ORDER BY id"):
        h.update(repr(row).encode())
    return h.hexdigest()


def _sqlite_workload(path: Path, journal_mode: str) -> tuple[int, str]:
    """Thousands of rows over several transactions, an update, a rolled-back transaction;
    returns (rows, digest) as seen by the writer before it closes."""
    rng = random.Random(42)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0] == journal_mode.lower()
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL, payload BLOB NOT NULL)")
        db.execute("CREATE INDEX t_v ON t (v)")
        for batch in range(5):
            db.execute("BEGIN")
            _fill(db, batch * 1000, 1000, rng)
            db.execute("COMMIT")
        db.execute("BEGIN")
        db.execute("UPDATE t SET v = v + 1 WHERE id % 7 = 0")
        db.execute("DELETE FROM t WHERE id % 11 = 0")
        db.execute("COMMIT")
        before = _digest(db)
        db.execute("BEGIN")
        _fill(db, 100_000, 2000, rng)
        db.execute("DELETE FROM t WHERE id < 2500")
        db.execute("ROLLBACK")
        assert _digest(db) == before
        rows = db.execute("SELECT count(*) FROM t").fetchone()[0]
        assert rows == 5000 - len(range(0, 5000, 11))
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return rows, before
    finally:
        db.close()


def _reopen_and_verify(path: Path, rows: int, digest: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT count(*) FROM t").fetchone()[0] == rows
        assert _digest(db) == digest
        assert db.execute("SELECT count(*) FROM t INDEXED BY t_v WHERE v >= 0").fetchone()[0] == rows
    finally:
        db.close()


def test_sqlite_database_on_the_mount(module_mount: Mount, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Rollback journal (DELETE, SQLite's default) and WAL, both through the FUSE mount.

    WAL mmaps ``<db>-shm`` MAP_SHARED; FUSE serves shared writable mappings through the
    page cache when the file is not opened with direct I/O (this mount never uses it), so
    WAL works for processes on this host — as on any local filesystem, and unlike over
    NFS, it is not coherent between hosts. That is what is asserted: every process here
    sees one consistent database."""
    d = workdir(module_mount, request)
    rows, digest = _sqlite_workload(d / "delete.db", "DELETE")
    assert not (d / "delete.db-journal").exists()  # the journal was unlinked at each commit
    drop_page_cache(d)
    _reopen_and_verify(d / "delete.db", rows, digest)

    wal = d / "wal.db"
    rows_w, digest_w = _sqlite_workload(wal, "WAL")
    assert (rows_w, digest_w) == (rows, digest)  # same seed, same content whatever the journal
    # a reader in another process sees the committed state while a writer holds a transaction
    w = sqlite3.connect(wal, isolation_level=None)
    try:
        w.execute("BEGIN IMMEDIATE")
        w.execute("INSERT INTO t (id, v, payload) VALUES (-1, 0, x'00')")
        seen = run([sys.executable, "-c", "import sqlite3,sys; db = sqlite3.connect(sys.argv[1]); "
                    "print(db.execute('SELECT count(*) FROM t').fetchone()[0])", str(wal)])
        assert int(seen) == rows
        w.execute("ROLLBACK")
        assert w.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        w.close()
    drop_page_cache(d)
    _reopen_and_verify(wal, rows, digest)
    # the same bytes copied to local disk are the same database
    shutil.copy(wal, tmp_path / "copy.db")
    _reopen_and_verify(tmp_path / "copy.db", rows, digest)


def _parquet_table(rows: int) -> object:
    import pyarrow as pa

    rng = random.Random(2024)
    ids = list(range(rows))
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "x": pa.array([rng.random() for _ in ids], pa.float64()),
        "name": pa.array([f"row-{rng.randrange(10**12):012d}" for _ in ids], pa.string()),
        "blob": pa.array([rng.randbytes(64) for _ in ids], pa.binary()),
    })


def test_parquet_write_and_read_back(module_mount: Mount, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = workdir(module_mount, request)
    table = _parquet_table(200_000)  # ~20 MB: random blobs and names do not compress
    path = d / "t.parquet"
    local = tmp_path / "t.parquet"
    for p in (path, local):
        pq.write_table(table, p, row_group_size=25_000, compression="snappy")
    assert path.stat().st_size > 15 * MiB
    drop_page_cache(path)
    assert files_equal(local, path)  # the same writer gives the same bytes on any filesystem

    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups == 8 and f.metadata.num_rows == 200_000
    drop_page_cache(path)
    assert pq.read_table(path).equals(table)
    # random access: the footer first, then single row groups and columns out of order
    for i in (5, 0, 7):
        assert f.read_row_group(i, columns=["id", "blob"]).equals(
            table.slice(i * 25_000, 25_000).select(["id", "blob"]))
    f.close()
    drop_page_cache(path)
    assert pq.read_table(path, memory_map=True).equals(table)
    with pa.memory_map(str(path)) as mm:
        assert pq.read_table(mm).equals(table)
