"""Every daemon serves Prometheus metrics that move with the work done."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster import TEST_CAPACITY_BYTES, free_port, random_file, scrape, wait_for


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
    # the device as heartbeats report it: the test cluster's capacity (or less, on a disk
    # with less room), the put's bytes in it
    dev = {k.removeprefix("appendfs_datanode_device_"): v for k, v in after.items() if "_device_" in k}
    assert dev["capacity_bytes"] <= TEST_CAPACITY_BYTES
    assert dev["capacity_bytes"] == dev["used_bytes"] + dev["free_bytes"]
    assert dev["used_bytes"] - before["appendfs_datanode_device_used_bytes"] >= 3 << 20
    assert dev["full"] == 0.0
    meta = wait_for(lambda: scrape(mport), "MetaNode metrics", 10)
    assert meta["appendfs_metanode_leader"] == 1.0
    assert meta["appendfs_metanode_allocations"] >= 1 and meta["appendfs_metanode_seals"] >= 1
    assert meta["appendfs_metanode_heartbeats"] > 0


def test_mount_metrics_count_and_time_every_request_by_operation(sqlite_url: str, make_cluster, make_mount,
                                                                 tmp_path: Path) -> None:
    """The mount's per-operation histograms and error counters move with real requests."""
    port = free_port()
    m = make_mount(make_cluster(sqlite_url), env={"APPENDFS_MOUNT_METRICS": f"127.0.0.1:{port}"})
    before = wait_for(lambda: _by_labels(scrape(port)), "mount metrics", 10)
    for i in range(5):
        (m.path / f"f{i}").write_bytes(b"x" * 4096)
    for i in range(3):
        assert not (m.path / f"missing{i}").exists()
    after = _by_labels(scrape(port))

    def moved(sample: str) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    for op in ("create", "write", "flush", "release"):
        assert moved(f'appendfs_mount_fuse_request_seconds_count{{op="{op}"}}') >= 5, op
        assert moved(f'appendfs_mount_fuse_request_seconds_sum{{op="{op}"}}') > 0, op
        assert after[f'appendfs_mount_fuse_request_seconds_bucket{{le="+Inf",op="{op}"}}'] == \
            after[f'appendfs_mount_fuse_request_seconds_count{{op="{op}"}}'], op
    # the kernel looks each new name up before creating it, and each missing one once
    assert moved('appendfs_mount_fuse_errors_total{errno="ENOENT",op="lookup"}') >= 8
    assert not any("EIO" in k for k in after)
    assert moved("appendfs_mount_fuse_write_bytes_total") == 5 * 4096

    # `appendfs stats` shows the same traffic live, one line per interval
    stats = subprocess.Popen([sys.executable, "-m", "appendfs", "stats", "--metrics", f"127.0.0.1:{port}",
                              "-i", "0.5", "-n", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for i in range(40):
            (m.path / f"g{i}").write_bytes(b"y" * 8192)
            assert (m.path / f"g{i}").read_bytes() == b"y" * 8192
        out, err = stats.communicate(timeout=30)
    finally:
        stats.kill()
    assert stats.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["time", "lookup", "getattr", "create"] and len(lines) == 2 + 4, out
    creates = [float(line.split()[5].replace(",", "")) for line in lines[2:]]  # create's requests/s column
    assert sum(creates) > 0, out


def _by_labels(samples: dict[str, float]) -> dict[str, float]:
    """Sample names with their labels in sorted order (the exposition's order is its own)."""
    out = {}
    for name, value in samples.items():
        if "{" in name:
            base, _, labels = name[:-1].partition("{")
            name = base + "{" + ",".join(sorted(labels.split(","))) + "}"
        out[name] = value
    return out
