"""Random file operations on a real mount, checked byte for byte against a local file.

Each seed runs a few hundred operations on one file in the mount and the same operations
on a file on local disk: writes of every size (a few bytes up to past the 4 MiB chunk, at
chunk boundaries, overlapping earlier ones, leaving holes), truncations both ways, reads
through the writing descriptor, reads through a second descriptor whose page cache is
dropped first (so the file layer itself must serve bytes still in its write buffer), mmap
reads, fsync, and close/reopen (with and without O_TRUNC). Every read is compared with
the local file; a mismatch names the seed and the operation index, so the failing run can
be replayed.

Two regression tests follow: open(O_TRUNC) truncates (libfuse's atomic O_TRUNC), and
readers racing a committing writer never see a byte go missing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mounts import Mount

SEEDS = [11, 23, 37]
OPS_PER_SEED = 400
CHUNK_BYTES = 4 << 20  # the file layer's default chunk_bytes: a buffer becomes a slice here
MAX_SIZE = 24 << 20
_PAGE = mmap.ALLOCATIONGRANULARITY

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _AT_STATX_FORCE_SYNC, _STATX_SIZE = -100, 0x2000, 0x200


def forced_stat(path: Path) -> None:
    """statx(AT_STATX_FORCE_SYNC): the kernel asks the mount for fresh attributes now,
    whatever its attribute TTL, and takes the answer (as it does when a TTL expires)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(_AT_FDCWD, os.fsencode(path), _AT_STATX_FORCE_SYNC, _STATX_SIZE, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


_WEIGHTS = {
    "write": 30,
    "read": 16,
    "read2": 12,
    "write_read2": 8,
    "mmap": 8,
    "truncate": 6,
    "fsync": 4,
    "reopen": 5,
    "reopen_trunc": 1,
    "stat": 5,
}


def first_difference(got: bytes, want: bytes) -> int:
    """Offset of the first differing byte (or of the shorter end); -1 when equal."""
    if got == want:
        return -1
    n = min(len(got), len(want))
    for i in range(0, n, 4096):
        if got[i : min(i + 4096, n)] != want[i : min(i + 4096, n)]:
            return i + next(
                j
                for j, (x, y) in enumerate(zip(got[i : i + 4096], want[i : i + 4096], strict=False))
                if x != y
            )
    return n


@dataclass
class Pair:
    """The file in the mount and its local twin, opened the same way."""

    mnt: Path
    local: Path
    fm: int = -1  # read-write descriptor in the mount
    fm2: int = -1  # second, read-only descriptor in the mount
    fl: int = -1  # read-write descriptor of the local file
    size: int = 0
    max_size: int = 0
    written_bytes: int = 0
    log: list[str] = field(default_factory=list)

    def open(self, create: bool = False, trunc: bool = False) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0) | (os.O_TRUNC if trunc else 0)
        self.fm = os.open(self.mnt, flags, 0o644)
        self.fl = os.open(self.local, flags, 0o644)
        self.fm2 = os.open(self.mnt, os.O_RDONLY)

    def close(self) -> None:
        for fd in (self.fm2, self.fm, self.fl):
            if fd >= 0:
                os.close(fd)
        self.fm = self.fm2 = self.fl = -1


