#!/usr/bin/env python3
"""S3 gateway benchmark (issue 5, "Speed"): the gateway against the mount, on one cluster.

One run starts a throwaway cluster (MetaNode + 3 DataNodes on loopback, SQLite namespace,
or a fresh database on the PostgreSQL server of ``--pg``), one ``appendfs mount`` and one
``appendfs s3`` gateway (``--listen 127.0.0.1:PORT``, default settings), creates an access
key with ``appendfs s3 keys create``, and measures:

1. **64 MiB objects** — ``--large-objects`` files written through the mount (1 MiB
   ``os.write`` calls from memory, ``fsync``, close: acknowledged data is durable, as with
   a PUT) and read back (1 MiB ``readinto``), then as many S3 PUTs and GETs of 64 MiB
   objects by one client. Caches are dropped before every phase (``sync; echo 3 >
   drop_caches``). Reported: MiB/s, the ratio PUT/write and GET/read, and the CPU
   seconds per GiB of the gateway (or of the mount process), the DataNodes and this
   load generator (utime+stime from /proc/PID/stat before and after the phase).
2. **4 KiB objects** — ``--objects`` PUTs, then GETs of them, by ``--clients`` threads,
   each with its own keep-alive connection: requests/s over the batch, latency
   percentiles, gateway CPU ms per request.
3. **ListObjectsV2** — a bucket of ``--keys`` keys created directly in the namespace
   (``Meta.s3_put_object`` in a loop: 0-byte objects, 80% as ``dirNNN/objNNNNNNN`` over
   300 directories, 20% under the flat prefix ``flat/``; the population time is
   printed), then paginated walks with pages of 1,000 keys: the whole bucket with caches
   dropped first, the whole bucket again (warm), and the ``flat/`` prefix. Per page: the
   time from sending the request to having read the whole response (median, p95, max).

The load generator is kept lean so the gateway gets the CPU: every URL is presigned
(SigV4, boto3 used only to sign) before the timed phase, requests go over ``http.client``
keep-alive connections, PUT bodies are sent from memory and GET bodies read into a
preallocated buffer; nothing is hashed client-side (a GET checks its length and spot-checks
its first and last 4 KiB). The machine may be shared: every row says how much CPU other
processes used meanwhile (everyone's CPU from /proc/stat minus this benchmark's processes),
as % of one core. With ``--pg`` the PostgreSQL server counts as "other".

``--profile DIR`` records ``py-spy record --nonblocking`` (raw collapsed stacks) of the
gateway during each S3 phase (the numbers are then disturbed). Results go to stdout as
Markdown tables with the issue's targets (PASS/MISS); progress goes to stderr. Needs root
(drop_caches, FUSE). Everything started here is stopped by pid and unmounted, also on
Ctrl-C; the scratch directory under ``--dir`` is removed unless ``--keep``.

    sudo .venv/bin/python bench/s3_bench.py [--dir /var/tmp] [--pg URL] [--large-objects 16]
        [--objects 2000] [--clients 4] [--keys 100000] [--redundancy rep:1] [--profile DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mount_bench as mb  # bench/ holds scripts, not a package
import store_bench as sb

MIB = 1 << 20
GIB = 1 << 30
LARGE_BYTES = 64 * MIB
IO_BYTES = MIB  # the mount's write and read size
SMALL_BYTES = 4096
SPOT_BYTES = 4096  # what a large GET compares with the payload, at each end
EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"
TENANT = "bench"
DATA_BUCKET = "bench-data"
LIST_BUCKET = "bench-list"
LIST_DIRS = 300
FLAT_SHARE = 0.2  # of the listing keys, under flat/
POLICY_XATTR = "user.appendfs.redundancy"

progress = mb.progress
PhaseError = mb.PhaseError


# ---- processes we start -------------------------------------------------------------------


def start_cluster(root: Path, meta_url: str) -> sb.Cluster:
    """Format ``meta_url`` and start a MetaNode and 3 DataNodes (as mount_bench, any engine)."""
    root.mkdir(parents=True, exist_ok=True)
    secret = root / "secret"
    subprocess.run([str(sb.APPENDFS), "format", meta_url, "--secret-file", str(secret)], check=True,
                   stdout=subprocess.DEVNULL)
    meta_addr = f"127.0.0.1:{sb.free_port()}"
    c = sb.Cluster(root, meta_url, mb.spawn([str(sb.APPENDFS), "metanode", "--meta", meta_url, "--listen", meta_addr],
                                            root / "metanode.log"))
    try:
        for i in range(3):
            c.datanodes.append(mb.spawn([str(sb.APPENDFS), "datanode", "--listen", f"127.0.0.1:{sb.free_port()}",
                                         "--data", str(root / f"dn{i}"), "--metanode", meta_addr,
                                         "--secret-file", str(secret)], root / f"dn{i}.log"))
        import trio

        trio.run(sb._wait_alive, meta_url, 3)
    except BaseException:
        mb.stop([*c.datanodes, c.metanode])
        raise
    return c


@dataclass
class GatewayProc:
    """``appendfs s3 --meta URL --listen 127.0.0.1:PORT``, ready once the port accepts."""

    meta_url: str
    log: Path
    workers: int | None = None  # --workers (None: the gateway's default, one per CPU)
    port: int = field(default_factory=sb.free_port)
    popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> GatewayProc:
        extra = [] if self.workers is None else ["--workers", str(self.workers)]
        self.popen = mb.spawn([str(sb.APPENDFS), "s3", "--meta", self.meta_url, "--listen",
                               f"127.0.0.1:{self.port}", *extra], self.log)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.popen.poll() is not None:
                raise PhaseError(f"the gateway exited with {self.popen.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            if time.monotonic() > deadline:
                raise PhaseError(f"the gateway did not listen on port {self.port} in {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def pids(self) -> list[int]:
        """The gateway's processes: the supervisor and its workers (or the one process)."""
        kids: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids += [int(x) for x in (task / "children").read_text().split()]
        return [self.pid, *sorted(kids)]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.popen is not None:
            mb.stop([self.popen])

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def create_key(meta_url: str, tenant: str) -> tuple[str, str]:
    """``appendfs s3 keys create``: (access key id, secret access key)."""
    out = subprocess.run([str(sb.APPENDFS), "s3", "keys", "create", "--meta", meta_url, "--tenant", tenant],
                         check=True, capture_output=True, text=True).stdout
    found = dict(re.findall(r"^(\w+) = (\S+)$", out, re.M))
    return found["access_key_id"], found["secret_access_key"]


