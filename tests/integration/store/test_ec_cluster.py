"""Erasure-coded (`ec:4+2`) streams end to end on real processes (issue 6, docs/erasure-coding.md).

`store put --redundancy ec:4+2` on six DataNodes with 4 MiB extents (so the file spans
several extents and the writer rotates), `store get` identical; with two DataNodes that
hold data fragments killed, the read decodes from the survivors; with a third gone, fewer
than K fragments remain and `store get` fails with a clear error — never wrong bytes. A
flipped byte in a data fragment is caught, reported (replica state `corrupt`) and decoded
around.

The issue's 128 MiB takes ~12 s here (most of it cluster start-up); SQLite only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import sqlalchemy as sa
from cluster import db_rows, files_equal, random_file, wait_for

from appendfs.store.ec import Layout

MiB = 1 << 20


def fragment_nodes(meta_url: str) -> dict[str, set[int]]:
    """node id → fragment indexes it holds, over every extent."""
    out: dict[str, set[int]] = {}
    for node_id, idx in db_rows(meta_url, "SELECT node_id, idx FROM replica"):
        out.setdefault(node_id, set()).add(int(idx))
    return out


def test_ec_put_get_survives_two_lost_nodes_and_refuses_with_three(sqlite_url: str, make_cluster,
                                                                   tmp_path: Path) -> None:
    # One engine for the suite's time budget: EC streams on PostgreSQL are exercised by
    # tests/probe/test_ec_faults.py and test_repair.py's ec:4+2 repair.
    c = make_cluster(sqlite_url, datanodes=6, extent_max_bytes=4 * MiB)
    src = random_file(tmp_path / "src.bin", 128 * MiB + 12345, seed=6)  # ends in a short stripe
    locator = c.put(src, "ec:4+2")
    out = tmp_path / "out.bin"
    assert c.get(locator, out).returncode == 0
    assert files_equal(src, out)

    status = c.status()
    assert status["extents"]["healthy"] >= 32 and status["extents"]["lost"] == 0
    assert [u["redundancy"] for u in status["erasure_coding"]] == ["ec:4+2"]
    text = c.run(["status", "--meta", c.meta_url]).stdout.decode()
    assert "erasure coding: ec:4+2 with backend " in text

    # Corrupt one byte of a data fragment on the first victim: the read reports it and
    # decodes the stripe from the other fragments (block checksums catch it first).
    holders = fragment_nodes(c.meta_url)
    addresses = {n["node_id"]: n["address"] for n in status["nodes"]}
    by_address = {p.argv[p.argv.index("--listen") + 1]: p for p in c.datanodes}
    data_holders = [n for n, idxs in sorted(holders.items()) if any(i < 4 for i in idxs)]
    victims = [by_address[addresses[n]] for n in data_holders[:3]]
    extent_id = db_rows(c.meta_url, f"SELECT min(extent_id) FROM replica WHERE node_id = '{data_holders[0]}' "
                                    "AND idx < 4")[0][0]
    dat = Path(victims[0].argv[victims[0].argv.index("--data") + 1]) / "extents" / f"{extent_id:016x}.dat"
    with open(dat, "r+b") as f:
        f.seek(Layout(4, 2).header_bytes + 1000)  # inside the first cell
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    healed = tmp_path / "healed.bin"
    res = c.get(locator, healed)
    assert res.returncode == 0, res.stderr.decode()
    assert files_equal(src, healed)
    # reported (the replica row is marked corrupt until the maintainer rewrites it in place)
    assert f"corrupt replica reported: extent {extent_id} on node {data_holders[0]}" in c.metanodes[0].text()

    # Kill two nodes holding data fragments (index < 4) of some extent: reads must decode.
    for v in victims[:2]:
        v.kill()
    wait_for(lambda: c.alive_nodes() == 4, "4 alive DataNodes")
    degraded = tmp_path / "degraded.bin"
    res = c.get(locator, degraded)
    assert res.returncode == 0, res.stderr.decode()
    assert files_equal(src, degraded)

    # A third: fewer than K=4 fragments of some stripe remain.
    victims[2].kill()
    lost = tmp_path / "lost.bin"
    res = c.get(locator, lost)
    assert res.returncode != 0
    err = res.stderr.decode()
    assert "fragments" in err and "appendfs: error:" in err, err
    assert not files_equal(src, lost) and src.read_bytes()[:lost.stat().st_size] == lost.read_bytes()


def test_directory_policy_ec_writes_new_files_erasure_coded(sqlite_url: str, make_cluster, make_mount,
                                                            tmp_path: Path) -> None:
    """`setfattr -n user.appendfs.redundancy -v ec:4+2 DIR` takes effect for new files.

    SQLite only: the store path is covered on both engines above; this checks the fs hands
    the directory's policy to its streams, and a second mount (cold page cache) reads back.
    """
    c = make_cluster(sqlite_url, datanodes=6, extent_max_bytes=4 * MiB)
    m = make_mount(c)
    d = m.path / "coded"
    d.mkdir()
    os.setxattr(d, "user.appendfs.redundancy", b"ec:4+2")
    src = random_file(tmp_path / "big.bin", 9 * MiB + 17, seed=7)
    shutil.copyfile(src, d / "big.bin")
    (d / "small.txt").write_bytes(b"hello, erasure coding\n")
    os.sync()
    assert os.getxattr(d / "big.bin", "user.appendfs.redundancy") == b"ec:4+2"
    eng = sa.create_engine(sqlite_url)
    with eng.connect() as conn:
        policies = {r[0] for r in conn.execute(sa.text("SELECT DISTINCT redundancy FROM extent"))}
    eng.dispose()
    assert "ec:4+2" in policies
    other = make_mount(c)
    assert files_equal(src, other.path / "coded" / "big.bin")
    assert (other.path / "coded" / "small.txt").read_bytes() == b"hello, erasure coding\n"
