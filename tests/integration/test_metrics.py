"""Every daemon serves Prometheus metrics that move with the work done."""

from __future__ import annotations

from pathlib import Path

from cluster import free_port, random_file, scrape, wait_for


def test_datanode_and_metanode_metrics(sqlite_url: str, make_cluster, tmp_path: Path) -> None:
    c = make_cluster(sqlite_url, datanodes=0, metanodes=0)
    mport, dport = free_port(), free_port()
    c.env["APPENDFS_METANODE_METRICS"] = f"127.0.0.1:{mport}"
    c.add_metanode()
    c.env.pop("APPENDFS_METANODE_METRICS")
    c.add_datanode("--metrics", f"127.0.0.1:{dport}")
    c.add_datanode()
    c.wait_alive(2)
    before = scrape(dport)
    src = random_file(tmp_path / "f.bin", 3 << 20, seed=61)
    c.put(src, "rep:2")
    after = scrape(dport)
    assert after["appendfs_datanode_append_bytes"] - before["appendfs_datanode_append_bytes"] == 3 << 20
    assert after["appendfs_datanode_commits"] > before["appendfs_datanode_commits"]
    meta = wait_for(lambda: scrape(mport), "MetaNode metrics", 10)
    assert meta["appendfs_metanode_leader"] == 1.0
    assert meta["appendfs_metanode_allocations"] >= 1 and meta["appendfs_metanode_seals"] >= 1
    assert meta["appendfs_metanode_heartbeats"] > 0