# ---- the load generator -------------------------------------------------------------------


class Presigner:
    """boto3, used only to presign (SigV4, path style); URLs come back as path?query."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint = endpoint
        self.client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                                   aws_secret_access_key=secret_key, region_name="us-east-1",
                                   config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    def url(self, op: str, bucket: str, key: str | None = None, params: dict[str, object] | None = None) -> str:
        p: dict[str, object] = {"Bucket": bucket, **(params or {})}
        if key is not None:
            p["Key"] = key
        url: str = self.client.generate_presigned_url(op, Params=p, ExpiresIn=6 * 3600)
        assert url.startswith(self.endpoint)
        return url[len(self.endpoint):]


class HttpError(Exception):
    pass


class Http:
    """One keep-alive connection to the gateway; reconnects once if the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def _exchange(self, method: str, url: str, body: bytes | None) -> http.client.HTTPResponse:
        for attempt in (0, 1):
            try:
                self.conn.request(method, url, body=body)
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # an idle keep-alive connection the server closed: one retry
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _check(self, r: http.client.HTTPResponse, method: str, url: str) -> None:
        if r.status != 200:
            raise HttpError(f"{method} {url.split('?')[0]}: HTTP {r.status}: {r.read()[:500]!r}")

    def put(self, url: str, body: bytes) -> None:
        r = self._exchange("PUT", url, body)
        self._check(r, "PUT", url)
        r.read()

    def get_into(self, url: str, buf: memoryview) -> int:
        """GET into ``buf`` (no copy, no hashing); the body's length."""
        r = self._exchange("GET", url, None)
        self._check(r, "GET", url)
        n = 0
        while True:
            k = r.readinto(buf[n:])
            if not k:
                break
            n += k
        if not r.isclosed() and r.read(1):
            raise HttpError(f"GET {url.split('?')[0]}: body longer than {len(buf)} bytes")
        return n

    def get(self, url: str) -> bytes:
        r = self._exchange("GET", url, None)
        self._check(r, "GET", url)
        return r.read()

    def close(self) -> None:
        self.conn.close()


# ---- measuring ----------------------------------------------------------------------------


@dataclass
class Usage:
    """What one phase cost: wall seconds, CPU of each of our roles, everyone else's CPU."""

    seconds: float = 0.0
    cpu: dict[str, sb.Cpu] = field(default_factory=dict)
    others_pct: float = 0.0  # % of one core
    top_others: list[tuple[str, float]] = field(default_factory=list)  # (command, CPU s), busiest first


