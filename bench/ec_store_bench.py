#!/usr/bin/env python3
"""Erasure-coding speed benchmark of issue 6: ec:4+2 against rep:3 on a throwaway cluster.

In one run, on one machine, all DataNodes on the one local disk:

1. cluster A (MetaNode on SQLite + 6 DataNodes, default settings but rebalance off: the
   maintainer would otherwise move replicas of the unevenly placed rep:3 extents during the
   measured phases, ``rebalance_spread`` 0.1): the in-process
   :class:`StoreClient` appends ``--size-mib`` in 1 MiB appends to a ``rep:3`` stream, then
   to an ``ec:4+2`` stream (target: ec:4+2 >= 1.2x rep:3 in MiB/s of logical bytes); reads
   the ec:4+2 stream back healthy; kills (SIGKILL) the two DataNodes holding fragments 0
   and 1 of its first extent and reads it again, degraded (target: >= 50% of the healthy
   read). With 6 DataNodes every extent has a fragment on every node, but placement
   chooses which index goes where per extent, so the two lost fragments of an extent are
   two data fragments, one data and one parity, or two parity ones; the counts are printed,
   with how many read requests the client decoded (``client.stats["read_fallbacks"]``).
   Caches are dropped before each phase.
2. cluster B (6 DataNodes serving /metrics; MetaNode with ``repair_bytes_s`` =
   ``--repair-mib-s``, ``repair_parallel`` 2, ``repair_after_s`` = ``dead_after_s`` = 3, ``maintain_interval_s``
   0.5, rebalance off; DataNode heartbeats every 0.5 s): ``--repair-size-mib`` written as
   ec:4+2, a 7th DataNode started (the only node not holding a fragment of every extent, so
   the repair target), one DataNode killed for good. Every 0.5 s the bench samples the
   bytes the DataNodes served to reads (``appendfs_datanode_read_bytes``, summed: no
   client reads meanwhile, scrub reads are not counted there, so it is repair's source
   reads, the quantity ``repair_bytes_s`` bounds), ``rebuild_read_bytes`` (counted when
   a job ends) and the MetaNode's ``repair.moved_bytes`` (stored bytes of finished moves).
   It reports the peak over any 30 s window (target: <= the limit), over 1 s and 5 s
   windows for information, and the time to repair; then reads the stream back (verified).
3. a table of MiB/s against the targets, CPU seconds per GiB (utime+stime from /proc) of the
   client (this process) and of the DataNodes (sum), DataNode peak RSS, and how busy the
   rest of the machine was (see bench/store_bench.py, whose helpers this uses). The encode
   cost is the writer's own count: thread CPU time inside ``Codec.encode``
   (``LogStream.encode_cpu_s``) per logical GiB of the ec:4+2 write (bench/ec_bench.py
   times the bare codec).

A script that prints tables, run on demand; tests never assert on wall time (STYLE 11).
It needs root (drop_caches, clear_refs).

    .venv/bin/python bench/ec_store_bench.py [--size-mib 1024] [--repair-size-mib 1024]
                                             [--repair-mib-s 24] [--keep] [--base DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
import store_bench as sb  # bench/ holds scripts, not a package

from appendfs.store import ec
from appendfs.store.client import ClientConfig, StoreClient

MIB = sb.MIB
GIB = sb.GIB
K, M = 4, 2
EC = f"ec:{K}+{M}"
DATANODES = K + M
SAMPLE_S = 0.5
WINDOW_S = 30.0
REPAIR_PARALLEL = 2  # the MetaNode's repair_parallel (its default, set explicitly)


def progress(msg: str) -> None:
    print(msg, flush=True)


def arg_of(p: Any, flag: str) -> str:
    """The value given to ``flag`` on the command line of process ``p`` (a Popen)."""
    args = [str(a) for a in p.args]
    return args[args.index(flag) + 1]


# ---- cluster A: writes, healthy and degraded reads -----------------------------------------


async def stream_read(meta_url: str, pieces: list[tuple[int, int, int]], payload: sb.Payload) -> dict[str, int]:
    """sb.store_read, also returning the client's counters (reads decoded, bad fragments)."""
    hasher = xxhash.xxh3_64()
    size = 0
    async with StoreClient.connect(meta_url, ClientConfig()) as client:
        async for chunk in client.read_pieces(pieces):
            hasher.update(chunk)
            size += len(chunk)
        stats = dict(client.stats)
    if size != payload.size or hasher.intdigest() != payload.xxh3:
        raise SystemExit(f"read returned {size} bytes not matching the {payload.size} written")
    return stats


