#!/usr/bin/env python3
"""What durability costs on this disk: O_DIRECT writes with an fdatasync every N MiB.

The store acknowledges an append only once every replica has it durable (DESIGN §2): a
DataNode writes with O_DIRECT and makes a group of appends durable with fdatasync
(store/datanode/extents.py). Whether that can reach a given fraction of plain fio depends
on what a device cache flush costs here. Some devices flush in constant time (an NVMe
drive with power-loss protection: almost nothing); a virtual disk whose host caches
writes pays for every byte it took into that cache at the flush. This script measures
which kind of disk it runs on, with the DataNode's own pattern and nothing else:

* ``--size-mib`` MiB written in 1 MiB O_DIRECT ``pwrite`` calls to a fresh file (one
  thread, psync, like fio ``--direct=1 --bs=1M``), in extents of 64 MiB;
* an ``fdatasync`` after every N MiB, for each N of ``--every`` (0 = never: plain fio's
  case), each N run ``--rounds`` times, interleaved, page cache dropped before each run;
* per N: MiB/s, write ms per MiB, fdatasync ms per call and per MiB flushed.

If the flush cost per MiB stays flat as N grows, a flush writes out what the device
cached: batching commits cannot buy durable bandwidth above ``1 / (write + flush ms per
MiB)``, and that — not plain fio — bounds any store that acknowledges only durable bytes.

    .venv/bin/python bench/disk_flush_bench.py [--dir /var/tmp] [--size-mib 1024]
        [--every 0,1,2,4,8,16,32] [--rounds 2]

Needs root for drop_caches (without it, the runs simply start with a warm cache). A
script that prints a table, run on demand; tests never assert on wall time.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
EXTENT_MIB = 64


@dataclass
class Run:
    every_mib: int
    seconds: float = 0.0
    write_s: float = 0.0
    sync_s: float = 0.0
    syncs: int = 0


@dataclass
class Row:
    every_mib: int
    runs: list[Run] = field(default_factory=list)


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: warm cache, still comparable across rows of one run


def one_run(where: Path, size_mib: int, every_mib: int, buf: mmap.mmap) -> Run:
    run = Run(every_mib)
    paths: list[Path] = []
    t0 = time.perf_counter()
    try:
        written = 0
        while written < size_mib:
            path = where / f"extent-{len(paths)}.dat"
            paths.append(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
            try:
                for i in range(min(EXTENT_MIB, size_mib - written)):
                    a = time.perf_counter()
                    os.pwrite(fd, buf, i * MIB)
                    b = time.perf_counter()
                    run.write_s += b - a
                    written += 1
                    if every_mib and written % every_mib == 0:
                        os.fdatasync(fd)
                        run.sync_s += time.perf_counter() - b
                        run.syncs += 1
                if every_mib and written % every_mib:
                    b = time.perf_counter()
                    os.fdatasync(fd)
                    run.sync_s += time.perf_counter() - b
                    run.syncs += 1
            finally:
                os.close(fd)
        run.seconds = time.perf_counter() - t0
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the scratch files go [/var/tmp]")
    ap.add_argument("--size-mib", type=int, default=1024, help="MiB written per run [1024]")
    ap.add_argument("--every", default="0,1,2,4,8,16,32", help="fdatasync every N MiB, comma separated; 0 = never")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each N, interleaved [2]")
    args = ap.parse_args()
    every = [int(x) for x in args.every.split(",")]
    buf = mmap.mmap(-1, MIB)  # page aligned, as O_DIRECT wants
    buf.write(os.urandom(MIB))
    rows = {n: Row(n) for n in every}
    with tempfile.TemporaryDirectory(prefix="disk-flush-", dir=args.dir) as tmp:
        print(f"# disk_flush_bench: {args.size_mib} MiB per run in {tmp}; 1 MiB O_DIRECT pwrite, "
              f"{EXTENT_MIB} MiB files; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        for r in range(args.rounds):
            for n in every:
                drop_caches()
                run = one_run(Path(tmp), args.size_mib, n, buf)
                rows[n].runs.append(run)
                print(f"#   round {r + 1}: fdatasync every {n or '-'} MiB: {args.size_mib / run.seconds:.0f} MiB/s",
                      flush=True)
    print()
    print("| fdatasync every | MiB/s (runs) | write ms per MiB | fdatasync ms per call | fdatasync ms per MiB |")
    print("|---|---|---:|---:|---:|")
    for n in every:
        runs = rows[n].runs
        rates = " / ".join(f"{args.size_mib / x.seconds:.0f}" for x in runs)
        write = statistics.mean(x.write_s for x in runs) / args.size_mib * 1e3
        if n:
            per_call = statistics.mean(x.sync_s / x.syncs for x in runs) * 1e3
            per_mib = statistics.mean(x.sync_s for x in runs) / args.size_mib * 1e3
            sync = f"{per_call:.1f} | {per_mib:.2f}"
        else:
            sync = "- | -"
        print(f"| {f'{n} MiB' if n else 'never (plain fio)'} | {rates} | {write:.2f} | {sync} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
