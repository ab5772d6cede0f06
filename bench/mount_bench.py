#!/usr/bin/env python3
"""Mount speed benchmark (issue 4, "Speed"): fio through appendfs against its ceilings.

One run, one disk, page cache dropped before every phase (``sync; echo 3 >
/proc/sys/vm/drop_caches``), targets in this order:

* ``local``        a directory on the disk itself;
* ``passthrough``  ``bench/passthrough.py`` (a plain pyfuse3 passthrough of a local
                   directory, its own process): the ceiling of any Python FUSE layer;
* ``store rep:1``  the in-process store client writing and reading back one ``rep:1``
                   stream in 1 MiB appends (``bench/store_bench.py``'s code, same cluster);
* ``appendfs rep:1`` / ``appendfs rep:3``  one ``appendfs mount`` (default settings, SQLite
                   MetaNode + 3 DataNodes started here), two directories whose
                   ``user.appendfs.redundancy`` xattr is ``rep:1`` and ``rep:3``.

Phases of each file-system target (fio ``--ioengine=psync --iodepth=1``, JSON output):

1. sequential write of ``--size-gib`` in 1 MiB blocks, buffered, ``--end_fsync=1`` (fio's
   bandwidth includes the final fsync);
2. sequential read of that file, 1 MiB blocks, buffered (cold: caches dropped);
   for appendfs rep:1, when the store target ran, the same bytes by both readers next:
   the store client reads the fio file's extents twice, then fio reads the file through
   the mount once more — mount, store, store, mount — and a last check compares the
   means. This VM's disk drifts within seconds and the store target's own stream lies
   elsewhere on it; this comparison takes both out and leaves what the mount adds.
   Between the store client's two reads, a second mount of the same cluster with
   ``-o direct_io`` (read-only opens bypass the page cache; not the default, see
   docs/mount.md) reads the file twice with the same fio job, so the order is mount,
   store, direct, direct, store, mount: informational, it shows what the page cache's
   copy costs and is not one of the checks;
   for the passthrough, fio reads its file again with the source file in the page
   cache: no disk below, the FUSE layer alone — the most fio reads through a Python FUSE
   process on this machine (reported under the table, and noted on the seq-read check
   when 80% of the store client is more than that); once with its own buffer, once with
   a page-aligned one (``PAGE_ALIGNED``);
3. 4 KiB random reads of that file at queue depth 1 for ``--rand-s`` seconds, with
   ``--direct=1`` when the target accepts O_DIRECT (probed on the file), else buffered —
   the table says which;
4. per ``--threads`` count: ``--files`` files of 4 KiB created, written and closed in one
   fresh directory by that many Python threads (os.open/os.write/os.close); files/s over
   the whole batch. They stay until the scratch directory goes (unlinking 10,000 files
   through a mount would only add minutes); the fio file is removed after its phases.

``--size-gib`` should stay well above the mount's block cache (``[fs] cache_bytes``, 64 MiB
by default), which dropping the kernel's caches does not empty; small sizes are for trying
the script out, not for numbers.

The peak RSS of each target's FUSE process is the larger of psutil samples (every 0.1 s)
and the kernel's VmHWM, reset before the target's phases (/proc/PID/clear_refs). Each row
also says how much CPU other processes used meanwhile (everyone's CPU from /proc/stat minus
this benchmark's processes, worst phase): the machine may be shared.

Results go to stdout as two Markdown tables (numbers; ratios against issue 4's targets with
PASS/MISS — the seq-read check also says when the store client read faster than the local
directory, i.e. from the host's cache on a VM; the verdict is not changed); progress goes
to stderr. Needs root (drop_caches, FUSE, clear_refs), fio and
/dev/fuse. Everything started here is stopped by pid and unmounted, also on Ctrl-C.

    .venv/bin/python bench/mount_bench.py --dir /var/tmp/afs-bench [--size-gib 1] [--rand-s 30]
        [--files 10000] [--threads 1,4] [--targets local,passthrough,store,rep1,rep3] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import store_bench as sb  # bench/ holds scripts, not a package

from appendfs.store.client import ClientConfig, StoreClient

MIB = 1 << 20
GIB = 1 << 30
SMALL_FILE = 4096
POLICY_XATTR = "user.appendfs.redundancy"
PASSTHROUGH = Path(__file__).resolve().with_name("passthrough.py")
TARGETS = ("local", "passthrough", "store", "rep1", "rep3")


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PhaseError(Exception):
    """One phase failed (fio error, mount error); recorded in the table, the run goes on."""


# ---- processes we start -----------------------------------------------------------------


SETPRIV = shutil.which("setpriv")


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A daemon in its own session (Ctrl-C reaches only the benchmark, which then stops
    things in order) that gets SIGTERM if the benchmark dies (setpriv --pdeathsig)."""
    if SETPRIV is not None:
        argv = [SETPRIV, "--pdeathsig", "TERM", "--", *argv]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop(procs: list[subprocess.Popen[bytes]], timeout_s: float = 60) -> None:
    """SIGTERM the processes this script started, by pid; SIGKILL whoever outlives the timeout."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            progress(f"pid {p.pid} did not stop in {timeout_s:.0f} s: SIGKILL")
            p.kill()
            p.wait()


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, from /proc/self/mounts (never touches the mount,
    so a hung or dead FUSE mount cannot block us)."""
    target = str(path).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mounts_below(root: Path) -> list[str]:
    prefix = str(root) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


