#!/usr/bin/env python3
"""Store speed benchmark (issue 2, "Speed"): fio on the raw disk vs the store client.

In one run, on one machine, all DataNodes on the one local disk:

1. fio sequential write, then read, of ``--size-mib`` (1 MiB blocks, ``direct=1``,
   psync, iodepth 1), page cache dropped before each phase — the disk's baseline; and
   the same write with an fdatasync every 8 MiB (the DataNode's group-commit size): what
   acknowledging only durable bytes costs before any appendfs code runs (a reference row);
2. a throwaway cluster (MetaNode on SQLite + 3 DataNodes, started and stopped here)
   and the in-process :class:`StoreClient` (not the CLI: no file reading is measured)
   appending 1 MiB buffers to a ``rep:1`` and then a ``rep:3`` stream, each read back right
   after it is written, as fio's file is (verified by the client, xxh3-compared here),
   caches dropped before each phase;
3. a table of MiB/s against the targets of issue 2 (rep:1 >= 60% of fio write, rep:3 >=
   60% of a third of it, reads >= 60% of fio read), DataNode peak RSS (VmHWM, reset per
   phase through /proc/PID/clear_refs) and CPU seconds per GiB (utime+stime from
   /proc/PID/stat) for the client (this process) and the DataNodes.

Other work on the machine distorts the numbers, so each row also says how busy the rest of
the machine was (everyone's CPU from /proc/stat minus ours; the disk's I/O from
/proc/diskstats) and the CPU-bound ceiling: the rate at which the phase's own CPU seconds
per GiB would fill every core — what the store could do on an idle machine at best.

A script that prints tables, run on demand; tests never assert on wall time (STYLE 11).
It needs root (drop_caches, clear_refs). ``--profile DIR`` records py-spy profiles
(GIL-holding samples, i.e. Python CPU time; raw collapsed stacks) of the client and of one
DataNode during the store phases (the numbers are then disturbed).

    .venv/bin/python bench/store_bench.py [--size-mib 1024] [--keep] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import xxhash

from appendfs.store.client import ClientConfig, StoreClient
from appendfs.tools import fetch_status

MIB = 1 << 20
GIB = 1 << 30
APPEND_BYTES = MIB
PATTERN_BYTES = 32 * MIB  # random bytes, repeated (rotated) to make the payload
REPEAT_SHIFT = 4096 + 3  # each repeat's rotation: aligned blocks never repeat for 1,365 repeats
CLK_TCK = os.sysconf("SC_CLK_TCK")
APPENDFS = Path(sys.executable).with_name("appendfs")
REPO = Path(__file__).resolve().parent.parent


# ---- /proc helpers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cpu:
    """CPU time of a process (all its threads), in seconds."""

    user_s: float = 0.0
    sys_s: float = 0.0

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user_s + other.user_s, self.sys_s + other.sys_s)

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user_s - other.user_s, self.sys_s - other.sys_s)

    @property
    def total_s(self) -> float:
        return self.user_s + self.sys_s

    def per(self, gib: float) -> str:
        return f"{self.total_s / gib:.2f} ({self.user_s / gib:.2f}+{self.sys_s / gib:.2f})"


def cpu_of(pid: int) -> Cpu:
    """utime, stime from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return Cpu(int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)


def cpu_sum(pids: list[int]) -> Cpu:
    total = Cpu()
    for pid in pids:
        total = total + cpu_of(pid)
    return total


def hwm_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) since start or since the last reset_hwm."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # not root or old kernel: the peak then covers the whole run


