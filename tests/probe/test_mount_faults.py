"""Probe: faults under a real FUSE mount — a DataNode, the mount itself, the database.

* a DataNode is SIGKILLed in the middle of a large write: the store client seals the
  broken extent, re-places it on the healthy nodes (degraded: two of three, DESIGN §7) and
  resends; the application sees neither error nor wrong byte, then or after a remount;
* two DataNodes freeze long enough to break the file's LogStream: the file layer sends
  the unacknowledged chunks to a new stream and the write completes once they are back;
* the mount process is SIGKILLed while files are being written: after a remount the
  namespace is sound and everything acknowledged by fsync is there, byte for byte;
* the metadata database goes away for a while: operations fail with EIO within a bounded
  time (no hang) and work again by themselves once it is back.

Programs that touch the mount run as subprocesses with a timeout, so a hang fails the test
instead of blocking the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cluster import Cluster, check_namespace, db_rows, files_equal, random_file, wait_for
from mounts import Mount, drop_page_cache
from pgserver import ThrowawayPostgres

MiB = 1 << 20


def same_bytes(src: Path, dst: Path) -> bool:
    drop_page_cache(dst)
    return files_equal(src, dst)


@contextmanager
def watchdog(proc: subprocess.Popen[bytes], m: Mount, timeout_s: float) -> Iterator[None]:
    """SIGKILL ``proc`` if it is still running after ``timeout_s``: a hang fails the test
    (the reader of its output sees EOF) instead of blocking the suite. The mount dies
    first: a program waiting in a FUSE request is not ended even by SIGKILL until the
    request is answered or aborted (in CI a hung flush once blocked the run for 80 min)."""
    def expire() -> None:
        m.kill()
        proc.kill()
    timer = threading.Timer(timeout_s, expire)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# ---- a: a DataNode dies during a large write ------------------------------------------

COPY = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f, open(dst, "wb") as g:
    done = 0
    while block := f.read(1 << 20):
        g.write(block)
        g.flush()
        done += len(block)
        print("written", done, flush=True)
    os.fsync(g.fileno())
print("closed", flush=True)
"""


