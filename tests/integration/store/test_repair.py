"""Repair, scrub, rebalance and drain on real processes (issue 6, must-show 2, 3 and 4).

The MetaNode's maintainer (store/metanode/maintain.py) re-creates copies through the
DataNodes' ``rebuild`` request. Timings are shortened through the environment (a node is
dead after 3 s of silence, rounds every 0.5 s, old copies deleted 1 s after a move); the
code paths are the production ones. Every check polls `appendfs status` or the cluster
tables with a generous deadline, never a wall-clock assert.
"""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa
from cluster import Cluster, files_equal, random_file, wait_for

from appendfs.store.ec import Layout

MiB = 1 << 20
FAST = {"APPENDFS_METANODE_REPAIR_AFTER_S": "3", "APPENDFS_METANODE_MAINTAIN_INTERVAL_S": "0.5",
        "APPENDFS_METANODE_DELETE_GRACE_S": "1"}


def cluster(root: Path, meta_url: str, datanodes: int, extent_max_bytes: int, **env: str) -> Cluster:
    c = Cluster(root, meta_url, extent_max_bytes=extent_max_bytes, env={**FAST, **env})
    c.add_metanode()
    for _ in range(datanodes):
        c.add_datanode()
    c.wait_alive(datanodes)
    return c


def rows(meta_url: str, query: str) -> list[tuple]:
    eng = sa.create_engine(meta_url)
    try:
        with eng.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(query))]
    finally:
        eng.dispose()


def placements(meta_url: str) -> set[tuple[int, str]]:
    return {(int(e), n) for e, n in rows(meta_url, "SELECT extent_id, node_id FROM replica")}


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
    assert st["repair"]["repairs"] >= len(held) and st["extents"]["lost"] == 0
    text = c.run(["status", "--meta", c.meta_url]).stdout.decode()
    assert "declared dead" in text and "repair:" in text
    check_get(c, locator, src, tmp_path / "after-repair.bin")

    # Full redundancy again: one more node may die and every byte still reads back.
    c.datanodes[1].kill()
    check_get(c, locator, src, tmp_path / "after-second-loss.bin")


def test_rep3_on_four_nodes_repairs_a_dead_node(meta_url: str, tmp_path: Path) -> None:
    c = cluster(tmp_path / "c", meta_url, 4, 4 * MiB)
    try:
        repair_then_lose_another(c, random_file(tmp_path / "src.bin", 40 * MiB + 1234, seed=61), "rep:3", tmp_path)
    finally:
        c.stop()


def test_ec42_on_seven_nodes_rebuilds_the_fragments_of_a_dead_node(meta_url: str, tmp_path: Path) -> None:
    c = cluster(tmp_path / "c", meta_url, 7, 4 * MiB)
    try:
        repair_then_lose_another(c, random_file(tmp_path / "src.bin", 32 * MiB + 4321, seed=62), "ec:4+2", tmp_path)
    finally:
        c.stop()


def test_a_joining_node_gets_its_share_and_a_drained_node_ends_empty(meta_url: str, tmp_path: Path) -> None:
    spread = 0.1
    c = cluster(tmp_path / "c", meta_url, 3, 1 * MiB, APPENDFS_METANODE_REBALANCE_SPREAD=str(spread))
    try:
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
    finally:
        c.stop()


def test_status_names_the_repair_settings_in_text(sqlite_url: str, tmp_path: Path) -> None:
    c = cluster(tmp_path / "c", sqlite_url, 3, 4 * MiB)
    try:
        text = c.run(["status", "--meta", c.meta_url]).stdout.decode()
        assert "degraded 0, under-replicated 0, lost 0" in text
        assert "repair: 0 running, 0 queued" in text
    finally:
        c.stop()



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


def test_scrub_finds_a_bad_block_and_the_copy_is_rewritten(meta_url: str, tmp_path: Path) -> None:
    """Must-show 3: a byte flipped on disk in a replica and in an EC fragment; scrub finds
    both, reports them, the maintainer rewrites each in place (every node holds a copy), and
    reads return the right bytes all along."""
    c = cluster(tmp_path / "c", meta_url, 3, 4 * MiB, APPENDFS_DATANODE_SCRUB_BYTES_S=str(64 * MiB),
                APPENDFS_DATANODE_SCRUB_INTERVAL_S="1")
    try:
        src_rep = random_file(tmp_path / "rep.bin", 9 * MiB, seed=64)
        src_ec = random_file(tmp_path / "ec.bin", 9 * MiB + 77, seed=65)
        loc_rep, loc_ec = c.put(src_rep, "rep:3"), c.put(src_ec, "ec:2+1")
        wait_for(lambda: fully_healthy(c), "a healthy cluster after the puts", 60, 0.5)
        rep_extent = int(loc_rep.split(":")[4].split("@")[0])
        ec_extent = int(loc_ec.split(":")[4].split("@")[0])
        (rep_node, rep_len), = rows(c.meta_url, f"SELECT r.node_id, e.sealed_length FROM replica r JOIN extent e "
                                                f"ON e.extent_id = r.extent_id WHERE r.extent_id = {rep_extent} "
                                                "AND r.idx = 0")
        (ec_node,), = rows(c.meta_url, f"SELECT node_id FROM replica WHERE extent_id = {ec_extent} AND idx = 1")
        rep_file, ec_file = data_file(c, rep_node, rep_extent), data_file(c, ec_node, ec_extent)
        good_rep, good_ec = rep_file.read_bytes(), ec_file.read_bytes()
        flip(rep_file, rep_len // 2)
        flip(ec_file, Layout(2, 1).header_bytes + 5000)  # inside the first cell of fragment 1

        def rewritten() -> bool:
            epochs = dict(rows(c.meta_url, "SELECT extent_id, placement_epoch FROM extent "
                                           f"WHERE extent_id IN ({rep_extent}, {ec_extent})"))
            return epochs == {rep_extent: 2, ec_extent: 2} and bool(fully_healthy(c))
        wait_for(rewritten, "scrub to find both bad blocks and the maintainer to rewrite them", 120, 0.5)
        mn = c.metanodes[0].text()
        assert f"corrupt replica reported: extent {rep_extent} on node {rep_node}" in mn
        assert f"corrupt replica reported: extent {ec_extent} on node {ec_node}" in mn
        assert "in place" in mn
        # the same node holds the copy again, byte for byte what was written
        assert rows(c.meta_url, f"SELECT node_id, state FROM replica WHERE extent_id = {rep_extent} "
                                "AND idx = 0") == [(rep_node, "ok")]
        assert rep_file.read_bytes() == good_rep and ec_file.read_bytes() == good_ec
        check_get(c, loc_rep, src_rep, tmp_path / "rep-out.bin")
        check_get(c, loc_ec, src_ec, tmp_path / "ec-out.bin")
    finally:
        c.stop()
