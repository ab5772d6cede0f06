"""Many processes at once in one mount: the namespace stays sound, the data stays valid.

Eight worker processes each run ~150 random operations on a small shared tree (create,
write, append, read, rename within and across directories, unlink, mkdir/rmdir, hard
link, stat, readdir), so their names collide on purpose. Races produce the errors POSIX
promises (ENOENT, EEXIST, ENOTEMPTY), which the workers count and ignore; any other
errno — EIO above all — or a dead mount fails the test.

The data is self-checking: a write at file offset ``x`` stores ``pattern(x)``, an append
stores 0xEE bytes and holes read as zeros, so every byte any reader ever sees must be
one of those three — a slice laid at the wrong offset or a stale overlay shows up. After
the run the mount must still answer, every file must read back valid with ``st_size``
bytes and ``st_nlink`` names, and the namespace invariant check must find nothing.

The workers are this file run as a script (``python test_stress.py ROOT WORKER SEED OPS``),
printing one JSON summary line.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mounts import Mount

WORKERS = 8
OPS_PER_WORKER = 150
DIRS, SUBDIRS, FILES = 3, 3, 4
EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY}
APPEND_BYTE = 0xEE
_PERIOD = 160  # pattern bytes are 1..160: never 0 (a hole) nor APPEND_BYTE
_MAX_WRITE = 1 << 20
_PATTERN = bytes(i % _PERIOD + 1 for i in range(_PERIOD + _MAX_WRITE))
# byte → 0 if it may appear anywhere (hole or append), else 0xFF (it must match the pattern)
_NOT_FREE = bytes(0 if b in (0, APPEND_BYTE) else 0xFF for b in range(256))
_NONZERO = bytes(0 if b == 0 else 0xFF for b in range(256))

_WEIGHTS = {
    "create": 14,
    "write": 12,
    "append": 10,
    "read": 12,
    "rename_file": 10,
    "rename_dir": 4,
    "unlink": 8,
    "mkdir": 6,
    "rmdir": 5,
    "link": 6,
    "stat": 8,
    "readdir": 5,
    "private": 4,
}


def pattern(off: int, n: int) -> bytes:
    """What a write of ``n`` bytes at file offset ``off`` stores."""
    start = off % _PERIOD
    if n <= _MAX_WRITE:
        return _PATTERN[start : start + n]
    return (_PATTERN[start : start + _PERIOD] * (n // _PERIOD + 1))[:n]


def invalid_offset(data: bytes, off: int) -> int:
    """-1 if every byte of ``data`` (read at ``off``) is 0, APPEND_BYTE or pattern(offset);
    else the file offset of the first byte that is none of them."""
    if not data:
        return -1
    want = pattern(off, len(data))
    diff = (int.from_bytes(data, "big") ^ int.from_bytes(want, "big")).to_bytes(len(data), "big")
    bad = int.from_bytes(diff.translate(_NONZERO), "big") & int.from_bytes(
        data.translate(_NOT_FREE), "big"
    )
    if not bad:
        return -1
    return off + len(data) - 1 - (bad.bit_length() - 1) // 8


# ---- the worker (a separate process) ---------------------------------------------------


class Worker:
    def __init__(self, root: Path, wid: int, seed: int) -> None:
        self.root = root
        self.wid = wid
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def file_path(self) -> Path:
        d = self.root / f"d{self.rng.randrange(DIRS)}"
        if self.rng.random() < 0.5:
            d = d / f"s{self.rng.randrange(SUBDIRS)}"
        return d / f"f{self.rng.randrange(FILES)}"

    def dir_path(self) -> Path:
        return self.root / f"d{self.rng.randrange(DIRS)}" / f"s{self.rng.randrange(SUBDIRS)}"

    def write_size(self) -> int:
        r = self.rng.random()
        if r < 0.7:
            return self.rng.randint(1, 8 << 10)
        if r < 0.95:
            return self.rng.randint(8 << 10, 128 << 10)
        return self.rng.randint(512 << 10, _MAX_WRITE)

    def verify(self, what: str, path: Path, data: bytes, off: int = 0) -> None:
        bad = invalid_offset(data, off)
        if bad >= 0:
            self.unexpected.append(
                f"{what} {path}: byte {data[bad - off]:#x} at offset {bad} is neither "
                f"a hole, an append nor pattern {pattern(bad, 1)[0]:#x}"
            )

    def op(self, name: str) -> None:
        rng = self.rng
        if name == "create":
            path, n = self.file_path(), self.write_size()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, pattern(0, n))
            finally:
                os.close(fd)
        elif name == "write":
            path, off, n = self.file_path(), rng.randint(0, 1 << 20), self.write_size()
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, pattern(off, n), off)
            finally:
                os.close(fd)
        elif name == "append":
            path = self.file_path()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, bytes([APPEND_BYTE]) * self.write_size())
            finally:
                os.close(fd)
        elif name == "read":
            path = self.file_path()
            self.verify("read", path, path.read_bytes())
        elif name == "rename_file":
            os.rename(self.file_path(), self.file_path())
        elif name == "rename_dir":
            os.rename(self.dir_path(), self.dir_path())
        elif name == "unlink":
            os.unlink(self.file_path())
        elif name == "mkdir":
            os.mkdir(self.dir_path())
        elif name == "rmdir":
            os.rmdir(self.dir_path())
        elif name == "link":
            os.link(self.file_path(), self.file_path())
        elif name == "stat":
            os.lstat(self.file_path() if rng.random() < 0.7 else self.dir_path())
        elif name == "readdir":
            d = self.root / f"d{rng.randrange(DIRS)}"
            os.listdir(d if rng.random() < 0.5 else d / f"s{rng.randrange(SUBDIRS)}")
        else:
            self.private()

    def private(self) -> None:
        """A file only this worker touches: what it wrote it must read back exactly."""
        path = self.root / "private" / f"w{self.wid}"
        data = self.rng.randbytes(self.write_size())
        path.write_bytes(data)
        got = path.read_bytes()
        if got != data:
            self.unexpected.append(
                f"private {path}: read {len(got)} bytes, wrote {len(data)}, differ"
            )

    def run(self, ops: int) -> dict[str, Any]:
        names, weights = list(_WEIGHTS), list(_WEIGHTS.values())
        for i in range(ops):
            name = self.rng.choices(names, weights)[0]
            try:
                self.op(name)
                self.counts[f"{name} ok"] += 1
            except OSError as exc:
                if exc.errno in EXPECTED:
                    self.counts[f"{name} {errno.errorcode[exc.errno]}"] += 1
                else:
                    self.unexpected.append(f"op {i} {name}: {exc!r}")
        return {"worker": self.wid, "counts": dict(self.counts), "unexpected": self.unexpected}


# ---- the test ---------------------------------------------------------------------------


def check_tree(root: Path) -> tuple[int, list[str]]:
    """Read every file after the run: valid bytes, st_size of them, st_nlink names each."""
    problems: list[str] = []
    names: Counter[int] = Counter()
    nlinks: dict[int, tuple[int, Path]] = {}
    files = 0
    for dirpath, _, filenames in os.walk(root, onerror=lambda e: problems.append(f"walk: {e!r}")):
        for fn in filenames:
            path = Path(dirpath) / fn
            st = os.lstat(path)
            data = path.read_bytes()
            files += 1
            names[st.st_ino] += 1
            nlinks[st.st_ino] = (st.st_nlink, path)
            if len(data) != st.st_size:
                problems.append(f"{path}: read {len(data)} bytes, st_size {st.st_size}")
            if path.parent.name != "private":
                bad = invalid_offset(data, 0)
                if bad >= 0:
                    problems.append(f"{path}: invalid byte {data[bad]:#x} at offset {bad}")
    for ino, (nlink, path) in nlinks.items():
        if nlink != names[ino]:
            problems.append(f"{path}: st_nlink {nlink} but {names[ino]} names found")
    return files, problems


def test_many_processes_at_once(module_mount: Mount) -> None:
    from cluster import check_namespace

    root = module_mount.path / "stress"
    for i in range(DIRS):
        (root / f"d{i}").mkdir(parents=True)
    (root / "private").mkdir()
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(root), str(w), str(1000 + w), str(OPS_PER_WORKER)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for w in range(WORKERS)
    ]
    results, failures = [], []
    for w, p in enumerate(workers):
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            failures.append(f"worker {w} hung (killed after 600 s)")
        if p.returncode != 0 or not out.strip():
            failures.append(
                f"worker {w} exited {p.returncode}: {out.decode()[-2000:]} {err.decode()[-2000:]}"
            )
            continue
        r = json.loads(out.decode().strip().splitlines()[-1])
        results.append(r)
        failures += [f"worker {w}: {u}" for u in r["unexpected"]]
    totals: Counter[str] = Counter()
    for r in results:
        totals.update(r["counts"])
    print("outcomes:", dict(sorted(totals.items())))
    assert not failures, "\n".join(failures[:50])
    assert module_mount.alive, f"the mount died:\n{module_mount.text()[-4000:]}"

    # The mount still answers, and what it holds is valid.
    assert os.stat(root).st_nlink >= 2
    assert sorted(os.listdir(root)) == [*(f"d{i}" for i in range(DIRS)), "private"]
    files, problems = check_tree(root)
    assert not problems, "\n".join(problems[:50])
    probe = root / "after"
    probe.write_bytes(b"still serving\n" * 1000)
    assert probe.read_bytes() == b"still serving\n" * 1000
    print(f"{files} files survived the run")
    assert sum(v for k, v in totals.items() if k.endswith(" ok")) > WORKERS * OPS_PER_WORKER // 3, (
        "too few operations succeeded for the run to mean much"
    )

    assert check_namespace(module_mount.cluster.meta_url) == []


if __name__ == "__main__":
    _root, _wid, _seed, _ops = sys.argv[1:]
    _result = Worker(Path(_root), int(_wid), int(_seed)).run(int(_ops))
    print(json.dumps(_result))
    sys.exit(1 if _result["unexpected"] else 0)
