"""Short-circuit reads (store/client/local.py) on real processes.

A StoreClient on the DataNodes' host reads sealed extents from their files, verified
against the block checksums; an open extent, a copy that does not verify, a DataNode
directory that is not the node's, or the option turned off all go through the DataNode,
which stays the authority (it is the one that reports a bad copy).

SQLite only: the namespace plays no part in how a copy is read.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import trio
from cluster import Cluster, db_rows, random_file, wait_for

from appendfs.store.client import ClientConfig, StoreClient
from appendfs.store.client.local import FDS_IDLE_S, LocalReads
from appendfs.store.codec.blocks import append_entries
from appendfs.store.datanode.backend import ExtentMeta
from appendfs.store.datanode.filebackend import FileBackend

MiB = 1 << 20


def copies(c: Cluster) -> list[tuple[int, int]]:
    """(extent id, sealed length) of every sealed extent, in stream order."""
    return [(int(e), int(n)) for e, n in db_rows(
        c.meta_url, "SELECT extent_id, sealed_length FROM extent WHERE state = 'sealed' ORDER BY stream_id, seq")]


def read_all(c: Cluster, ranges: list[tuple[int, int, int]], cfg: ClientConfig | None = None
             ) -> tuple[list[bytes], dict[str, int]]:
    async def go() -> tuple[list[bytes], dict[str, int]]:
        async with StoreClient.connect(c.meta_url, cfg) as client:
            out = [await client.read(e, off, n) for e, off, n in ranges]
            return out, dict(client.stats)
    return trio.run(go)


def test_sealed_extents_are_read_from_their_files_and_a_bad_copy_goes_through_the_datanode(
        sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    c = make_cluster(sqlite_url, datanodes=3, extent_max_bytes=4 * MiB)
    src = random_file(tmp_path / "src.bin", 10 * MiB + 5000, seed=71)
    c.put(src, "rep:3")
    data = src.read_bytes()
    extents = copies(c)
    assert len(extents) == 3
    ranges, expected, pos = [], [], 0
    for extent_id, length in extents:
        # a 4 KiB read across a block boundary, a large one (worker thread), the short tail
        for off, n in ((5000, 4096), (0, length), (length - 100, 100)):
            ranges.append((extent_id, off, n))
            expected.append(data[pos + off:pos + off + n])
        pos += length

    got, stats = read_all(c, ranges)
    assert got == expected
    assert stats["local_reads"] == len(ranges) and stats["local_fallbacks"] == 0 and stats["local_nodes"] >= 1

    got, stats = read_all(c, ranges, ClientConfig(short_circuit=False))
    assert got == expected and "local_reads" not in stats

    # A flipped byte in the copy the reader tries first: the short circuit does not verify,
    # the DataNode's answer does not either (it is the one that reports), another copy serves.
    extent_id = extents[0][0]
    first = min(range(3), key=lambda i: (i + extent_id) % 7)  # StoreClient.read's order of replicas
    (node,) = db_rows(c.meta_url, f"SELECT node_id FROM replica WHERE extent_id = {extent_id} AND idx = {first}")[0]
    address = next(n["address"] for n in c.status()["nodes"] if n["node_id"] == node)
    proc = next(p for p in c.datanodes if p.argv[p.argv.index("--listen") + 1] == address)
    dat = Path(proc.argv[proc.argv.index("--data") + 1]) / "extents" / f"{extent_id:016x}.dat"
    with open(dat, "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0xFF]))
    got, stats = read_all(c, [(extent_id, 4096, 4096)])
    assert got == [data[4096:8192]]
    assert stats["local_fallbacks"] == 1 and stats["bad_replicas"] == 1 and stats["local_reads"] == 1
    wait_for(lambda: db_rows(c.meta_url, f"SELECT state FROM replica WHERE extent_id = {extent_id} "
                                         f"AND node_id = '{node}'") == [("corrupt",)]
             or "corrupt replica reported" in c.metanodes[0].text(), "the bad copy reported", 30)


def test_open_extents_are_read_through_the_datanode(sqlite_url: str, make_cluster) -> None:
    c = make_cluster(sqlite_url, datanodes=3, extent_max_bytes=4 * MiB)

    async def go() -> tuple[bytes, dict[str, int]]:
        async with StoreClient.connect(c.meta_url) as client:
            s = await client.create_stream("raw", "rep:3")
            t = await s.append(b"x" * 10000)
            await s.flush()
            (piece,) = await t.wait()
            got = await client.read(piece.extent_id, piece.ext_off, piece.length)
            stats = dict(client.stats)
            await s.close()
            return got, stats
    got, stats = trio.run(go)
    assert got == b"x" * 10000 and stats.get("local_reads", 0) == 0


def test_a_directory_is_used_only_if_its_stamp_names_the_node_and_cluster(tmp_path: Path) -> None:
    d = tmp_path / "dn"
    (d / "extents").mkdir(parents=True)
    (d / "node.json").write_text(json.dumps({"format_version": 1, "node_id": "n1", "cluster_id": "c1"}))
    stats: dict[str, int] = {}
    local = LocalReads("c1", inline_bytes=65536, stats=stats)
    assert local.learn("127.0.0.1:1", "n1", str(d)) == d
    assert local.learn("127.0.0.1:2", "n2", str(d)) is None  # another node's directory
    assert LocalReads("c2", inline_bytes=65536, stats={}).learn("127.0.0.1:1", "n1", str(d)) is None
    assert local.learn("127.0.0.1:3", "n1", None) is None  # a backend without files (spdk)
    assert local.learn("127.0.0.1:4", "n1", str(tmp_path / "nowhere")) is None
    assert stats["local_nodes"] == 1

    async def missing() -> bytes | None:  # an extent this directory does not hold
        return await local.read("127.0.0.1:1", "n1", 7, 0, 4096)
    assert trio.run(missing) is None and stats["local_fallbacks"] == 1


def _sealed_copy(root: Path, extent_id: int, data: bytes) -> None:
    """A sealed copy in a DataNode-style directory, written through the `file` backend."""
    (root / "node.json").write_text(json.dumps({"format_version": 1, "node_id": "n1", "cluster_id": "c1"}))
    backend = FileBackend(root)
    backend.create(ExtentMeta(extent_id, stream_id=1, epoch=1, index=0))
    backend.write_data(extent_id, 0, data)
    backend.write_checksums(extent_id, 0, append_entries(b"", data)[0])
    backend.set_meta(ExtentMeta(extent_id, stream_id=1, epoch=1, index=0, state="sealed", sealed_length=len(data)))
    backend.close()


@pytest.fixture
def ramfs(tmp_path: Path):
    """A ramfs mount: a real filesystem that refuses O_DIRECT opens (EINVAL)."""
    where = tmp_path / "ramfs"
    where.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount ramfs here (needs root): the O_DIRECT fallback is not exercised")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_large_reads_use_o_direct_and_stay_buffered_where_the_filesystem_refuses_it(tmp_path: Path, ramfs: Path
                                                                                    ) -> None:
    data = random.Random(5).randbytes(300 * 1024 + 123)  # a partial last block
    for root, direct_after in ((tmp_path / "dn", True), (ramfs / "dn", False)):
        root.mkdir()
        _sealed_copy(root, 9, data)
        stats: dict[str, int] = {}
        local = LocalReads("c1", inline_bytes=65536, stats=stats)
        assert local.learn("127.0.0.1:1", "n1", str(root)) == root

        async def reads(local: LocalReads, ranges: list[tuple[int, int]]) -> list[bytes | bytearray | None]:
            return [await local.read("127.0.0.1:1", "n1", 9, off, n) for off, n in ranges]
        # whole copy (returned without a copy), unaligned start, unaligned end, the short tail
        ranges = [(0, len(data)), (1000, 200_000), (4096, 100_000 + 7), (len(data) - 70_000, 70_000)]
        got = trio.run(reads, local, ranges)
        assert got == [data[off:off + n] for off, n in ranges], root
        assert local.direct is direct_after and stats["local_reads"] == 4 and stats.get("local_fallbacks") == 0

        # A flipped byte: the direct read does not verify, so the caller goes to the DataNode.
        dat = root / "extents" / f"{9:016x}.dat"
        with open(dat, "r+b") as f:
            f.seek(150_000)
            b = f.read(1)
            f.seek(150_000)
            f.write(bytes([b[0] ^ 1]))
        assert trio.run(reads, local, [(0, len(data)), (200_000, 100_000)]) == [None, data[200_000:300_000]]
        assert stats["local_fallbacks"] == 1
        local.close()


def _held(path: str) -> bool:
    """Whether this process has ``path`` open."""
    return any(os.readlink(f"/proc/self/fd/{fd}").startswith(path) for fd in os.listdir("/proc/self/fd")
               if os.path.islink(f"/proc/self/fd/{fd}"))


def _one_copy(tmp_path: Path, extent_id: int, size: int) -> tuple[LocalReads, bytes, str]:
    root = tmp_path / "dn"
    root.mkdir()
    data = random.Random(extent_id).randbytes(size)
    _sealed_copy(root, extent_id, data)
    local = LocalReads("c1", inline_bytes=65536, stats={})
    assert local.learn("127.0.0.1:1", "n1", str(root)) == root
    return local, data, str(root / "extents" / f"{extent_id:016x}.dat")


def test_idle_cached_copies_are_closed_so_a_deleted_extent_frees_its_space(tmp_path: Path) -> None:
    """Small reads keep the copy's descriptors open for the next one. Once the DataNode
    deletes the extent, only those descriptors keep its blocks allocated: a client that
    stopped reading it closes them after FDS_IDLE_S (StoreClient runs expire periodically)."""
    local, data, dat = _one_copy(tmp_path, 3, 64 * 1024)

    async def read() -> tuple[bytes | bytearray | None, float]:
        return await local.read("127.0.0.1:1", "n1", 3, 0, 4096), trio.current_time()
    got, at = trio.run(read)
    assert got == data[:4096] and _held(dat)
    os.unlink(dat)  # the DataNode deletes the extent: our descriptor still pins its blocks
    assert _held(dat)
    assert local.expire(at + 1) == 0  # read a moment ago: kept
    assert local.expire(at + FDS_IDLE_S) == 1 and not _held(dat)
    local.close()


def test_large_reads_keep_the_copy_open_until_one_reaches_its_end(tmp_path: Path) -> None:
    """A sequential reader reads a copy block by block in worker threads: its files stay
    open between blocks (not re-opened and re-parsed for each), and the read that reaches
    the copy's end closes them, so a reader that moved on pins nothing."""
    local, data, dat = _one_copy(tmp_path, 4, 3 * MiB + 100_005)  # the tail is a large read too
    opened: list[bool] = []

    async def reads() -> None:
        for off in range(0, len(data), MiB):
            n = min(MiB, len(data) - off)
            assert await local.read("127.0.0.1:1", "n1", 4, off, n) == data[off:off + n]
            opened.append(_held(dat))
    trio.run(reads)
    assert opened == [True, True, True, False]
    assert local.stats["local_reads"] == 4 and local.stats["local_fallbacks"] == 0
    local.close()


