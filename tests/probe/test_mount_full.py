"""A full cluster through the mount: writers get ENOSPC (DESIGN §7), never a hang, and the
mount keeps serving everything else."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import Cluster
from mounts import Mount

WRITER = r"""
import errno, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
block = os.urandom(1 << 20)
try:
    for _ in range(400):
        os.write(fd, block)
    os.fsync(fd)
    print("no error")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
finally:
    try:
        os.close(fd)
    except OSError as exc:
        print("close", errno.errorcode.get(exc.errno, exc.errno))
"""


def test_writes_to_a_full_cluster_fail_with_enospc_and_the_mount_lives_on(
        make_cluster: object, make_mount: object, sqlite_url: str) -> None:
    # Three DataNodes of 48 MiB each (rep:3): about 45 MiB of files fit, 400 MiB do not.
    cluster: Cluster = make_cluster(sqlite_url, extent_max_bytes=8 << 20, datanodes=0)  # type: ignore[operator]
    cluster.env["APPENDFS_DATANODE_RESERVE_BYTES"] = "0"  # the capacity alone decides
    for _ in range(3):
        cluster.add_datanode("--capacity-bytes", str(48 << 20))
    cluster.wait_alive(3)
    m: Mount = make_mount(cluster)  # type: ignore[operator]
    (m.path / "small").write_bytes(b"fits")
    res = subprocess.run([sys.executable, "-c", WRITER, str(m.path / "huge")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "ENOSPC", res.stdout
    # everything else still works: reads, listing, metadata
    assert (m.path / "small").read_bytes() == b"fits"
    assert sorted(p.name for p in m.path.iterdir()) == ["huge", "small"]
    (m.path / "dir").mkdir()
    assert m.alive
    assert Path(m.path / "huge").stat().st_size >= 0


def test_a_lost_write_is_reported_to_each_writing_handle_once(
        make_cluster: object, make_mount: object, sqlite_url: str) -> None:
    """A write lost to a full cluster is a deferred error of the file: each handle open for
    writing when it was lost reports it once (next write, fsync or close); a reader's close
    reports nothing and does not take the error from the writers (it used to: the first
    close of any handle got it and cleared it, and the writer's fsync then said 0)."""
    cluster: Cluster = make_cluster(sqlite_url, extent_max_bytes=8 << 20, datanodes=0)  # type: ignore[operator]
    cluster.env["APPENDFS_DATANODE_RESERVE_BYTES"] = "0"
    for _ in range(3):
        cluster.add_datanode("--capacity-bytes", str(48 << 20))
    cluster.wait_alive(3)
    m: Mount = make_mount(cluster)  # type: ignore[operator]
    path = m.path / "huge"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    other_writer = os.open(path, os.O_WRONLY)
    reader = os.open(path, os.O_RDONLY)
    try:
        block = os.urandom(1 << 20)
        with pytest.raises(OSError) as lost:
            for _ in range(400):
                os.write(writer, block)
            os.fsync(writer)
        assert lost.value.errno == errno.ENOSPC
        os.close(reader)  # no error, and the writers keep theirs
        reader = -1
        with pytest.raises(OSError) as again:
            os.fsync(other_writer)
        assert again.value.errno == errno.ENOSPC
    finally:
        for fd in (writer, other_writer, reader):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass  # more lost writes may be reported here
    assert m.alive