@dataclass
class FuseProc:
    """A FUSE server process serving ``mountpoint`` in the foreground."""

    name: str
    argv: list[str]
    mountpoint: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> FuseProc:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.popen = spawn(self.argv, self.log)
        deadline = time.monotonic() + timeout_s
        while not mounted(self.mountpoint):
            if self.popen.poll() is not None:
                raise PhaseError(f"{self.name} exited with status {self.popen.returncode} before mounting:\n"
                                 f"{self.tail()}")
            if time.monotonic() > deadline:
                raise PhaseError(f"{self.name} did not mount {self.mountpoint} in {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stop(self) -> None:
        """SIGTERM (a clean unmount), then a lazy unmount if the mount outlived its process."""
        if self.popen is not None:
            stop([self.popen])
        if mounted(self.mountpoint):
            progress(f"{self.mountpoint} still mounted after {self.name} stopped: umount -l")
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start_cluster(root: Path) -> sb.Cluster:
    """A SQLite MetaNode and 3 DataNodes, as store_bench starts them (default settings)."""
    root.mkdir(parents=True, exist_ok=True)
    meta_url = f"sqlite:///{root}/meta.db"
    secret = root / "secret"
    subprocess.run([str(sb.APPENDFS), "format", meta_url, "--secret-file", str(secret)], check=True,
                   stdout=subprocess.DEVNULL)
    meta_addr = f"127.0.0.1:{sb.free_port()}"
    c = sb.Cluster(root, meta_url, spawn([str(sb.APPENDFS), "metanode", "--meta", meta_url, "--listen", meta_addr],
                                         root / "metanode.log"))
    try:
        for i in range(3):
            c.datanodes.append(spawn([str(sb.APPENDFS), "datanode", "--listen", f"127.0.0.1:{sb.free_port()}",
                                      "--data", str(root / f"dn{i}"), "--metanode", meta_addr,
                                      "--secret-file", str(secret)], root / f"dn{i}.log"))
        trio.run(sb._wait_alive, meta_url, 3)
    except BaseException:
        stop([*c.datanodes, c.metanode])
        raise
    return c


# ---- measuring --------------------------------------------------------------------------


class RssWatch:
    """Peak RSS of some processes: psutil samples every 0.1 s in a thread, and VmHWM."""

    def __init__(self) -> None:
        self._peak: dict[int, int] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        """(Re)start the peak of ``pid`` from its current RSS."""
        sb.reset_hwm(pid)
        with self._lock:
            self._procs[pid] = psutil.Process(pid)
            self._peak[pid] = 0

    def peak_mib(self, pid: int) -> float:
        with self._lock:
            sampled = self._peak.get(pid, 0) / MIB
        try:
            return max(sampled, sb.hwm_mib(pid))
        except OSError:
            return sampled

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                for pid, proc in list(self._procs.items()):
                    try:
                        self._peak[pid] = max(self._peak[pid], proc.memory_info().rss)
                    except psutil.Error:
                        self._procs.pop(pid)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Busy:
    """CPU seconds used by processes other than ours during one phase, as % of one core."""

    pids: Callable[[], list[int]]  # our daemons (FUSE servers, cluster) alive now

    @contextlib.contextmanager
    def phase(self, sink: list[float]) -> Iterator[None]:
        def ours() -> float:
            total = sb.cpu_of(os.getpid()).total_s
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # fio, once reaped
            total += ru.ru_utime + ru.ru_stime
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    total += sb.cpu_of(pid).total_s
            return total

        ours0, busy0, t0 = ours(), sb.machine_busy_s(), time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        others = max(0.0, (sb.machine_busy_s() - busy0) - (ours() - ours0))
        sink.append(others / seconds * 100 if seconds > 0 else 0.0)


#: fio aligns its buffer only for O_DIRECT; a buffered job's is malloc's, 16 bytes past a
#: page boundary, and the kernel's copy between it and the page cache runs at a fifth of
#: the speed here (fio read a hot local file at 2,612 MiB/s, 12,800 with this option; dd
#: 14,400). The checks keep fio's own buffer, as the issue's runs always have; the FUSE
#: layer alone is measured both ways (docs/benchmarks.md, session 18).
PAGE_ALIGNED = "--mem_align=4096"


def fio(name: str, path: Path, rw: str, size_mib: int, *extra: str, timeout_s: float) -> dict[str, Any]:
    """Run one fio job; its JSON result for the job's direction (read or write)."""
    cmd = ["fio", f"--name={name}", f"--filename={path}", f"--rw={rw}", f"--size={size_mib}M",
           "--ioengine=psync", "--iodepth=1", "--fallocate=none", "--output-format=json", *extra]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PhaseError(f"fio did not finish in {timeout_s:.0f} s: {' '.join(cmd)}") from None
    if res.returncode != 0 or "{" not in res.stdout:
        raise PhaseError(f"fio exited with {res.returncode}: {' '.join(cmd)}\n{(res.stderr or res.stdout)[-2000:]}")
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    if job.get("error"):
        raise PhaseError(f"fio job error {job['error']}: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    result: dict[str, Any] = job["write" if "write" in rw else "read"]
    return result


async def read_pieces(meta_url: str, pieces: list[tuple[int, int, int]]) -> int:
    """Read (extent, offset, length) pieces in order with the store client (it verifies
    every block's checksum); return the bytes read."""
    size = 0
    async with StoreClient.connect(meta_url, ClientConfig()) as client:
        async for chunk in client.read_pieces(pieces):
            size += len(chunk)
    return size


def direct_ok(path: Path) -> bool:
    """Whether ``path`` can be opened with O_DIRECT and read 4 KiB that way."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    buf = mmap.mmap(-1, 4096)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


def small_files(where: Path, count: int, threads: int) -> float:
    """``count`` files of 4 KiB created, written and closed by ``threads`` threads; files/s."""
    where.mkdir()
    data = os.urandom(SMALL_FILE)
    stop_now = threading.Event()
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(t: int, n: int) -> None:
        try:
            start.wait()
            for i in range(n):
                if stop_now.is_set():
                    return
                fd = os.open(where / f"f{t}-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except BaseException as exc:
            errors.append(exc)
            stop_now.set()

    share = [count // threads + (1 if t < count % threads else 0) for t in range(threads)]
    workers = [threading.Thread(target=work, args=(t, share[t]), name=f"small-{t}") for t in range(threads)]
    for w in workers:
        w.start()
    try:
        start.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        seconds = time.perf_counter() - t0
    finally:
        stop_now.set()
        with contextlib.suppress(threading.BrokenBarrierError):
            start.abort()
        for w in workers:
            w.join()
    if errors:
        raise PhaseError(f"small files in {where}: {errors[0]!r}")
    return count / seconds


# ---- results ----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    write: float | None = None  # MiB/s
    read: float | None = None  # MiB/s
    iops: float | None = None
    rand_mode: str = ""
    files: dict[int, float] = field(default_factory=dict)  # threads -> files/s
    rss_mib: float | None = None
    others: list[float] = field(default_factory=list)  # % of a core, per phase
    errors: list[str] = field(default_factory=list)
    fs_target: bool = True  # False for the store client (no fio, no small files)
    reads: list[float] = field(default_factory=list)  # every seq read of the fio file, MiB/s
    hot_read: float | None = None  # passthrough only: seq read with its source file in memory, MiB/s
    hot_read_aligned: float | None = None  # the same with fio's buffer page-aligned
    # threads -> FUSE op -> handler ms per file, from the mount's /metrics (appendfs only)
    file_ops: dict[int, dict[str, float]] = field(default_factory=dict)


def fmt(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def results_table(rows: list[Row], threads: list[int], size_mib: int, rand_s: int, files: int) -> str:
    head = (f"| target | seq write {size_mib} MiB, MiB/s | seq read, MiB/s | 4 KiB randread QD1 {rand_s} s, IOPS "
            + "".join(f"| {files:,} files of 4 KiB, {t} thread{'s' if t > 1 else ''}, files/s " for t in threads)
            + "| FUSE process peak RSS MiB | other processes' CPU, % of a core (worst phase) |")
    out = [head, "|---|" + "---:|" * (4 + len(threads) + 1)]
    for r in rows:
        iops = "—" if r.iops is None else f"{r.iops:,.0f} ({r.rand_mode})"
        if not r.fs_target:
            iops = "n/a"
        cells = [r.name, fmt(r.write), fmt(r.read), iops,
                 *[(fmt(r.files.get(t)) if r.fs_target else "n/a") for t in threads],
                 fmt(r.rss_mib), f"{max(r.others):.0f}%" if r.others else "—"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


@dataclass
class SameBytes:
    """Reads of appendfs rep:1's fio file, MiB/s: the mount's (its seq read, then once more
    at the end) and the store client's (two, in between). See :meth:`Bench.same_bytes`."""

    mount: list[float] = field(default_factory=list)
    store: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)  # a second mount with -o direct_io

    def table(self) -> str:
        if len(self.mount) < 2 or not self.store:
            return ""
        store = "store rep:1 client (4 MiB reads, 4 in flight)"
        order = [("appendfs rep:1 (fio, through the mount)", self.mount[0]), (store, self.store[0]),
                 *[("appendfs rep:1 (fio, through a second mount with `-o direct_io`)", v) for v in self.direct],
                 *[(store, v) for v in self.store[1:]],
                 ("appendfs rep:1 (fio, through the mount)", self.mount[1])]
        out = ["| # | reader of appendfs rep:1's fio file | MiB/s |", "|---:|---|---:|"]
        out += [f"| {i} | {who} | {v:,.0f} |" for i, (who, v) in enumerate(order, 1)]
        return "\n".join(out)


#: The FUSE requests the kernel sends for one file created, written and closed.
SMALL_FILE_OPS = ("lookup", "getattr", "create", "getxattr", "write", "flush", "release")


def op_seconds(port: int) -> dict[str, float]:
    """Seconds spent in each FUSE handler so far, from the mount's /metrics (the parser of
    ``appendfs stats``)."""
    import urllib.request

    from appendfs.mount.statsview import parse

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {op: seconds for op, (_count, seconds) in parse(text).ops.items()}


def file_ops_table(rows: list[Row], threads: list[int]) -> str:
    """Where a small file's time goes inside the mount: each FUSE handler's time per file
    (summed over the threads, so with several threads it exceeds the wall time per file)."""
    out = ["| target, threads | " + " | ".join(SMALL_FILE_OPS) + " | other ops | all handlers | wall per file |",
           "|---|" + "---:|" * (len(SMALL_FILE_OPS) + 3)]
    for r in rows:
        for t in threads:
            ops = r.file_ops.get(t)
            rate = r.files.get(t)
            if not ops or not rate:
                continue
            other = sum(v for k, v in ops.items() if k not in SMALL_FILE_OPS)
            out.append(f"| {r.name}, {t} | " + " | ".join(f"{ops.get(k, 0.0):.3f}" for k in SMALL_FILE_OPS)
                       + f" | {other:.3f} | {sum(ops.values()):.3f} | {1000 / rate:.3f} |")
    return "\n".join(out) if len(out) > 2 else ""


def ratios_table(rows: dict[str, Row], threads: list[int], same: SameBytes | None = None) -> str:
    out = ["| check | measured | against | ratio | target | verdict |", "|---|---:|---:|---:|---:|---|"]

    def ratio(label: str, num: float | None, den: float | None, target: float, unit: str,
              note: str = "", info: str = "") -> None:
        if num is None or den is None or den <= 0:
            out.append(f"| {label} | {fmt(num)} {unit} | {fmt(den)} {unit} | — | ≥ {target:.0%} | no data |")
            return
        r = num / den
        verdict = f"informational: {info}" if info else ("PASS" if r >= target else "MISS") + note
        out.append(f"| {label} | {num:,.0f} {unit} | {den:,.0f} {unit} | {r:.0%} | ≥ {target:.0%} | {verdict} |")

    def absolute(label: str, value: float | None, target: float, unit: str, above: bool = True) -> None:
        if value is None:
            out.append(f"| {label} | — | | | {'≥' if above else '<'} {target:,.0f} {unit} | no data |")
            return
        ok = value >= target if above else value < target
        out.append(f"| {label} | {value:,.0f} {unit} | | | {'≥' if above else '<'} {target:,.0f} {unit} "
                   f"| {'PASS' if ok else 'MISS'} |")

    a1, a3, store, pt, local = (rows.get(k) for k in ("rep1", "rep3", "store", "passthrough", "local"))

    if a1 is not None and store is not None:
        ratio("appendfs rep:1 seq write / store rep:1 client write", a1.write, store.write, 0.8, "MiB/s")
        # The verdict stands; the note says when the yardstick itself read faster than the
        # local directory on the same disk (the host's cache of fresh data, on a VM).
        note = ""
        if local is not None and local.read is not None and store.read is not None and store.read > local.read:
            note = f" (the store client read more than the local directory: {local.read:,.0f} MiB/s)"
        if pt is not None and pt.hot_read is not None and store.read is not None and 0.8 * store.read > pt.hot_read:
            note += (f" (80% of the store client is more than fio reads through the passthrough with its source"
                     f" in memory: {pt.hot_read:,.0f} MiB/s)")
        ratio("appendfs rep:1 seq read / store rep:1 client read", a1.read, store.read, 0.8, "MiB/s", note)
        if same is not None and len(same.mount) >= 2 and same.store:
            # The same bytes at the same places on the disk, read in the order mount, store,
            # store, mount: what the mount adds, with the disk's drift taken out.
            ratio("appendfs rep:1 seq read / store rep:1 client read, the same file (means)",
                  sum(same.mount) / len(same.mount), sum(same.store) / len(same.store), 0.8, "MiB/s")
        if same is not None and same.direct and same.store:
            ratio("appendfs rep:1 seq read, second mount with `-o direct_io` / store rep:1 client read, the same file "
                  "(means)", sum(same.direct) / len(same.direct), sum(same.store) / len(same.store), 0.8, "MiB/s",
                  info="`-o direct_io` is not the default")
    if a1 is not None and pt is not None:
        ratio("appendfs rep:1 seq write / passthrough", a1.write, pt.write, 0.6, "MiB/s")
        ratio("appendfs rep:1 seq read / passthrough", a1.read, pt.read, 0.6, "MiB/s")
    for a in (a1, a3):
        if a is None or pt is None:
            continue
        note = "" if a.rand_mode == pt.rand_mode else f" (modes differ: {a.rand_mode} vs {pt.rand_mode})"
        ratio(f"{a.name} 4 KiB randread / passthrough", a.iops, pt.iops, 0.5, "IOPS", note)
    for a in (a1, a3):
        if a is None:
            continue
        for t in threads:
            absolute(f"{a.name} 4 KiB files created+closed, {t} thread{'s' if t > 1 else ''}", a.files.get(t),
                     300, "files/s")
    rss = [r.rss_mib for r in (a1, a3) if r is not None and r.rss_mib is not None]
    if a1 is not None or a3 is not None:
        absolute("appendfs mount peak RSS (default cache)", max(rss) if rss else None, 300, "MiB", above=False)
    return "\n".join(out)


# ---- the run ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.size_mib = max(1, round(args.size_gib * 1024))
        self.threads: list[int] = args.threads
        self.rss = RssWatch()
        self.fuse: list[FuseProc] = []
        self.cluster: sb.Cluster | None = None
        self.busy = Busy(self._our_pids)
        self.rows: dict[str, Row] = {}
        self.same = SameBytes()

    def _our_pids(self) -> list[int]:
        pids = [f.pid for f in self.fuse if f.popen is not None and f.popen.poll() is None]
        if self.cluster is not None:
            pids += [self.cluster.metanode.pid, *self.cluster.dn_pids]
        return pids

    def _phase(self, row: Row, what: str, fn: Callable[[], str]) -> None:
        """Drop caches, run one phase, record its load; a failure is noted and the run goes on."""
        sb.drop_caches()
        try:
            with self.busy.phase(row.others):
                summary = fn()
            progress(f"{row.name}: {what}: {summary} (other processes {row.others[-1]:.0f}% of a core)")
        except (Exception, SystemExit) as exc:  # noted in the table; the run goes on
            msg = str(exc) if isinstance(exc, PhaseError) else f"{type(exc).__name__}: {exc}"
            row.errors.append(f"{what}: {msg}")
            progress(f"{row.name}: {what}: FAILED: {msg}")

    def fs_target(self, key: str, name: str, where: Path, fuse_pid: int | None,
                  metrics_port: int | None = None,
                  after_read: Callable[[Path, Callable[[], str]], None] | None = None) -> Row:
        row = self.rows[key] = Row(name)
        where.mkdir(parents=True, exist_ok=True)
        if fuse_pid is not None:
            self.rss.watch(fuse_pid)
        data = where / "fio.dat"
        seq_timeout = 600 + self.size_mib  # a generous bound: hung I/O is reported, not waited for forever

        def write() -> str:
            row.write = fio("seqwrite", data, "write", self.size_mib, "--bs=1M", "--end_fsync=1",
                            timeout_s=seq_timeout)["bw_bytes"] / MIB
            return f"{row.write:,.0f} MiB/s"

        def read() -> str:
            rate = fio("seqread", data, "read", self.size_mib, "--bs=1M", timeout_s=seq_timeout)["bw_bytes"] / MIB
            row.reads.append(rate)
            row.read = row.reads[0]  # the checks use the first; later ones are for same_bytes
            return f"{rate:,.0f} MiB/s"

        def randread() -> str:
            direct = direct_ok(data)
            row.rand_mode = "direct" if direct else "buffered"
            res = fio("randread", data, "randread", self.size_mib, "--bs=4k", "--time_based",
                      f"--runtime={self.args.rand_s}", f"--direct={int(direct)}", timeout_s=self.args.rand_s + 600)
            row.iops = float(res["iops"])
            return f"{row.iops:,.0f} IOPS ({row.rand_mode})"

        self._phase(row, "seq write", write)
        if data.exists():
            self._phase(row, "seq read", read)
            if after_read is not None and row.read is not None:
                after_read(data, read)
            self._phase(row, "4k randread", randread)
            with contextlib.suppress(OSError):
                data.unlink()
        for t in self.threads:
            def files(t: int = t) -> str:
                before = op_seconds(metrics_port) if metrics_port else {}
                row.files[t] = small_files(where / f"small-{t}", self.args.files, t)
                if metrics_port:
                    after = op_seconds(metrics_port)
                    row.file_ops[t] = {op: (v - before.get(op, 0.0)) * 1000 / self.args.files
                                       for op, v in after.items() if v > before.get(op, 0.0)}
                return f"{row.files[t]:,.0f} files/s"
            self._phase(row, f"{self.args.files} small files, {t} thread{'s' if t > 1 else ''}", files)
        if fuse_pid is not None:
            row.rss_mib = self.rss.peak_mib(fuse_pid)
            progress(f"{row.name}: FUSE process peak RSS {row.rss_mib:.0f} MiB")
        return row

    def store_target(self, c: sb.Cluster) -> None:
        row = self.rows["store"] = Row("store rep:1 client", fs_target=False)
        size = self.size_mib * MIB
        payload = sb.Payload(size)
        device = sb.block_device(self.root)
        pieces: list[tuple[int, int, int]] = []

        def write() -> str:
            nonlocal pieces
            phase, pieces = sb.measure(c, "rep1-write", sb.store_write, c.meta_url, "rep:1", payload, device=device)
            row.write = size / MIB / phase.seconds
            return f"{row.write:,.0f} MiB/s"

        def read() -> str:
            phase, _ = sb.measure(c, "rep1-read", sb.store_read, c.meta_url, pieces, payload, device=device)
            row.read = size / MIB / phase.seconds
            return f"{row.read:,.0f} MiB/s"

        self._phase(row, "1 MiB appends, close", write)
        if pieces:
            self._phase(row, "read back (verified)", read)

    def hot_source_read(self, source: Path) -> Callable[[Path, Callable[[], str]], None]:
        """After the passthrough's seq read: fio reads the file through it twice more (its
        own buffer, then page-aligned), its source file read into the page cache first. No disk below, only the FUSE layer:
        the most fio reads through a Python FUSE process on this machine (informational,
        next to the checks that compare the mount with readers that are not FUSE)."""
        def after(data: Path, _read: Callable[[], str]) -> None:
            row = self.rows["passthrough"]

            def read_hot() -> str:
                with open(source, "rb") as f:  # (fio drops the FUSE file's own cache at open)
                    while f.read(8 * MIB):
                        pass
                row.hot_read = fio("seqread-hot", data, "read", self.size_mib, "--bs=1M",
                                   timeout_s=600 + self.size_mib)["bw_bytes"] / MIB
                row.hot_read_aligned = fio("seqread-hot-aligned", data, "read", self.size_mib, "--bs=1M", PAGE_ALIGNED,
                                           timeout_s=600 + self.size_mib)["bw_bytes"] / MIB
                return f"{row.hot_read:,.0f} MiB/s; {row.hot_read_aligned:,.0f} with a page-aligned buffer"
            self._phase(row, "seq read, source file in the page cache (the FUSE layer alone)", read_hot)
        return after

    def same_bytes(self, c: sb.Cluster, volume_path: str, mount_read: Callable[[], str]) -> None:
        """Right after appendfs rep:1's seq read: the store client reads the same file's
        extents twice (its own 4 MiB requests, 4 in flight), then fio reads the file through
        the mount once more. Mount, store, store, mount: the same bytes at the same places
        on the disk, each reader once early and once late, so a disk whose speed drifts
        within seconds (this VM's does) favours neither. Caches are dropped before each.

        Between the store client's reads, a second mount of the cluster with ``-o
        direct_io`` reads the file twice with the same fio job (informational): mount,
        store, direct, direct, store, mount, each reader's mean at the same place in time."""
        from appendfs.meta.client import Meta

        row = self.rows["store"]
        device = sb.block_device(self.root)
        meta = Meta.from_url(c.meta_url)
        try:
            attr = meta.resolve_path(volume_path)
            segments = meta.read_map(attr.ino, 0, attr.size)
        finally:
            meta.close()
        if any(s.extent_id is None for s in segments):
            raise PhaseError(f"{volume_path} has holes")
        pieces = [(s.extent_id, s.ext_off, s.length) for s in segments]

        def read() -> str:
            phase, size = sb.measure(c, "rep1-file-read", read_pieces, c.meta_url, pieces, device=device)
            if size != attr.size:
                raise PhaseError(f"read {size} bytes of {volume_path}'s {attr.size}")
            self.same.store.append(size / MIB / phase.seconds)
            return f"{self.same.store[-1]:,.0f} MiB/s"

        mount = self.rows["rep1"]
        direct = Row("appendfs rep:1, second mount with -o direct_io")
        what = f"read of {volume_path} (the bytes appendfs rep:1 just read)"
        self._phase(row, what, read)
        self._phase(direct, "seq read of the same file, twice", lambda: self.direct_reads(c, volume_path))
        self._phase(row, what, read)
        self._phase(mount, "seq read again (after the store client's two)", mount_read)
        self.same.mount = list(mount.reads)

    def direct_reads(self, c: sb.Cluster, volume_path: str) -> str:
        """A second mount of ``c`` with ``-o direct_io`` (read-only opens bypass the page
        cache) reads ``volume_path`` twice with the seq-read fio job, caches dropped before
        each; the mount is stopped again before the next reader."""
        d = FuseProc("appendfs mount -o direct_io", [str(sb.APPENDFS), "mount", "--meta", c.meta_url, "--foreground",
                                                      "-o", "direct_io", str(self.root / "mnt-afs-direct")],
                     self.root / "mnt-afs-direct", self.root / "mount-direct.log")
        self.fuse.append(d)
        try:
            d.start()
            data = d.mountpoint / volume_path.lstrip("/")
            for _ in range(2):
                sb.drop_caches()
                self.same.direct.append(fio("seqread-direct-io", data, "read", self.size_mib, "--bs=1M",
                                            timeout_s=600 + self.size_mib)["bw_bytes"] / MIB)
        finally:
            d.stop()
            self.fuse.remove(d)
        return " and ".join(f"{v:,.0f}" for v in self.same.direct) + " MiB/s"

    def run(self) -> None:
        want = set(self.args.targets)
        if "local" in want:
            progress("target local")
            self.fs_target("local", "local directory", self.root / "local", None)
        if "passthrough" in want:
            progress("target passthrough: starting bench/passthrough.py")
            src = self.root / "pt-src"
            src.mkdir()
            pt = FuseProc("passthrough", [sys.executable, str(PASSTHROUGH), str(src), str(self.root / "mnt-pt")],
                          self.root / "mnt-pt", self.root / "passthrough.log")
            self.fuse.append(pt)
            try:
                pt.start()
                self.fs_target("passthrough", "pyfuse3 passthrough", pt.mountpoint / "bench", pt.pid,
                               after_read=self.hot_source_read(src / "bench" / "fio.dat"))
            except PhaseError as exc:
                self.rows.setdefault("passthrough", Row("pyfuse3 passthrough")).errors.append(str(exc))
                progress(f"passthrough: FAILED: {exc}")
            finally:
                pt.stop()
        if not want & {"store", "rep1", "rep3"}:
            return
        progress("starting the cluster (SQLite MetaNode + 3 DataNodes)")
        self.cluster = c = start_cluster(self.root / "cluster")
        if "store" in want:
            progress("target store rep:1 client")
            self.store_target(c)
        if not want & {"rep1", "rep3"}:
            return
        progress("mounting appendfs (default settings)")
        from appendfs.up import free_port

        metrics_port = free_port()
        afs = FuseProc("appendfs mount", [str(sb.APPENDFS), "mount", "--meta", c.meta_url, "--foreground",
                                          "--metrics", f"127.0.0.1:{metrics_port}", str(self.root / "mnt-afs")],
                       self.root / "mnt-afs", self.root / "mount.log")
        self.fuse.append(afs)
        try:
            afs.start()
        except PhaseError as exc:
            for key in ("rep1", "rep3"):
                if key in want:
                    self.rows[key] = Row(f"appendfs {key[:3]}:{key[3]}", errors=[str(exc)])
            progress(f"appendfs: FAILED: {exc}")
            return
        for key in ("rep1", "rep3"):
            if key not in want:
                continue
            policy = f"rep:{key[3]}"
            where = afs.mountpoint / key
            where.mkdir()
            os.setxattr(where, POLICY_XATTR, policy.encode())  # new files and directories below inherit it
            progress(f"target appendfs {policy} ({where}, {POLICY_XATTR}={policy})")
            same = None
            if key == "rep1" and "store" in self.rows and self.rows["store"].read is not None:
                def same(data: Path, mount_read: Callable[[], str]) -> None:
                    self.same_bytes(c, "/" + str(data.relative_to(afs.mountpoint)), mount_read)
            self.fs_target(key, f"appendfs {policy}", where, afs.pid, metrics_port, after_read=same)
            if afs.popen is not None and afs.popen.poll() is not None:
                self.rows[key].errors.append(f"the mount process exited with {afs.popen.returncode}")
                progress(f"appendfs mount exited with {afs.popen.returncode}:\n{afs.tail()}")
                break

    def close(self) -> None:
        """Unmount and stop everything started here, by pid (mounts before the cluster)."""
        for f in reversed(self.fuse):
            f.stop()
        if self.cluster is not None:
            stop([*self.cluster.datanodes, self.cluster.metanode])
        self.rss.close()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    from appendfs.runtime import reexec_with_huge_pages, tune_allocator

    reexec_with_huge_pages()  # the store client in this process runs as in a daemon: huge pages
    tune_allocator()  # as every appendfs process does; the store client runs in this one
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dir", type=Path, default=None, help="parent of the scratch directory (made here, on the disk "
                    "under test) [the temp dir if on the repository's disk and not tmpfs, else the repository's parent]")
    ap.add_argument("--size-gib", type=float, default=1.0, help="fio file size and store payload, GiB [1]")
    ap.add_argument("--rand-s", type=int, default=30, help="seconds of 4 KiB random reads [30]")
    ap.add_argument("--files", type=int, default=10_000, help="small files per run [10000]")
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                    help="thread counts of the small-file runs, comma-separated [1,4]")
    ap.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS),
                    help=f"subset of {','.join(TARGETS)} [all]")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, cluster data)")
    args = ap.parse_args()
    bad = set(args.targets) - set(TARGETS)
    if bad:
        ap.error(f"unknown targets {sorted(bad)}; choose from {','.join(TARGETS)}")
    if any(t < 1 for t in args.threads) or args.files < 1 or args.rand_s < 1 or args.size_gib <= 0:
        ap.error("--threads, --files, --rand-s and --size-gib must be positive")
    if os.geteuid() != 0:
        raise SystemExit("mount_bench: needs root (drop_caches, FUSE mounts, clear_refs)")
    if shutil.which("fio") is None:
        raise SystemExit("mount_bench: fio is not installed (apt-get install fio)")
    base = sb.pick_base(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    need = round(args.size_gib * GIB) * 6 + GIB  # store + rep:1 + 3 copies of rep:3, with room to spare
    st = os.statvfs(base)
    if st.f_bavail * st.f_frsize < need:
        raise SystemExit(f"mount_bench: {base} has {st.f_bavail * st.f_frsize / GIB:.1f} GiB free; "
                         f"the run needs about {need / GIB:.1f} GiB")
    root = Path(tempfile.mkdtemp(prefix="mount-bench-", dir=base)).resolve()
    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C: everything is cleaned up
    bench = Bench(args, root)
    progress(f"mount_bench in {root} on {sb.disk_of(root)}; {os.cpu_count()} CPUs; load {sb.loadavg()}; "
             f"{bench.size_mib} MiB files, {args.rand_s} s random reads, {args.files} small files, threads "
             f"{args.threads}")
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: cleaning up; the tables below hold what was measured")
    finally:
        bench.close()
        left = mounts_below(root)
        if left:
            progress(f"NOT removing {root}: still mounted: {left}")
        elif args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    order = [k for k in TARGETS if k in bench.rows]
    rows = [bench.rows[k] for k in order]
    print(f"# mount_bench: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load after {sb.loadavg()}; "
          f"scratch on {sb.disk_of(base)}")
    print("# fio: psync, iodepth 1; seq write 1 MiB blocks buffered + end_fsync=1; seq read 1 MiB buffered, cold; "
          "randread 4 KiB (direct where O_DIRECT opens work, else buffered); caches dropped before every phase")
    print()
    print(results_table(rows, args.threads, bench.size_mib, args.rand_s, args.files))
    pt = bench.rows.get("passthrough")
    if pt is not None and pt.hot_read is not None:
        aligned = ("" if pt.hot_read_aligned is None else
                   f" With its buffer page-aligned ({PAGE_ALIGNED}) fio read it at {pt.hot_read_aligned:,.0f} MiB/s:"
                   " fio's own copy into its unaligned buffer is part of that ceiling.")
        print(f"\nThe FUSE layer alone: fio read the passthrough's file at {pt.hot_read:,.0f} MiB/s with its source "
              f"file in the page cache (no disk below): the most fio reads through a Python FUSE process here.{aligned}")
    print()
    print(ratios_table(bench.rows, args.threads, bench.same))
    same = bench.same.table()
    if same:
        print("\nThe same bytes read by the mount and by the store client, in this order (caches dropped "
              "before each; the last check above compares the means):\n")
        print(same)
    ops = file_ops_table(rows, args.threads)
    if ops:
        print("\nSmall files inside the mount: each FUSE handler's time, ms per file (from the mount's "
              "appendfs_mount_fuse_request_seconds; with several threads the handlers overlap):\n")
        print(ops)
    errors = [(r.name, e) for r in rows for e in r.errors]
    if errors:
        print("\nErrors:")
        for name, e in errors:
            print(f"- {name}: {e.splitlines()[0]}")
            for line in e.splitlines()[1:]:
                print(f"    {line}")
    if interrupted:
        print("\n(interrupted: incomplete)")
        sys.exit(130)


if __name__ == "__main__":
    main()
