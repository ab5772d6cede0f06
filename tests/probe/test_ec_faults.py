"""Probe: faults while an `ec:4+2` stream is written (issue 6, docs/erasure-coding.md).

* kill -9 the writer mid-stream: the MetaNode fences the stream and seals its open EC
  extent at the logical end of the whole records every fragment holds; every fragment
  file ends sealed at exactly ``Layout.fragment_length(sealed_length)``.
* kill -9 a DataNode holding fragments mid-stream: the writer seals the extent at its
  acknowledged logical length and re-encodes the unacknowledged appends on a new extent
  placed on the other six nodes; the file reads back identical.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import trio
from cluster import db_rows, files_equal, random_file, wait_for

from appendfs.store.client import StoreClient
from appendfs.store.ec import DEFAULT_CELL_BYTES, Layout

MiB = 1 << 20


OPEN_EXTENT_NODES = ("SELECT r.node_id FROM replica r JOIN extent e ON e.extent_id = r.extent_id "
                     "WHERE e.state = 'open' ORDER BY r.idx")


def _put_killing(c, src: Path, at_bytes: int, kill) -> subprocess.Popen[bytes]:
    """`store put` of ``src``; once ``at_bytes`` are acknowledged, freeze the writer (SIGSTOP)
    while its extent is open and call ``kill(proc, nodes of the open extent)``."""
    with c.popen(["store", "put", "--meta", c.meta_url, "--redundancy", "ec:4+2", str(src)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        killed = False
        for line in proc.stderr:
            if not killed and line.startswith(b"progress:") and int(line.split()[1].split(b"/")[0]) >= at_bytes:
                while not killed:  # between a seal and the next allocation no extent is open
                    proc.send_signal(signal.SIGSTOP)
                    time.sleep(0.05)  # let a call already sent land
                    holders = db_rows(c.meta_url, OPEN_EXTENT_NODES)
                    if holders:
                        kill(proc, [h[0] for h in holders])
                        killed = True
                    proc.send_signal(signal.SIGCONT)
                    time.sleep(0.01)
        proc.stdout_text = proc.stdout.read().decode()  # type: ignore[attr-defined]
        proc.wait()
    assert killed
    return proc


async def _read_extent(meta_url: str, extent_id: int, length: int) -> bytes:
    async with StoreClient.connect(meta_url) as client:
        return await client.read(extent_id, 0, length)


def test_ec_writer_and_datanode_crashes(meta_url: str, make_cluster, tmp_path: Path) -> None:
    c = make_cluster(meta_url, datanodes=7, extent_max_bytes=4 * MiB)
    layout = Layout(4, 2, DEFAULT_CELL_BYTES)

    # 1. the writer dies: fenced, every fragment sealed at the fragment length of the logical end
    src = random_file(tmp_path / "src.bin", 48 * MiB, seed=61)
    proc = _put_killing(c, src, 10 * MiB, lambda p, _nodes: p.send_signal(signal.SIGKILL))
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: db_rows(c.meta_url, "SELECT state FROM stream") == [("closed",)],
             "the MetaNode to fence the dead writer's EC stream", 60, 0.3)
    assert db_rows(c.meta_url, "SELECT count(*) FROM extent WHERE state = 'open'") == [(0,)]
    assert "fenced stream 1: extent" in c.metanodes[0].text()  # it had an open extent to seal
    sealed = dict(db_rows(c.meta_url, "SELECT extent_id, sealed_length FROM extent"))
    last = max(sealed)
    assert 0 <= sealed[last] <= 4 * MiB
    seen = 0
    for dn in c.datanodes:
        meta_file = Path(dn.argv[dn.argv.index("--data") + 1]) / "extents" / f"{last:016x}.meta"
        if meta_file.exists():
            rec = json.loads(meta_file.read_text())
            want = layout.fragment_length(sealed[last])
            assert rec["state"] == "sealed" and rec["sealed_length"] == want, (dn.name, rec)
            assert meta_file.with_suffix(".dat").stat().st_size == want
            seen += 1
    assert seen == 6
    # and the fenced extent reads back as the file's bytes (4 appends of 1 MiB per extent)
    if sealed[last]:
        seq = db_rows(c.meta_url, f"SELECT seq FROM extent WHERE extent_id = {last}")[0][0]
        got = trio.run(_read_extent, c.meta_url, last, sealed[last])
        assert got == src.read_bytes()[seq * 4 * MiB:seq * 4 * MiB + sealed[last]]

    # 2. a DataNode holding a fragment of the open extent dies mid-stream: the put still
    # succeeds (resent on a new extent) and reads back identical
    procs = {json.loads((Path(dn.argv[dn.argv.index("--data") + 1]) / "node.json").read_text())["node_id"]: dn
             for dn in c.datanodes}
    victims = []

    def kill_a_holder(_proc: subprocess.Popen[bytes], nodes: list[str]) -> None:
        victims.append(procs[nodes[0]])  # fragment 0: a data fragment
        victims[0].kill()
    proc = _put_killing(c, src, 16 * MiB, kill_a_holder)
    assert proc.returncode == 0
    unsealed = db_rows(c.meta_url, "SELECT count(*) FROM replica WHERE state = 'unsealed'")
    assert unsealed[0][0] >= 1, "the writer should have sealed an extent without the killed node"
    locator = proc.stdout_text.strip().splitlines()[-1]  # type: ignore[attr-defined]
    out = tmp_path / "out.bin"
    res = c.get(locator, out)
    assert res.returncode == 0, res.stderr.decode()
    assert files_equal(src, out)
