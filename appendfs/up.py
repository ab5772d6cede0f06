"""`appendfs up --data DIR`: a whole single-host cluster under one supervisor (DESIGN §7).

Children: one MetaNode and three DataNodes on the embedded SQLite default
(``sqlite:///DIR/meta.db``), and with ``--mount MOUNTPOINT`` the FUSE mount, each a
separate process with its own log file under ``DIR/logs/``. The mount starts once the
DataNodes have registered and is stopped first (it commits buffered data while the
DataNodes still run); a mount that died is detached (``umount -l``) before its restart. Ports are picked free at start and recorded, with pids and the META_URL,
in ``DIR/run.json``. Children get SIGTERM when the supervisor stops (and die with it
through PR_SET_PDEATHSIG if it is killed); a child that exits unexpectedly is restarted
with backoff.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appendfs.config import parse_host_port
from appendfs.errors import ConfigError

DATANODES = 3
_PR_SET_PDEATHSIG = 1


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free to listen on, chosen *below* the kernel's ephemeral range.

    bind(0) hands out an ephemeral port; between our close and the daemon's bind, any
    outgoing connection on the host may take that very port (seen in CI: a MetaNode died
    with EADDRINUSE). Ports below the range are never given to outgoing connections, so
    only another listener picking the same random number could collide. Ports handed
    out by this process are remembered, so a caller that picks several ports before
    starting any daemon (a test cluster, `up`) never gets the same one twice — a CI run
    lost a DataNode that way, its port given again before the first one had bound it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200 if low > 2048 else 0):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # everything below the range is taken: fall back
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        log.close()
        self.started_at = time.monotonic()


def _appendfs() -> list[str]:
    return [sys.executable, "-m", "appendfs"]


def plan(data_dir: Path) -> tuple[str, list[Child], dict[str, Any]]:
    """The MetaNode and DataNode children, and run.json's first contents. Every child
    serves Prometheus metrics on a loopback port of its own (``run["metrics"]``)."""
    meta_url = f"sqlite:///{data_dir}/meta.db"
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    meta_port = free_port()
    run: dict[str, Any] = {"meta_url": meta_url, "metanode": f"127.0.0.1:{meta_port}", "datanodes": [],
                           "secret_file": str(data_dir / "secret"), "metrics": {}}
    children = [Child("metanode", [*_appendfs(), "metanode", "--meta", meta_url, "--listen", f"127.0.0.1:{meta_port}",
                                   *_metrics(run, "metanode")], logs / "metanode.log")]
    for i in range(1, DATANODES + 1):
        port = free_port()
        children.append(Child(f"datanode-{i}", [
            *_appendfs(), "datanode", "--listen", f"127.0.0.1:{port}", "--data", str(data_dir / f"datanode-{i}"),
            "--metanode", f"127.0.0.1:{meta_port}", "--secret-file", str(data_dir / "secret"),
            *_metrics(run, f"datanode-{i}")], logs / f"datanode-{i}.log"))
        run["datanodes"].append(f"127.0.0.1:{port}")
    return meta_url, children, run


def _metrics(run: dict[str, Any], name: str) -> list[str]:
    """``--metrics`` arguments for child ``name``: a fresh loopback port, noted in run.json."""
    address = run["metrics"][name] = f"127.0.0.1:{free_port()}"
    return ["--metrics", address]


def mount_child(meta_url: str, mountpoint: Path, logs: Path, metrics: list[str]) -> Child:
    return Child("mount", [*_appendfs(), "mount", "--meta", meta_url, "--foreground", *metrics, str(mountpoint)],
                 logs / "mount.log")


def _wait_mounted(child: Child, mountpoint: Path, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc is None or child.proc.poll() is not None:
            return False
        if os.path.ismount(mountpoint):
            return True
        time.sleep(0.1)
    return False


def s3_child(meta_url: str, address: str, logs: Path, metrics: list[str]) -> Child:
    return Child("s3", [*_appendfs(), "s3", "--meta", meta_url, "--listen", address, *metrics], logs / "s3.log")


def _wait_listening(child: Child, address: str, timeout_s: float = 60) -> bool:
    host, port = parse_host_port(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc is None or child.proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host or "127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def first_s3_key(meta_url: str, data_dir: Path) -> tuple[str, str]:
    """The key pair ``up`` prints: created once (tenant ``default``, objects owned by the
    user running ``up``) and kept in DIR/s3-credentials (mode 0600, aws credentials format)."""
    from appendfs.meta import Meta
    from appendfs.s3.keys import create_key

    path = data_dir / "s3-credentials"
    if path.exists():
        pairs = dict(line.split(" = ", 1) for line in path.read_text().splitlines() if " = " in line)
        if "aws_access_key_id" in pairs and "aws_secret_access_key" in pairs:
            return pairs["aws_access_key_id"], pairs["aws_secret_access_key"]
    meta = Meta.from_url(meta_url)
    try:
        key = create_key(meta, "default", os.getuid(), os.getgid())
    finally:
        meta.close()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[default]\naws_access_key_id = {key.access_key}\naws_secret_access_key = {key.secret_key}\n")
    return key.access_key, key.secret_key


def run_up(data_dir: Path, mountpoint: Path | None = None, s3_address: str | None = None) -> int:
    from appendfs.format import format_cluster

    data_dir = data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {data_dir}: {exc.strerror}") from None
    if mountpoint is not None:
        from appendfs.mount.main import detach_mount, preflight

        mountpoint = mountpoint.absolute()
        try:
            mountpoint.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the mountpoint {mountpoint}: {exc.strerror}") from None
        preflight(mountpoint)
    meta_url, children, run = plan(data_dir)
    res = format_cluster(meta_url, data_dir / "secret")
    print(f"appendfs: {'formatted a new' if res.created else 'using the existing'} cluster {res.cluster_id} in {data_dir}",
          flush=True)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.start()
    run["supervisor_pid"] = os.getpid()
    run["pids"] = {c.name: c.proc.pid for c in children if c.proc}
    (data_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    _wait_registered(meta_url)
    if mountpoint is not None:
        child = mount_child(meta_url, mountpoint, data_dir / "logs", _metrics(run, "mount"))
        child.start()
        children.append(child)
        if not _wait_mounted(child, mountpoint):
            print(f"appendfs: the mount did not come up; see {child.log_path}", file=sys.stderr, flush=True)
        run["mount"] = str(mountpoint)
        run["pids"] = {c.name: c.proc.pid for c in children if c.proc}
        (data_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    if s3_address is not None:
        run["s3_key"] = first_s3_key(meta_url, data_dir)
        child = s3_child(meta_url, s3_address, data_dir / "logs", _metrics(run, "s3"))
        child.start()
        children.append(child)
        if not _wait_listening(child, s3_address):
            print(f"appendfs: the S3 gateway did not come up; see {child.log_path}", file=sys.stderr, flush=True)
        run["s3"] = s3_address
        run["pids"] = {c.name: c.proc.pid for c in children if c.proc}
        (data_dir / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k != "s3_key"}, indent=2)
                                           + "\n")
    _announce(meta_url, run, data_dir)
    try:
        while not stopping:
            time.sleep(0.2)
            for child in children:
                assert child.proc is not None
                code = child.proc.poll()
                if code is None or stopping:
                    continue
                delay = min(30.0, 2.0 ** min(child.restarts, 5))
                if time.monotonic() - child.started_at > 60:
                    child.restarts, delay = 0, 1.0
                print(f"appendfs: {child.name} exited with status {code}; restarting in {delay:.0f} s "
                      f"(see {child.log_path})", file=sys.stderr, flush=True)
                time.sleep(delay)
                child.restarts += 1
                if child.name == "mount" and mountpoint is not None:
                    detach_mount(mountpoint)
                child.start()
    finally:
        for child in children:  # the mount first: it commits buffered data to running DataNodes
            if child.name == "mount" and child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
                try:
                    child.proc.wait(60)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
        if mountpoint is not None:
            detach_mount(mountpoint)
        for child in reversed(children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 10
        for child in children:
            if child.proc is not None:
                try:
                    child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
        print("appendfs: stopped", flush=True)
    return 0


def _wait_registered(meta_url: str, timeout_s: float = 30) -> int:
    """Wait until the DataNodes have registered with the MetaNode; returns how many did."""
    import trio

    from appendfs.tools import fetch_status

    deadline = time.monotonic() + timeout_s
    alive = 0
    while time.monotonic() < deadline:
        try:
            st = trio.run(fetch_status, meta_url)
            alive = sum(1 for n in st["nodes"] if n["alive"])
            if alive >= DATANODES:
                break
        except Exception:  # the cluster is still starting; the deadline bounds this
            pass
        time.sleep(0.3)
    return alive


def _announce(meta_url: str, run: dict[str, Any], data_dir: Path) -> None:
    alive = _wait_registered(meta_url, 5)
    state = "up" if alive >= DATANODES else f"starting ({alive}/{DATANODES} DataNodes registered so far)"
    mount = f"\n  mount      {run['mount']}" if run.get("mount") else ""
    s3 = ""
    if run.get("s3"):
        ak, sk = run["s3_key"]
        s3 = (f"\n  S3         http://{run['s3']}  (path-style; region us-east-1)"
              f"\n  S3 key     {ak}\n  S3 secret  {sk}   (also in {data_dir}/s3-credentials)")
    m = run["metrics"]
    named = ", ".join(f"{name} {m[name]}" for name in ("mount", "s3", "metanode") if name in m)
    dns = ", ".join(address for name, address in m.items() if name.startswith("datanode-"))
    metrics = f"Prometheus /metrics of {named},\n             DataNodes {dns}"
    s3_try = ""
    if run.get("s3"):
        s3_try = (f"\n  AWS_SHARED_CREDENTIALS_FILE={data_dir}/s3-credentials aws --endpoint-url http://{run['s3']} "
                  "s3 mb s3://bucket")
    print(f"""appendfs is {state}:{mount}{s3}
  META_URL   {meta_url}
  MetaNode   {run['metanode']}
  DataNodes  {', '.join(run['datanodes'])}
  metrics    {metrics}
  logs       {data_dir}/logs/   ports and pids: {data_dir}/run.json
try:
  export APPENDFS_META={meta_url}
  appendfs status
  appendfs store put --redundancy rep:3 FILE      # prints a locator
  appendfs store get LOCATOR > copy{s3_try}
Ctrl-C stops everything.""", flush=True)