def machine_busy_s() -> float:
    """CPU seconds all processes used so far (every non-idle, non-iowait field of /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port() -> int:
    from appendfs.up import free_port as below_ephemeral  # see its docstring

    return below_ephemeral()


def block_device(path: Path) -> str:
    """Kernel name of the block device (or partition) holding ``path``, e.g. ``vda``."""
    dev = os.stat(path).st_dev
    return Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name


def disk_of(path: Path) -> str:
    """A short description of the block device holding ``path``."""
    name = block_device(path)
    try:
        rot = Path(f"/sys/block/{name}/queue/rotational").read_text().strip()
        size = int(Path(f"/sys/block/{name}/size").read_text()) * 512 / GIB
        return f"/dev/{name} (queue/rotational={rot}, {size:.0f} GiB)"
    except OSError:
        return f"/dev/{name}"


def disk_mib(name: str) -> tuple[float, float]:
    """MiB read and written so far on block device ``name`` (/proc/diskstats), by everyone."""
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == name:
                return int(fields[5]) * 512 / MIB, int(fields[9]) * 512 / MIB
    return float("nan"), float("nan")


def pick_base(requested: Path | None) -> Path:
    """A directory on the same disk as the repository, never tmpfs."""
    if requested is not None:
        return requested
    tmp = Path(tempfile.gettempdir())
    same = os.stat(tmp).st_dev == os.stat(REPO).st_dev
    with open("/proc/mounts") as f:
        tmpfs = any(line.split()[1] == str(tmp) and line.split()[2] == "tmpfs" for line in f)
    return tmp if same and not tmpfs else REPO.parent


# ---- fio ----------------------------------------------------------------------------------


#: The durable reference: fdatasync after every this many 1 MiB writes, the DataNode's
#: group-commit size (``commit_bytes``, 8 MiB). Not a target: issue 2's targets are against
#: plain fio, which never syncs, while the store acknowledges only durable bytes (DESIGN §2).
DURABLE_EVERY = 8


def fio_cmd(path: Path, rw: str, size_mib: int, fdatasync: int = 0) -> list[str]:
    cmd = ["fio", f"--name=seq{rw}", f"--filename={path}", f"--rw={rw}", "--bs=1M", f"--size={size_mib}M",
           "--direct=1", "--ioengine=psync", "--iodepth=1", "--output-format=json"]
    return [*cmd, f"--fdatasync={fdatasync}"] if fdatasync else cmd


def run_fio(path: Path, rw: str, size_mib: int, device: str, fdatasync: int = 0) -> tuple[float, Phase]:
    """fio's bandwidth in MiB/s, and the phase's counters (fio's CPU in the client column)."""
    drop_caches()
    own0, ru0 = cpu_of(os.getpid()), resource.getrusage(resource.RUSAGE_CHILDREN)
    with Meter(device) as m:
        out = subprocess.run(fio_cmd(path, rw, size_mib, fdatasync), check=True, capture_output=True,
                             text=True).stdout
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    fio_cpu = Cpu(ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime)
    ours = fio_cpu + (cpu_of(os.getpid()) - own0)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    phase = Phase(f"fio {rw}", m.seconds, fio_cpu, Cpu(), Cpu(), [], max(0.0, m.busy_s - ours.total_s), m.disk)
    return float(job[rw]["bw_bytes"]) / MIB, phase


# ---- the cluster --------------------------------------------------------------------------


@dataclass
class Cluster:
    root: Path
    meta_url: str
    metanode: subprocess.Popen[bytes]
    datanodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    meta_addr: str = ""
    env: dict[str, str] | None = None  # added to the daemons' environment (APPENDFS_* settings)

    @property
    def dn_pids(self) -> list[int]:
        """The DataNodes still running (a benchmark may kill some)."""
        return [p.pid for p in self.datanodes if p.returncode is None]

    def start_datanode(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start one more DataNode, ``dnN`` (N = how many were started before), with ``extra`` arguments."""
        i = len(self.datanodes)
        p = _spawn(["datanode", "--listen", f"127.0.0.1:{free_port()}", "--data", str(self.root / f"dn{i}"),
                    "--metanode", self.meta_addr, "--secret-file", str(self.root / "secret"), *extra],
                   self.root / f"dn{i}.log", self.env)
        self.datanodes.append(p)
        return p


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([str(APPENDFS), *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=None if env is None else {**os.environ, **env})


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the processes this script started, by pid: SIGTERM, then SIGKILL after 10 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextmanager
def cluster(root: Path, datanodes: int = 3, env: dict[str, str] | None = None,
            dn_args: Callable[[int], list[str]] | None = None) -> Iterator[Cluster]:
    """A throwaway cluster in ``root``; ``env`` is added to every daemon's environment,
    ``dn_args(i)`` to DataNode i's arguments."""
    meta_url = f"sqlite:///{root}/meta.db"
    secret = root / "secret"
    subprocess.run([str(APPENDFS), "format", meta_url, "--secret-file", str(secret)], check=True,
                   stdout=subprocess.DEVNULL)
    meta_addr = f"127.0.0.1:{free_port()}"
    c = Cluster(root, meta_url, _spawn(["metanode", "--meta", meta_url, "--listen", meta_addr], root / "metanode.log",
                                       env), meta_addr=meta_addr, env=env)
    try:
        for i in range(datanodes):
            c.start_datanode(*(dn_args(i) if dn_args else []))
        trio.run(_wait_alive, meta_url, datanodes)
        yield c
    finally:
        _stop([*c.datanodes, c.metanode])


async def _wait_alive(meta_url: str, count: int) -> None:
    with trio.fail_after(60):
        while True:
            try:
                st = await fetch_status(meta_url)
                if sum(1 for n in st["nodes"] if n["alive"]) >= count:
                    return
            except Exception:  # the MetaNode may not be leading yet
                pass
            await trio.sleep(0.5)


# ---- the store phases ---------------------------------------------------------------------


class Payload:
    """``size`` bytes that no two 4 KiB-aligned blocks share, handed out as 1 MiB ``bytes``.

    Built from one random pattern of PATTERN_BYTES, repeated, each repeat rotated by another
    REPEAT_SHIFT bytes (not a multiple of 4 KiB): a block's bytes start at a different point
    of the pattern in every repeat, so no aligned block repeats for the first ~40 GiB. A
    plainly repeated pattern is not a fair payload here: this machine's virtual disk serves
    blocks whose content it has seen from its host's cache (a 1 GiB file of one 32 MiB
    pattern read back with ``O_DIRECT`` at 3.7-5.6 GB/s, one of random bytes at 1.1 GB/s,
    docs/benchmarks.md "Session 16"), so reads of such a payload measured the host, not
    the store.

    The appends are made before any phase starts (``size`` bytes of memory; a copy in the
    timed loop would cost the client ~0.1 s per GiB): appends get ``bytes``, as from
    ``store put``'s file reads, so the client need not copy them.
    """

    def __init__(self, size: int) -> None:
        pattern = os.urandom(PATTERN_BYTES)
        self._twice = memoryview(pattern + pattern)
        self.size = size
        self._appends = [self.view(pos, min(APPEND_BYTES, size - pos)).tobytes()
                         for pos in range(0, size, APPEND_BYTES)]
        hasher = xxhash.xxh3_64()
        for data in self._appends:
            hasher.update(data)
        self.xxh3 = hasher.intdigest()

    def append_at(self, pos: int) -> bytes:
        """The append starting at ``pos`` (a multiple of APPEND_BYTES)."""
        return self._appends[pos // APPEND_BYTES]

    def view(self, pos: int, length: int) -> memoryview:
        """``length`` payload bytes at ``pos``, within one repeat of the pattern."""
        repeat, at = divmod(pos, PATTERN_BYTES)
        assert at + length <= PATTERN_BYTES
        start = (at + repeat * REPEAT_SHIFT) % PATTERN_BYTES
        return self._twice[start:start + length]


async def store_write(meta_url: str, redundancy: str, payload: Payload,
                      out: dict[str, float] | None = None) -> list[tuple[int, int, int]]:
    """Append the payload to a new stream in 1 MiB appends; return its (extent, offset, length) pieces
    (``out``, if given, gets the stream's ``encode_cpu_s``)."""
    async with StoreClient.connect(meta_url, ClientConfig()) as client:
        stream = await client.create_stream("raw", redundancy)
        tickets = []
        for pos in range(0, payload.size, APPEND_BYTES):
            tickets.append(await stream.append(payload.append_at(pos)))
        await stream.close()
        if out is not None:
            out["encode_cpu_s"] = stream.encode_cpu_s
        pieces: list[tuple[int, int, int]] = []
        for t in tickets:
            for p in await t.wait():
                if pieces and pieces[-1][0] == p.extent_id and pieces[-1][1] + pieces[-1][2] == p.ext_off:
                    pieces[-1] = (p.extent_id, pieces[-1][1], pieces[-1][2] + p.length)
                else:
                    pieces.append((p.extent_id, p.ext_off, p.length))
        return pieces


async def store_read(meta_url: str, pieces: list[tuple[int, int, int]], payload: Payload) -> None:
    """Read the pieces back in order; check their xxh3 against the payload's.

    (The client verifies every 4 KiB block already; this end-to-end check costs ~0.03 ms
    per MiB, where comparing against a copy would allocate and fault in fresh pages.)
    """
    hasher = xxhash.xxh3_64()
    size = 0
    async with StoreClient.connect(meta_url, ClientConfig()) as client:
        async for chunk in client.read_pieces(pieces):
            hasher.update(chunk)
            size += len(chunk)
    if size != payload.size or hasher.intdigest() != payload.xxh3:
        raise SystemExit(f"store read returned {size} bytes not matching the {payload.size} written")


@dataclass
class Phase:
    name: str
    seconds: float
    client_cpu: Cpu
    dn_cpu: Cpu
    meta_cpu: Cpu
    dn_hwm_mib: list[float]
    others_cpu_s: float  # CPU used meanwhile by processes other than this benchmark's
    disk_mib: tuple[float, float]  # MiB read, written on the device meanwhile, by everyone


class Meter:
    """Machine-wide counters around one phase: wall time, everyone's CPU, the disk's I/O."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> Meter:
        self._disk0, self._busy0, self._t0 = disk_mib(self.device), machine_busy_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.busy_s = machine_busy_s() - self._busy0
        disk1 = disk_mib(self.device)
        self.disk = (disk1[0] - self._disk0[0], disk1[1] - self._disk0[1])


@contextmanager
def profiling(profile_dir: Path | None, name: str, pids: dict[str, int]) -> Iterator[None]:
    """py-spy record (raw collapsed stacks) of each pid for the duration of the block."""
    if profile_dir is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    procs = [subprocess.Popen([spy, "record", "--nonblocking", "--gil", "--format", "raw", "--rate", "200",
                               "-o", str(profile_dir / f"{name}-{who}.txt"), "--pid", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for who, pid in pids.items()]
    time.sleep(1.0)  # let py-spy attach
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(timeout=60)


def measure(c: Cluster, name: str, fn: Callable[..., Awaitable[Any]], *args: Any,
            device: str, profile_dir: Path | None = None) -> tuple[Phase, Any]:
    """Run one store phase (caches dropped first); return (Phase, fn's result)."""
    drop_caches()
    for pid in c.dn_pids:
        reset_hwm(pid)
    with profiling(profile_dir, name, {"client": os.getpid(), "dn0": c.dn_pids[0]}):
        dn0, meta0, own0 = cpu_sum(c.dn_pids), cpu_of(c.metanode.pid), cpu_of(os.getpid())
        with Meter(device) as m:
            result = trio.run(fn, *args)
        dn1, meta1, own1 = cpu_sum(c.dn_pids), cpu_of(c.metanode.pid), cpu_of(os.getpid())
    ours = (own1 - own0) + (dn1 - dn0) + (meta1 - meta0)
    phase = Phase(name, m.seconds, own1 - own0, dn1 - dn0, meta1 - meta0, [hwm_mib(p) for p in c.dn_pids],
                  max(0.0, m.busy_s - ours.total_s), m.disk)
    return phase, result


# ---- report -------------------------------------------------------------------------------


def report(size: int, fio: dict[str, tuple[float, Phase]], phases: dict[str, Phase]) -> str:
    gib = size / GIB
    fio_w = fio["write"][0] if "write" in fio else float("nan")
    fio_r = fio["read"][0] if "read" in fio else float("nan")
    targets = {"rep:1 write": 0.6 * fio_w, "rep:3 write": 0.6 * fio_w / 3,
               "rep:1 read": 0.6 * fio_r, "rep:3 read": 0.6 * fio_r}
    rows = ["| phase | MiB/s | target MiB/s | % of target | DataNode peak RSS MiB (max of 3) "
            "| client (fio) CPU s/GiB (user+sys) | DataNodes CPU s/GiB, sum of 3 (user+sys) | MetaNode CPU s "
            "| disk MiB read/written (everyone) | other processes' CPU (% of one core) "
            "| CPU-bound ceiling MiB/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ceiling(ph: Phase) -> float:
        """The rate at which this phase's own CPU use would fill every core of the machine."""
        return (os.cpu_count() or 1) * size / MIB / (ph.client_cpu + ph.dn_cpu + ph.meta_cpu).total_s

    def context(ph: Phase) -> str:
        return (f"{ph.disk_mib[0]:.0f} / {ph.disk_mib[1]:.0f} | {ph.others_cpu_s / ph.seconds * 100:.0f}%")

    for key, (rate, ph) in fio.items():
        what = (f"fio write + fdatasync every {DURABLE_EVERY} MiB (reference, not a target)" if key == "durable"
                else f"fio {key} (direct, 1 MiB, QD1)")
        rows.append(f"| {what} | {rate:.0f} | | | | {ph.client_cpu.per(gib)} | | | {context(ph)} | |")
    for name, ph in phases.items():
        rate = size / MIB / ph.seconds
        target = targets[name]
        verdict = "ok" if rate >= target else "MISSED"
        rows.append(f"| store {name} | {rate:.0f} | {target:.0f} | {rate / target * 100:.0f}% {verdict} "
                    f"| {max(ph.dn_hwm_mib):.0f} | {ph.client_cpu.per(gib)} | {ph.dn_cpu.per(gib)} "
                    f"| {ph.meta_cpu.total_s:.2f} | {context(ph)} | {ceiling(ph):.0f} |")
    return "\n".join(rows)


def main() -> None:
    from appendfs.runtime import reexec_with_huge_pages, tune_allocator

    reexec_with_huge_pages()  # the store client in this process runs as in a daemon: huge pages
    tune_allocator()  # as every appendfs process does (appendfs/runtime.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="bytes written per phase, in MiB [1024]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs)")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory "
                    "[the temp dir if on the repository's disk and not tmpfs, else the repository's parent]")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="record py-spy profiles (raw collapsed stacks) of the client and one DataNode here "
                    "(pip install py-spy)")
    ap.add_argument("--skip-fio", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("store_bench: needs root (drop_caches, clear_refs)")
    size = args.size_mib * MIB
    base = pick_base(args.dir)
    root = Path(tempfile.mkdtemp(prefix="appendfs-bench-", dir=base))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    print(f"# store_bench: {args.size_mib} MiB per phase in {root} on {disk_of(root)}; "
          f"{os.cpu_count()} CPUs; load {loadavg()}", flush=True)
    try:
        device = block_device(root)
        fio: dict[str, tuple[float, Phase]] = {}
        if not args.skip_fio:
            fio_file = root / "fio.dat"
            for rw in ("write", "read"):
                fio[rw] = run_fio(fio_file, rw, args.size_mib, device)
                print(f"fio {rw}: {fio[rw][0]:.0f} MiB/s", flush=True)
            fio_file.unlink()
            fio["durable"] = run_fio(fio_file, "write", args.size_mib, device, fdatasync=DURABLE_EVERY)
            print(f"fio write, fdatasync every {DURABLE_EVERY} MiB: {fio['durable'][0]:.0f} MiB/s", flush=True)
            fio_file.unlink()
        payload = Payload(size)
        phases: dict[str, Phase] = {}
        with cluster(root, env={"APPENDFS_METANODE_REBALANCE_SPREAD": "0"}) as c:  # rep:1 placement is uneven by design
            pieces = {}
            # Each stream is read right after it is written, as fio reads its file right after
            # writing it: a virtual disk's host cache favours whatever was written last, and
            # reading rep:1 only after rep:3's 3 GiB handed fio that advantage alone.
            for red in ("rep:1", "rep:3"):
                phases[f"{red} write"], pieces[red] = measure(c, f"{red}-write".replace(":", ""), store_write,
                                                              c.meta_url, red, payload, device=device,
                                                              profile_dir=args.profile)
                print(f"store {red} write: {size / MIB / phases[f'{red} write'].seconds:.0f} MiB/s", flush=True)
                phases[f"{red} read"], _ = measure(c, f"{red}-read".replace(":", ""), store_read,
                                                   c.meta_url, pieces[red], payload, device=device,
                                                   profile_dir=args.profile)
                print(f"store {red} read:  {size / MIB / phases[f'{red} read'].seconds:.0f} MiB/s", flush=True)
        print()
        print(report(size, fio, phases))
        print(f"\nload average after: {loadavg()}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
