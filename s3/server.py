"""Running the gateway: the file layer, the gateway state and hypercorn's trio worker.

``appendfs s3 --meta META_URL --listen HOST:PORT`` ends here. The process holds one
:class:`~appendfs.fs.FileSystem` (a namespace session and store streams, like a mount
without FUSE) and serves the ASGI :class:`~appendfs.s3.app.App` with hypercorn (HTTP/1.1
keep-alive, ``Expect: 100-continue``, bounded header sizes, read timeouts). SIGTERM
stops accepting, lets requests in flight finish (bounded), and closes the session.

One Python process serves one core at most (the GIL), and a 4 KiB request costs the
gateway 1.7-3.5 ms of CPU. With ``workers`` > 1 (default: one per CPU, at most 8) the
process started by ``appendfs s3`` is a **supervisor**: it binds the listening socket
once and runs that many worker processes (``python -m appendfs`` with the same arguments
and environment, so the same configuration), which all accept connections from that one
socket — the kernel hands each new connection to one of them. The gateway keeps no state
a worker needs from another (DESIGN §5), so nothing else is shared. The supervisor:

* checks what every worker needs before starting any (the database opens and has our
  schema, the TLS certificate and key load), so those errors are one line, once;
* restarts a worker that dies (after 1 s), but exits with the worker's code when one
  dies before it served (its first counters report): restarting would not help, and
  its error is in the log;
* on SIGTERM/SIGINT sends SIGTERM to every worker and waits for them (each finishes its
  requests in flight, bounded by hypercorn's graceful timeout);
* serves ``/metrics`` (``metrics``) as the sum of the workers' counters, which each
  worker reports every second over a pipe, plus ``appendfs_s3_workers`` (workers
  running). A restarted worker's counters start again from zero.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import h11
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve as hyper_serve
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from appendfs.db import make_engine
from appendfs.errors import ConfigError
from appendfs.fs import FileSystem, FsConfig
from appendfs.meta.schema import check_schema
from appendfs.metrics import serve_metrics
from appendfs.s3.app import App
from appendfs.s3.config import S3Config
from appendfs.s3.gateway import open_gateway
from appendfs.store.client import ClientConfig

log = logging.getLogger(__name__)


def _give_100_continue_a_reason() -> None:
    """hypercorn answers ``Expect: 100-continue`` with ``HTTP/1.1 100 `` (h11's empty reason
    phrase). The botocore inside Debian 12's aws cli recognises the interim response only
    as ``100 <reason>``; without one it takes the interim response for the final one and the
    upload fails (BadStatusLine). RFC 9112 makes the reason optional, so this is their bug,
    but every S3 server sends ``100 Continue``: so do we. Idempotent."""
    if getattr(h11.Connection.send, "_appendfs_reason", False):
        return
    original = h11.Connection.send

    def send(self: h11.Connection, event: Any) -> bytes | None:
        if isinstance(event, h11.InformationalResponse) and not event.reason:
            event = h11.InformationalResponse(status_code=event.status_code, headers=event.headers,
                                              reason=b"Continue" if event.status_code == 100 else b"Informational")
        return original(self, event)

    send._appendfs_reason = True  # type: ignore[attr-defined]
    h11.Connection.send = send  # type: ignore[method-assign, assignment]


#: Bytes hypercorn's trio server asks the socket for at a time (see _read_larger_chunks).
RECV_BYTES = 1 << 20


def _read_larger_chunks() -> None:
    """hypercorn's trio server reads a connection 64 KiB at a time (``MAX_RECV`` in
    ``hypercorn.trio.tcp_server``, a module constant it looks up at every read, not a
    setting). Each read becomes one h11 event, one ASGI message and one pass through the
    request body reader, so a 64 MiB PUT took ~1,000 of them and most of the gateway's CPU
    went to that machinery (py-spy). Raised to RECV_BYTES: the gateway's CPU per GiB of
    64 MiB PUTs went from 5.50 to 3.80 s (bench/s3_bench.py, docs/benchmarks.md, session
    16). A read returns what the socket holds, so small requests are unchanged. Skipped,
    with a log line, if a hypercorn release drops the constant. Idempotent."""
    from hypercorn.trio import tcp_server

    current = getattr(tcp_server, "MAX_RECV", None)
    if not isinstance(current, int):
        log.info("hypercorn.trio.tcp_server.MAX_RECV is gone: request bodies are read in its own chunks")
        return
    tcp_server.MAX_RECV = max(current, RECV_BYTES)


def hyper_config(cfg: S3Config) -> HyperConfig:
    hc = HyperConfig()
    hc.bind = [cfg.listen]
    hc.keep_alive_timeout = cfg.keep_alive_s
    hc.read_timeout = int(cfg.read_timeout_s)
    hc.graceful_timeout = 10.0
    hc.accesslog = None
    hc.errorlog = logging.getLogger("appendfs.s3.http")
    hc.include_server_header = False
    hc.backlog = 1024
    if cfg.tls_cert_file and cfg.tls_key_file:
        hc.certfile, hc.keyfile = cfg.tls_cert_file, cfg.tls_key_file
    return hc


#: Set by the supervisor in a worker's environment: "INDEX:LISTEN_FD:STATS_FD" (not an
#: ``APPENDFS_S3_*`` name: those are configuration keys).
WORKER_ENV = "_APPENDFS_S3_WORKER"
_STATS_INTERVAL_S = 1.0


def worker_count(cfg: S3Config) -> int:
    """Worker processes to run: ``cfg.workers``, or one per CPU (at most 8) when 0."""
    return cfg.workers or max(1, min(os.cpu_count() or 1, 8))


def run_gateway(meta_url: str, cfg: S3Config, fcfg: FsConfig, ccfg: ClientConfig,
                run_daemon: Callable[[Callable[[], Any]], None]) -> int:
    """``appendfs s3``: serve in this process (one worker, or this is a worker), or
    supervise ``worker_count`` workers. Returns the exit code."""
    worker = os.environ.get(WORKER_ENV)
    if worker is None:
        _check_tls(cfg)
    else:
        index, listen_fd, stats_fd = (int(x) for x in worker.split(":"))
        sock = socket.socket(fileno=listen_fd)
        run_daemon(lambda: serve(meta_url, cfg, fcfg, ccfg, worker=(index, sock, stats_fd)))
        return 0
    n = worker_count(cfg)
    if n == 1:
        run_daemon(lambda: serve(meta_url, cfg, fcfg, ccfg))
        return 0
    _check_database(meta_url)  # one clear error here rather than one per worker
    return trio.run(_supervise, cfg, n)


def _check_tls(cfg: S3Config) -> None:
    if cfg.tls_cert_file:
        try:
            hyper_config(cfg).create_ssl_context()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {cfg.tls_cert_file} and key {cfg.tls_key_file}: "
                              f"{exc}") from None


def _check_database(meta_url: str) -> None:
    engine = make_engine(meta_url)
    try:
        check_schema(engine)
    finally:
        engine.dispose()


async def serve(meta_url: str, cfg: S3Config, fcfg: FsConfig, ccfg: ClientConfig,
                ready: Callable[[list[str]], None] | None = None,
                worker: tuple[int, socket.socket, int] | None = None) -> None:
    """Serve the gateway in this process: on ``cfg.listen``, or as worker ``(index,
    listening socket, stats pipe)`` of a supervisor."""
    _give_100_continue_a_reason()
    _read_larger_chunks()
    owner = f"s3:{os.uname().nodename}:{cfg.listen}" + (f":w{worker[0]}" if worker else "")
    async with FileSystem.connect(meta_url, fcfg, ccfg, owner=owner) as fs, open_gateway(fs, cfg) as gw:
        def counters() -> dict[str, float]:
            return {**gw.stats, **fs.stats(), **fs.client.stats}
        async with trio.open_nursery() as nursery:
            if worker is None:
                serve_metrics(cfg.metrics, "appendfs_s3", counters)
                binds: list[str] = await nursery.start(_serve_http, App(gw), hyper_config(cfg), None)
            else:
                _index, sock, stats_fd = worker
                nursery.start_soon(_report_stats, stats_fd, counters)
                secure = bool(cfg.tls_cert_file)
                sockets = Sockets([sock] if secure else [], [] if secure else [sock], [])
                binds = await nursery.start(_serve_http, App(gw), hyper_config(cfg), sockets)
            log.info("S3 gateway for %s serving %s%s", meta_url, ", ".join(binds),
                     f" (worker {worker[0]})" if worker else "")
            if ready is not None:
                ready(binds)


async def _serve_http(app: App, hc: HyperConfig, sockets: Sockets | None, *,
                      task_status: trio.TaskStatus[list[str]]) -> None:
    if sockets is None:
        await hyper_serve(app, hc, task_status=task_status)  # type: ignore[arg-type]
    else:  # hypercorn's own multi-worker runner serves inherited sockets this way
        await worker_serve(wrap_app(app, hc.wsgi_max_body_size, "asgi"), hc,  # type: ignore[arg-type]
                           sockets=sockets, task_status=task_status)


async def _report_stats(fd: int, counters: Callable[[], dict[str, float]]) -> None:
    """Worker: send the supervisor this worker's counters (one JSON line) every second."""
    async with trio.lowlevel.FdStream(fd) as pipe:
        while True:
            try:
                await pipe.send_all(json.dumps(counters()).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the supervisor is gone; SIGTERM will follow or already came
            await trio.sleep(_STATS_INTERVAL_S)


# ---- the supervisor -------------------------------------------------------------------------


def _listening_socket(cfg: S3Config) -> socket.socket:
    """Bind ``cfg.listen`` once, as hypercorn would, for every worker to accept from."""
    hc = hyper_config(cfg)
    sockets = hc.create_sockets()
    sock = (sockets.secure_sockets or sockets.insecure_sockets)[0]
    sock.listen(hc.backlog)
    sock.set_inheritable(True)
    return sock


class _Supervisor:
    def __init__(self, cfg: S3Config, n: int) -> None:
        self.cfg = cfg
        self.n = n
        self.sock: socket.socket | None = None  # bound by listen()
        self.procs: dict[int, trio.Process] = {}
        self.counters: dict[int, dict[str, float]] = {}  # index → last report (present once it served)
        self.stopping = False
        self.exit_code = 0

    def listen(self) -> None:
        self.sock = _listening_socket(self.cfg)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {"workers": float(len(self.procs))}
        for c in list(self.counters.values()):
            for k, v in c.items():
                out[k] = out.get(k, 0.0) + float(v)
        return out

    async def worker(self, index: int, nursery: trio.Nursery) -> None:
        argv = [sys.executable, "-m", "appendfs", *sys.argv[1:]]
        assert self.sock is not None, "listen() first"
        while not self.stopping:
            rfd, wfd = os.pipe()
            env = {**os.environ, WORKER_ENV: f"{index}:{self.sock.fileno()}:{wfd}"}
            try:
                proc = await trio.lowlevel.open_process(argv, env=env, pass_fds=(self.sock.fileno(), wfd))
            except BaseException:
                os.close(rfd)
                raise
            finally:
                os.close(wfd)
            self.procs[index] = proc
            async with trio.open_nursery() as inner:
                inner.start_soon(self._read_stats, index, rfd)
                await proc.wait()
                inner.cancel_scope.cancel()
            self.procs.pop(index, None)
            served = self.counters.pop(index, None) is not None
            if self.stopping:
                return
            code = proc.returncode
            if not served:
                log.error("S3 worker %d exited with %s before it served: stopping the gateway "
                          "(its log lines above say why)", index, code)
                self.exit_code = code if code and code > 0 else 1
                self.stop(nursery)
                return
            log.error("S3 worker %d (pid %d) exited with %s; starting it again in 1 s", index, proc.pid, code)
            await trio.sleep(1.0)

    async def _read_stats(self, index: int, fd: int) -> None:
        buf = b""
        async with trio.lowlevel.FdStream(fd) as pipe:
            async for chunk in pipe:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                if lines:
                    try:
                        self.counters[index] = json.loads(lines[-1])
                    except ValueError:
                        log.warning("S3 worker %d sent unreadable counters", index)

    def stop(self, nursery: trio.Nursery) -> None:
        self.stopping = True
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        nursery.cancel_scope.deadline = trio.current_time() + 30  # graceful timeout, then give up


async def _supervise(cfg: S3Config, n: int) -> int:
    sup = _Supervisor(cfg, n)
    # /metrics before the S3 socket: once the gateway's port accepts connections (what a
    # health check or a test waits for), /metrics answers too. Bound the other way round,
    # a scrape right after the port opened was refused.
    serve_metrics(cfg.metrics, "appendfs_s3", sup.totals)
    sup.listen()
    log.info("S3 gateway supervisor: %d workers serving %s", n, cfg.listen)
    try:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("received %s, stopping %d S3 workers", signal.Signals(signum).name, len(sup.procs))
                        sup.stop(nursery)
                        return

            nursery.start_soon(on_signal)
            async with trio.open_nursery() as workers:
                for i in range(n):
                    workers.start_soon(sup.worker, i, nursery)
            nursery.cancel_scope.cancel()
    finally:
        for proc in sup.procs.values():
            if proc.returncode is None:
                proc.kill()
        if sup.sock is not None:
            sup.sock.close()
    return sup.exit_code
