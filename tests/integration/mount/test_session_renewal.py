"""A mount whose session was declared dead opens a new one and holds its open files again.

A mount's session keeps the files it has open alive (an unlinked file lives until its last
close). When the mount misses heartbeats for ``session_ttl_s`` (here: SIGSTOPped), any
client may end its session, dropping those holds; the mount, running again, finds its
session dead at the next heartbeat and holds every open file again in a new one. It must
hold each file once per open handle: held once, the first close dropped the hold under the
other handles, and a removal by another client then destroyed a file still open here.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any

from cluster import check_namespace, wait_for

from appendfs.meta import Meta
from appendfs.meta.errors import FsError

TTL_S = 2


def _gone(meta: Meta, ino: int) -> bool:
    try:
        meta.getattr(ino)
    except FsError as exc:
        assert exc.errno == errno.ENOENT, exc
        return True
    return False


def test_a_renewed_session_holds_each_open_handle(meta_url: str, make_cluster: Any, make_mount: Any) -> None:
    cluster = make_cluster(meta_url)
    mount = make_mount(cluster, env={"APPENDFS_FS_SESSION_TTL_S": str(TTL_S)})
    sub = mount.path / "s"
    sub.mkdir()
    path = sub / "held"
    data = os.urandom(300_000)
    path.write_bytes(data)
    meta = Meta.from_url(meta_url)
    fds: list[int] = []
    try:
        ino = os.stat(path).st_ino
        assert meta.lookup(os.stat(sub).st_ino, "held").ino == ino
        fds = [os.open(path, os.O_RDONLY) for _ in range(3)]

        assert mount.popen is not None
        os.kill(mount.popen.pid, signal.SIGSTOP)
        try:
            time.sleep(TTL_S + 1.5)  # silent past its TTL
            assert meta.clean_dead_sessions() >= 1
        finally:
            os.kill(mount.popen.pid, signal.SIGCONT)
        wait_for(lambda: "was declared dead" in mount.text() and "opening a new one" in mount.text(),
                 "the mount to notice its dead session", timeout_s=30)
        wait_for(lambda: not _gone(meta, ino) and os.stat(sub).st_nlink >= 2, "the mount to answer again")
        time.sleep(1)  # the renewal's holds are taken in the same heartbeat; let it finish

        os.close(fds.pop(0))  # one close of three: two handles still hold the file
        time.sleep(1)  # closes are released in batches after 50 ms
        meta.unlink(os.stat(sub).st_ino, "held")  # another client removes the name
        assert not _gone(meta, ino), "the file was destroyed while two handles of it were still open"
        for fd in fds:
            assert os.pread(fd, len(data) + 1, 0) == data

        for fd in fds:
            os.close(fd)
        fds = []
        wait_for(lambda: _gone(meta, ino), "the file to go with its last close")
        assert check_namespace(meta_url) == []
    finally:
        for fd in fds:
            os.close(fd)
        meta.close()

