"""The errno wrapper counts every request: its operation, its time, the errno it answered."""

from __future__ import annotations

import errno
import re

import pyfuse3
import pytest
import trio

from appendfs.meta import FsError
from appendfs.mount.errors import fuse_errors
from appendfs.mount.opstats import BUCKETS, OpStats, metric_families


class _Handlers:
    def __init__(self) -> None:
        self.op_stats = OpStats()

    @fuse_errors
    async def lookup(self, name: bytes) -> bytes:
        if name == b"missing":
            raise FsError(errno.ENOENT, "no such name")
        if name == b"broken":
            raise RuntimeError("a bug")
        if name == b"slow":
            await trio.sleep(0.02)
        return name

    @fuse_errors
    async def hang(self) -> None:
        await trio.sleep_forever()


async def test_requests_are_counted_timed_and_their_errors_named() -> None:
    h = _Handlers()
    assert await h.lookup(b"a") == b"a"
    assert await h.lookup(b"slow") == b"slow"
    for name, want in ((b"missing", errno.ENOENT), (b"broken", errno.EIO)):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await h.lookup(name)
        assert caught.value.errno == want
    lat, errors = h.op_stats.snapshot()
    assert lat["lookup"].count == 4
    assert lat["lookup"].total_s >= 0.02
    assert errors == {("lookup", "ENOENT"): 1, ("lookup", "EIO"): 1}
    buckets = lat["lookup"].cumulative()
    assert [b for b, _ in buckets] == [*map(repr, BUCKETS), "+Inf"]
    assert [n for _, n in buckets] == sorted(n for _, n in buckets) and buckets[-1][1] == 4
    # The slow one (20 ms asleep) lies above the 10 ms bound. Where the fast ones land is
    # the machine's business: logging the "broken" one's traceback took over 10 ms once
    # under CI's load, so their bounds are not asserted (STYLE: no wall-time asserts).
    assert dict(buckets)["0.01"] <= 3


async def test_a_cancelled_request_is_not_counted() -> None:
    h = _Handlers()
    with trio.move_on_after(0.01):
        await h.hang()
    assert h.op_stats.snapshot() == ({}, {})


def test_buckets_hold_their_upper_bound_and_the_slowest_go_to_inf() -> None:
    s = OpStats()
    s.record("read", BUCKETS[0])
    s.record("read", BUCKETS[0] * 1.01)
    s.record("read", BUCKETS[-1] * 2)
    counts = s.latency["read"].counts
    assert counts[0] == 1 and counts[1] == 1 and counts[-1] == 1


def test_metric_families_render_histograms_and_error_counters() -> None:
    s = OpStats()
    s.record("create", 0.003)
    s.record("lookup", 0.0002, errno.ENOENT)
    hist, errs, _read, _write = metric_families(s)
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value for x in hist.samples + errs.samples}
    assert samples[("appendfs_mount_fuse_request_seconds_count", (("op", "create"),))] == 1
    assert samples[("appendfs_mount_fuse_request_seconds_bucket", (("le", "0.0025"), ("op", "create")))] == 0
    assert samples[("appendfs_mount_fuse_request_seconds_bucket", (("le", "0.005"), ("op", "create")))] == 1
    assert samples[("appendfs_mount_fuse_errors_total", (("errno", "ENOENT"), ("op", "lookup")))] == 1


async def test_a_slow_request_is_logged_with_its_numbers_but_not_its_data(caplog: pytest.LogCaptureFixture) -> None:
    class Slow:
        def __init__(self) -> None:
            self.op_stats = OpStats(slow_s=0.01)

        @fuse_errors
        async def write(self, fh: int, off: int, buf: bytes) -> int:
            await trio.sleep(0.02 if off else 0)
            return len(buf)

    h = Slow()
    with caplog.at_level("WARNING", logger="appendfs.mount.errors"):
        assert await h.write(7, 0, b"fast") == 4
        assert await h.write(7, 4096, b"secret bytes") == 12
    slow = [r.getMessage() for r in caplog.records]
    assert len(slow) == 1 and re.fullmatch(r"slow FUSE request: write\(7, 4096\) took \d+\.\d{3} s", slow[0]), slow
    assert "secret" not in slow[0]
    assert OpStats().record("write", 100.0) is False  # 0 turns the warning off
