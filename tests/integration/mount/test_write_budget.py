"""The write budget under many concurrent writers: backpressure, never a deadlock.

``[fs] write_buffer_bytes`` bounds the file data a mount holds before its commit. A writer
that needs more waits until commits give bytes back; idle dirty buffers are sent to free
some (the relief), but a buffer whose file is in a write right now is skipped. Before the
fix a writer extending its buffer waited for budget *with* that buffer under its file's
lock: when every writer did, the budget was all in buffers nobody could send, and every
write — and then every close — hung for good. Here sixteen processes write 8 MiB each, in
1 MiB writes, through a mount whose budget is 8 MiB: their buffers fill it at once. On the
old code this hung in every run (3 of 3); now each writer finishes, the files read back,
and a deadline on the writers turns a hang into a failure.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

WRITERS = 16
FILE_BYTES = 8 << 20
WRITE_BYTES = 1 << 20
BUDGET = 8 << 20  # two chunks (4 MiB, the default chunk_bytes): the smallest allowed
DEADLINE_S = 120

_WRITER = """
import os, sys
path, seed, size, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
block = bytes((seed * 31 + i) % 251 for i in range(step))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for off in range(0, size, step):
    os.write(fd, block)
os.fsync(fd)
os.close(fd)
"""


def _expected(seed: int) -> str:
    block = bytes((seed * 31 + i) % 251 for i in range(WRITE_BYTES))
    return hashlib.sha256(block * (FILE_BYTES // WRITE_BYTES)).hexdigest()


def test_many_writers_share_a_small_write_budget(meta_url: str, make_cluster: Any, make_mount: Any) -> None:
    cluster = make_cluster(meta_url)
    mount = make_mount(cluster, env={"APPENDFS_FS_WRITE_BUFFER_BYTES": str(BUDGET)})
    work = Path(mount.path) / "budget"
    work.mkdir()
    logs = [cluster.root / f"writer-{i}.err" for i in range(WRITERS)]
    procs = []
    for i in range(WRITERS):
        with logs[i].open("wb") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _WRITER, str(work / f"f{i}"), str(i), str(FILE_BYTES), str(WRITE_BYTES)],
                stderr=err))
    try:
        codes = [p.wait(timeout=DEADLINE_S) for p in procs]
    except subprocess.TimeoutExpired:
        mount.kill()  # ends the writes stuck in the mount (ENOTCONN), so the writers exit
        for p in procs:
            p.wait()
        raise AssertionError(f"writers still blocked after {DEADLINE_S} s: the write budget deadlocked\n"
                             + mount.text()[-3000:]) from None
    assert codes == [0] * WRITERS, [log.read_text(errors="replace") for log in logs]
    for i in range(WRITERS):
        data = (work / f"f{i}").read_bytes()
        assert len(data) == FILE_BYTES
        assert hashlib.sha256(data).hexdigest() == _expected(i), f"f{i} reads back different bytes"
    assert mount.alive
