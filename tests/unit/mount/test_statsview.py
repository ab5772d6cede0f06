"""`appendfs stats` arithmetic: parse the mount's exposition text, difference two snapshots."""

from __future__ import annotations

import errno

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from appendfs.mount.opstats import OpStats, metric_families
from appendfs.mount.statsview import COLUMNS, header, line, parse


class _Families(Collector):
    def __init__(self, stats: OpStats) -> None:
        self.stats = stats

    def collect(self):  # type: ignore[no-untyped-def]
        return metric_families(self.stats)


def _text(stats: OpStats) -> str:
    reg = CollectorRegistry()
    reg.register(_Families(stats))
    return generate_latest(reg).decode() + "appendfs_mount_cache_hits 30.0\nappendfs_mount_cache_misses 10.0\n"


def test_a_line_gives_rates_mean_latencies_throughput_and_unusual_errors() -> None:
    s = OpStats()
    before = parse(_text(s), at=100.0)
    for _ in range(20):
        s.record("create", 0.002)
        s.record("lookup", 0.0001, errno.ENOENT)  # routine: not an error worth a column
    s.record("mkdir", 0.004)
    s.record("unlink", 0.006, errno.EACCES)
    s.write_bytes += 4 << 20
    s.read_bytes += 8 << 20
    after = parse(_text(s), at=102.0)
    cells = line(before, after, clock="12:00:00").split()
    assert cells[0] == "12:00:00"
    by_op = {op: (cells[1 + 2 * i], cells[2 + 2 * i]) for i, op in enumerate((*COLUMNS, "other"))}
    assert by_op["create"] == ("10", "2.0")  # 20 in 2 s, 2 ms each
    assert by_op["lookup"] == ("10", "0.1")
    assert by_op["read"] == ("0", "-")
    assert by_op["other"] == ("1", "5.0")  # mkdir and unlink: 2 in 2 s, 5 ms on average
    read_mib, write_mib, errs, hit = cells[-4:]
    assert (read_mib, write_mib, errs, hit) == ("4.0", "2.0", "0", "-")  # 1 error in 2 s rounds to 0/s
    assert "err/s" in header() and header().split()[1:9] == list(COLUMNS)


def test_a_restarted_mount_counts_from_zero_and_cache_hits_become_a_rate() -> None:
    s = OpStats()
    for _ in range(50):
        s.record("flush", 0.001)
    old = parse(_text(s), at=0.0)
    old.cache_hits, old.cache_misses = 100.0, 100.0  # the old process had more than the new one has
    fresh = OpStats()
    fresh.record("flush", 0.003)
    cells = line(old, parse(_text(fresh), at=1.0), clock="t").split()
    assert cells[1 + 2 * COLUMNS.index("flush"):3 + 2 * COLUMNS.index("flush")] == ["1", "3.0"]
    assert cells[-1] == "75%"  # 30 hits, 10 misses since the restart


def test_text_without_mount_metrics_is_refused() -> None:
    with pytest.raises(ValueError, match="--metrics"):
        parse("# HELP x y\n# TYPE x gauge\nappendfs_datanode_appends 3.0\n")
