"""A directory's attributes after a create or unlink of ours: answered from it, still exact.

The kernel drops a directory's cached attributes after every create or unlink in it and
asks for them again at the next path walk (its permission check). The file layer answers
that one getattr with the directory row the transaction read, when the transaction left it
unchanged (fs/filesystem.py ``_left_unchanged``). These tests pin both halves: the answer is
used (``appendfs_mount_dir_attrs_reused``), and whatever this client does to the directory
meanwhile — mkdir (nlink), chmod, renames, unlinks, xattrs — the attributes it answers are
the namespace's own.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Callable

import trio
from cluster import Cluster, free_port, scrape
from mounts import Mount

from appendfs.db import make_engine
from appendfs.fs import FileSystem, FsConfig
from appendfs.meta import ROOT_INO, Attr, FsError, Meta, MetaConfig

_COMPARED = ("ino", "kind", "mode", "uid", "gid", "nlink", "size", "mtime_ns", "ctime_ns", "parent")


def _same(a: Attr, b: Attr) -> dict[str, tuple[int, int]]:
    return {f: (getattr(a, f), getattr(b, f)) for f in _COMPARED if getattr(a, f) != getattr(b, f)}


def test_creates_and_unlinks_answer_the_kernels_directory_getattr_and_stat_stays_exact(
        meta_url: str, make_cluster: Callable[..., Cluster], make_mount: Callable[..., Mount]) -> None:
    port = free_port()
    m = make_mount(make_cluster(meta_url), env={"APPENDFS_MOUNT_METRICS": f"127.0.0.1:{port}"})
    d = m.path / "d"
    d.mkdir()
    before = scrape(port)["appendfs_mount_dir_attrs_reused"]
    for i in range(40):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * 4096)
        os.close(fd)
    reused = scrape(port)["appendfs_mount_dir_attrs_reused"] - before
    # The directory's mtime is rewritten at most every dir_mtime_granularity_ns (100 ms);
    # only those creates leave nothing to reuse. 40 creates take far less than 3 s.
    assert reused >= 10, f"only {reused} of 40 directory getattrs were answered from the create"

    meta = Meta(make_engine(meta_url, pool_size=2), MetaConfig())
    try:
        def check(what: str) -> None:
            st = os.stat(d)
            a = meta.getattr(meta.lookup(ROOT_INO, b"d").ino)
            got = (stat.S_IMODE(st.st_mode), st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)
            assert got == (a.mode, a.nlink, a.mtime_ns, a.ctime_ns), what

        check("after 40 creates")
        os.chmod(d, 0o750)
        (d / "g").write_bytes(b"y")
        check("chmod, then a create")
        (d / "sub").mkdir()
        (d / "h").write_bytes(b"z")
        check("mkdir, then a create")
        assert os.stat(d).st_nlink == 3
        before = scrape(port)["appendfs_mount_dir_attrs_reused"]
        for i in range(40):
            os.unlink(d / f"f{i}")
        reused = scrape(port)["appendfs_mount_dir_attrs_reused"] - before
        assert reused >= 10, f"only {reused} of 40 directory getattrs were answered from the unlink"
        check("after 40 unlinks")
    finally:
        meta.close()


def test_every_change_of_ours_to_a_directory_ends_the_reused_answer(
        meta_url: str, make_cluster: Callable[..., Cluster]) -> None:
    """Through the file layer, with no kernel between: each of our changes to the directory
    comes right after a create left an answer to reuse, and the next getattr must still
    equal the row (random sequences, fixed seeds)."""
    make_cluster(meta_url)
    ref = Meta(make_engine(meta_url, pool_size=2), MetaConfig())
    try:
        trio.run(_changes_after_creates, meta_url, ref)
    finally:
        ref.close()


_CHANGES = ("none", "mkdir", "rmdir", "chmod", "utimes", "unlink", "rename", "link", "setxattr",
            "removexattr", "symlink", "mknod")


async def _changes_after_creates(meta_url: str, ref: Meta) -> None:
    async with FileSystem.connect(meta_url, FsConfig()) as fs:
        d = (await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).ino
        names: list[bytes] = []
        dirs: list[bytes] = []
        reused = fs.dir_attrs_reused
        # A directory whose mtime is old: the next create or unlink rewrites it, and then
        # there is nothing to reuse (the row it read is no longer the directory's).
        for i, op in enumerate((b"create", b"unlink", b"symlink", b"create", b"unlink")):
            await fs.setattr(d, mtime_ns=1_000_000_000 + i)
            name = b"old-" + op + bytes([48 + i])
            if op == b"unlink":
                await fs.unlink(d, b"old-create" + bytes([48 + i - 1]))
            elif op == b"symlink":
                await fs.symlink(d, name, b"target", 0, 0)
            else:
                fh, _ = await fs.create(d, name, 0o644, 0, 0, os.O_WRONLY)
                await fs.release(fh)
            got, want = await fs.getattr(d), ref.getattr(d)
            assert want.mtime_ns > 10**18 and not _same(got, want), (op, _same(got, want))
        for seed in range(3):
            rng = random.Random(seed)
            for step in range(40):
                n = f"s{seed}-{step}".encode()
                fh, _ = await fs.create(d, n, 0o644, 0, 0, os.O_WRONLY)
                await fs.release(fh)
                names.append(n)
                # one or two changes: the second comes after an unlink's or symlink's answer
                changes = [rng.choice(_CHANGES) for _ in range(rng.choice((1, 2)))]
                for change in changes:
                    await _change(fs, rng, d, n, change, names, dirs)
                got = await fs.getattr(d)
                want = ref.getattr(d)
                assert not _same(got, want), (seed, step, changes, _same(got, want))
        # Many steps left the directory's row alone after their create or unlink: those
        # answers were used (the 'none' steps alone are about 1 in 12).
        assert fs.dir_attrs_reused - reused >= 5


async def _change(fs: FileSystem, rng: random.Random, d: int, n: bytes, change: str,
                  names: list[bytes], dirs: list[bytes]) -> None:
    """One change of ours to directory ``d`` (``names``: its entries we may remove)."""
    if change == "mkdir":
        dirs.append(b"sub" + n + bytes([48 + len(dirs) % 10]))
        await fs.mkdir(d, dirs[-1], 0o755, 0, 0)
    elif change == "rmdir" and dirs:
        await fs.rmdir(d, dirs.pop())
    elif change == "chmod":
        await fs.setattr(d, mode=rng.choice([0o700, 0o755, 0o2775]))
    elif change == "utimes":
        await fs.setattr(d, mtime_ns=rng.randrange(1, 10**18))
    elif change == "unlink" and names:
        await fs.unlink(d, names.pop(rng.randrange(len(names))))
    elif change == "rename" and names:
        old = names.pop(rng.randrange(len(names)))
        names.append(old + b".r")
        await fs.rename(d, old, d, names[-1])
    elif change == "link" and names:
        src = await fs.lookup(d, names[0])
        names.append(names[0] + b".l" + n + bytes([48 + len(names) % 10]))
        await fs.link(src.ino, d, names[-1])
    elif change == "setxattr":
        await fs.setxattr(d, b"user.k", n)
    elif change == "removexattr":
        try:
            await fs.removexattr(d, b"user.k")
        except FsError:  # nothing set: ENODATA, and nothing changed
            pass
    elif change == "symlink":
        names.append(n + b".s" + bytes([48 + len(names) % 10]))
        await fs.symlink(d, names[-1], b"target", 0, 0)
    elif change == "mknod":
        names.append(n + b".n" + bytes([48 + len(names) % 10]))
        await fs.mknod(d, names[-1], stat.S_IFIFO | 0o644, 0, 0, 0)
