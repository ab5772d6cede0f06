"""Probe: the database stops for a few seconds under a running cluster (PostgreSQL).

The leader loses its advisory-lock session with the server; it must step down rather
than die, win the election again once the database is back (new epoch), and serve puts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cluster import files_equal, random_file, wait_for

MiB = 1 << 20


@pytest.mark.postgres
def test_cluster_recovers_after_the_database_was_down(pg_url: str, stoppable_pg, make_cluster, tmp_path: Path) -> None:
    server = stoppable_pg
    c = make_cluster(pg_url, datanodes=3)
    epoch_before = c.status()["epoch"]
    src = random_file(tmp_path / "a.bin", 8 * MiB, seed=51)
    loc_a = c.put(src)

    server.pause()
    try:
        time.sleep(4)
        assert all(p.alive for p in c.metanodes + c.datanodes), "a daemon died while the database was down"
    finally:
        server.resume()

    wait_for(lambda: c.alive_nodes() == 3, "the cluster to answer again", 90, 0.5)
    assert c.status()["epoch"] > epoch_before, "the leader should have re-won the election"
    src_b = random_file(tmp_path / "b.bin", 8 * MiB, seed=52)
    loc_b = c.put(src_b)
    for loc, original in ((loc_a, src), (loc_b, src_b)):
        out = tmp_path / "out.bin"
        assert c.get(loc, out).returncode == 0 and files_equal(original, out)
    assert all(p.alive for p in c.metanodes + c.datanodes)