def test_datanode_killed_during_a_large_write(meta_url: str, make_cluster, make_mount, tmp_path: Path) -> None:
    c: Cluster = make_cluster(meta_url)
    m: Mount = make_mount(c)
    src = random_file(tmp_path / "src.bin", 200 * MiB, seed=61)
    total = src.stat().st_size
    dst = m.path / "big.bin"
    killed_at = None
    last = b""
    with subprocess.Popen([sys.executable, "-c", COPY, str(src), str(dst)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc, watchdog(proc, m, 240):
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            words = line.split()
            if killed_at is None and words[0] == b"written" and int(words[1]) >= total * 0.3:
                c.datanodes[1].kill()  # SIGKILL: its open extents lose a replica mid-append
                killed_at = int(words[1])
            last = line
        err = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=300)
    assert killed_at is not None and killed_at < total
    assert proc.returncode == 0 and last == b"closed\n", err[-3000:]
    assert dst.stat().st_size == total
    assert same_bytes(src, dst)
    # extents allocated after the kill were placed degraded, on the two survivors only
    wait_for(lambda: c.alive_nodes() == 2, "the MetaNode to declare the killed DataNode dead")
    alive = {n["node_id"] for n in c.status()["nodes"] if n["alive"]}
    placed = db_rows(c.meta_url, "SELECT r.extent_id, r.node_id FROM replica r WHERE r.extent_id IN "
                     "(SELECT extent_id FROM slice WHERE ino = :ino)", ino=dst.stat().st_ino)
    nodes_of: dict[int, set[str]] = {}
    for extent_id, node_id in placed:
        nodes_of.setdefault(extent_id, set()).add(node_id)
    assert any(nodes == alive for nodes in nodes_of.values()), nodes_of

    m.stop()  # a fresh mount: no page cache, no block cache, the slice map from the database
    m.start()
    assert same_bytes(src, m.path / "big.bin")
    assert check_namespace(c.meta_url) == []


def test_a_stream_that_breaks_under_a_write_is_replaced(sqlite_url: str, make_cluster, make_mount,
                                                       tmp_path: Path) -> None:
    """Two of three DataNodes freeze (SIGSTOP) in the middle of a large write, for longer
    than the client waits for a placement: the file's LogStream breaks while the writer
    is blocked on its window. The file layer sends every unacknowledged chunk — the ones
    in flight and the one the blocked write was handing over — to a new stream, so once
    the nodes answer again the write completes and reads back byte for byte. (The blocked
    chunk used to be dropped with EIO; before that, the broken stream's in-flight tickets
    never completed and the writer hung in flush.)"""
    c: Cluster = make_cluster(sqlite_url, env={"APPENDFS_CLIENT_PLACEMENT_WAIT_S": "3"})
    m: Mount = make_mount(c, env={"APPENDFS_CLIENT_APPEND_TIMEOUT_S": "1"})
    src = random_file(tmp_path / "src.bin", 96 * MiB, seed=67)
    dst = m.path / "big.bin"
    frozen = [c.datanodes[0], c.datanodes[1]]
    last = b""
    with subprocess.Popen([sys.executable, "-c", COPY, str(src), str(dst)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc, watchdog(proc, m, 240):
        assert proc.stdout is not None and proc.stderr is not None
        try:
            for line in proc.stdout:
                words = line.split()
                if words[0] == b"written" and int(words[1]) == 24 * MiB:
                    for dn in frozen:
                        assert dn.popen is not None
                        dn.popen.send_signal(signal.SIGSTOP)
                    wait_for(lambda: "on a new stream" in m.text(), "the file layer to replace the broken stream", 60)
                    for dn in frozen:
                        dn.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                last = line
        finally:
            for dn in frozen:
                if dn.alive:
                    dn.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        err = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=240)
    assert proc.returncode == 0 and last == b"closed\n", err[-3000:]
    assert "not stored" not in m.text() and "not committed" not in m.text()
    m.stop()
    m.start()
    assert same_bytes(src, m.path / "big.bin")
    assert check_namespace(c.meta_url) == []


# ---- b: the mount dies while files are being written ------------------------------------

#: Writes into DIR forever (until the mount dies under it):
#:   s<i>: a whole file, fsynced, closed — printed as "synced s<i> SIZE" after fsync returned;
#:   u<i>: a file written and left open, never fsynced (lost or partial after the kill);
#:   log:  one file appended to in pieces, fsynced every third piece ("log SIZE" after fsync).
#: Every file's content is content(name, size): a prefix of one fixed random stream per name.
WRITERS = """
import os, random, sys
d = sys.argv[1]

def content(name, n):  # prefix-stable: content(name, n)[:k] == content(name, k)
    rng = random.Random(name)
    return b"".join(rng.randbytes(1 << 20) for _ in range(-(-n // (1 << 20))))[:n]

rng = random.Random(71)
log_data = content("log", 48 << 20)
log = open(os.path.join(d, "log"), "wb")
log_off = 0
left_open = []
i = 0
while True:
    name = f"s{i}"
    size = rng.choice([0, 1, 4095, 4096, 65537]) if i % 4 == 0 else rng.randrange(1, 3 << 20)
    with open(os.path.join(d, name), "wb") as f:
        f.write(content(name, size))
        f.flush()
        os.fsync(f.fileno())
    print("synced", name, size, flush=True)
    u = open(os.path.join(d, f"u{i}"), "wb")
    u.write(content(f"u{i}", rng.randrange(1, 2 << 20)))
    u.flush()
    left_open.append(u)
    n = rng.randrange(1, 256 << 10)
    if log_off + n <= len(log_data):
        log.write(log_data[log_off:log_off + n])
        log.flush()
        log_off += n
        if i % 3 == 0:
            os.fsync(log.fileno())
            print("log", log_off, flush=True)
    i += 1
"""


def expected(name: str, size: int) -> bytes:
    """content() of WRITERS: whole 1 MiB blocks of a random stream per name, so a prefix
    of a longer file is exactly the shorter one (randbytes(n) alone is not prefix-stable)."""
    rng = random.Random(name)
    return b"".join(rng.randbytes(MiB) for _ in range(-(-size // MiB)))[:size]


def describe_mismatch(got: bytes, want: bytes) -> str:
    first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    last = len(got) - next(i for i, (a, b) in enumerate(zip(reversed(got), reversed(want), strict=True)) if a != b)
    bad = got[first:last]
    kind = "zeros" if bad.count(0) == len(bad) else "other bytes"
    return f"wrong bytes in [{first}, {last}) of {len(got)}: {kind}"


def test_mount_killed_while_files_are_written(meta_url: str, make_cluster, make_mount, tmp_path: Path) -> None:
    """Verified after the remount: the namespace invariants hold; every file whose fsync
    returned has exactly its size and bytes; the log is at least as long as its last
    fsynced length; and every file (fsynced or not: u<i>, the log's tail) holds, within
    the size the namespace reports, exactly the prefix that was written — never zeros or
    bytes of another file (writes are sequential, and commits apply in order). No name
    appears that was not written."""
    c: Cluster = make_cluster(meta_url)
    m: Mount = make_mount(c)
    d = m.path / "w"
    d.mkdir()
    synced: dict[str, int] = {}
    log_synced = 0
    started: float | None = None
    with subprocess.Popen([sys.executable, "-c", WRITERS, str(d)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc, watchdog(proc, m, 240):
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            words = line.decode().split()
            if words[0] == "synced":
                synced[words[1]] = int(words[2])
            elif words[0] == "log":
                log_synced = int(words[1])
            if started is None:
                started = time.monotonic()
            # kill once the aged-buffer flusher (1 s here) has had time to commit some of
            # the never-fsynced data too, so the survivors include partial files
            if len(synced) >= 12 and log_synced and time.monotonic() - started > 3 and m.alive:
                m.kill()  # SIGKILL the mount: buffers, in-flight appends and commits die with it
        err = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=120)
    assert not m.alive and proc.returncode != 0, f"the writers should have died with the mount:\n{err[-2000:]}"
    assert "[Errno " in err, err[-2000:]  # an OSError from the dead mount, not a bug of the writer

    m.start()  # the same mountpoint, a new process and session
    assert check_namespace(c.meta_url) == []
    names = set(os.listdir(d))
    assert set(synced) <= names
    assert names <= {"log"} | {f"{p}{i}" for p in "su" for i in range(len(synced) + 1)}
    sizes: dict[str, int] = {}
    for name in sorted(names):
        data = (d / name).read_bytes()
        if name in synced:
            assert len(data) == synced[name], name
        elif name == "log":
            assert len(data) >= log_synced
        assert data == expected(name, len(data)), f"{name}: {describe_mismatch(data, expected(name, len(data)))}"
        sizes[name] = len(data)
    print(f"after the remount: {len(synced)} fsynced files intact; log {sizes.get('log')} bytes "
          f"(fsynced {log_synced}); never-fsynced files: {sorted((n, s) for n, s in sizes.items() if n[0] == 'u')}")

    # the remounted filesystem works normally
    (d / "after").write_bytes(b"after the crash\n" * 1000)
    drop_page_cache(d / "after")
    assert (d / "after").read_bytes() == b"after the crash\n" * 1000
    assert check_namespace(c.meta_url) == []


# ---- c: the database is down for a while ------------------------------------------------

#: One program per outage probe: each operation's result ("ok" or the errno name) as JSON.
OPS = """
import errno, hashlib, json, os, sys
mnt, tag, want = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}

def op(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))

def read():
    with open(os.path.join(mnt, "before.bin"), "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != want:
            raise OSError(0, "wrong bytes")

def create():
    with open(os.path.join(mnt, f"new-{tag}.bin"), "wb") as f:
        f.write(tag.encode() * 10000)

op("stat", lambda: os.stat(os.path.join(mnt, "before.bin")))
op("listdir", lambda: os.listdir(os.path.join(mnt, "d")))
op("read", read)
op("create", create)
op("mkdir", lambda: os.mkdir(os.path.join(mnt, "d", f"dir-{tag}")))
print(json.dumps(out))
"""

#: A program holding a file open across the outage: a write+fsync before it, one during
#: it (must fail: EIO), and one after it at a later offset (retried until the database
#: answers again). Markers in a local directory say when the outage starts and ends.
HOLDER = """
import errno, json, os, sys, time
path, markers = sys.argv[1], sys.argv[2]
result = {}

def wait_marker(name):
    deadline = time.monotonic() + 180
    while not os.path.exists(os.path.join(markers, name)):
        assert time.monotonic() < deadline, name
        time.sleep(0.05)

def write_fsync(fd, off, data):
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
result["before"] = write_fsync(fd, 0, b"1" * 300000)
open(os.path.join(markers, "opened"), "w").close()
wait_marker("down")
result["during"] = write_fsync(fd, 300000, b"2" * 200000)
open(os.path.join(markers, "tried"), "w").close()
wait_marker("up")
deadline = time.monotonic() + 120
failures = []
while (r := write_fsync(fd, 500000, b"3" * 100000)) != "ok" and time.monotonic() < deadline:
    failures.append(r)
    time.sleep(0.5)
result["after"] = r
result["after_failures"] = failures
os.close(fd)
print(json.dumps(result))
"""

META_TIMEOUT_S = 3


def finish(proc: subprocess.Popen[bytes], m: Mount, timeout_s: float, what: str) -> bytes:
    """Wait for ``proc``; if it hangs, fail. A process waiting for a FUSE reply cannot be
    killed until the reply comes, so the mount is killed first (that aborts the requests)."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        m.kill()
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{what} hung for {timeout_s:.0f} s (the mount was killed to end it)") from None
    assert proc.returncode == 0, f"{what}: {err.decode(errors='replace')[-3000:]}"
    return out


def run_ops(m: Mount, tag: str, want: str) -> dict[str, str]:
    # every FUSE request gives up after META_TIMEOUT_S (x2 at most when SQLite is busy);
    # five operations of one or two requests each: 90 s is a hang, not slowness
    proc = subprocess.Popen([sys.executable, "-c", OPS, str(m.path), tag, want], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    return json.loads(finish(proc, m, 90, f"operations {tag!r}"))  # type: ignore[no-any-return]


@contextmanager
def sqlite_locked(url: str) -> Iterator[None]:
    """Another process holds the SQLite database's write lock (BEGIN EXCLUSIVE) until exit."""
    path = url.removeprefix("sqlite:///")
    script = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None); "
              "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read(); db.execute('ROLLBACK')")
    with subprocess.Popen([sys.executable, "-c", script, path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        try:
            assert holder.stdout.readline() == b"locked\n"
            yield
        finally:
            holder.stdin.close()
            holder.wait(60)


@contextmanager
def outage(meta_url: str, pg: ThrowawayPostgres | None) -> Iterator[None]:
    if pg is None:
        with sqlite_locked(meta_url):
            yield
    else:
        pg.pause()
        try:
            yield
        finally:
            pg.resume()


def test_database_outage_gives_eio_then_recovers(meta_url: str, make_cluster, make_mount, tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    """The outage, per engine:

    * PostgreSQL: the server is stopped (fast shutdown: connections are cut, new ones
      refused) and started again — a database host going down. Every operation that
      needs the namespace fails with EIO.
    * SQLite: the database is a local file, so it does not "go away"; what does happen is
      another process holding its write lock — an operator's ``sqlite3`` shell left in a
      transaction, a backup or VACUUM. The test holds ``BEGIN EXCLUSIVE`` from another
      process. (Renaming or chmod-ing the directory does not cut off connections already
      open, and root ignores permissions, so neither would be an outage.) In WAL mode
      readers are not blocked by the write lock, so stat and readdir keep working;
      everything that writes the namespace — open (it records the open handle), create,
      mkdir, the commit behind fsync — fails with EIO once its budget is spent.

    The mount runs with APPENDFS_FS_META_TIMEOUT_S=3; every probe runs in a subprocess
    with a timeout, so an operation that hangs instead of failing fails the test."""
    sqlite = meta_url.startswith("sqlite")
    pg = None if sqlite else request.getfixturevalue("stoppable_pg")  # skips (with a reason) if external
    c: Cluster = make_cluster(meta_url)
    m: Mount = make_mount(c, env={"APPENDFS_FS_META_TIMEOUT_S": str(META_TIMEOUT_S)})
    before = random.Random(81).randbytes(2 * MiB + 17)
    (m.path / "before.bin").write_bytes(before)
    (m.path / "d").mkdir()
    want = hashlib.sha256(before).hexdigest()
    assert run_ops(m, "warmup", want) == dict.fromkeys(["stat", "listdir", "read", "create", "mkdir"], "ok")

    markers = tmp_path / "markers"
    markers.mkdir()
    held = m.path / "held.bin"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(held), str(markers)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (markers / "opened").exists() or holder.poll() is not None, "the holder to open its file")
        with outage(meta_url, pg):
            time.sleep(1.5)  # let the kernel's attribute and entry caches (1 s) expire
            (markers / "down").touch()
            during = run_ops(m, "down", want)
            wait_for(lambda: (markers / "tried").exists() or holder.poll() is not None,
                     "the holder's fsync during the outage to return", 90)
            assert m.alive
        (markers / "up").touch()
        held_result = json.loads(finish(holder, m, 240, "the program holding a file open"))
    finally:
        if holder.poll() is None:
            m.kill()
            holder.send_signal(signal.SIGKILL)
            holder.wait()

    if sqlite:
        assert during == {"stat": "ok", "listdir": "ok", "read": "EIO", "create": "EIO", "mkdir": "EIO"}
    else:
        assert during == dict.fromkeys(["stat", "listdir", "read", "create", "mkdir"], "EIO")
    # After an outage longer than the stream lease (3 s here) the MetaNode fences this
    # client's streams as soon as it can write again; appends on such a stream fail. The
    # file layer sends those chunks again on a new stream (fs: _resend), so the first
    # fsync after the outage succeeds: nothing acknowledged to the program is lost.
    print(f"held file: {held_result}")
    failures = held_result.pop("after_failures")
    assert held_result == {"before": "ok", "during": "EIO", "after": "ok"}
    assert failures == [], failures

    # back by itself: no remount, no restart
    wait_for(lambda: run_ops(m, f"up{time.monotonic_ns()}", want)["create"] == "ok",
             "the mount to work again after the outage", 120, 1)
    assert run_ops(m, "after", want) == dict.fromkeys(["stat", "listdir", "read", "create", "mkdir"], "ok")
    assert m.alive
    drop_page_cache(held)
    data = held.read_bytes()
    assert len(data) == 600000
    assert data[:300000] == b"1" * 300000 and data[500000:] == b"3" * 100000
    # the write whose fsync failed: either all there or a hole, never other bytes
    assert data[300000:500000] in (b"2" * 200000, b"\0" * 200000)
    # the operations that failed left nothing behind
    assert not (m.path / "new-down.bin").exists() and not (m.path / "d" / "dir-down").exists()
    assert check_namespace(c.meta_url) == []
