"""Probe: kill -9 the writer (the `store put` client) mid-stream.

Its lease expires, the MetaNode fences the stream: the open extent is sealed at the
minimum length over reachable replicas (DESIGN §7), every replica ends sealed at exactly
that length, and the stream is closed for good.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from cluster import db_rows, random_file, wait_for

MiB = 1 << 20


def test_dead_writer_is_fenced_at_the_minimum_replica_length(meta_url: str, make_cluster, tmp_path: Path) -> None:
    c = make_cluster(meta_url, datanodes=3)
    src = random_file(tmp_path / "src.bin", 64 * MiB, seed=31)
    with c.popen(["store", "put", "--meta", c.meta_url, str(src)], stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(b"progress:") and int(line.split()[1].split(b"/")[0]) >= 20 * MiB:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # before the lease runs out the stream is still open
    assert db_rows(c.meta_url, "SELECT state FROM stream") == [("open",)]
    wait_for(lambda: db_rows(c.meta_url, "SELECT state FROM stream") == [("closed",)],
             "the MetaNode to fence the dead writer's stream", 60, 0.3)
    assert db_rows(c.meta_url, "SELECT count(*) FROM extent WHERE state = 'open'") == [(0,)]
    assert "fenced stream" in c.metanodes[0].text()

    sealed = dict(db_rows(c.meta_url, "SELECT extent_id, sealed_length FROM extent"))
    last = max(sealed)
    for dn in c.datanodes:
        data_dir = Path(dn.argv[dn.argv.index("--data") + 1])
        meta_file = data_dir / "extents" / f"{last:016x}.meta"
        if meta_file.exists():
            rec = json.loads(meta_file.read_text())
            assert rec["state"] == "sealed" and rec["sealed_length"] == sealed[last], (dn.name, rec, dn.text()[-3000:])
            assert meta_file.with_suffix(".dat").stat().st_size == sealed[last]
    # and nobody can append to a fenced stream again: a new writer gets a new stream
    loc = c.put(random_file(tmp_path / "small.bin", MiB, seed=32))
    assert loc.split(":")[1] != "1"