class Meter:
    """CPU of our processes by role (gateway, mount, DataNodes, MetaNode, this bench) and of
    the whole machine, around one phase."""

    def __init__(self, roles: Callable[[], dict[str, list[int]]]) -> None:
        self.roles = roles

    def _snap(self) -> dict[str, sb.Cpu]:
        out = {}
        for role, pids in self.roles().items():
            total = sb.Cpu()
            for pid in pids:
                with contextlib.suppress(OSError):
                    total = total + sb.cpu_of(pid)
            out[role] = total
        return out

    @staticmethod
    def _everyone() -> dict[int, tuple[str, float]]:
        """(command, CPU seconds) of every process (kernel threads such as jbd2 too)."""
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open(f"/proc/{d}/stat") as f:
                        head, rest = f.read().rsplit(")", 1)
                    fields = rest.split()
                    out[int(d)] = (head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / sb.CLK_TCK)
        return out

    @contextlib.contextmanager
    def phase(self, usage: Usage) -> Iterator[None]:
        all0 = self._everyone()
        cpu0, busy0, t0 = self._snap(), sb.machine_busy_s(), time.perf_counter()
        yield
        usage.seconds = time.perf_counter() - t0
        cpu1, busy1 = self._snap(), sb.machine_busy_s()
        all1 = self._everyone()
        usage.cpu = {r: cpu1[r] - cpu0.get(r, sb.Cpu()) for r in cpu1}
        ours = sum(c.total_s for c in usage.cpu.values())
        usage.others_pct = max(0.0, (busy1 - busy0) - ours) / usage.seconds * 100 if usage.seconds > 0 else 0.0
        mine = {pid for pids in self.roles().values() for pid in pids}
        others = [(name, cpu - all0.get(pid, (name, 0.0))[1]) for pid, (name, cpu) in all1.items() if pid not in mine]
        usage.top_others = sorted((o for o in others if o[1] >= 0.05), key=lambda o: -o[1])[:4]


