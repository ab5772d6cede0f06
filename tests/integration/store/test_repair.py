"""Repair, scrub, rebalance, drain and transcoding on real processes (issue 6, must-show 2-5).

The MetaNode's maintainer (store/metanode/maintain.py) re-creates copies through the
DataNodes' ``rebuild`` request. Timings are shortened through the environment (a node is
dead after 3 s of silence, rounds every 0.5 s, old copies deleted 1 s after a move); the
code paths are the production ones. Every check polls `appendfs status` or the cluster
tables with a generous deadline, never a wall-clock assert.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import trio
from cluster import Cluster, db_rows, files_equal, random_file, wait_for

from appendfs.store.client import StoreClient
from appendfs.store.client.locator import Locator
from appendfs.store.ec import Layout

MiB = 1 << 20
FAST = {"APPENDFS_METANODE_REPAIR_AFTER_S": "3", "APPENDFS_METANODE_MAINTAIN_INTERVAL_S": "0.5",
        "APPENDFS_METANODE_DELETE_GRACE_S": "1"}


def cluster(make_cluster, meta_url: str, datanodes: int, extent_max_bytes: int, **env: str) -> Cluster:
    """A running cluster with the shortened maintainer timings (stopped by the fixture)."""
    return make_cluster(meta_url, datanodes=datanodes, extent_max_bytes=extent_max_bytes,
                        env={**FAST, **env})


def placements(meta_url: str) -> set[tuple[int, str]]:
    return {(int(e), n) for e, n in db_rows(meta_url, "SELECT extent_id, node_id FROM replica")}


def node_of(c: Cluster, proc) -> str:
    address = proc.argv[proc.argv.index("--listen") + 1]
    return next(n["node_id"] for n in c.status()["nodes"] if n["address"] == address)


def fully_healthy(c: Cluster) -> dict | None:
    st = c.status()
    e = st["extents"]
    done = e["healthy"] == e["sealed"] + e["open"] and not st["repair"]["running"] and st["repair"]["queued"] == 0
    return st if done else None


def check_get(c: Cluster, locator: str, src: Path, out: Path) -> None:
    res = c.get(locator, out)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert files_equal(src, out)


def repair_then_lose_another(c: Cluster, src: Path, redundancy: str, tmp_path: Path) -> None:
    locator = c.put(src, redundancy)
    assert wait_for(lambda: fully_healthy(c), "a healthy cluster after the put", 60, 0.5)
    victim = c.datanodes[0]
    dead_id = node_of(c, victim)
    held = {e for e, n in placements(c.meta_url) if n == dead_id}
    assert held, "the victim holds nothing: the test would prove nothing"
    victim.kill()

    def repaired() -> dict | None:
        st = fully_healthy(c)
        return st if st and not any(n == dead_id for _, n in placements(c.meta_url)) else None
    st = wait_for(repaired, "repair to re-create every copy the dead node held", 120, 1.0)
    dead = next(n for n in st["nodes"] if n["node_id"] == dead_id)
    assert dead["dead"] and not dead["alive"]
    # A rebalance running when the victim died may have moved one of its copies away
    # first (seen in CI: ec:4+2 on 7 nodes right after the put); that copy needed no repair.
    moved_off = {e for e in held if re.search(rf"rebalance: extent {e} slot \d+ now on \S+ \(node {dead_id} above "
                                              r"its share\)", c.metanodes[0].text())}
    assert st["repair"]["repairs"] >= len(held - moved_off) and st["extents"]["lost"] == 0
    text = c.run(["status", "--meta", c.meta_url]).stdout.decode()
    assert "declared dead" in text and "repair:" in text
    check_get(c, locator, src, tmp_path / "after-repair.bin")

    # Full redundancy again: one more node may die and every byte still reads back.
    c.datanodes[1].kill()
    check_get(c, locator, src, tmp_path / "after-second-loss.bin")


def test_rep3_on_four_nodes_repairs_a_dead_node(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    # One engine for the suite's time budget: the EC case below runs the same repair on PostgreSQL.
    c = cluster(make_cluster, sqlite_url, 4, 4 * MiB)
    repair_then_lose_another(c, random_file(tmp_path / "src.bin", 40 * MiB + 1234, seed=61), "rep:3", tmp_path)


@pytest.mark.postgres
def test_ec42_on_seven_nodes_rebuilds_the_fragments_of_a_dead_node(pg_url: str, make_cluster, tmp_path: Path) -> None:
    """PostgreSQL only (the suite's time budget): rep:3 above runs the same maintainer on SQLite."""
    c = cluster(make_cluster, pg_url, 7, 4 * MiB)
    repair_then_lose_another(c, random_file(tmp_path / "src.bin", 32 * MiB + 4321, seed=62), "ec:4+2", tmp_path)


def test_a_joining_node_gets_its_share_and_a_drained_node_ends_empty(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    """SQLite only (the suite's time budget): the maintainer's SQL is the same for both
    engines and runs on PostgreSQL in the repair and transcoding tests."""
    spread = 0.1
    c = cluster(make_cluster, sqlite_url, 3, 1 * MiB, APPENDFS_METANODE_REBALANCE_SPREAD=str(spread))
    src = random_file(tmp_path / "src.bin", 32 * MiB, seed=63)  # 32 extents of 1 MiB, each on all 3 nodes
    locator = c.put(src, "rep:3")
    wait_for(lambda: fully_healthy(c), "a healthy cluster after the put", 60, 0.5)
    before = placements(c.meta_url)

    # Readers keep reading while extents move.
    stop, failures, reads = threading.Event(), [], [0]

    def reader() -> None:
        i = 0
        while not stop.is_set():
            out = tmp_path / f"during-{i % 2}.bin"
            res = c.get(locator, out)
            if res.returncode != 0 or not files_equal(src, out):
                failures.append(res.stderr.decode()[-1000:] or "different bytes")
            reads[0] += 1
            i += 1
    t = threading.Thread(target=reader)
    t.start()
    try:
        joined = c.add_datanode()
        c.wait_alive(4)
        new_id = node_of(c, joined)

        def balanced() -> dict | None:
            st = fully_healthy(c)
            return st if st and st["repair"]["imbalance"] <= spread and \
                any(n == new_id for _, n in placements(c.meta_url)) else None
        st = wait_for(balanced, "the new node to receive its share", 120, 0.5)
        after = placements(c.meta_url)
        moved = len(after - before) * MiB
        # rep:3 over 4 equal nodes: the newcomer's share is 3/4 of the data; the least
        # that puts every node within the spread gives it (1 - spread) of that.
        minimum = (1 - spread) * 0.75 * 32 * MiB
        assert {n for _, n in after - before} == {new_id}, "only the newcomer should receive extents"
        assert minimum <= moved + MiB and moved <= 1.2 * minimum, (moved / MiB, minimum / MiB)
        assert st["repair"]["rebalance_moves"] == len(after - before)

        # Drain one of the original nodes: everything leaves it, nothing comes back.
        victim = c.datanodes[0]
        victim_id = node_of(c, victim)
        out = c.run(["node", "drain", "--meta", c.meta_url, victim_id]).stdout.decode()
        assert f"node {victim_id}: draining" in out

        def drained() -> dict | None:
            st = fully_healthy(c)
            node = st and next(n for n in st["nodes"] if n["node_id"] == victim_id)
            return st if node and node["state"] == "drained" and node["stored_bytes"] == 0 else None
        wait_for(drained, "the drained node to hold nothing", 120, 0.5)
        extents_dir = Path(victim.argv[victim.argv.index("--data") + 1]) / "extents"
        wait_for(lambda: not list(extents_dir.glob("*.dat")), "the drained node's files to be deleted", 60, 0.5)
    finally:
        stop.set()
        t.join()
    assert not failures, failures[:3]
    assert reads[0] >= 2
    victim.kill()
    check_get(c, locator, src, tmp_path / "after-drain.bin")
    # a drained node takes no new extents; unknown ids are refused clearly
    res = c.run(["node", "drain", "--meta", c.meta_url, "no-such-node"], check=False)
    assert res.returncode != 0 and b"no-such-node" in res.stderr


def test_status_names_the_repair_settings_in_text(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    c = cluster(make_cluster, sqlite_url, 3, 4 * MiB)
    text = c.run(["status", "--meta", c.meta_url]).stdout.decode()
    assert "degraded 0, under-replicated 0, lost 0" in text
    assert "repair: 0 running, 0 queued" in text


def data_file(c: Cluster, node_id: str, extent_id: int) -> Path:
    st = c.status()
    address = next(n["address"] for n in st["nodes"] if n["node_id"] == node_id)
    proc = next(p for p in c.datanodes if p.argv[p.argv.index("--listen") + 1] == address)
    return Path(proc.argv[proc.argv.index("--data") + 1]) / "extents" / f"{extent_id:016x}.dat"


def flip(path: Path, offset: int) -> bytes:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))
    return byte


@pytest.mark.postgres
def test_scrub_finds_a_bad_block_and_the_copy_is_rewritten(pg_url: str, make_cluster, tmp_path: Path) -> None:
    """Must-show 3: a byte flipped on disk in a replica and in an EC fragment; scrub finds
    both, reports them, the maintainer rewrites each in place (every node holds a copy), and
    reads return the right bytes all along. PostgreSQL only (time budget): scrub's report
    path runs on SQLite in test_datanode_repair.py."""
    c = cluster(make_cluster, pg_url, 3, 4 * MiB, APPENDFS_DATANODE_SCRUB_BYTES_S=str(64 * MiB),
                APPENDFS_DATANODE_SCRUB_INTERVAL_S="1")
    src_rep = random_file(tmp_path / "rep.bin", 9 * MiB, seed=64)
    src_ec = random_file(tmp_path / "ec.bin", 9 * MiB + 77, seed=65)
    loc_rep, loc_ec = c.put(src_rep, "rep:3"), c.put(src_ec, "ec:2+1")
    wait_for(lambda: fully_healthy(c), "a healthy cluster after the puts", 60, 0.5)
    rep_extent = int(loc_rep.split(":")[4].split("@")[0])
    ec_extent = int(loc_ec.split(":")[4].split("@")[0])
    (rep_node, rep_len), = db_rows(c.meta_url, f"SELECT r.node_id, e.sealed_length FROM replica r JOIN extent e "
                                            f"ON e.extent_id = r.extent_id WHERE r.extent_id = {rep_extent} "
                                            "AND r.idx = 0")
    (ec_node,), = db_rows(c.meta_url, f"SELECT node_id FROM replica WHERE extent_id = {ec_extent} AND idx = 1")
    rep_file, ec_file = data_file(c, rep_node, rep_extent), data_file(c, ec_node, ec_extent)
    good_rep, good_ec = rep_file.read_bytes(), ec_file.read_bytes()
    flip(rep_file, rep_len // 2)
    flip(ec_file, Layout(2, 1).header_bytes + 5000)  # inside the first cell of fragment 1

    def rewritten() -> bool:
        epochs = dict(db_rows(c.meta_url, "SELECT extent_id, placement_epoch FROM extent "
                                       f"WHERE extent_id IN ({rep_extent}, {ec_extent})"))
        return epochs == {rep_extent: 2, ec_extent: 2} and bool(fully_healthy(c))
    wait_for(rewritten, "scrub to find both bad blocks and the maintainer to rewrite them", 120, 0.5)
    mn = c.metanodes[0].text()
    assert f"corrupt replica reported: extent {rep_extent} on node {rep_node}" in mn
    assert f"corrupt replica reported: extent {ec_extent} on node {ec_node}" in mn
    assert "in place" in mn
    # the same node holds the copy again, byte for byte what was written
    assert db_rows(c.meta_url, f"SELECT node_id, state FROM replica WHERE extent_id = {rep_extent} "
                            "AND idx = 0") == [(rep_node, "ok")]
    assert rep_file.read_bytes() == good_rep and ec_file.read_bytes() == good_ec
    check_get(c, loc_rep, src_rep, tmp_path / "rep-out.bin")
    check_get(c, loc_ec, src_ec, tmp_path / "ec-out.bin")


def raw_bytes(c: Cluster) -> int:
    """Bytes of every extent file on every DataNode (one deleted while we count adds none)."""
    total = 0
    for p in c.datanodes:
        for f in (Path(p.argv[p.argv.index("--data") + 1]) / "extents").glob("*.dat"):
            try:
                total += f.stat().st_size
            except FileNotFoundError:
                pass
    return total


def transcoded(c: Cluster, logical: int) -> bool:
    policies = {r[0] for r in db_rows(c.meta_url, "SELECT redundancy FROM extent WHERE state = 'sealed'")}
    return policies == {"ec:4+2"} and bool(fully_healthy(c)) and raw_bytes(c) < 2 * logical


@pytest.mark.postgres
def test_rep3_then_ec42_ends_erasure_coded_at_half_the_raw_space(pg_url: str, make_cluster, tmp_path: Path) -> None:
    """Must-show 5 on the store: `store put --redundancy rep:3>ec:4+2` is written with three
    replicas; the maintainer transcodes every sealed extent (6 nodes: some hold an old
    replica and a new fragment at once) and deletes the replicas; reads work throughout.
    PostgreSQL only (time budget): the mount and stale-map tests below run it on SQLite."""
    c = cluster(make_cluster, pg_url, 6, 4 * MiB)
    src = random_file(tmp_path / "src.bin", 24 * MiB + 12345, seed=66)
    stop, failures, reads = threading.Event(), [], [0]
    locator_box: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            if not locator_box:
                stop.wait(0.05)
                continue
            res = c.get(locator_box[0], tmp_path / "during.bin")
            if res.returncode != 0 or not files_equal(src, tmp_path / "during.bin"):
                failures.append(res.stderr.decode()[-1000:] or "different bytes")
            reads[0] += 1
    t = threading.Thread(target=reader)
    t.start()
    try:
        locator_box.append(c.put(src, "rep:3>ec:4+2"))
        wait_for(lambda: transcoded(c, src.stat().st_size), "every extent erasure-coded, replicas deleted",
                 120, 0.5)
        stop.wait(1.0)  # one more read on the final placement
    finally:
        stop.set()
        t.join()
    assert not failures, failures[:3]
    assert reads[0] >= 1
    # Exactly six fragment files per extent left on disk, nothing else: no replica survives.
    lengths = [int(n) for (n,) in db_rows(c.meta_url, "SELECT sealed_length FROM extent")]
    assert sum(lengths) == src.stat().st_size
    expected = sum(6 * Layout(4, 2).fragment_length(n) for n in lengths)
    assert raw_bytes(c) == expected
    # ec:4+2: 1.5x the data plus record headers and the last extent's short stripe, where
    # the rep:3 it was written with takes 3x
    assert expected < 0.52 * 3 * src.stat().st_size, expected / src.stat().st_size
    st = c.status()
    assert st["repair"]["transcodes"] == st["extents"]["sealed"] == 7
    assert [u["redundancy"] for u in st["erasure_coding"]] == ["ec:4+2"]
    check_get(c, locator_box[0], src, tmp_path / "out.bin")
    # fully erasure-coded: any two nodes may die
    c.datanodes[0].kill()
    c.datanodes[3].kill()
    check_get(c, locator_box[0], src, tmp_path / "after-two-lost.bin")


def test_a_directory_under_rep3_then_ec42_keeps_its_files_erasure_coded(sqlite_url: str, make_cluster, make_mount,
                                                                      tmp_path: Path) -> None:
    """Must-show 5 through the mount: the directory policy `rep:3>ec:4+2` (SQLite: the
    store path runs on both engines above)."""
    c = make_cluster(sqlite_url, datanodes=6, extent_max_bytes=4 * MiB, env=FAST)
    m = make_mount(c)
    d = m.path / "archive"
    d.mkdir()
    os.setxattr(d, "user.appendfs.redundancy", b"rep:3>ec:4+2")
    assert os.getxattr(d, "user.appendfs.redundancy") == b"rep:3>ec:4+2"
    src = random_file(tmp_path / "big.bin", 20 * MiB + 99, seed=67)
    shutil.copyfile(src, d / "big.bin")
    os.sync()
    assert os.getxattr(d / "big.bin", "user.appendfs.redundancy") == b"rep:3>ec:4+2"
    m.stop()  # closes the file's stream: its last extent is sealed, so every extent transcodes
    wait_for(lambda: transcoded(c, src.stat().st_size), "the file's extents erasure-coded", 120, 0.5)
    other = make_mount(c)
    assert files_equal(src, other.path / "archive" / "big.bin")


def test_a_client_holding_the_replicated_map_reads_right_after_transcoding(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    """A reader caches an extent's `rep:3` map; the extent is transcoded and its replicas
    deleted; the reader's next read misses the replicas, refreshes, gets an `ec:4+2` map
    and must decode it as such — reading a fragment file as if it were a replica returned
    fragment bytes (valid block checksums, wrong content) before this was fixed.

    The maintainer only wakes when told (interval 3600 s; a `node drain --cancel` wakes it),
    so the map is cached before any transcode; old copies go at once (grace 0)."""
    c = cluster(make_cluster, sqlite_url, 6, 4 * MiB, APPENDFS_METANODE_MAINTAIN_INTERVAL_S="3600",
                APPENDFS_METANODE_DELETE_GRACE_S="0")
    src = random_file(tmp_path / "src.bin", 10 * MiB + 5, seed=68)
    locator = c.put(src, "rep:3>ec:4+2")
    pieces = [(p.extent_id, p.ext_off, p.length) for p in Locator.parse(locator).pieces]
    expected = src.read_bytes()
    some_node = c.status()["nodes"][0]["node_id"]

    async def read_all(client: StoreClient) -> bytes:
        return b"".join([await client.read(*p) for p in pieces])

    async def main() -> tuple[bytes, bytes]:
        async with StoreClient.connect(c.meta_url) as client:
            before = await read_all(client)
            maps = [await client.extent_map(e) for e, _, _ in pieces]
            assert not any("layout" in m for m in maps)  # cached: replicated
            await trio.to_thread.run_sync(lambda: c.run(["node", "drain", "--meta", c.meta_url, some_node,
                                                         "--cancel"]))
            await trio.to_thread.run_sync(lambda: wait_for(
                lambda: transcoded(c, len(expected)), "every extent transcoded, replicas deleted", 120, 0.5))
            after = await read_all(client)
            return before, after
    before, after = trio.run(main)
    assert before == expected
    assert after == expected


def test_an_ec_write_with_one_node_short_is_completed_by_repair(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    """`ec:4+2` with 5 live DataNodes: extents are placed with one fragment missing
    (`ec_missing_max` 1, never fewer than K+1), the put succeeds and reads back; once a
    sixth node joins, repair rebuilds the missing fragment of every sealed extent."""
    c = cluster(make_cluster, sqlite_url, 5, 4 * MiB)
    src = random_file(tmp_path / "src.bin", 12 * MiB + 3, seed=69)
    locator = c.put(src, "ec:4+2")
    st = c.status()
    assert st["extents"]["under_replicated"] == st["extents"]["sealed"] == 4 and st["extents"]["lost"] == 0
    assert {n for (n,) in db_rows(c.meta_url, "SELECT count(*) FROM replica GROUP BY extent_id")} == {5}
    check_get(c, locator, src, tmp_path / "short.bin")
    c.add_datanode()
    c.wait_alive(6)
    wait_for(lambda: fully_healthy(c), "repair to place every missing fragment", 120, 0.5)
    assert {n for (n,) in db_rows(c.meta_url, "SELECT count(*) FROM replica GROUP BY extent_id")} == {6}
    # the rebuilt fragments are real: two of the first five nodes may go
    c.datanodes[0].kill()
    c.datanodes[1].kill()
    check_get(c, locator, src, tmp_path / "after.bin")
