"""Real clusters for tests: MetaNodes and DataNodes as separate processes on loopback.

Every process is an `appendfs` subprocess with its own log file; tests kill them with
SIGKILL and restart them. Timings are shortened (heartbeat 0.3 s, dead after 2 s, lease
3 s) so failure handling happens within seconds; the code paths are the production ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from appendfs.up import free_port as up_free_port

R = TypeVar("R")
APPENDFS = [sys.executable, "-m", "appendfs"]
#: the device size of a test DataNode that the test does not size (see Cluster.add_datanode)
TEST_CAPACITY_BYTES = 16 << 30


def free_port() -> int:
    return up_free_port()


def run_threads(n: int, target: Callable[[int], R]) -> list[R]:
    """Run ``target(i)`` in ``n`` threads released together; their results in order (any
    error fails the test)."""
    results: dict[int, R] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return [results[i] for i in range(n)]


def db_rows(meta_url: str, query: str, **params: object) -> list[tuple[Any, ...]]:
    """Rows of one SQL query on the cluster's database (tests read the tables directly)."""
    import sqlalchemy as sa

    eng = sa.create_engine(meta_url)
    try:
        with eng.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(query), params)]
    finally:
        eng.dispose()


def check_namespace(meta_url: str) -> list[str]:
    """The namespace invariant check's findings on the cluster's database ([] when sound)."""
    from appendfs.meta import Meta

    meta = Meta.from_url(meta_url)
    try:
        return meta.check_invariants()
    finally:
        meta.close()


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 60.0, interval_s: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; a generous deadline, never a wall-clock assert."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as f:
            self.popen = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        self.terminate()
        self.wait_stopped()

    def terminate(self) -> None:
        """One SIGTERM: a clean shutdown. (A second one, once the daemon stopped listening
        for signals, would kill it mid-shutdown.)"""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()

    def wait_stopped(self, timeout_s: float = 10) -> None:
        """Wait for the exit after :meth:`terminate`; SIGKILL after ``timeout_s``."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    def __init__(self, root: Path, meta_url: str, *, extent_max_bytes: int = 8 << 20,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.meta_url = meta_url
        self.secret = root / "secret"
        self.env = {**os.environ, "APPENDFS_METANODE_LEASE_TTL_S": "3", "APPENDFS_METANODE_DEAD_AFTER_S": "2",
                    "APPENDFS_DATANODE_HEARTBEAT_INTERVAL_S": "0.3", "APPENDFS_METANODE_ELECTION_INTERVAL_S": "0.3",
                    "APPENDFS_CLIENT_PLACEMENT_WAIT_S": "20", **(env or {})}
        self.metanodes: list[Proc] = []
        self.datanodes: list[Proc] = []
        self.datanode_args: list[list[str]] = []
        root.mkdir(parents=True, exist_ok=True)
        # In this process, like status(): tests of `appendfs format` itself run the command.
        from appendfs.format import format_cluster

        format_cluster(meta_url, self.secret, extent_max_bytes)

    def run(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*APPENDFS, *args], env=self.env, capture_output=True, check=kw.pop("check", True), **kw)

    def popen(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*APPENDFS, *args], env=self.env, **kw)

    @property
    def metanode_addresses(self) -> str:
        return ",".join(p.argv[p.argv.index("--listen") + 1] for p in self.metanodes)

    def add_metanode(self) -> Proc:
        port = free_port()
        proc = Proc(f"metanode-{len(self.metanodes) + 1}",
                    [*APPENDFS, "metanode", "--meta", self.meta_url, "--listen", f"127.0.0.1:{port}"],
                    self.root / f"metanode-{len(self.metanodes) + 1}.log")
        self.metanodes.append(proc)
        proc.argv_env = self.env  # type: ignore[attr-defined]
        self._start(proc)
        return proc

    def add_datanode(self, *extra: str, data: Path | None = None, secret: Path | None = None) -> Proc:
        """A DataNode on loopback. Unless the test sizes it, its device gets a capacity of
        TEST_CAPACITY_BYTES: without one, a device is as full as the host's disk (df), and
        a shared CI disk past 95% made every test that writes fail with ENOSPC. With one, it
        is full only when the test fills it or the disk has less than 64 MiB left."""
        if "--capacity-bytes" not in extra:
            extra = ("--capacity-bytes", str(TEST_CAPACITY_BYTES), *extra)
        i = len(self.datanodes) + 1
        port = free_port()
        proc = Proc(f"datanode-{i}", [
            *APPENDFS, "datanode", "--listen", f"127.0.0.1:{port}", "--data", str(data or self.root / f"dn{i}"),
            "--metanode", self.metanode_addresses, "--secret-file", str(secret or self.secret), *extra],
            self.root / f"datanode-{i}.log")
        self.datanodes.append(proc)
        self._start(proc)
        return proc

    def _start(self, proc: Proc) -> None:
        with open(proc.log, "ab") as f:
            proc.popen = subprocess.Popen(proc.argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env)

    def restart(self, proc: Proc) -> None:
        proc.kill()
        self._start(proc)

    def status(self, wait_s: float = 10.0) -> dict[str, Any]:
        """What `appendfs status --json` prints, asked in this process: tests poll it often,
        and each CLI process costs about a second of CPU (imports), which the cluster under
        test then lacks. Tests of the command itself run it with :meth:`run`. Waits up to
        ``wait_s`` for a leading MetaNode."""
        from appendfs.tools import fetch_status

        return json.loads(json.dumps(trio.run(fetch_status, self.meta_url, wait_s), default=str))  # type: ignore[no-any-return]

    def alive_nodes(self) -> int:
        try:
            # A short leader wait: polled every 50 ms, where the client's own backoff (up to
            # 1 s between looks) would answer up to a second after the leader is there.
            return sum(1 for n in self.status(wait_s=0.2)["nodes"] if n["alive"])
        except Exception:  # no leader yet, or the database is not there yet
            return 0

    def wait_alive(self, count: int, timeout_s: float = 60) -> None:
        # status() is an in-process call of ~20 ms: poll often, a cluster start is ~1.6 s
        wait_for(lambda: self.alive_nodes() == count, f"{count} alive DataNodes", timeout_s, 0.05)

    def put(self, path: Path, redundancy: str = "rep:3") -> str:
        out = self.run(["store", "put", "--meta", self.meta_url, "--redundancy", redundancy, str(path)], timeout=600)
        return out.stdout.decode().strip().splitlines()[-1]

    def get(self, locator: str, dest: Path) -> subprocess.CompletedProcess[bytes]:
        with open(dest, "wb") as f:
            return subprocess.run([*APPENDFS, "store", "get", "--meta", self.meta_url, locator], env=self.env,
                                  stdout=f, stderr=subprocess.PIPE, check=False, timeout=600)

    def stop(self) -> None:
        """SIGTERM to every daemon at once, then wait for each: their shutdowns overlap
        (one after the other cost ~0.55 s per cluster, over a hundred clusters a suite)."""
        procs = self.datanodes + self.metanodes
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait_stopped()

    def logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.text()[-4000:]}" for p in self.metanodes + self.datanodes)


@contextmanager
def running_up(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`appendfs up ARGS` until it prints "appendfs is up"; SIGTERM and wait on exit."""
    with subprocess.Popen([*APPENDFS, "up", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as sup:
        try:
            assert sup.stdout is not None
            for line in sup.stdout:
                if line.startswith("appendfs is"):
                    assert line.startswith("appendfs is up"), line
                    break
            yield sup
        finally:
            sup.send_signal(signal.SIGTERM)
            sup.wait(90)


def wait_gone(pids: Iterable[int], what: str, timeout_s: float = 30) -> None:
    """Poll until none of ``pids`` runs any more (zombies count as gone)."""
    def gone() -> bool:
        return all(not Path(f"/proc/{p}").exists() or "zombie" in Path(f"/proc/{p}/status").read_text().lower()
                   for p in pids)
    wait_for(gone, what, timeout_s)


def random_file(path: Path, size: int, seed: int) -> Path:
    """A file of pseudo-random bytes (fixed seed: the same bytes every run)."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def scrape(port: int) -> dict[str, float]:
    """A daemon's Prometheus metrics on 127.0.0.1:``port``, by sample name."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def files_equal(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