@contextlib.contextmanager
def profiling(profile_dir: Path | None, name: str, pids: dict[str, int]) -> Iterator[None]:
    """``py-spy record --nonblocking`` of each process in ``pids`` (role prefix → pid; raw
    collapsed stacks) for the block, twice: ``PREFIXNAME.txt`` samples every thread py-spy
    finds active (native code that released the GIL, such as MD5 or socket sends, included —
    but also some waits), ``PREFIXNAME-gil.txt`` only the thread holding the GIL (Python CPU
    time). Never blocking: py-spy pausing a process that
    serves our own requests (and, for a FUSE server, its own mount) can deadlock."""
    if profile_dir is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    procs = [subprocess.Popen([spy, "record", "--nonblocking", "--subprocesses", *extra, "--format", "raw", "--rate", "100",
                               "-o", str(profile_dir / f"{prefix}{name}{suffix}.txt"), "--pid", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for prefix, pid in pids.items() for extra, suffix in (([], ""), (["--gil"], "-gil"))]
    time.sleep(1.0)  # let py-spy attach
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


# ---- results ------------------------------------------------------------------------------


@dataclass
class Large:
    name: str
    role: str  # whose CPU is the front end's: "gateway" or "mount"
    nbytes: int = 0
    usage: Usage | None = None
    error: str = ""

    @property
    def mib_s(self) -> float | None:
        return self.nbytes / MIB / self.usage.seconds if self.usage and self.nbytes else None


@dataclass
class Small:
    name: str
    ops: int = 0
    latencies_s: list[float] = field(default_factory=list)
    usage: Usage | None = None
    error: str = ""

    @property
    def rate(self) -> float | None:
        return self.ops / self.usage.seconds if self.usage and self.ops else None


@dataclass
class Walk:
    name: str
    page_s: list[float] = field(default_factory=list)
    keys: int = 0
    usage: Usage | None = None
    error: str = ""


@dataclass
class Results:
    large: dict[str, Large] = field(default_factory=dict)
    small: dict[str, Small] = field(default_factory=dict)
    walks: list[Walk] = field(default_factory=list)
    populate_s: float | None = None
    populated: int = 0
    errors: list[str] = field(default_factory=list)


def fmt(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def per_gib(u: Usage | None, role: str, nbytes: int) -> str:
    if u is None or not nbytes or role not in u.cpu:
        return "—"
    return u.cpu[role].per(nbytes / GIB)


def busy(u: Usage | None, role: str) -> str:
    """How busy ``role`` was during the phase: its CPU seconds over the wall time (summed over
    its processes: the gateway's supervisor and workers). One gateway process near 100% is
    CPU-bound, whatever the rest of the machine does; N workers can reach N x 100%."""
    if u is None or role not in u.cpu or u.seconds <= 0:
        return "—"
    return f"{u.cpu[role].total_s / u.seconds * 100:.0f}%"


def large_table(r: Results, n: int) -> str:
    out = [f"| phase ({n} x 64 MiB) | MiB/s | gateway or mount process CPU s/GiB (user+sys) "
           "| gateway or mount process busy, % of a core "
           "| DataNodes CPU s/GiB, sum of 3 | load generator CPU s/GiB | other processes' CPU, % of a core |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for x in r.large.values():
        u = x.usage
        out.append(f"| {x.name} | {fmt(x.mib_s)} | {per_gib(u, x.role, x.nbytes)} | {busy(u, x.role)} | "
                   f"{per_gib(u, 'datanodes', x.nbytes)} | {per_gib(u, 'bench', x.nbytes)} | "
                   f"{fmt(u.others_pct if u else None)}% |")
    return "\n".join(out)


def small_table(r: Results, clients: int) -> str:
    out = [f"| phase (4 KiB objects, {clients} clients) | requests | requests/s | latency ms p50 / p95 / p99 "
           "| gateway CPU ms per request | gateway busy, % of a core | DataNodes CPU ms per request "
           "| load generator CPU ms per request | other processes' CPU, % of a core |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r.small.values():
        u = x.usage
        lat = x.latencies_s
        lat_s = (f"{pct(lat, 50) * 1e3:.1f} / {pct(lat, 95) * 1e3:.1f} / {pct(lat, 99) * 1e3:.1f}"
                 if lat else "—")

        def ms(role: str, u: Usage | None = u, ops: int = x.ops) -> str:
            return f"{u.cpu[role].total_s / ops * 1e3:.2f}" if u and ops and role in u.cpu else "—"

        out.append(f"| {x.name} | {x.ops:,} | {fmt(x.rate)} | {lat_s} | {ms('gateway')} | {busy(u, 'gateway')} "
                   f"| {ms('datanodes')} "
                   f"| {ms('bench')} | {fmt(u.others_pct if u else None)}% |")
    return "\n".join(out)


def walk_table(r: Results) -> str:
    out = ["| ListObjectsV2 walk, pages of 1,000 keys | pages | keys | ms per page p50 / p95 / max "
           "| whole walk s | gateway CPU ms per page | other processes' CPU, % of a core |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for w in r.walks:
        p = w.page_s
        times = f"{pct(p, 50) * 1e3:.0f} / {pct(p, 95) * 1e3:.0f} / {max(p) * 1e3:.0f}" if p else "—"
        gw = f"{w.usage.cpu['gateway'].total_s / len(p) * 1e3:.0f}" if w.usage and p else "—"
        out.append(f"| {w.name} | {len(p)} | {w.keys:,} | {times} | {fmt(sum(p), 1) if p else '—'} | {gw} "
                   f"| {fmt(w.usage.others_pct if w.usage else None)}% |")
    return "\n".join(out)


def checks_table(r: Results) -> str:
    out = ["| check | measured | against | ratio | target | verdict |", "|---|---:|---:|---:|---:|---|"]

    def ratio(label: str, a: Large | None, b: Large | None, target: float) -> None:
        num, den = (a.mib_s if a else None), (b.mib_s if b else None)
        if num is None or den is None:
            out.append(f"| {label} | {fmt(num)} MiB/s | {fmt(den)} MiB/s | — | ≥ {target:.0%} | no data |")
            return
        ok = num / den >= target
        out.append(f"| {label} | {num:,.0f} MiB/s | {den:,.0f} MiB/s | {num / den:.0%} | ≥ {target:.0%} "
                   f"| {'PASS' if ok else 'MISS'} |")

    def absolute(label: str, value: float | None, target: float, unit: str, above: bool) -> None:
        sign = "≥" if above else "<"
        if value is None:
            out.append(f"| {label} | — | | | {sign} {target:,.0f} {unit} | no data |")
            return
        ok = value >= target if above else value < target
        out.append(f"| {label} | {value:,.0f} {unit} | | | {sign} {target:,.0f} {unit} | {'PASS' if ok else 'MISS'} |")

    lg = r.large.get
    ratio("S3 PUT 64 MiB / mount sequential write", lg("put"), lg("write"), 0.5)
    ratio("S3 GET 64 MiB / mount sequential read", lg("get"), lg("read"), 0.8)
    sp, sg = r.small.get("put"), r.small.get("get")
    absolute("S3 PUT 4 KiB, requests/s", sp.rate if sp else None, 200, "/s", True)
    absolute("S3 GET 4 KiB, requests/s", sg.rate if sg else None, 500, "/s", True)
    for w in r.walks:
        absolute(f"ListObjectsV2 page, p95 — {w.name}", pct(w.page_s, 95) * 1e3 if w.page_s else None, 200, "ms",
                 False)
    return "\n".join(out)


# ---- the run ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, meta_url: str) -> None:
        self.args = args
        self.root = root
        self.meta_url = meta_url
        self.cluster: sb.Cluster | None = None
        self.fuse: mb.FuseProc | None = None
        self.gateway: GatewayProc | None = None
        self.meter = Meter(self._roles)
        self.res = Results()
        self.payload = os.urandom(LARGE_BYTES)
        self.small_payload = os.urandom(SMALL_BYTES)
        self.signer: Presigner | None = None

    def _roles(self) -> dict[str, list[int]]:
        roles: dict[str, list[int]] = {"bench": [os.getpid()]}
        if self.gateway is not None and self.gateway.popen is not None:
            roles["gateway"] = self.gateway.pids
        if self.fuse is not None and self.fuse.popen is not None:
            roles["mount"] = [self.fuse.pid]
        if self.cluster is not None:
            roles["datanodes"] = self.cluster.dn_pids
            roles["metanode"] = [self.cluster.metanode.pid]
        return roles

    @property
    def gw(self) -> GatewayProc:
        assert self.gateway is not None
        return self.gateway

    def _phase(self, what: str, usage: Usage, fn: Callable[[], str], profile: str | None = None, *,
               cold: bool = True) -> str:
        """Drop caches (unless not ``cold``: then only sync), run one measured phase; an error
        is recorded and returned, the run goes on."""
        if cold:
            sb.drop_caches()
        else:
            os.sync()
        try:
            pids = {"": self.gw.pid, **({"datanode0-": self.cluster.dn_pids[0]} if self.cluster else {})}
            with profiling(self.args.profile if profile else None, profile or "", pids), \
                    self.meter.phase(usage):
                summary = fn()
            busiest = ", ".join(f"{name} {cpu:.1f} s" for name, cpu in usage.top_others)
            progress(f"{what}: {summary} (other processes {usage.others_pct:.0f}% of a core"
                     f"{'; busiest: ' + busiest if busiest else ''})")
            return ""
        except (Exception, SystemExit) as exc:  # noted in the report; the run goes on
            msg = f"{type(exc).__name__}: {exc}"
            progress(f"{what}: FAILED: {msg}")
            self.res.errors.append(f"{what}: {msg}")
            return msg

    # ---- setup ----

    def start(self) -> None:
        progress(f"starting the cluster on {self.meta_url.split('@')[-1]} (MetaNode + 3 DataNodes)")
        self.cluster = start_cluster(self.root / "cluster", self.meta_url)
        progress("mounting appendfs (default settings)")
        mnt = self.root / "mnt"
        self.fuse = mb.FuseProc("appendfs mount", [str(sb.APPENDFS), "mount", "--meta", self.meta_url,
                                                   "--foreground", str(mnt)], mnt, self.root / "mount.log")
        self.fuse.start()
        progress("starting the S3 gateway (default settings)")
        self.gateway = GatewayProc(self.meta_url, self.root / "s3.log", self.args.s3_workers).start()
        access, secret = create_key(self.meta_url, TENANT)
        self.signer = Presigner(self.gw.endpoint, access, secret)
        self.signer.client.create_bucket(Bucket=DATA_BUCKET)  # through the gateway
        (mnt / "seq").mkdir()
        if self.args.redundancy:
            for d in (mnt / "seq", mnt / DATA_BUCKET):  # new files and directories below inherit it
                os.setxattr(d, POLICY_XATTR, self.args.redundancy.encode())
        progress(f"gateway pids {self.gw.pids} on {self.gw.endpoint}; mount pid {self.fuse.pid}; "
                 f"redundancy {self.args.redundancy or 'the default ([fs] redundancy)'}")

    def close(self) -> None:
        """Stop everything started here, by pid: gateway, mount, cluster."""
        if self.gateway is not None:
            self.gateway.stop()
        if self.fuse is not None:
            self.fuse.stop()
        if self.cluster is not None:
            mb.stop([*self.cluster.datanodes, self.cluster.metanode])

    # ---- 64 MiB objects ----

    def large(self) -> None:
        n = self.args.large_objects
        seq = self.root / "mnt" / "seq"
        assert self.signer is not None
        put_urls = [self.signer.url("put_object", DATA_BUCKET, f"large/obj{i:04d}") for i in range(n)]
        get_urls = [self.signer.url("get_object", DATA_BUCKET, f"large/obj{i:04d}") for i in range(n)]
        view = memoryview(self.payload)
        buf = memoryview(bytearray(LARGE_BYTES))
        conn = Http(self.gw.port)
        rows = self.res.large
        for key, name, role in (("write", "mount sequential write (1 MiB writes, fsync)", "mount"),
                                ("put", "S3 PUT (presigned, 1 client)", "gateway"),
                                ("read", "mount sequential read (1 MiB reads, cold)", "mount"),
                                ("get", "S3 GET (presigned, 1 client, cold)", "gateway")):
            rows[key] = Large(name, role)

        def write() -> str:
            for i in range(n):
                fd = os.open(seq / f"f{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    for pos in range(0, LARGE_BYTES, IO_BYTES):
                        if os.write(fd, view[pos:pos + IO_BYTES]) != IO_BYTES:
                            raise PhaseError("short write")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                rows["write"].nbytes += LARGE_BYTES
            return f"{n * LARGE_BYTES / MIB:,.0f} MiB written"

        def read() -> str:
            for i in range(n):
                with open(seq / f"f{i:04d}", "rb", buffering=0) as f:
                    got = 0
                    while k := f.readinto(buf[got:got + IO_BYTES]):
                        got += k
                check(got, f"mount file f{i:04d}")
                rows["read"].nbytes += got
            return f"{n * LARGE_BYTES / MIB:,.0f} MiB read"

        def put() -> str:
            for u in put_urls:
                conn.put(u, self.payload)
                rows["put"].nbytes += LARGE_BYTES
            return f"{n} objects"

        def get() -> str:
            for i, u in enumerate(get_urls):
                check(conn.get_into(u, buf), f"object large/obj{i:04d}")
                rows["get"].nbytes += LARGE_BYTES
            return f"{n} objects"

        def check(got: int, what: str) -> None:
            if got != LARGE_BYTES or buf[:SPOT_BYTES] != view[:SPOT_BYTES] or buf[-SPOT_BYTES:] != view[-SPOT_BYTES:]:
                raise PhaseError(f"{what}: {got} bytes, or not what was written")

        try:
            for key, fn, prof in (("write", write, None), ("put", put, "put-64MiB"),
                                  ("read", read, None), ("get", get, "get-64MiB")):
                row = rows[key]
                row.usage = Usage()
                row.error = self._phase(row.name, row.usage, fn, prof)
                if row.error:
                    row.usage = None
        finally:
            conn.close()

    # ---- 4 KiB objects ----

    def small(self) -> None:
        n, clients = self.args.objects, self.args.clients
        assert self.signer is not None
        keys = [f"small/obj{i:06d}" for i in range(n)]
        progress(f"presigning {2 * n:,} URLs")
        plans = {"put": [self.signer.url("put_object", DATA_BUCKET, k) for k in keys],
                 "get": [self.signer.url("get_object", DATA_BUCKET, k) for k in keys]}
        conns = [Http(self.gw.port) for _ in range(clients)]
        try:
            for key, name in (("put", f"S3 PUT 4 KiB ({clients} clients)"), ("get", f"S3 GET 4 KiB ({clients} clients)")):
                usage = Usage()
                row = self.res.small[key] = Small(name, usage=usage)
                urls = plans[key]

                def run(key: str = key, urls: list[str] = urls, row: Small = row) -> str:
                    t0 = time.perf_counter()
                    row.latencies_s = self._clients(conns, urls, key)
                    row.ops = len(urls)
                    return f"{row.ops / (time.perf_counter() - t0):,.0f} requests/s"

                row.error = self._phase(name, usage, run, f"{key}-4KiB")
                if row.error:
                    row.usage = None
        finally:
            for c in conns:
                c.close()

    def _clients(self, conns: list[Http], urls: list[str], op: str) -> list[float]:
        """Each connection's thread works through its share of ``urls``; all latencies."""
        share = [urls[t::len(conns)] for t in range(len(conns))]
        lat: list[list[float]] = [[] for _ in conns]
        errors: list[BaseException] = []
        start = threading.Barrier(len(conns))
        stop_now = threading.Event()
        payload = self.small_payload

        def work(t: int) -> None:
            c, out = conns[t], lat[t]
            buf = memoryview(bytearray(SMALL_BYTES))
            try:
                start.wait()
                for u in share[t]:
                    if stop_now.is_set():
                        return
                    t0 = time.perf_counter()
                    if op == "put":
                        c.put(u, payload)
                    elif c.get_into(u, buf) != SMALL_BYTES or buf != payload:
                        raise PhaseError(f"GET {u.split('?')[0]}: not the 4 KiB that was written")
                    out.append(time.perf_counter() - t0)
            except BaseException as exc:
                errors.append(exc)
                stop_now.set()
                with contextlib.suppress(threading.BrokenBarrierError):
                    start.abort()

        threads = [threading.Thread(target=work, args=(t,), name=f"client-{t}") for t in range(len(conns))]
        for th in threads:
            th.start()
        try:
            for th in threads:
                th.join()
        finally:  # Ctrl-C: the clients stop after their current request
            stop_now.set()
            for th in threads:
                th.join()
        if errors:
            raise PhaseError(repr(errors[0]))
        return [x for part in lat for x in part]

    # ---- listings ----

    def populate(self) -> None:
        """``--keys`` 0-byte objects in their own bucket, straight into the namespace."""
        from appendfs.meta import Meta

        n = self.args.keys
        threads = self.args.populate_threads or (1 if self.meta_url.startswith("sqlite") else 4)
        m = Meta.from_url(self.meta_url, pool_size=max(2, threads))
        try:
            bucket = m.s3_bucket_create(LIST_BUCKET, TENANT)
            flat_from = n - int(n * FLAT_SHARE)
            done = [0]
            lock = threading.Lock()
            errors: list[BaseException] = []
            stop_now = threading.Event()  # an error in one thread, or Ctrl-C in the main one
            progress(f"populating {LIST_BUCKET}: {n:,} keys through Meta.s3_put_object, {threads} thread(s)")
            t0 = time.perf_counter()

            def work(t: int) -> None:
                try:
                    for i in range(t, n, threads):
                        key = f"dir{i % LIST_DIRS:03d}/obj{i:07d}" if i < flat_from else f"flat/obj{i:07d}"
                        m.s3_put_object(bucket.ino, key.encode(), [], 0, uid=0, gid=0, file_mode=0o644,
                                        dir_mode=0o755, etag=EMPTY_MD5, headers={})
                        with lock:
                            done[0] += 1
                            if done[0] % 10_000 == 0:
                                s = time.perf_counter() - t0
                                progress(f"  {done[0]:,} keys in {s:.0f} s ({done[0] / s:,.0f}/s)")
                        if stop_now.is_set():
                            return
                except BaseException as exc:
                    errors.append(exc)
                    stop_now.set()

            ths = [threading.Thread(target=work, args=(t,), name=f"populate-{t}") for t in range(threads)]
            for th in ths:
                th.start()
            try:
                for th in ths:
                    th.join()
            finally:
                stop_now.set()
                for th in ths:
                    th.join()
            self.res.populate_s = time.perf_counter() - t0
            self.res.populated = done[0]
            if errors:
                raise PhaseError(f"populating: {errors[0]!r}")
            progress(f"populated {n:,} keys in {self.res.populate_s:.0f} s ({n / self.res.populate_s:,.0f}/s)")
        finally:
            m.close()

    def walks(self) -> None:
        n = self.args.keys
        flat = int(n * FLAT_SHARE)
        for name, prefix, expect, cold in (("whole bucket, caches dropped", "", n, True),
                                           ("whole bucket, again (warm)", "", n, False),
                                           ("prefix flat/", "flat/", flat, False)):
            w = Walk(f"{name} ({expect:,} keys)", usage=Usage())
            self.res.walks.append(w)
            w.error = self._walk(w, prefix, expect, cold)
            if w.error:
                w.usage = None

    def _walk(self, w: Walk, prefix: str, expect: int, cold: bool) -> str:
        assert self.signer is not None
        signer = self.signer
        conn = Http(self.gw.port)
        key_re = re.compile(rb"<Key>([^<]*)</Key>")
        token_re = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")

        def walk() -> str:
            token: str | None = None
            last = b""
            while True:
                params: dict[str, object] = {"MaxKeys": 1000}
                if prefix:
                    params["Prefix"] = prefix
                if token:
                    params["ContinuationToken"] = token
                url = signer.url("list_objects_v2", LIST_BUCKET, params=params)
                t0 = time.perf_counter()
                body = conn.get(url)
                w.page_s.append(time.perf_counter() - t0)
                keys = key_re.findall(body)
                if keys and keys[0] <= last:
                    raise PhaseError(f"keys out of order across pages: {last!r} then {keys[0]!r}")
                w.keys += len(keys)
                last = keys[-1] if keys else last
                m = token_re.search(body)
                if m is None:
                    break
                token = m.group(1).decode()
                if len(w.page_s) % 25 == 0:
                    progress(f"  {w.name}: {len(w.page_s)} pages, {w.keys:,} keys")
            if w.keys != expect:
                raise PhaseError(f"the walk returned {w.keys:,} keys, not {expect:,}")
            return (f"{len(w.page_s)} pages, median {pct(w.page_s, 50) * 1e3:.0f} ms, "
                    f"p95 {pct(w.page_s, 95) * 1e3:.0f} ms")

        try:
            return self._phase(f"ListObjectsV2 {w.name}", w.usage or Usage(), walk, "list" if cold else None,
                               cold=cold)
        finally:
            conn.close()

    def run(self) -> None:
        self.start()
        progress(f"64 MiB objects: {self.args.large_objects} through the mount, then through S3")
        self.large()
        progress(f"4 KiB objects: {self.args.objects:,} PUTs then GETs, {self.args.clients} clients")
        self.small()
        try:
            self.populate()
        except PhaseError as exc:
            self.res.errors.append(str(exc))
            progress(f"FAILED: {exc}")
            return
        self.walks()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def report(bench: Bench, args: argparse.Namespace, base: Path, interrupted: bool) -> None:
    r = bench.res
    engine = "PostgreSQL (--pg)" if args.pg else "SQLite"
    print(f"# s3_bench: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load after {sb.loadavg()}; "
          f"scratch on {sb.disk_of(base)}; namespace {engine}; redundancy "
          f"{args.redundancy or 'default ([fs] redundancy)'}; gateway workers "
          f"{args.s3_workers if args.s3_workers is not None else f'default ({os.cpu_count()} here)'}")
    print("# caches dropped before every phase except the warm listing walks; CPU is utime+stime from /proc/PID/stat")
    print()
    print(large_table(r, args.large_objects))
    print()
    print(small_table(r, args.clients))
    print()
    if r.populate_s is not None:
        print(f"Listing bucket: {r.populated:,} keys created with Meta.s3_put_object in {r.populate_s:.0f} s "
              f"({r.populated / r.populate_s:,.0f}/s)")
        print()
    print(walk_table(r))
    print()
    print(checks_table(r))
    if r.errors:
        print("\nErrors:")
        for e in r.errors:
            print(f"- {e.splitlines()[0]}")
            for line in e.splitlines()[1:]:
                print(f"    {line}")
    if interrupted:
        print("\n(interrupted: incomplete)")


def main() -> None:
    from appendfs.runtime import reexec_with_huge_pages, tune_allocator

    reexec_with_huge_pages()  # the store client in this process runs as in a daemon: huge pages
    tune_allocator()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="parent of the scratch directory (cluster data, mount point) [/var/tmp]")
    ap.add_argument("--pg", default=None, metavar="URL",
                    help="admin URL of a PostgreSQL server: the namespace goes in a fresh database there "
                    "(dropped at the end) instead of SQLite")
    ap.add_argument("--large-objects", type=int, default=16, help="64 MiB objects (and mount files) [16]")
    ap.add_argument("--objects", type=int, default=2000, help="4 KiB objects PUT and then GET [2000]")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients for 4 KiB objects [4]")
    ap.add_argument("--keys", type=int, default=100_000, help="keys in the listing bucket [100000]")
    ap.add_argument("--populate-threads", type=int, default=0,
                    help="threads creating the listing keys [1 on SQLite, 4 on PostgreSQL]")
    ap.add_argument("--redundancy", default=None, metavar="POLICY",
                    help="set user.appendfs.redundancy on the data bucket and the mount's directory "
                    "(e.g. rep:1) [none: the cluster's default]")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="record py-spy profiles of the gateway and of one DataNode during the S3 phases here "
                         "(disturbs the numbers)")
    ap.add_argument("--s3-workers", type=int, default=None, metavar="N",
                    help="the gateway's --workers [its default: one per CPU]")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, cluster data)")
    args = ap.parse_args()
    if min(args.large_objects, args.objects, args.clients, args.keys) < 1 or args.populate_threads < 0:
        ap.error("--large-objects, --objects, --clients and --keys must be positive")
    if os.geteuid() != 0:
        raise SystemExit("s3_bench: needs root (drop_caches, FUSE mounts)")
    args.dir.mkdir(parents=True, exist_ok=True)
    need = args.large_objects * LARGE_BYTES * 2 * 3 + GIB  # mount + S3 copies, up to rep:3
    st = os.statvfs(args.dir)
    if st.f_bavail * st.f_frsize < need:
        raise SystemExit(f"s3_bench: {args.dir} has {st.f_bavail * st.f_frsize / GIB:.1f} GiB free; "
                         f"the run needs about {need / GIB:.1f} GiB")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="s3-bench-", dir=args.dir)).resolve()
    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C: everything is cleaned up
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (a background job)
    with contextlib.ExitStack() as stack:
        if args.pg:
            sys.path.insert(0, str(sb.REPO / "tests"))
            from pgserver import create_database, drop_database

            meta_url = create_database(args.pg, prefix="s3bench")
            stack.callback(drop_database, args.pg, meta_url)
        else:
            meta_url = f"sqlite:///{root}/meta.db"
        bench = Bench(args, root, meta_url)
        progress(f"s3_bench in {root} on {sb.disk_of(root)}; {os.cpu_count()} CPUs; load {sb.loadavg()}; "
                 f"{args.large_objects} x 64 MiB, {args.objects:,} x 4 KiB with {args.clients} clients, "
                 f"{args.keys:,} listing keys")
        interrupted = False
        try:
            bench.run()
        except KeyboardInterrupt:
            interrupted = True
            progress("interrupted: cleaning up; the tables below hold what was measured")
        except PhaseError as exc:
            bench.res.errors.append(str(exc))
            progress(f"FAILED: {exc}")
        finally:
            bench.close()
            left = mb.mounts_below(root)
            if left:
                progress(f"NOT removing {root}: still mounted: {left}")
            elif args.keep:
                progress(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    report(bench, args, args.dir, interrupted)
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
