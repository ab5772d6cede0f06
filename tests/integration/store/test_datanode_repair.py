"""The DataNode side of repair (issue 6): `rebuild` and scrub, on real processes.

`rebuild` is sent by hand here, as the MetaNode would: to a node that holds no copy of a
sealed extent (replicated: copied from the replicas; `ec:4+2`: reconstructed from the other
fragments, or copied from a holder of the same index), with a corrupt source listed first,
with too few or unreachable sources (then `unavailable`, and nothing is left behind), and
under a rate limit. Scrub runs in DataNodes started with a 1 s interval: a byte flipped in
a sealed replica file ends up reported to the MetaNode (replica state `corrupt`).

SQLite only (the suite's time budget): these requests are between DataNodes, the database
only allocates; test_repair.py runs the MetaNode's side on both engines.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster import Cluster, db_rows, free_port, random_file, wait_for

from appendfs.store.client import StoreClient
from appendfs.store.codec import checksum, verify_blocks
from appendfs.store.ec import Codec, Layout, choose_backend
from appendfs.store.identity import read_secret_file
from appendfs.store.placement import local_id
from appendfs.store.rpc import RpcError, single_channel

MiB = 1 << 20


# ---- helpers ----------------------------------------------------------------------------


def start(make_cluster, meta_url: str, *, datanodes: int, extent_max_bytes: int,
          env: dict[str, str] | None = None) -> Cluster:
    """A cluster whose MetaNode maintainer (repair, rebalance) sleeps after its first round,
    so the copies these tests make by hand are not moved under them."""
    c = make_cluster(meta_url, metanodes=0, datanodes=0, extent_max_bytes=extent_max_bytes)
    c.env["APPENDFS_METANODE_MAINTAIN_INTERVAL_S"] = "3600"
    c.env.update(env or {})
    c.add_metanode()
    for _ in range(datanodes):
        c.add_datanode()
    c.wait_alive(datanodes)
    return c


def addresses(c: Cluster) -> dict[str, str]:
    """node id → address, from the MetaNode's status."""
    return {n["node_id"]: n["address"] for n in c.status()["nodes"]}


def data_dir(c: Cluster, address: str) -> Path:
    proc = next(p for p in c.datanodes if p.argv[p.argv.index("--listen") + 1] == address)
    return Path(proc.argv[proc.argv.index("--data") + 1])