async def extent_maps(meta_url: str, ids: list[int]) -> list[dict[str, Any]]:
    async with StoreClient.connect(meta_url, ClientConfig()) as client:
        out: list[dict[str, Any]] = []
        for i in range(0, len(ids), 1024):
            out += (await client.meta.call("get_extents", {"extent_ids": ids[i:i + 1024]}))["extents"]
    return out


async def status(meta_url: str) -> dict[str, Any]:
    async with StoreClient.connect(meta_url, ClientConfig(leader_wait_s=10.0)) as client:
        return dict(await client.meta.call("status", {}, wait_s=10.0))


async def wait_nodes(meta_url: str, addresses: set[str], alive: bool, timeout_s: float = 60.0) -> None:
    """Until the MetaNode sees every DataNode at ``addresses`` alive (or every one not alive)."""
    with trio.fail_after(timeout_s):
        while True:
            st = await status(meta_url)
            seen = [n for n in st["nodes"] if n["address"] in addresses]
            if len(seen) == len(addresses) and all(bool(n["alive"]) == alive for n in seen):
                return
            await trio.sleep(0.5)


@dataclass
class Degraded:
    """What the two killed DataNodes took from the ec:4+2 stream."""

    by_data_lost: dict[int, int] = field(default_factory=dict)  # data fragments lost -> extents
    requests: int = 0  # read requests of the stream
    decode_requests: int = 0  # of which touch an extent missing a data fragment
    decode_stripes: int = 0  # stripes those requests cover
    stats: dict[str, int] = field(default_factory=dict)  # client.stats of the degraded read


def read_requests(pieces: list[tuple[int, int, int]], step: int) -> list[tuple[int, int, int]]:
    """The (extent, offset, length) requests read_pieces makes (as StoreClient.read_pieces)."""
    return [(e, o, min(step, off + length - o)) for e, off, length in pieces for o in range(off, off + length, step)]


def degraded_shape(maps: list[dict[str, Any]], killed: set[str], pieces: list[tuple[int, int, int]]) -> Degraded:
    d = Degraded()
    data_lost: dict[int, int] = {}
    for m in maps:
        lost = sum(1 for r in m["replicas"] if r["address"] in killed and int(r["idx"]) < K)
        data_lost[int(m["extent_id"])] = lost
        d.by_data_lost[lost] = d.by_data_lost.get(lost, 0) + 1
    stripe = int(maps[0]["layout"]["cell_bytes"]) * K
    for e, off, length in read_requests(pieces, ClientConfig().read_bytes):
        d.requests += 1
        if data_lost.get(e, 0):
            d.decode_requests += 1
            d.decode_stripes += (off + length - 1) // stripe - off // stripe + 1
    return d


# ---- cluster B: repair under its bandwidth limit --------------------------------------------


@dataclass
class Sample:
    t: float  # perf_counter
    read: float  # bytes served to reads by the live DataNodes (sum): repair's source reads
    rebuild_read: float  # rebuild_read_bytes (sum; counted when a rebuild job ends)
    written: float  # append_bytes (sum): what the rebuild target wrote
    moved: float  # the MetaNode's repair.moved_bytes (stored bytes of finished moves)


@dataclass
class RepairRun:
    kill_t: float
    samples: list[Sample] = field(default_factory=list)
    dead_t: float | None = None  # first sample that saw the killed node declared dead
    done_t: float | None = None
    final: dict[str, Any] = field(default_factory=dict)  # the last status


