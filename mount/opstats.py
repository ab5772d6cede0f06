"""Per-operation counts, latencies and errors of the mount's FUSE handlers (no I/O).

Every handler passes through :func:`~appendfs.mount.errors.fuse_errors`, which records
each request here: its operation, how long the handler took (from the moment pyfuse3
called it to its answer, so the kernel's queue and the reply's copy are not included)
and the errno it answered, if any. The mount's ``/metrics`` endpoint exports them as

* ``appendfs_mount_fuse_request_seconds{op}``: a histogram (count, sum, buckets);
* ``appendfs_mount_fuse_errors_total{op,errno}``: requests answered with an error, by
  errno name — some are routine (``lookup`` ENOENT before every create, ``getxattr``
  ENODATA), a jump in ``EIO`` is not;
* ``appendfs_mount_fuse_read_bytes_total`` / ``..._write_bytes_total``: bytes answered to
  reads and taken from writes.

``appendfs stats`` (:mod:`appendfs.mount.statsview`) shows them live.

Recording costs two dict lookups and a bisect per request (~1 µs); the scrape runs in
prometheus_client's thread and reads copies, so a scrape never blocks a request (a
snapshot may lag a request behind between a count and its sum, which Prometheus
tolerates).
"""

from __future__ import annotations

import bisect
import errno as errno_mod
from dataclasses import dataclass, field
from typing import Any

#: Upper bounds of the latency buckets, in seconds: from a cached getattr (~50 µs) to a
#: close that waits out a database outage (the meta timeout, 15 s by default).
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                              0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class OpLatency:
    """One operation's histogram: ``counts[i]`` requests took at most ``BUCKETS[i]`` (and
    more than the bucket before); the last slot counts those slower than every bound."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total_s: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, requests at most that long), ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*map(repr, BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class OpStats:
    """``slow_s``: :meth:`record` answers True for a request at least this long (0: never),
    so the wrapper can log it."""

    def __init__(self, slow_s: float = 0.0) -> None:
        self.slow_s = slow_s
        self.latency: dict[str, OpLatency] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.read_bytes = 0  # answered to FUSE reads (ops.read counts them)
        self.write_bytes = 0  # taken from FUSE writes (ops.write)

    def record(self, op: str, seconds: float, err: int = 0) -> bool:
        """Count one request; True when it was slow (see ``slow_s``)."""
        lat = self.latency.get(op)
        if lat is None:
            lat = self.latency[op] = OpLatency()
        lat.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        lat.total_s += seconds
        if err:
            key = (op, errno_mod.errorcode.get(err, str(err)))
            self.errors[key] = self.errors.get(key, 0) + 1
        return 0 < self.slow_s <= seconds

    def snapshot(self) -> tuple[dict[str, OpLatency], dict[tuple[str, str], int]]:
        """Copies for a scrape in another thread (each list copy is one C call under the GIL)."""
        lat = {op: OpLatency(list(v.counts), v.total_s) for op, v in list(self.latency.items())}
        return lat, dict(self.errors)


def metric_families(stats: OpStats, prefix: str = "appendfs_mount") -> list[Any]:
    """The prometheus_client families of ``stats`` (for :func:`appendfs.metrics.serve_metrics`)."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    latency, errors = stats.snapshot()
    hist = HistogramMetricFamily(f"{prefix}_fuse_request_seconds",
                                 "mount: time a FUSE handler took to answer, by operation", labels=["op"])
    for op, lat in sorted(latency.items()):
        hist.add_metric([op], buckets=lat.cumulative(), sum_value=lat.total_s)
    errs = CounterMetricFamily(f"{prefix}_fuse_errors", "mount: FUSE requests answered with an error, by "
                               "operation and errno", labels=["op", "errno"])
    for (op, name), n in sorted(errors.items()):
        errs.add_metric([op, name], n)
    rd = CounterMetricFamily(f"{prefix}_fuse_read_bytes", "mount: bytes answered to FUSE reads",
                             value=stats.read_bytes)
    wr = CounterMetricFamily(f"{prefix}_fuse_write_bytes", "mount: bytes taken from FUSE writes",
                             value=stats.write_bytes)
    return [hist, errs, rd, wr]
