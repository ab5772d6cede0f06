#!/usr/bin/env python3
"""Erasure-coding transform benchmark (issue 6, "report encode CPU seconds per GiB").

Times the pure transform of store/ec.py — no network, no disk — for one layout
(default ``ec:4+2`` with 64 KiB cells) on every backend available here:

* ``pyeclib encode``: the bare ``ECDriver.encode`` per stripe (the floor; no headers);
* ``encode``: :meth:`Codec.encode` (pad, encode, xxh3 of every cell, record headers);
* ``healthy read``: :meth:`Layout.assemble` of the data fragments (what a healthy read does:
  copies, no decoding; the same on every backend);
* ``decode, all data``: :meth:`Codec.decode` given every fragment (verifies, copies);
* ``decode, 2 data lost``: :meth:`Codec.decode` without fragments 0 and 1 (reconstructs);
* ``rebuild 1 fragment``: :meth:`Codec.rebuild` of fragment 0 from fragments 1..K.

Each row gives MiB/s of *logical* data by wall clock and by CPU time (process CPU, so
other work on the machine inflates the wall number but not the CPU one) and CPU seconds
per GiB of logical data. Run once with ``--no-tune`` to see what glibc's default malloc
thresholds cost (pyeclib allocates stripe-sized buffers per call; see appendfs.runtime.tune_allocator, which every appendfs process applies).

    .venv/bin/python bench/ec_bench.py [--size-mib 64] [--k 4] [--m 2] [--cell-kib 64] [--op-kib 4096]
                                       [--repeat 3] [--no-tune]

A script that prints a table; tests never assert on wall time (STYLE 11).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

from pyeclib.ec_iface import ECDriver

from appendfs.runtime import tune_allocator
from appendfs.store import ec

MIB = 1 << 20
GIB = 1 << 30
EXTENT = 1


def measure(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(wall s, CPU s) per run of ``fn``: best of ``repeat`` runs after a warm-up run."""
    fn()
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def rows_for(backend: str, layout: ec.Layout, payload: bytes, op_bytes: int,
             repeat: int) -> list[tuple[str, float, float]]:
    """Time each operation over ``payload`` cut into calls of ``op_bytes`` logical bytes
    (like the client: an append op or a read request per call)."""
    codec = ec.Codec(layout, backend)
    driver = ECDriver(k=layout.k, m=layout.m, ec_type=backend)
    s = layout.stripe_bytes
    stripes = [payload[i:i + s] for i in range(0, len(payload), s)]
    ops = []  # (first stripe, logical bytes, fragments of those stripes)
    for off in range(0, len(payload), op_bytes):
        data = payload[off:off + op_bytes]
        ops.append((off // s, data, codec.encode(data, extent_id=EXTENT, first_stripe=off // s)))

    reads = []  # what a healthy read of each op's range receives: one span per data fragment
    for first, data, frags in ops:
        base, start = layout.stripe_start(first), layout.record_span(first, 1)[0]
        spans = layout.read_spans(base, len(data))
        reads.append((base, len(data), {i: (lo, frags[i][lo - start:hi - start]) for i, (lo, hi) in spans.items()}))

    def healthy() -> None:
        for base, length, fetched in reads:
            layout.assemble(base, length, fetched)

    def decode(drop: int) -> None:
        for first, data, frags in ops:
            codec.decode({i: frags[i] for i in range(drop, layout.width)}, extent_id=EXTENT, first_stripe=first,
                         ext_off=layout.stripe_start(first), length=len(data))

    def rebuild() -> None:
        for first, _data, frags in ops:
            codec.rebuild({i: frags[i] for i in range(1, layout.k + 1)}, missing=0, extent_id=EXTENT,
                          first_stripe=first)

    first, data, frags = ops[-1]
    base = layout.stripe_start(first)
    got = codec.decode({i: frags[i] for i in range(2, layout.width)}, extent_id=EXTENT, first_stripe=first,
                       ext_off=base, length=len(data))
    if got.data != data or codec.rebuild({i: frags[i] for i in range(1, layout.k + 1)}, missing=0, extent_id=EXTENT,
                                         first_stripe=first) != frags[0]:
        raise SystemExit(f"{backend}: decoded or rebuilt bytes differ")
    def bare_encode() -> None:
        for x in stripes:
            driver.encode(x)  # results dropped at once, as the writer does once they are sent

    def encode() -> None:
        for f, d, _ in ops:
            codec.encode(d, extent_id=EXTENT, first_stripe=f)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("pyeclib encode", bare_encode),
        ("encode", encode),
        ("healthy read (no decode)", healthy),
        ("decode, all data", lambda: decode(0)),
        ("decode, 2 data lost", lambda: decode(2)),
        ("rebuild 1 fragment", rebuild),
    ]
    return [(name, *measure(fn, repeat)) for name, fn in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=64, help="logical bytes per operation (MiB)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--cell-kib", type=int, default=ec.DEFAULT_CELL_BYTES // 1024)
    ap.add_argument("--op-kib", type=int, default=4096,
                    help="logical bytes per call (KiB; rounded to whole stripes): the client's read_bytes")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per row (best is shown)")
    ap.add_argument("--no-tune", action="store_true", help="keep glibc's default malloc thresholds")
    args = ap.parse_args()

    tuned = False if args.no_tune else tune_allocator()
    layout = ec.Layout(args.k, args.m, args.cell_kib * 1024)
    payload = random.Random(6).randbytes(args.size_mib * MIB)
    op_bytes = max(1, args.op_kib * 1024 // layout.stripe_bytes) * layout.stripe_bytes
    choice = ec.choose_backend(args.k, args.m)
    print(f"ec:{layout.k}+{layout.m}, cell {layout.cell_bytes // 1024} KiB (stripe {layout.stripe_bytes // 1024} KiB, "
          f"record {layout.record_bytes} B), {args.size_mib} MiB logical in calls of "
          f"{op_bytes // 1024} KiB, best of {args.repeat}")
    print(f"allocator thresholds tuned: {tuned}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"chosen backend: {choice.name} — {choice.reason}")
    print()
    head = f"{'backend':<24} {'operation':<26} {'MiB/s wall':>11} {'MiB/s CPU':>10} {'CPU s/GiB':>10}"
    print(head)
    print("-" * len(head))
    for backend in ec.available_backends():
        if backend == "isa_l_rs_vand" and layout.m > 4:
            continue
        for name, wall, cpu in rows_for(backend, layout, payload, op_bytes, args.repeat):
            mib = args.size_mib
            print(f"{backend:<24} {name:<26} {mib / wall:>11.0f} {mib / max(cpu, 1e-9):>10.0f} "
                  f"{cpu / (mib * MIB / GIB):>10.3f}")


if __name__ == "__main__":
    main()