def scrape(address: str) -> dict[str, float]:
    """A DataNode's Prometheus counters (appendfs_datanode_*), by short name."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("appendfs_datanode_"):
            name, value = line.split()[:2]
            out[name.removeprefix("appendfs_datanode_")] = float(value)
    return out


async def watch_repair(meta_url: str, metrics: list[str], killed: str, kill_t: float, timeout_s: float) -> RepairRun:
    """Sample the counters every SAMPLE_S until the killed node is declared dead and every
    extent is healthy again with no move running or queued."""
    run = RepairRun(kill_t)
    async with StoreClient.connect(meta_url, ClientConfig(leader_wait_s=10.0)) as client:
        with trio.fail_after(timeout_s):
            while True:
                t0 = time.perf_counter()
                counters: list[dict[str, float]] = []

                async def one(address: str, out: list[dict[str, float]] = counters) -> None:
                    out.append(await trio.to_thread.run_sync(scrape, address))
                async with trio.open_nursery() as nursery:
                    for address in metrics:
                        nursery.start_soon(one, address)
                t = (t0 + time.perf_counter()) / 2
                st = await client.meta.call("status", {}, wait_s=10.0)
                rep, ext = st["repair"], st["extents"]
                run.samples.append(Sample(t, sum(c.get("read_bytes", 0) for c in counters),
                                          sum(c.get("rebuild_read_bytes", 0) for c in counters),
                                          sum(c.get("append_bytes", 0) for c in counters), float(rep["moved_bytes"])))
                dead = any(n["address"] == killed and n.get("dead") for n in st["nodes"])
                if dead and run.dead_t is None:
                    run.dead_t = t
                if dead and rep["repairs"] > 0 and not rep["running"] and not rep["queued"] \
                        and ext["degraded"] == ext["under_replicated"] == ext["lost"] == 0:
                    run.done_t, run.final = t, st
                    return run
                await trio.sleep(max(0.0, SAMPLE_S - (time.perf_counter() - t0)))


def peak_rate(points: list[tuple[float, float]], window_s: float) -> float | None:
    """Highest (v_j - v_i) / (t_j - t_i) over sample pairs at least ``window_s`` apart (the
    nearest such j for each i); None when the samples span less than the window."""
    best: float | None = None
    j = 0
    for i in range(len(points)):
        while j < len(points) and points[j][0] - points[i][0] < window_s:
            j += 1
        if j == len(points):
            break
        rate = (points[j][1] - points[i][1]) / (points[j][0] - points[i][0])
        best = rate if best is None else max(best, rate)
    return best


@dataclass
class RepairSummary:
    limit: float  # bytes/s
    read_bytes: float
    rebuild_read_bytes: float
    written_bytes: float
    moved_bytes: float
    active_s: float  # from the last sample before the first source read to the last sample of one
    detect_s: float  # kill -> node declared dead
    total_s: float  # kill -> every extent healthy
    peaks: dict[float, float | None]  # window -> peak source-read bytes/s
    moved_peak30: float | None

    @property
    def resolution(self) -> float:
        """How far a measured 30 s rate may be off (bytes/s): the read counters advance by a
        whole source read (<= 1 MiB) when it ends, up to repair_parallel * K at a time, at
        either end of the window."""
        return 2 * REPAIR_PARALLEL * K * MIB / (WINDOW_S if self.peaks.get(WINDOW_S) is not None else self.active_s)

    @property
    def average(self) -> float:
        return self.read_bytes / self.active_s if self.active_s > 0 else float("nan")

    @property
    def shown(self) -> float:
        """The 30 s peak, or the average when the repair read for less than 30 s."""
        p = self.peaks.get(WINDOW_S)
        return p if p is not None else self.average


def summarise(run: RepairRun, limit: float) -> RepairSummary:
    s = run.samples
    base = s[0]
    reads = [(x.t, x.read - base.read) for x in s]
    grew = [i for i in range(1, len(s)) if s[i].read > s[i - 1].read]
    if grew:
        lo, hi = grew[0] - 1, grew[-1]
        active = reads[lo:hi + 1]
        active_s = s[hi].t - s[lo].t
    else:
        active, active_s = reads, 0.0
    assert run.done_t is not None
    return RepairSummary(
        limit, s[-1].read - base.read, s[-1].rebuild_read - base.rebuild_read, s[-1].written - base.written,
        s[-1].moved - base.moved, active_s,
        (run.dead_t if run.dead_t is not None else run.done_t) - run.kill_t, run.done_t - run.kill_t,
        {w: peak_rate(active, w) for w in (1.0, 5.0, WINDOW_S)},
        peak_rate([(x.t, x.moved - base.moved) for x in s], WINDOW_S))


def repair_lines(r: RepairSummary, st: dict[str, Any], limit_mib: float) -> list[str]:
    def mib(x: float | None) -> str:
        return "-" if x is None else f"{x / MIB:.1f}"
    out = [f"repair: limit {limit_mib:g} MiB/s of source reads (repair_bytes_s; "
           f"{st['repair']['limit_bytes_s'] / MIB:g} MiB/s reported by the MetaNode)",
           f"  killed node declared dead after {r.detect_s:.1f} s; every extent healthy "
           f"{r.total_s:.1f} s after the kill; sources read for {r.active_s:.1f} s",
           f"  source reads {r.read_bytes / MIB:.0f} MiB (rebuild_read_bytes {r.rebuild_read_bytes / MIB:.0f} MiB), "
           f"written by the target {r.written_bytes / MIB:.0f} MiB, moved_bytes {r.moved_bytes / MIB:.0f} MiB; "
           f"{st['repair']['repairs']} repairs, {st['repair']['move_failures']} failed",
           f"  source reads MiB/s: average {mib(r.average)}; peak over 1 s {mib(r.peaks[1.0])}, "
           f"5 s {mib(r.peaks[5.0])}, 30 s {mib(r.peaks[WINDOW_S])} "
           f"(moved_bytes, 30 s: {mib(r.moved_peak30)}); the {'30 s peak' if r.peaks[WINDOW_S] else 'average'} is "
           f"{r.shown / r.limit * 100:.1f}% of the limit, counter resolution ±{r.resolution / MIB:.2f} MiB/s "
           f"(source reads of <= 1 MiB counted when they end, up to {REPAIR_PARALLEL * K} in flight; each "
           f"rebuild job's token bucket starts empty, so its reads by time t never exceed rate * t)"]
    if r.peaks[WINDOW_S] is None:
        out.append(f"  NOTE: the repair read for only {r.active_s:.1f} s (< {WINDOW_S:.0f} s): no 30 s window; "
                   f"the table shows the average instead (raise --repair-size-mib or lower --repair-mib-s)")
    return out


# ---- report ---------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    phase: sb.Phase
    nbytes: float  # the bytes the per-GiB columns divide by
    rate: float  # MiB/s
    target: str  # e.g. ">= 120"
    met: bool | str | None  # a string: the verdict as is
    client: bool = True  # whether the client CPU column means anything


def report(rows: list[Row]) -> str:
    lines = ["| phase | MiB/s | target MiB/s | met? | client CPU s/GiB (user+sys) | DataNodes CPU s/GiB, sum (user+sys) "
             "| DataNode peak RSS MiB (max) | MetaNode CPU s | disk MiB read/written (everyone) "
             "| other processes' CPU (% of one core) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ph, gib = r.phase, r.nbytes / GIB
        met = r.met if isinstance(r.met, str) else "" if r.met is None else ("ok" if r.met else "MISSED")
        rate = f"{r.rate:.0f}" if r.rate >= 100 else f"{r.rate:.1f}"
        lines.append(f"| {r.name} | {rate} | {r.target} | {met} | {ph.client_cpu.per(gib) if r.client else '-'} "
                     f"| {ph.dn_cpu.per(gib)} | {max(ph.dn_hwm_mib, default=float('nan')):.0f} "
                     f"| {ph.meta_cpu.total_s:.2f} | {ph.disk_mib[0]:.0f} / {ph.disk_mib[1]:.0f} "
                     f"| {ph.others_cpu_s / ph.seconds * 100:.0f}% |")
    return "\n".join(lines)


ENCODE: dict[str, float] = {}  # the EC write's LogStream.encode_cpu_s (the rep:3 write overwrites it first)

# ---- main -----------------------------------------------------------------------------------


def cluster_a(root: Path, size: int, device: str, rows: list[Row]) -> Degraded:
    payload = sb.Payload(size)
    mib = size / MIB
    with sb.cluster(root, datanodes=DATANODES, env={"APPENDFS_METANODE_REBALANCE_SPREAD": "0"}) as c:
        rates: dict[str, float] = {}
        pieces: dict[str, list[tuple[int, int, int]]] = {}
        for red in ("rep:3", EC):
            ph, pieces[red] = sb.measure(c, f"{red} write", sb.store_write, c.meta_url, red, payload, ENCODE,
                                         device=device)
            rates[red] = mib / ph.seconds
            progress(f"{red} write: {rates[red]:.0f} MiB/s")
            target = 1.2 * rates["rep:3"]
            rows.append(Row(f"{red} write", ph, size, rates[red], "" if red == "rep:3" else f">= {target:.0f}",
                            None if red == "rep:3" else rates[red] >= target))
        ph, healthy_stats = sb.measure(c, f"{EC} read", stream_read, c.meta_url, pieces[EC], payload, device=device)
        healthy = mib / ph.seconds
        progress(f"{EC} healthy read: {healthy:.0f} MiB/s (client stats {healthy_stats})")
        rows.append(Row(f"{EC} healthy read", ph, size, healthy, "", None))

        ids = list(dict.fromkeys(e for e, _, _ in pieces[EC]))
        maps = trio.run(extent_maps, c.meta_url, ids)
        first = {int(r["idx"]): r for r in maps[0]["replicas"]}
        killed = {str(first[0]["address"]), str(first[1]["address"])}
        victims = [p for p in c.datanodes if arg_of(p, "--listen") in killed]
        assert len(victims) == 2, (killed, [p.args for p in c.datanodes])
        for p in victims:
            p.kill()  # SIGKILL, by pid
            p.wait()
        trio.run(wait_nodes, c.meta_url, killed, False)
        shape = degraded_shape(maps, killed, pieces[EC])
        progress(f"killed the DataNodes of fragments 0 and 1 of extent {ids[0]} ({' '.join(sorted(killed))}); "
                 f"extents by data fragments lost: {dict(sorted(shape.by_data_lost.items()))}")
        ph, shape.stats = sb.measure(c, f"{EC} degraded read", stream_read, c.meta_url, pieces[EC], payload,
                                     device=device)
        rate = mib / ph.seconds
        progress(f"{EC} degraded read: {rate:.0f} MiB/s (client stats {shape.stats})")
        rows.append(Row(f"{EC} degraded read (2 nodes down)", ph, size, rate, f">= {0.5 * healthy:.0f}",
                        rate >= 0.5 * healthy))
        work = trio.run(status, c.meta_url)["repair"]
        if work["moved_bytes"] or work["move_failures"] or work["running"]:
            progress(f"WARNING: the maintainer moved data during the phases above: {work}")
    return shape


def cluster_b(root: Path, size: int, limit: int, device: str, rows: list[Row]) -> list[str]:
    env = {"APPENDFS_METANODE_REPAIR_BYTES_S": str(limit), "APPENDFS_METANODE_REPAIR_AFTER_S": "3",
           "APPENDFS_METANODE_DEAD_AFTER_S": "3", "APPENDFS_METANODE_MAINTAIN_INTERVAL_S": "0.5",
           "APPENDFS_METANODE_REBALANCE_SPREAD": "0", "APPENDFS_METANODE_REPAIR_PARALLEL": str(REPAIR_PARALLEL),
           "APPENDFS_DATANODE_HEARTBEAT_INTERVAL_S": "0.5"}

    def metrics_arg(_i: int) -> list[str]:
        return ["--metrics", f"127.0.0.1:{sb.free_port()}"]

    payload = sb.Payload(size)
    with sb.cluster(root, datanodes=DATANODES, env=env, dn_args=metrics_arg) as c:
        t0 = time.perf_counter()
        pieces = trio.run(sb.store_write, c.meta_url, EC, payload)
        progress(f"repair data: {size / MIB:.0f} MiB written as {EC} in {time.perf_counter() - t0:.1f} s")
        sb.drop_caches()
        seventh = c.start_datanode(*metrics_arg(DATANODES))
        trio.run(sb._wait_alive, c.meta_url, DATANODES + 1)
        before = trio.run(status, c.meta_url)["repair"]
        if before["moved_bytes"] or before["running"] or before["queued"]:
            progress(f"WARNING: maintenance work before the kill (a missed heartbeat?): {before}")
        victim = c.datanodes[0]
        killed = arg_of(victim, "--listen")
        live_metrics = [arg_of(p, "--metrics") for p in c.datanodes if p is not victim]
        kill_t = time.perf_counter()
        victim.kill()  # SIGKILL, by pid: dead for good
        victim.wait()
        progress(f"started a 7th DataNode ({arg_of(seventh, '--listen')}), killed {killed}; repairing "
                 f"at <= {limit / MIB:g} MiB/s ...")
        timeout = 120 + 4 * size * (1 + 1 / 8) / limit
        ph, run = sb.measure(c, "repair", watch_repair, c.meta_url, live_metrics, killed, kill_t, timeout,
                             device=device)
        r = summarise(run, limit)
        lines = repair_lines(r, run.final, limit / MIB)
        for line in lines:
            progress(line)
        over = (r.shown - limit) / limit * 100
        met: bool | str = r.shown <= limit
        if not met and r.shown <= limit + r.resolution:
            met = f"~ (+{over:.1f}%, within ±{r.resolution / limit * 100:.1f}%)"
        rows.append(Row("repair (source reads; " + ("peak over 30 s)" if r.peaks[WINDOW_S] is not None
                                                   else "average: ran < 30 s)"),
                        ph, r.read_bytes, r.shown / MIB, f"<= {limit / MIB:g}", met, client=False))
        t0 = time.perf_counter()
        trio.run(sb.store_read, c.meta_url, pieces, payload)
        lines.append(f"  read back after the repair, verified: {size / MIB / (time.perf_counter() - t0):.0f} MiB/s "
                     f"(caches not dropped)")
        progress(lines[-1])
    return lines


def main() -> None:
    from appendfs.runtime import reexec_with_huge_pages, tune_allocator

    reexec_with_huge_pages()  # the store client in this process runs as in a daemon: huge pages
    tune_allocator()  # as every appendfs process does (appendfs/runtime.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="bytes written per write phase, in MiB [1024]")
    ap.add_argument("--repair-size-mib", type=int, default=1024,
                    help="bytes written as ec:4+2 for the repair phase, in MiB [1024]; the repair reads about as "
                    "much, so it takes about this divided by --repair-mib-s seconds")
    ap.add_argument("--repair-mib-s", type=float, default=24, help="the MetaNode's repair_bytes_s, in MiB/s [24]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs)")
    ap.add_argument("--base", "--dir", dest="base", type=Path, default=None, metavar="DIR",
                    help="parent of the temporary directory [the temp dir if on the repository's disk and not "
                    "tmpfs, else the repository's parent]")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("ec_store_bench: needs root (drop_caches, clear_refs)")
    size, repair_size = args.size_mib * MIB, args.repair_size_mib * MIB
    limit = int(args.repair_mib_s * MIB)
    root = Path(tempfile.mkdtemp(prefix="appendfs-ecbench-", dir=sb.pick_base(args.base)))
    print(f"# command: cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *sys.argv])}")
    choice = ec.choose_backend(K, M)
    print(f"# ec_store_bench: {args.size_mib} MiB per phase, {args.repair_size_mib} MiB repaired at "
          f"<= {args.repair_mib_s:g} MiB/s, in {root} on {sb.disk_of(root)}; {os.cpu_count()} CPUs; "
          f"load {sb.loadavg()}; {EC} backend {choice.name}", flush=True)
    try:
        device = sb.block_device(root)
        rows: list[Row] = []
        (root / "a").mkdir()
        shape = cluster_a(root / "a", size, device, rows)
        if not args.keep:
            shutil.rmtree(root / "a", ignore_errors=True)
        (root / "b").mkdir()
        repair = cluster_b(root / "b", repair_size, limit, device, rows)
        print()
        print(report(rows))
        print("(repair row: MiB/s and DataNode CPU per GiB of repair's source reads; its client is only the poller)")
        print(f"\nencode: {ENCODE['encode_cpu_s'] / (size / GIB):.2f} CPU s per logical GiB (thread CPU time "
              f"of the writer's Codec.encode calls, LogStream.encode_cpu_s, in the {EC} write)")
        lost = shape.by_data_lost
        print(f"degraded read: {DATANODES} DataNodes, 2 killed; extents with 2 data fragments lost: {lost.get(2, 0)}, "
              f"1 data + 1 parity: {lost.get(1, 0)}, 2 parity: {lost.get(0, 0)} (of {sum(lost.values())}); "
              f"{shape.decode_requests} of {shape.requests} read requests "
              f"({ClientConfig().read_bytes // MIB} MiB) touch a lost data fragment, {shape.decode_stripes} "
              f"stripes; the client decoded {shape.stats.get('read_fallbacks', 0)} requests "
              f"(bad fragments reported: {shape.stats.get('bad_replicas', 0)})")
        print("\n".join(repair))
        print(f"\nload average after: {sb.loadavg()}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
