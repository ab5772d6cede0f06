"""Two mounts of one volume: what one client writes and closes, the other sees when it opens.

The consistency promised is close-to-open (DESIGN §3): once a writer's close returned,
an open in another client reads the new bytes — neither its kernel page cache nor the
size its kernel cached may hide them, whatever it read just before. That is checked on
the first open, no retries. Names may be cached by the kernel for the entry TTL (1 s),
so namespace changes are polled for with a generous deadline; nothing asserts on wall
time.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from cluster import wait_for
from mounts import Mount

SIZES = [0, 1, 4097, 5 << 20, 17 << 20]
DEADLINE_S = 30.0


@pytest.fixture
def two_mounts(meta_url: str, make_cluster: object, make_mount: object) -> tuple[Mount, Mount]:
    cluster = make_cluster(meta_url)  # type: ignore[operator]
    return make_mount(cluster), make_mount(cluster)  # type: ignore[operator]


def read_uncached(path: Path) -> bytes:
    """Read ``path`` through a fresh descriptor, as a program would after open(2)."""
    with open(path, "rb") as f:
        return f.read()


def sees(path: Path, want: bytes) -> bool:
    try:
        return read_uncached(path) == want
    except FileNotFoundError:
        return False


def wait_content(path: Path, want: bytes, what: str) -> None:
    def ok() -> bool:
        return sees(path, want)

    try:
        wait_for(ok, what, DEADLINE_S)
    except AssertionError:
        got = read_uncached(path) if path.exists() else None
        detail = "missing" if got is None else f"{len(got)} bytes, want {len(want)}"
        if got is not None and len(got) == len(want):
            first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            detail += f", first difference at offset {first}"
        raise AssertionError(f"{what}: {path} reads {detail}") from None


def assert_content(path: Path, want: bytes, what: str) -> None:
    """Close-to-open, strictly: the first open after the writer's close reads ``want``."""
    got = read_uncached(path)
    if got != want:
        detail = f"{len(got)} bytes, want {len(want)}"
        diff = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), None)
        if diff is not None:
            detail += f", first difference at offset {diff}"
        raise AssertionError(f"{what}: {path} reads {detail}")


