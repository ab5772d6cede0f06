"""``appendfs stats``: a live, per-second view of a mount's FUSE traffic.

It polls the mount's Prometheus endpoint (``appendfs mount --metrics HOST:PORT``; under
``appendfs up`` the address is in ``DIR/run.json``) and prints one line per interval:
requests per second and their mean latency for the operations a workload is made of,
the read and write throughput through FUSE, errors per second, and the block cache's hit
rate (errors: those a workload does not cause by itself — not the ENOENT of a lookup
before a create, not the ENODATA of the kernel's ``security.capability`` check). Everything
comes from the counters of :mod:`appendfs.mount.opstats` and
``FileSystem.stats``; this module only parses (prometheus_client's own parser), takes
differences and formats — the polling loop is in the CLI.

Example (`up`'s mount: 4 KiB files created one by one, then a 400 MiB file written and
read back cold)::

        time    lookup   getattr    create      open      read     write     flush   release     other  read MiB/s write MiB/s  err/s cache hit
                 /s ms     /s ms     /s ms     /s ms     /s ms     /s ms     /s ms     /s ms     /s ms
    01:05:46   370 0.1   368 0.1   369 0.5       0 -       0 -   369 0.0   368 1.5   368 0.0   369 0.0         0.0         1.4      0         -
    01:05:48       0 -       0 -       0 -       0 -       0 -   304 2.2       0 -       0 -   304 0.0         0.0       303.6      0         -
    01:05:49     2 0.3     1 0.6       0 -     1 3.2   398 3.4    29 2.5    2 17.2     2 0.0    29 0.0       398.4        28.9      0       64%

("other" during the small files is the kernel's ``getxattr`` of ``security.capability``.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

#: The operations that get a column of their own; every other one is summed in "other".
COLUMNS = ("lookup", "getattr", "create", "open", "read", "write", "flush", "release")
#: Errors every workload causes, left out of the error column: the kernel looks a name up
#: before creating it, and asks for security.capability before the first write to a file.
ROUTINE_ERRORS = {("lookup", "ENOENT"), ("getxattr", "ENODATA")}
_PREFIX = "appendfs_mount_"
MIB = 1 << 20


@dataclass
class Snapshot:
    """The counters a line is computed from, at one moment."""

    at: float
    ops: dict[str, tuple[float, float]] = field(default_factory=dict)  # op -> (count, seconds)
    errors: float = 0.0
    read_bytes: float = 0.0
    write_bytes: float = 0.0
    cache_hits: float = 0.0
    cache_misses: float = 0.0


def parse(text: str, at: float | None = None) -> Snapshot:
    """A :class:`Snapshot` of a mount's ``/metrics`` text. Raises ValueError when the text
    is not a mount's (no ``appendfs_mount_`` samples at all)."""
    snap = Snapshot(time.monotonic() if at is None else at)
    seen = False
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith(_PREFIX):
                continue
            seen = True
            name = s.name.removeprefix(_PREFIX)
            if name == "fuse_request_seconds_count":
                counts[s.labels["op"]] = s.value
            elif name == "fuse_request_seconds_sum":
                sums[s.labels["op"]] = s.value
            elif name == "fuse_errors_total":
                if (s.labels.get("op"), s.labels.get("errno")) not in ROUTINE_ERRORS:
                    snap.errors += s.value
            elif name == "fuse_read_bytes_total":
                snap.read_bytes = s.value
            elif name == "fuse_write_bytes_total":
                snap.write_bytes = s.value
            elif name == "cache_hits":
                snap.cache_hits = s.value
            elif name == "cache_misses":
                snap.cache_misses = s.value
    if not seen:
        raise ValueError("no appendfs_mount_* metrics here: is this a mount's --metrics address?")
    snap.ops = {op: (n, sums.get(op, 0.0)) for op, n in counts.items()}
    return snap


def header() -> str:
    ops = "".join(f"{op:>10}" for op in (*COLUMNS, "other"))
    units = "".join(f"{'/s ms':>10}" for _ in (*COLUMNS, "other"))
    return (f"{'time':>8}{ops}  read MiB/s write MiB/s  err/s cache hit\n"
            f"{'':>8}{units}")


def _op_cell(n: float, seconds: float, dt: float) -> str:
    if n <= 0:
        return f"{'0 -':>10}"
    return f"{f'{n / dt:,.0f} {seconds / n * 1000:.1f}':>10}"


def line(prev: Snapshot, cur: Snapshot, clock: str | None = None) -> str:
    """One line: what happened between two snapshots (a restarted mount's counters going
    backwards count as starting from zero)."""
    dt = max(cur.at - prev.at, 1e-6)

    def delta(a: float, b: float) -> float:
        return b - a if b >= a else b

    deltas: dict[str, tuple[float, float]] = {}
    for op in set(cur.ops) | set(prev.ops):
        n0, s0 = prev.ops.get(op, (0.0, 0.0))
        n1, s1 = cur.ops.get(op, (0.0, 0.0))
        deltas[op] = (delta(n0, n1), delta(s0, s1))
    other = [v for op, v in deltas.items() if op not in COLUMNS]
    cells = [_op_cell(*deltas.get(op, (0.0, 0.0)), dt) for op in COLUMNS]
    cells.append(_op_cell(sum(n for n, _ in other), sum(s for _, s in other), dt))
    hits = delta(prev.cache_hits, cur.cache_hits)
    lookups = hits + delta(prev.cache_misses, cur.cache_misses)
    hit = f"{hits / lookups:.0%}" if lookups else "-"
    stamp = clock if clock is not None else time.strftime("%H:%M:%S")
    return (f"{stamp:>8}{''.join(cells)}"
            f"  {delta(prev.read_bytes, cur.read_bytes) / MIB / dt:>10,.1f}"
            f" {delta(prev.write_bytes, cur.write_bytes) / MIB / dt:>11,.1f}"
            f" {delta(prev.errors, cur.errors) / dt:>6,.0f} {hit:>9}")
