"""FileBackend specifics beyond the backend contract: its descriptor cache, and writes
from page-aligned buffers without the staging copy.

The cache holds at most ``_MAX_OPEN_EXTENTS`` descriptors and evicts the least recently
used. A descriptor evicted while another thread is in a call with it (a long fdatasync of
the sync lane, a read of the read lane) must stay open until that call ends: closed under
it, its number could be handed to the next open, and the call would write to or sync
another extent's file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appendfs.store.buffers import aligned_bytearray
from appendfs.store.datanode import filebackend
from appendfs.store.datanode.backend import ExtentMeta
from appendfs.store.datanode.filebackend import FileBackend


def _target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


def test_an_evicted_descriptor_stays_open_while_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filebackend, "_MAX_OPEN_EXTENTS", 2)
    backend = FileBackend(tmp_path / "dev")
    try:
        for extent_id in range(1, 6):
            backend.create(ExtentMeta(extent_id=extent_id, stream_id=1, epoch=1, index=0))
            backend.write_data(extent_id, 0, bytes([extent_id]) * 4096)
        path_1 = str((tmp_path / "dev" / "extents" / f"{1:016x}.dat").resolve())
        with backend._using(1, "dat") as fd:
            for extent_id in range(2, 6):  # four other extents: extent 1's entry is evicted
                assert backend.read_data(extent_id, 0, 4096) == bytes([extent_id]) * 4096
            assert (1, "dat") not in backend._fds
            assert _target(fd) == path_1  # still open, still extent 1's file
            assert os.pread(fd, 4096, 0) == bytes([1]) * 4096
        assert _target(fd) != path_1  # closed once its last user is done
        assert backend.read_data(1, 0, 4096) == bytes([1]) * 4096  # and reopened on demand
    finally:
        backend.close()



def test_whole_blocks_in_an_aligned_buffer_are_written_from_it(tmp_path: Path) -> None:
    """A large append as the wire protocol receives it (whole blocks, page-aligned) goes to
    the device from its own buffer; anything else through the staging buffer. Either way
    the file holds exactly the appended bytes, partial blocks included."""
    backend = FileBackend(tmp_path / "dev")
    try:
        if not backend.direct_io:
            pytest.skip(f"{tmp_path} refuses O_DIRECT: the staging path is not used at all there")
        backend.create(ExtentMeta(extent_id=1, stream_id=1, epoch=1, index=0))
        first = aligned_bytearray(64 * 1024)
        first[:] = os.urandom(len(first))
        backend.write_data(1, 0, first)
        assert backend._staging is None  # nothing was staged
        tail = os.urandom(5000)  # ends in a partial block: staged
        backend.write_data(1, len(first), tail)
        assert backend._staging is not None
        after = aligned_bytearray(3 * 4096)  # not at a block boundary now: staged, tail merged
        after[:] = os.urandom(len(after))
        backend.write_data(1, len(first) + len(tail), after)
        want = bytes(first) + tail + bytes(after)
        assert backend.read_data(1, 0, len(want)) == want
        unaligned = bytearray(os.urandom(8192 + 1))[1:]  # whole blocks at a boundary, unaligned address
        backend.create(ExtentMeta(extent_id=2, stream_id=1, epoch=1, index=0))
        backend.write_data(2, 0, unaligned)
        assert backend.read_data(2, 0, 8192) == bytes(unaligned)
    finally:
        backend.close()