def gone(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def test_file_written_in_one_reads_identically_in_the_other(
    two_mounts: tuple[Mount, Mount],
) -> None:
    a, b = two_mounts
    rng = random.Random(5)
    (a.path / "data").mkdir()
    contents: dict[str, bytes] = {}
    for size in SIZES:
        data = rng.randbytes(size)
        contents[f"f{size}"] = data
        (a.path / "data" / f"f{size}").write_bytes(data)
    for name, data in contents.items():
        wait_content(b.path / "data" / name, data, f"{name} written in mount A, read in mount B")
        assert os.stat(b.path / "data" / name).st_size == len(data)

    # And the other way round: written in B, read in A.
    back = rng.randbytes(3 << 20)
    (b.path / "data" / "from-b").write_bytes(back)
    wait_content(a.path / "data" / "from-b", back, "written in mount B, read in mount A")


def test_overwrite_in_one_is_not_hidden_by_the_others_caches(
    two_mounts: tuple[Mount, Mount],
) -> None:
    """B reads (and stats) the file right before each change in A, so its kernel holds
    pages and a size still within their TTL when it opens the file again."""
    a, b = two_mounts
    rng = random.Random(6)
    pa, pb = a.path / "f", b.path / "f"

    def b_caches(want: bytes) -> None:
        assert read_uncached(pb) == want
        assert os.stat(pb).st_size == len(want)

    old = rng.randbytes(1 << 20)
    pa.write_bytes(old)
    wait_content(pb, old, "first version in B")

    # Same size, every byte new (opened without O_TRUNC: a pure overwrite).
    b_caches(old)
    new = rng.randbytes(len(old))
    with open(pa, "r+b") as f:
        f.write(new)
    assert_content(pb, new, "a same-size overwrite in A, opened again in B")

    # A few bytes in the middle of a page B has cached.
    b_caches(new)
    patched = bytearray(new)
    patched[123457 : 123457 + 3] = b"XYZ"
    with open(pa, "r+b") as f:
        f.seek(123457)
        f.write(b"XYZ")
    assert_content(pb, bytes(patched), "a 3-byte overwrite in A, opened again in B")

    # Shorter (open with O_TRUNC), then longer again by appends, small and large.
    b_caches(bytes(patched))
    short = rng.randbytes(100_000)
    pa.write_bytes(short)
    assert_content(pb, short, "a truncating rewrite in A, opened again in B")
    b_caches(short)
    tail = rng.randbytes(65536)
    with open(pa, "ab") as appender:
        appender.write(tail)
    assert_content(pb, short + tail, "a small append in A, opened again in B")
    b_caches(short + tail)
    big = rng.randbytes(6 << 20)
    with open(pa, "ab") as appender:
        appender.write(big)
    current = short + tail + big
    assert_content(pb, current, "a 6 MiB append in A, opened again in B")

    # B keeps a descriptor open (its file layer holds the file's slice map) while A
    # rewrites the file: a new open in B must still see the new bytes.
    held = os.open(pb, os.O_RDONLY)
    try:
        os.posix_fadvise(held, 0, 0, os.POSIX_FADV_DONTNEED)  # B's file layer must load the file
        assert os.pread(held, len(current), 0) == current
        newer = rng.randbytes(len(current))
        with open(pa, "r+b") as f:
            f.write(newer)
        assert_content(
            pb, newer, "an overwrite in A while B holds the file open, opened again in B"
        )
    finally:
        os.close(held)

    # Writes in B are seen by A in turn, after A had the file cached.
    assert read_uncached(pa) == newer
    assert os.stat(pa).st_size == len(newer)
    again = rng.randbytes(200_000)
    with open(pb, "r+b") as f:
        f.write(again)
    assert_content(pa, again + newer[len(again) :], "an overwrite in B, opened again in A")


def test_namespace_changes_in_one_are_seen_by_the_other(two_mounts: tuple[Mount, Mount]) -> None:
    a, b = two_mounts
    rng = random.Random(7)

    # mkdir and readdir agree, across more entries than one readdir page.
    (a.path / "d").mkdir()
    (a.path / "d" / "sub").mkdir()
    names = {f"n{i:04d}" for i in range(600)}
    for n in names:
        (a.path / "d" / n).write_bytes(n.encode())
    want = names | {"sub"}
    wait_for(
        lambda: set(os.listdir(b.path / "d")) == want,
        "B to list the 601 entries made in A",
        DEADLINE_S,
    )
    assert os.path.isdir(b.path / "d" / "sub")
    assert read_uncached(b.path / "d" / "n0599") == b"n0599"
    (b.path / "d" / "sub" / "from-b").write_bytes(b"hello from b")
    wait_for(
        lambda: os.listdir(a.path / "d" / "sub") == ["from-b"],
        "A to list the file made in B",
        DEADLINE_S,
    )

    # Renames within a directory, across directories, and of a directory.
    data = rng.randbytes(200_000)
    (a.path / "d" / "moving").write_bytes(data)
    wait_content(b.path / "d" / "moving", data, "B reads the file before the renames")
    os.rename(a.path / "d" / "moving", a.path / "d" / "moved")
    wait_for(lambda: gone(b.path / "d" / "moving"), "the old name to vanish in B", DEADLINE_S)
    wait_content(b.path / "d" / "moved", data, "renamed in A, read by its new name in B")
    os.rename(a.path / "d" / "moved", a.path / "d" / "sub" / "moved")
    wait_for(
        lambda: gone(b.path / "d" / "moved"),
        "the name moved to another directory to vanish in B",
        DEADLINE_S,
    )
    wait_content(b.path / "d" / "sub" / "moved", data, "moved across directories in A, read in B")
    os.rename(a.path / "d" / "sub", a.path / "sub2")
    wait_for(
        lambda: gone(b.path / "d" / "sub"),
        "the renamed directory's old name to vanish in B",
        DEADLINE_S,
    )
    wait_content(
        b.path / "sub2" / "moved", data, "a file under a directory renamed in A, read in B"
    )
    wait_for(
        lambda: sorted(os.listdir(b.path / "sub2")) == ["from-b", "moved"],
        "B to list the moved directory",
        DEADLINE_S,
    )

    # unlink in one: ENOENT in the other; a file the other holds open stays readable.
    wait_for(lambda: not gone(b.path / "d" / "n0007"), "B to see n0007", DEADLINE_S)
    os.unlink(a.path / "d" / "n0007")
    wait_for(lambda: gone(b.path / "d" / "n0007"), "the unlinked name to vanish in B", DEADLINE_S)
    with pytest.raises(FileNotFoundError):
        os.open(b.path / "d" / "n0007", os.O_RDONLY)
    held = rng.randbytes(3 << 20)
    (a.path / "held").write_bytes(held)
    wait_content(b.path / "held", held, "B sees the file it will hold open")
    fd = os.open(b.path / "held", os.O_RDONLY)
    try:
        os.unlink(a.path / "held")
        wait_for(lambda: gone(b.path / "held"), "the held file's name to vanish in B", DEADLINE_S)
        # Read from the cluster, not from the page cache.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = b"".join(os.pread(fd, 1 << 20, off) for off in range(0, len(held), 1 << 20))
        assert got == held, "a file unlinked in A while open in B must stay readable in B"
    finally:
        os.close(fd)

    # rmdir in the other direction; the listing of the root agrees in both at the end.
    os.unlink(b.path / "sub2" / "moved")
    os.unlink(b.path / "sub2" / "from-b")
    os.rmdir(b.path / "sub2")
    wait_for(lambda: gone(a.path / "sub2"), "the directory removed in B to vanish in A", DEADLINE_S)
    wait_for(
        lambda: sorted(os.listdir(a.path)) == sorted(os.listdir(b.path)) == ["d"],
        "both mounts to list the same root",
        DEADLINE_S,
    )
    assert len(os.listdir(a.path / "d")) == len(os.listdir(b.path / "d")) == 599