def flip_byte(c: Cluster, address: str, extent_id: int, offset: int) -> None:
    with open(data_dir(c, address) / "extents" / f"{extent_id:016x}.dat", "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


async def _call(c: Cluster, address: str, op: str, args: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    async with single_channel(address, read_secret_file(c.secret)) as ch:
        try:
            return await ch.call(op, args, timeout_s=120)
        except RpcError as exc:
            error = exc  # raised outside the pool's nursery, which would wrap it in an ExceptionGroup
    raise error


def call(c: Cluster, address: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
    return trio.run(_call, c, address, op, args)[0]


def call_error(c: Cluster, address: str, op: str, args: dict[str, Any]) -> RpcError:
    with pytest.raises(RpcError) as err:
        call(c, address, op, args)
    return err.value


def read_extent(c: Cluster, address: str, extent_id: int, length: int) -> bytes:
    """All ``length`` bytes of the extent on that node, verified against its block checksums."""
    async def go() -> bytes:
        out = bytearray()
        async with single_channel(address, read_secret_file(c.secret)) as ch:
            for off in range(0, length, 4 * MiB):
                n = min(4 * MiB, length - off)
                res, data = await ch.call("read", {"extent_id": extent_id, "offset": off, "length": n}, timeout_s=60)
                verify_blocks(data, res["entries"], res["start"] // 4096)
                assert res["start"] == off and len(data) == n
                out += data
        return bytes(out)
    return trio.run(go)


def sealed_extents(meta_url: str) -> list[tuple[int, int, int]]:
    """(extent id, sealed length, file offset) of every sealed extent, in stream order (one stream)."""
    rows = db_rows(meta_url, "SELECT extent_id, sealed_length, placement_epoch FROM extent "
                             "WHERE state = 'sealed' ORDER BY stream_id, seq")
    out, pos = [], 0
    for extent_id, length, _ in rows:
        out.append((int(extent_id), int(length), pos))
        pos += int(length)
    return out


def holders(meta_url: str, extent_id: int) -> dict[int, str]:
    """replica / fragment index → node id."""
    return {int(i): str(n) for i, n in db_rows(meta_url, f"SELECT idx, node_id FROM replica "
                                                          f"WHERE extent_id = {extent_id}")}


def stream_of(meta_url: str, extent_id: int) -> int:
    return int(db_rows(meta_url, f"SELECT stream_id FROM extent WHERE extent_id = {extent_id}")[0][0])


def rebuild_args(meta_url: str, extent_id: int, *, epoch: int, index: int, length: int,
                 sources: list[tuple[int, str, str]], layout: dict[str, Any] | None = None,
                 rate: int = 0) -> dict[str, Any]:
    args: dict[str, Any] = {"extent_id": extent_id, "stream_id": stream_of(meta_url, extent_id), "epoch": epoch,
                            "index": index, "length": length, "rate_bytes_s": rate,
                            "sources": [{"idx": i, "node_id": n, "address": a} for i, n, a in sources]}
    if layout is not None:
        args["layout"] = layout
    return args


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


# ---- replicated extents ---------------------------------------------------------------------


def test_rebuild_replica_copies_verified_bytes(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    c = start(make_cluster, sqlite_url, datanodes=3, extent_max_bytes=4 * MiB)
    src = random_file(tmp_path / "src.bin", 20 * MiB + 4321, seed=61)
    c.put(src, "rep:2")
    original = src.read_bytes()
    addr = addresses(c)
    extents = sealed_extents(c.meta_url)
    assert len(extents) >= 5
    extent_id, length, pos = extents[1]
    reps = holders(c.meta_url, extent_id)
    (target,) = set(addr) - set(reps.values())
    sources = [(i, n, addr[n]) for i, n in sorted(reps.items())]

    args = rebuild_args(c.meta_url, extent_id, epoch=2, index=2, length=length, sources=sources)
    res = call(c, addr[target], "rebuild", args)
    assert res["length"] == length and res["read_bytes"] >= length and res["seconds"] >= 0
    assert read_extent(c, addr[target], extent_id, length) == original[pos:pos + length]
    st = call(c, addr[target], "stat", {"extent_id": extent_id})
    assert (st["state"], st["sealed_length"], st["length"], st["epoch"], st["index"]) == \
        ("sealed", length, length, 2, 2)
    assert st["stream_id"] == args["stream_id"]

    # A retried request finds the job done and reads nothing.
    again = call(c, addr[target], "rebuild", args)
    assert again["length"] == length and again["read_bytes"] == 0

    # A corrupt source listed first: its bad block is caught, the other replica serves the
    # chunk, and the local copy (epoch 2) is replaced by a fresh one at epoch 3.
    bad_node = sources[0][1]
    flip_byte(c, addr[bad_node], extent_id, length // 2)
    res = call(c, addr[target], "rebuild", {**args, "epoch": 3})
    assert res["length"] == length
    assert read_extent(c, addr[target], extent_id, length) == original[pos:pos + length]
    assert call(c, addr[target], "stat", {"extent_id": extent_id})["epoch"] == 3
    # The rebuilding node reported the corrupt source to the MetaNode.
    wait_for(lambda: f"corrupt replica reported: extent {extent_id} on node {bad_node}" in c.metanodes[0].text()
             or db_rows(c.meta_url, f"SELECT state FROM replica WHERE extent_id = {extent_id} "
                                    f"AND node_id = '{bad_node}'") == [("corrupt",)],
             "the corrupt source reported", 30)

    # The last extent is short (not a whole number of blocks): copied exactly too.
    last_id, last_len, last_pos = extents[-1]
    assert last_len % 4096
    last_reps = holders(c.meta_url, last_id)
    (last_target,) = set(addr) - set(last_reps.values())
    call(c, addr[last_target], "rebuild", rebuild_args(
        c.meta_url, last_id, epoch=2, index=2, length=last_len,
        sources=[(i, n, addr[n]) for i, n in sorted(last_reps.items())]))
    assert read_extent(c, addr[last_target], last_id, last_len) == original[last_pos:last_pos + last_len]


def test_rebuild_that_cannot_finish_leaves_nothing(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    c = start(make_cluster, sqlite_url, datanodes=3, extent_max_bytes=4 * MiB)
    c.put(random_file(tmp_path / "src.bin", 9 * MiB, seed=62), "rep:2")
    addr = addresses(c)
    extent_id, length, _ = sealed_extents(c.meta_url)[0]
    reps = holders(c.meta_url, extent_id)
    (target,) = set(addr) - set(reps.values())
    live = [(i, n, addr[n]) for i, n in sorted(reps.items())]

    # Every source unreachable.
    dead = [(0, "gone-1", dead_address()), (1, "gone-2", dead_address())]
    err = call_error(c, addr[target], "rebuild",
                     rebuild_args(c.meta_url, extent_id, epoch=2, index=2, length=length, sources=dead))
    assert err.code == "unavailable" and err.temporary
    assert "gone-1" in err.message and "gone-2" in err.message and "cannot connect" in err.message
    assert call_error(c, addr[target], "stat", {"extent_id": extent_id}).code == "not_found"

    # No sources at all.
    err = call_error(c, addr[target], "rebuild",
                     rebuild_args(c.meta_url, extent_id, epoch=2, index=2, length=length, sources=[]))
    assert err.code == "unavailable"
    assert call_error(c, addr[target], "stat", {"extent_id": extent_id}).code == "not_found"

    # Sources that fail only at the end (asked for more bytes than they hold): the chunks
    # already copied are deleted again.
    err = call_error(c, addr[target], "rebuild",
                     rebuild_args(c.meta_url, extent_id, epoch=2, index=2, length=length + 3 * MiB, sources=live))
    assert err.code == "unavailable" and "out_of_range" in err.message, err.message
    assert call_error(c, addr[target], "stat", {"extent_id": extent_id}).code == "not_found"
    assert not (data_dir(c, addr[target]) / "extents" / f"{extent_id:016x}.dat").exists()

    # Malformed requests.
    bad = rebuild_args(c.meta_url, extent_id, epoch=2, index=2, length=length, sources=live)
    del bad["length"]
    assert call_error(c, addr[target], "rebuild", bad).code == "bad_request"
    # ... and the node still works.
    call(c, addr[target], "rebuild",
         rebuild_args(c.meta_url, extent_id, epoch=2, index=2, length=length, sources=live))
    assert call(c, addr[target], "stat", {"extent_id": extent_id})["state"] == "sealed"


def test_rebuild_rate_limit_and_one_job_per_extent(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    c = start(make_cluster, sqlite_url, datanodes=3, extent_max_bytes=8 * MiB)
    c.put(random_file(tmp_path / "src.bin", 8 * MiB, seed=63), "rep:2")
    addr = addresses(c)
    extent_id, length, _ = sealed_extents(c.meta_url)[0]
    assert length == 8 * MiB
    reps = holders(c.meta_url, extent_id)
    (target,) = set(addr) - set(reps.values())
    args = rebuild_args(c.meta_url, extent_id, epoch=2, index=2, length=length, rate=4 * MiB,
                        sources=[(i, n, addr[n]) for i, n in sorted(reps.items())])
    results: dict[str, Any] = {}

    async def go() -> None:
        async def first() -> None:
            t0 = trio.current_time()
            results["first"] = (await _call(c, addr[target], "rebuild", args))[0]
            results["wall"] = trio.current_time() - t0

        async def second() -> None:
            # Once the first job has created its (open) copy — it runs >= 1.75 s — ask again.
            while True:
                try:
                    st = (await _call(c, addr[target], "stat", {"extent_id": extent_id}))[0]
                except RpcError as exc:
                    assert exc.code == "not_found"
                    await trio.sleep(0.02)
                    continue
                assert st["state"] == "open", st
                break
            try:
                await _call(c, addr[target], "rebuild", args)
            except RpcError as exc:
                results["second"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)

    trio.run(go)
    # No burst at the start (back-to-back jobs must not add up), 4 MiB/s: 8 MiB take >= 2 s.
    assert results["wall"] >= 1.7 and results["first"]["seconds"] >= 1.7, results
    assert results["first"]["length"] == length
    assert isinstance(results.get("second"), RpcError) and results["second"].code == "busy", results
    assert call(c, addr[target], "stat", {"extent_id": extent_id})["state"] == "sealed"


# ---- erasure-coded extents ------------------------------------------------------------------


def ec_extent(c: Cluster, extent_id: int, logical: int) -> tuple[Layout, dict[str, Any], int, dict[int, str]]:
    """(layout, the request's layout map, fragment length, index → node id) of an EC extent."""
    backend, cell = db_rows(c.meta_url, f"SELECT ec_backend, ec_cell_bytes FROM extent WHERE extent_id = {extent_id}")[0]
    lay = Layout(4, 2, int(cell))
    frags = holders(c.meta_url, extent_id)
    assert sorted(frags) == list(range(6))
    return lay, {"k": 4, "m": 2, "cell_bytes": int(cell), "backend": backend}, lay.fragment_length(logical), frags


def test_rebuild_ec_fragment_reconstructs_byte_identical(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    c = start(make_cluster, sqlite_url, datanodes=7, extent_max_bytes=4 * MiB)
    c.put(random_file(tmp_path / "src.bin", 10 * MiB + 777, seed=64), "ec:4+2")
    addr = addresses(c)
    extents = sealed_extents(c.meta_url)
    extent_id, logical, _ = extents[0]  # 16 full stripes: two runs of records (15 + 1) per source
    lay, layout, length, frags = ec_extent(c, extent_id, logical)
    assert lay.records_in(length) == 16
    (target,) = set(addr) - set(frags.values())
    original = {i: read_extent(c, addr[n], extent_id, length) for i, n in frags.items()}

    def sources(without: int) -> list[tuple[int, str, str]]:
        return [(i, n, addr[n]) for i, n in sorted(frags.items()) if i != without]

    def rebuild(epoch: int, index: int, srcs: list[tuple[int, str, str]]) -> dict[str, Any]:
        return call(c, addr[target], "rebuild", rebuild_args(c.meta_url, extent_id, epoch=epoch, index=index,
                                                             length=length, sources=srcs, layout=layout))

    epoch = 1
    for j in (1, 4):  # a data fragment and a parity fragment, from the other five
        epoch += 1
        res = rebuild(epoch, j, sources(j))
        assert res["length"] == length
        assert 4 * length <= res["read_bytes"] < 5 * length  # K fragments' records
        assert read_extent(c, addr[target], extent_id, length) == original[j]
        st = call(c, addr[target], "stat", {"extent_id": extent_id})
        assert (st["state"], st["sealed_length"], st["epoch"], st["index"]) == ("sealed", length, epoch, j)

    # Verbatim copy: the holder of index 0 is a source (listed last): only its bytes are read.
    epoch += 1
    res = rebuild(epoch, 0, [*sources(0), (0, frags[0], addr[frags[0]])])
    assert length <= res["read_bytes"] < 2 * length
    assert read_extent(c, addr[target], extent_id, length) == original[0]

    # A data fragment corrupt in its second run of records (stripe 15): the first run still
    # uses it, the second reads parity instead.
    flip_byte(c, addr[frags[1]], extent_id, 15 * lay.record_bytes + lay.header_bytes + 5000)
    epoch += 1
    rebuild(epoch, 3, sources(3))
    assert read_extent(c, addr[target], extent_id, length) == original[3]

    # A copy source of the same index, corrupt there: the first run is copied, the second
    # reconstructed from the others.
    epoch += 1
    res = rebuild(epoch, 1, [(1, frags[1], addr[frags[1]]), *sources(1)])
    assert res["read_bytes"] < 2 * length  # 15 records copied, one reconstructed from 4
    assert read_extent(c, addr[target], extent_id, length) == original[1]

    # Fewer than K usable fragments: K given, but fragment 1 is corrupt in the second run.
    # Unavailable, and nothing is left behind on the target though the first run was written.
    err = call_error(c, addr[target], "rebuild", rebuild_args(
        c.meta_url, extent_id, epoch=epoch + 1, index=5, length=length, layout=layout,
        sources=[(i, frags[i], addr[frags[i]]) for i in (0, 1, 2, 3)]))
    assert err.code == "unavailable", err.message
    assert "only 3 of the 4 fragments needed returned verified records of stripes 15..15" in err.message, err.message
    assert re.search(r"index 1\): corrupt", err.message), err.message
    assert call_error(c, addr[target], "stat", {"extent_id": extent_id}).code == "not_found"
    err = call_error(c, addr[target], "rebuild", rebuild_args(
        c.meta_url, extent_id, epoch=epoch + 1, index=5, length=length, layout=layout,
        sources=[(i, frags[i], addr[frags[i]]) for i in (0, 2, 3)]))
    assert err.code == "unavailable" and "(3 other fragments given)" in err.message, err.message
    assert call_error(c, addr[target], "stat", {"extent_id": extent_id}).code == "not_found"

    # A length that is not whole records is refused up front.
    err = call_error(c, addr[target], "rebuild", rebuild_args(
        c.meta_url, extent_id, epoch=epoch + 1, index=5, length=length - 1, layout=layout, sources=sources(5)))
    assert err.code == "bad_request"

    # The last extent ends in a short, padded stripe: rebuilt byte-identical too.
    last_id, last_logical, _ = extents[-1]
    assert last_logical % lay.stripe_bytes
    lay, layout, length, frags = ec_extent(c, last_id, last_logical)
    (target,) = set(addr) - set(frags.values())
    res = call(c, addr[target], "rebuild", rebuild_args(
        c.meta_url, last_id, epoch=2, index=2, length=length, layout=layout,
        sources=[(i, n, addr[n]) for i, n in sorted(frags.items()) if i != 2]))
    assert read_extent(c, addr[target], last_id, length) == read_extent(c, addr[frags[2]], last_id, length)


def test_a_duplicate_transcode_never_replaces_a_sealed_fragment(sqlite_url: str, make_cluster,
                                                               tmp_path: Path) -> None:
    """The DataNode's own safeguard behind the maintainer's one-job-per-extent rule: a
    second `transcode` of an extent whose fragments are sealed (a MetaNode failover could
    start one) fails and leaves every fragment as it was, in whatever index order it names
    the targets; an unsealed leftover of an attempt that died is replaced."""
    c = start(make_cluster, sqlite_url, datanodes=6, extent_max_bytes=4 * MiB)
    src = random_file(tmp_path / "src.bin", 5 * MiB, seed=66)
    c.put(src, "rep:3")
    addr = addresses(c)
    extent_id, length, pos = sealed_extents(c.meta_url)[0]
    nodes = sorted(addr)
    lay, backend, new_id = Layout(4, 2, 64 * 1024), choose_backend(4, 2).name, local_id(extent_id, 1)
    stream_id = stream_of(c.meta_url, extent_id)

    def job(order: list[str]) -> dict[str, Any]:
        return {"extent_id": extent_id, "stream_id": stream_id, "epoch": 2, "length": length, "read_id": extent_id,
                "local_id": new_id, "rate_bytes_s": 0,
                "sources": [{"idx": i, "node_id": n, "address": addr[n]}
                            for i, n in sorted(holders(c.meta_url, extent_id).items())],
                "targets": [{"idx": i, "node_id": n, "address": addr[n]} for i, n in enumerate(order)],
                "layout": {"k": lay.k, "m": lay.m, "cell_bytes": lay.cell_bytes, "backend": backend}}
    coordinator = addr[holders(c.meta_url, extent_id)[0]]

    async def leftover() -> None:  # an attempt that died after its first append on target 2
        async with single_channel(addr[nodes[2]], read_secret_file(c.secret)) as ch:
            await ch.call("create", {"extent_id": new_id, "stream_id": stream_id, "epoch": 2, "index": 2}, timeout_s=30)
            junk = os.urandom(lay.record_bytes)
            await ch.call("append", {"extent_id": new_id, "offset": 0, "xxh3": checksum(junk)}, junk, timeout_s=30)
    trio.run(leftover)

    assert call(c, coordinator, "transcode", job(nodes))["length"] == length
    frag_len = lay.fragment_length(length)
    first = {i: read_extent(c, addr[n], new_id, frag_len) for i, n in enumerate(nodes)}
    decoded = Codec(lay, backend).decode({i: first[i] for i in (2, 3, 4, 5)}, extent_id=extent_id, first_stripe=0,
                                         ext_off=0, length=length)
    assert decoded.data == src.read_bytes()[pos:pos + length] and not decoded.bad

    for order in (nodes, nodes[1:] + nodes[:1]):  # the same job again; one with other indexes
        err = call_error(c, coordinator, "transcode", job(order))
        assert err.code == "unavailable" and "is already sealed" in err.message, err.message
        for i, n in enumerate(nodes):
            st = call(c, addr[n], "stat", {"extent_id": new_id})
            assert (st["state"], st["sealed_length"], st["index"], st["epoch"]) == ("sealed", frag_len, i, 2)
            assert read_extent(c, addr[n], new_id, frag_len) == first[i]


def test_an_ec_read_refuses_a_fragment_stored_where_another_index_is_placed(sqlite_url: str, make_cluster,
                                                                            tmp_path: Path) -> None:
    """Block checksums only say a copy is what its DataNode was given. Swap the copies of
    fragments 0 and 1 of an `ec:2+2` extent between their nodes (data, checksums and record:
    what a duplicate transcode with another index order would leave): a 4 KiB read inside
    one cell (no record header in its span: the DataNode's `index` catches it) and a whole
    read (headers in its spans) both return the right bytes, decoded from the parity, and
    both fragments are reported."""
    c = start(make_cluster, sqlite_url, datanodes=4, extent_max_bytes=4 * MiB)
    src = random_file(tmp_path / "src.bin", 3 * MiB, seed=67)
    c.put(src, "ec:2+2")
    original = src.read_bytes()
    addr = addresses(c)
    extent_id, logical, pos = sealed_extents(c.meta_url)[0]
    frags = holders(c.meta_url, extent_id)
    procs = [next(p for p in c.datanodes if p.argv[p.argv.index("--listen") + 1] == addr[frags[i]]) for i in (0, 1)]
    for p in procs:
        p.stop()
    dirs = [data_dir(c, addr[frags[i]]) / "extents" for i in (0, 1)]
    for suffix in ("dat", "sum", "meta"):
        name = f"{extent_id:016x}.{suffix}"
        tmp = dirs[0] / (name + ".swap")
        os.rename(dirs[0] / name, tmp)
        os.rename(dirs[1] / name, dirs[0] / name)
        os.rename(tmp, dirs[1] / name)
    for p in procs:
        c._start(p)

    def serving() -> bool:  # the MetaNode may still count them alive from before the stop
        try:
            return all(call(c, addr[frags[i]], "ping", {})["node_id"] == frags[i] for i in (0, 1))
        except Exception:  # refused while it starts (raised from the channel's nursery, as a group)
            return False
    wait_for(serving, "the two restarted DataNodes to answer", 30, 0.1)

    async def go() -> tuple[bytes, bytes, int]:
        async with StoreClient.connect(c.meta_url) as client:
            small = await client.read(extent_id, 100, 4096)
            whole = await client.read(extent_id, 0, logical)
            return small, whole, client.stats["bad_replicas"]
    small, whole, bad = trio.run(go)
    assert small == original[pos + 100:pos + 4196]
    assert whole == original[pos:pos + logical]
    assert bad >= 2
    wait_for(lambda: db_rows(c.meta_url, f"SELECT idx, state FROM replica WHERE extent_id = {extent_id} "
                                         "AND idx < 2 ORDER BY idx") == [(0, "corrupt"), (1, "corrupt")],
             "both misplaced fragments reported", 30)


# ---- scrub ----------------------------------------------------------------------------------


def test_scrub_reports_a_flipped_byte(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    c = start(make_cluster, sqlite_url, datanodes=3, extent_max_bytes=4 * MiB,
              env={"APPENDFS_DATANODE_SCRUB_BYTES_S": str(256 * MiB), "APPENDFS_DATANODE_SCRUB_INTERVAL_S": "1"})
    c.put(random_file(tmp_path / "src.bin", 9 * MiB, seed=65), "rep:2")
    addr = addresses(c)
    extent_id, length, _ = sealed_extents(c.meta_url)[0]
    node = holders(c.meta_url, extent_id)[0]
    flip_byte(c, addr[node], extent_id, length - 10)

    def reported() -> bool:
        rows = db_rows(c.meta_url, f"SELECT state FROM replica WHERE extent_id = {extent_id} AND node_id = '{node}'")
        # (the MetaNode may already have had the replica rebuilt elsewhere: its log says it was reported)
        return rows == [("corrupt",)] or f"corrupt replica reported: extent {extent_id} on node {node}" in \
            c.metanodes[0].text()

    wait_for(reported, "scrub to report the flipped byte", 60, 0.2)
    proc = next(p for p in c.datanodes if p.argv[p.argv.index("--listen") + 1] == addr[node])
    assert f"scrub: extent {extent_id} (epoch 1, index 0) is corrupt" in proc.text()
    # The other replica of that extent and every other extent verify: nothing else reported.
    others = db_rows(c.meta_url, f"SELECT count(*) FROM replica WHERE state = 'corrupt' AND NOT "
                                 f"(extent_id = {extent_id} AND node_id = '{node}')")
    assert others == [(0,)]
    assert os.path.exists(data_dir(c, addr[node]) / "scrub.json")