def test_a_copy_dropped_during_a_read_in_a_thread_is_closed_when_the_read_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Expiry (or eviction) while a worker thread reads through the copy's descriptors
    must not close them under it: the read completes with the right bytes, and the
    descriptors are closed once it has returned."""
    import threading

    from appendfs.store.client import local as local_module
    local, data, dat = _one_copy(tmp_path, 5, 2 * MiB)
    in_thread, go_on = threading.Event(), threading.Event()
    real = local_module._read_quietly

    def paused(*args: object) -> object:
        in_thread.set()
        assert go_on.wait(30)
        return real(*args)  # type: ignore[arg-type]
    monkeypatch.setattr(local_module, "_read_quietly", paused)

    async def scenario() -> tuple[bytes | bytearray | None, bool, bool]:
        result: list[bytes | bytearray | None] = []
        async with trio.open_nursery() as nursery:
            async def read() -> None:
                result.append(await local.read("127.0.0.1:1", "n1", 5, 4096, MiB))
            nursery.start_soon(read)
            await trio.to_thread.run_sync(in_thread.wait, 30)
            closed = local.expire(trio.current_time() + FDS_IDLE_S)  # dropped while the thread reads
            still_open = _held(dat)
            go_on.set()
        return result[0], bool(closed), still_open
    got, closed, still_open = trio.run(scenario)
    assert closed and still_open
    assert got == data[4096:4096 + MiB]
    assert not _held(dat)  # closed by the read's return
    local.close()