def pick_write(rng: random.Random, size: int) -> tuple[int, int]:
    r = rng.random()
    if r < 0.55:
        n = rng.randint(1, 4096)
    elif r < 0.88:
        n = rng.randint(4097, 512 << 10)
    else:
        n = rng.randint(3 << 20, 6 << 20)  # crosses at least one chunk boundary
    where = rng.random()
    if where < 0.3:  # around a chunk boundary
        k = rng.randint(1, MAX_SIZE // CHUNK_BYTES - 1)
        off = k * CHUNK_BYTES + rng.randint(-(64 << 10), 64 << 10)
    elif where < 0.8:  # inside or at the end of the data: overlapping
        off = rng.randint(0, size)
    else:  # past the end: a hole
        off = size + rng.randint(1, 1 << 20)
    off = max(0, min(off, MAX_SIZE - 1))
    return off, min(n, MAX_SIZE - off)


def pick_read(rng: random.Random, size: int) -> tuple[int, int]:
    off = rng.randint(0, size + 4096)
    r = rng.random()
    n = (
        rng.randint(1, 4096)
        if r < 0.5
        else rng.randint(4097, 1 << 20)
        if r < 0.9
        else rng.randint(1 << 20, 5 << 20)
    )
    return off, n


def check(p: Pair, what: str, got: bytes, off: int, n: int) -> None:
    want = os.pread(p.fl, n, off)
    if got != want:
        d = first_difference(got, want)
        raise AssertionError(
            f"{what}: {len(got)} bytes read at {off} (asked {n}), want {len(want)}; "
            f"first difference at file offset {off + d}: got {got[d : d + 8].hex()} "
            f"want {want[d : d + 8].hex()}"
        )


def step(p: Pair, rng: random.Random, op: str) -> str:
    """Apply one operation to both files; returns its description for the log."""
    if op == "write" or op == "write_read2":
        off, n = pick_write(rng, p.size)
        data = rng.randbytes(n)
        assert os.pwrite(p.fm, data, off) == n
        assert os.pwrite(p.fl, data, off) == n
        p.size = max(p.size, off + n)
        p.max_size = max(p.max_size, p.size)
        p.written_bytes += n
        if op == "write_read2":  # the bytes are almost surely still in the write buffer
            lo = max(0, off - rng.randint(0, 8192))
            hi = off + n + rng.randint(0, 8192)
            os.posix_fadvise(p.fm2, 0, 0, os.POSIX_FADV_DONTNEED)
            check(
                p,
                f"read via 2nd fd right after write({off}, {n})",
                os.pread(p.fm2, hi - lo, lo),
                lo,
                hi - lo,
            )
        return f"{op}(off={off}, n={n})"
    if op in ("read", "read2"):
        off, n = pick_read(rng, p.size)
        fd = p.fm
        if op == "read2":
            fd = p.fm2
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the file layer answer
        check(p, op, os.pread(fd, n, off), off, n)
        return f"{op}(off={off}, n={n})"
    if op == "mmap":
        if p.size == 0:
            return "mmap(skipped: empty)"
        off = rng.randint(0, p.size - 1)
        n = rng.randint(1, min(p.size - off, 2 << 20))
        base = off - off % _PAGE
        with mmap.mmap(p.fm2, off + n - base, prot=mmap.PROT_READ, offset=base) as mm:
            got = mm[off - base : off - base + n]
        check(p, "mmap read", got, off, n)
        return f"mmap(off={off}, n={n})"
    if op == "truncate":
        new = (
            rng.randint(0, p.size)
            if rng.random() < 0.5
            else min(MAX_SIZE, p.size + rng.randint(1, 3 << 20))
        )
        os.ftruncate(p.fm, new)
        os.ftruncate(p.fl, new)
        p.size = new
        p.max_size = max(p.max_size, p.size)
        return f"truncate({new})"
    if op == "fsync":
        os.fsync(p.fm)
        return "fsync"
    if op in ("reopen", "reopen_trunc"):
        p.close()
        p.open(trunc=op == "reopen_trunc")
        if op == "reopen_trunc":
            p.size = 0
        return op
    assert op == "stat"
    for fd, name in ((p.fm, "fstat"), (p.fm2, "fstat 2nd fd")):
        got_size = os.fstat(fd).st_size
        assert got_size == p.size, f"{name}: size {got_size}, want {p.size}"
    return "stat"


def compare_whole(p: Pair, what: str) -> None:
    assert os.stat(p.mnt).st_size == p.size, (
        f"{what}: stat size {os.stat(p.mnt).st_size}, want {p.size}"
    )
    fd = os.open(p.mnt, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for off in range(0, p.size + 1, 1 << 20):
            check(p, what, os.pread(fd, 1 << 20, off), off, 1 << 20)
    finally:
        os.close(fd)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_ops_match_local_file(module_mount: Mount, tmp_path: Path, seed: int) -> None:
    d = module_mount.path / f"random-ops-{seed}"
    d.mkdir()
    p = Pair(d / "f", tmp_path / "f")
    rng = random.Random(seed)
    ops, weights = list(_WEIGHTS), list(_WEIGHTS.values())
    p.open(create=True)
    i, op = -1, "open"
    try:
        while i + 1 < OPS_PER_SEED:
            i += 1
            op = rng.choices(ops, weights)[0]
            p.log.append(step(p, rng, op))
        p.close()
        i = OPS_PER_SEED
        p.fl = os.open(p.local, os.O_RDONLY)
        compare_whole(p, "after the last close")
        op = "coverage"
        print(
            f"seed {seed}: {OPS_PER_SEED} ops, {p.written_bytes} bytes written, largest size {p.max_size}"
        )
        assert p.max_size > 2 * CHUNK_BYTES, (
            "the operations never crossed two chunks: raise the write sizes"
        )
    except (AssertionError, OSError) as exc:
        recent = "\n  ".join(f"{j}: {s}" for j, s in enumerate(p.log) if j >= len(p.log) - 15)
        msg = f"seed {seed}, op {i} ({op}): {exc}\nlast operations:\n  {recent}"
        print(msg)
        raise AssertionError(msg) from exc
    finally:
        p.close()


def test_open_with_o_trunc_truncates(module_mount: Mount) -> None:
    """libfuse 3 negotiates atomic O_TRUNC: no setattr precedes such an open, the mount
    must truncate itself (it once did not, and a shorter rewrite kept the old tail)."""
    d = module_mount.path / "o-trunc"
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"a" * 5000)
    f.write_bytes(b"b" * 300)  # O_WRONLY | O_CREAT | O_TRUNC on an existing file
    assert f.read_bytes() == b"b" * 300
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    assert f.stat().st_size == 0 and f.read_bytes() == b""

    # Bytes still buffered behind another descriptor are truncated too, and stay so.
    fd = os.open(f, os.O_WRONLY)
    try:
        os.write(fd, b"c" * 10000)
        os.close(os.open(f, os.O_RDWR | os.O_TRUNC))
        assert f.stat().st_size == 0
    finally:
        os.close(fd)
    assert f.read_bytes() == b""


@pytest.mark.parametrize(
    ("total", "piece", "fsync_every"),
    [(12 << 20, 64 << 10, 3), (4 << 20, 16 << 10, 1)],
    ids=["buffered", "commit-per-write"],
)
def test_reads_racing_commits_see_every_byte(
    module_mount: Mount, total: int, piece: int, fsync_every: int
) -> None:
    """Readers through another descriptor chase a writer whose fsyncs commit often, so
    reads overlap chunks being sent, slice-map loads overlap commits, and attribute reads
    (forced by a third thread) overlap commits. Each once lost bytes for a moment: a chunk
    on its way to the stream was in no list reads looked at; a map loaded before a commit
    but cached after it hid the committed chunk; attributes read before a commit but
    answered after it gave the kernel an older size, so reads came back short."""
    d = module_mount.path / f"reads-racing-commits-{piece}"
    d.mkdir()
    f = d / "f"
    want = random.Random(99).randbytes(total)
    window = 16 * piece  # readers chase the newest bytes: those are the ones in motion
    published = 0
    done = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        nonlocal published
        fd = os.open(f, os.O_WRONLY)
        try:
            for i, off in enumerate(range(0, total, piece)):
                os.pwrite(fd, want[off : off + piece], off)
                published = off + piece
                if i % fsync_every == fsync_every - 1:
                    os.fsync(fd)
        finally:
            os.close(fd)
            done.set()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(f, os.O_RDONLY)
        try:
            while not done.is_set() and not errors:
                top = published
                if top == 0:
                    continue
                off = rng.randint(max(0, top - window), top - 1)
                n = min(rng.randint(1, 4 * piece), top - off)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                got = os.pread(fd, n, off)
                if got != want[off : off + n]:
                    bad = off + first_difference(got, want[off : off + n])
                    errors.append(
                        f"read({off}, {n}) while {top} bytes were written: {len(got)} bytes, "
                        f"wrong from offset {bad}: {got[bad - off : bad - off + 8].hex()}"
                    )
        finally:
            os.close(fd)

    def statter() -> None:
        while not done.is_set() and not errors:
            forced_stat(f)

    os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o644))
    threads = [threading.Thread(target=writer), threading.Thread(target=statter)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[0]
    assert f.read_bytes() == want
