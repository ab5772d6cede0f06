"""The `appendfs` command: one entry point with a subcommand per role and tool.

Every command that needs the cluster takes ``--meta META_URL`` (or APPENDFS_META).
Daemon settings come from ``--config FILE`` (TOML), the environment and flags, are
validated at start, and a bad value prints one line and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import trio

from appendfs import __version__
from appendfs.errors import (
    AppendfsError,
    ClusterMismatch,
    ConfigError,
    NotFormatted,
    VersionMismatch,
)

log = logging.getLogger("appendfs")
meta_option = click.option("--meta", "meta_url", envvar="APPENDFS_META", required=True, metavar="META_URL",
                           help="database URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB (env APPENDFS_META)")
config_option = click.option("--config", "config_file", type=click.Path(path_type=Path), envvar="APPENDFS_CONFIG",
                             default=None, help="TOML config file (env APPENDFS_CONFIG)")


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"appendfs: error: {message}", err=True)
    sys.exit(code)


def setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise ConfigError(f"log level {level!r} is not DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=numeric, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_daemon(main: Callable[[], Awaitable[None]]) -> None:
    """Run a daemon's main under trio; SIGTERM/SIGINT end it cleanly."""

    async def wrapper() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return
            nursery.start_soon(on_signal)
            await main()
            nursery.cancel_scope.cancel()

    trio.run(wrapper)


def own_error(exc: BaseException) -> AppendfsError | None:
    """The appendfs error behind ``exc``, looking inside trio's exception groups."""
    if isinstance(exc, AppendfsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = own_error(inner)
            if found is not None:
                return found
    return None


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn appendfs's own errors into one clear line and the right exit status."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            ours = own_error(exc)
            if ours is None:
                raise
            fail(str(ours), 2 if isinstance(ours, (ConfigError, VersionMismatch, ClusterMismatch, NotFormatted)) else 1)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="appendfs")
def main() -> None:
    """appendfs — a distributed POSIX filesystem on append-only LogStreams."""
    from appendfs.runtime import tune_allocator

    tune_allocator()


# ---- format ---------------------------------------------------------------------------


@main.command("format")
@click.argument("meta_url", envvar="APPENDFS_META", metavar="META_URL")
@click.option("--secret-file", type=click.Path(path_type=Path), required=True,
              help="where to write the cluster secret for DataNodes (mode 0600)")
@click.option("--extent-max-bytes", type=click.IntRange(1 << 20, 1 << 30), default=64 << 20, show_default=True,
              help="largest extent")
@guarded
def format_cmd(meta_url: str, secret_file: Path, extent_max_bytes: int) -> None:
    """Create the namespace and cluster schemas and the cluster identity in META_URL."""
    from appendfs.format import format_cluster

    res = format_cluster(meta_url, secret_file, extent_max_bytes)
    verb = "formatted" if res.created else "already formatted"
    click.echo(f"{verb}: cluster {res.cluster_id}; secret file {res.secret_file}")


# ---- daemons --------------------------------------------------------------------------


@main.command("metanode")
@meta_option
@config_option
@click.option("--listen", default=None, metavar="HOST:PORT", help="address to serve on [127.0.0.1:7000]")
@click.option("--advertise", default=None, metavar="HOST:PORT", help="address published for others (default: listen)")
@click.option("--lease-ttl-s", type=float, default=None, help="stream lease lifetime [10]")
@click.option("--dead-after-s", type=float, default=None, help="silence after which a DataNode is dead [5]")
@click.option("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus /metrics here")
@click.option("--log-level", default=None)
@guarded
def metanode_cmd(meta_url: str, config_file: Path | None, **flags: Any) -> None:
    """Run a MetaNode (the cluster manager); standbys take over when the leader dies."""
    from appendfs.config import load
    from appendfs.db import make_engine
    from appendfs.metrics import serve_metrics
    from appendfs.store.metanode.config import MetaNodeConfig
    from appendfs.store.metanode.schema import read_cluster
    from appendfs.store.metanode.service import MetaNode
    from appendfs.store.rpc import ClusterAuth

    cfg = load(MetaNodeConfig, "metanode", file=config_file, flags=flags)
    setup_logging(cfg.log_level)
    engine = make_engine(meta_url, pool_size=6, must_exist=True)
    row = read_cluster(engine)
    node = MetaNode(cfg, engine, ClusterAuth(row.cluster_id, row.secret), int(row.extent_max_bytes))
    serve_metrics(cfg.metrics, "appendfs_metanode", lambda: {**node.stats, "leader": float(node.epoch is not None),
                                                             "datanodes_known": len(node.nodes)})

    async def run() -> None:
        await node.run()
        await trio.sleep_forever()

    run_daemon(run)


@main.command("datanode")
@config_option
@click.option("--listen", default=None, metavar="HOST:PORT", help="address to serve extents on [127.0.0.1:7100]")
@click.option("--advertise", default=None, metavar="HOST:PORT", help="address clients use (default: listen)")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="data directory (one device)")
@click.option("--metanode", default=None, metavar="HOST:PORT[,...]", help="MetaNode addresses")
@click.option("--secret-file", type=click.Path(path_type=Path), default=None, help="cluster secret file")
@click.option("--capacity-bytes", type=int, default=None, help="cap the device's usable bytes")
@click.option("--high-water", type=float, default=None, help="fill fraction above which no new extents [0.95]")
@click.option("--failure-domain", default=None, help="rack/host label; replicas avoid sharing one")
@click.option("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus /metrics here")
@click.option("--log-level", default=None)
@guarded
def datanode_cmd(config_file: Path | None, **flags: Any) -> None:
    """Run a DataNode serving the extents of one data directory."""
    from appendfs.config import load
    from appendfs.metrics import serve_metrics
    from appendfs.store.datanode.config import DataNodeConfig
    from appendfs.store.datanode.extents import ExtentStore
    from appendfs.store.datanode.filebackend import FileBackend
    from appendfs.store.datanode.server import DataNode
    from appendfs.store.identity import claim_data_dir, lock_data_dir, read_secret_file

    cfg = load(DataNodeConfig, "datanode", file=config_file, flags=flags)
    setup_logging(cfg.log_level)
    auth = read_secret_file(cfg.secret_file)
    _lock_fd = lock_data_dir(cfg.data)  # open, hence locked, until the process ends
    ident = claim_data_dir(cfg.data, auth.cluster_id)
    store = ExtentStore(FileBackend(cfg.data, cfg.capacity_bytes, cfg.direct_io), high_water=cfg.high_water,
                        reserve_bytes=cfg.reserve_bytes, read_threads=cfg.read_threads,
                        commit_bytes=cfg.commit_bytes, commit_wait_s=cfg.commit_wait_s,
                        inline_write_bytes=cfg.inline_write_bytes, inline_commit_s=cfg.inline_commit_s)
    recovering = store.recover()
    if recovering:
        log.info("%d extents were open at the last stop; they reconcile with the MetaNode", len(recovering))
    node = DataNode(cfg, auth, ident, store)
    def metrics() -> dict[str, float]:
        u, full = node.device()  # the numbers heartbeats report, for alerts on a filling disk
        return {**store.stats, "device_capacity_bytes": u.capacity_bytes, "device_used_bytes": u.used_bytes,
                "device_free_bytes": u.free_bytes, "device_full": float(full)}
    serve_metrics(cfg.metrics, "appendfs_datanode", metrics)

    async def run() -> None:
        await node.run()
        await trio.sleep_forever()

    run_daemon(run)


# ---- store tools ----------------------------------------------------------------------


@main.group("store")
def store_group() -> None:
    """Raw LogStream tools: put a file into a stream, get it back by locator."""


def _client_config(config_file: Path | None) -> Any:
    from appendfs.config import load
    from appendfs.store.client.config import ClientConfig

    return load(ClientConfig, "client", file=config_file)


@store_group.command("put")
@meta_option
@config_option
@click.option("--redundancy", default="rep:3", show_default=True, help="rep:N, ec:K+M (erasure coded, K+M DataNodes) or rep:N>ec:K+M (transcoded once sealed)")
@click.argument("file", type=click.Path(path_type=Path, allow_dash=True))
@guarded
def store_put(meta_url: str, config_file: Path | None, redundancy: str, file: Path) -> None:
    """Append FILE (or - for stdin) to a new stream; print its locator as the last line."""
    from appendfs.store.placement import PolicyError, parse_policy
    from appendfs.tools import put_file

    try:
        parse_policy(redundancy)
    except PolicyError as exc:
        raise ConfigError(f"--redundancy: {exc}") from None
    cfg = _client_config(config_file)
    setup_logging("WARNING")
    if str(file) != "-" and not file.is_file():
        raise ConfigError(f"{file} is not a readable file")
    locator = trio.run(put_file, meta_url, cfg, file, redundancy)
    click.echo(str(locator))


@store_group.command("get")
@meta_option
@config_option
@click.argument("locator")
@guarded
def store_get(meta_url: str, config_file: Path | None, locator: str) -> None:
    """Write the verified bytes of LOCATOR to stdout."""
    from appendfs.store.client import Locator
    from appendfs.store.errors import BadLocator
    from appendfs.tools import get_to

    try:
        loc = Locator.parse(locator)
    except BadLocator as exc:
        raise ConfigError(str(exc)) from None
    cfg = _client_config(config_file)
    setup_logging("WARNING")
    trio.run(get_to, meta_url, cfg, loc, sys.stdout.buffer)


@main.command("status")
@meta_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@guarded
def status_cmd(meta_url: str, as_json: bool) -> None:
    """Nodes, devices, capacity and extent health, from the leading MetaNode."""
    from appendfs.tools import fetch_status, render_status

    setup_logging("WARNING")
    status = trio.run(fetch_status, meta_url)
    click.echo(json.dumps(status, indent=2, default=str) if as_json else render_status(status))


@main.command("stats")
@click.option("--metrics", "address", default=None, metavar="HOST:PORT",
              help="the mount's Prometheus address (its --metrics)")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="an `appendfs up` directory: the address of its mount, from DIR/run.json")
@click.option("-i", "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="seconds per line")
@click.option("-n", "--count", type=click.IntRange(min=1), default=None, help="stop after this many lines")
@guarded
def stats_cmd(address: str | None, data_dir: Path | None, interval: float, count: int | None) -> None:
    """A mount's FUSE traffic, one line per interval: requests per second and mean latency
    by operation, read/write MiB/s, errors, block-cache hit rate (Ctrl-C stops)."""
    import time
    import urllib.error
    import urllib.request

    from appendfs.mount import statsview

    if (address is None) == (data_dir is None):
        raise ConfigError("give --metrics HOST:PORT (the mount's --metrics) or --data DIR (an `appendfs up` "
                          "directory), one of them")
    if data_dir is not None:
        try:
            run = json.loads((data_dir / "run.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {data_dir / 'run.json'}: {exc}; is `appendfs up --data {data_dir}` "
                              "running?") from None
        address = run.get("metrics", {}).get("mount")
        if address is None:
            raise ConfigError(f"{data_dir / 'run.json'} names no mount with metrics: start `appendfs up` with "
                              "--mount, or give --metrics")
    url = f"http://{address}/metrics"

    def snapshot() -> statsview.Snapshot:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except (OSError, urllib.error.URLError) as exc:
            fail(f"cannot read {url}: {getattr(exc, 'reason', exc)}; is the mount running with --metrics "
                 f"{address}?", 1)
        try:
            return statsview.parse(text)
        except ValueError as exc:
            fail(f"{url}: {exc}", 1)

    prev = snapshot()
    click.echo(statsview.header())
    shown = 0
    try:
        while count is None or shown < count:
            time.sleep(max(0.0, prev.at + interval - time.monotonic()))
            cur = snapshot()
            click.echo(statsview.line(prev, cur))
            prev, shown = cur, shown + 1
    except KeyboardInterrupt:
        pass


@main.group("node")
def node_group() -> None:
    """DataNode administration: drain a node before removing it."""


@node_group.command("drain")
@meta_option
@click.argument("node_id")
@click.option("--cancel", is_flag=True, help="stop draining: the node takes new extents again")
@guarded
def node_drain(meta_url: str, node_id: str, cancel: bool) -> None:
    """Move every extent off NODE_ID (see `appendfs status` for progress); it gets no new
    extents meanwhile and is shown `drained` once it holds nothing and can be removed."""
    from appendfs.tools import drain_node

    setup_logging("WARNING")
    state = trio.run(drain_node, meta_url, node_id, cancel)
    click.echo(f"node {node_id}: {state}")


@main.command("mount")
@meta_option
@config_option
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("-f", "--foreground", is_flag=True, help="stay in the foreground (default: daemon once mounted)")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="allow_other, direct_io, fsname=NAME, ro/nosuid/nodev/noexec/noatime…; fstab's defaults/_netdev/noauto are ignored")
@click.option("--log-file", type=click.Path(path_type=Path), default=None,
              help="daemon log [/var/log/appendfs/mount-<mountpoint>.log]")
@click.option("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus /metrics here")
@click.option("--log-level", default=None)
@guarded
def mount_cmd(meta_url: str, config_file: Path | None, mountpoint: Path, foreground: bool, options: tuple[str, ...],
              log_file: Path | None, **flags: Any) -> None:
    """Mount the filesystem at MOUNTPOINT (unmount with `umount MOUNTPOINT` or SIGTERM)."""
    from appendfs.config import load
    from appendfs.fs import FsConfig
    from appendfs.mount.config import MountConfig
    from appendfs.mount.main import IGNORED_OPTIONS, KERNEL_OPTIONS, run
    from appendfs.store.client.config import ClientConfig

    kernel: set[str] = set()
    for opt in ",".join(options).split(","):
        key, _, value = opt.strip().partition("=")
        if not key or key in IGNORED_OPTIONS or key.startswith(("x-", "comment=")):
            continue
        if key in KERNEL_OPTIONS:
            kernel.add(key)
        elif key in ("allow_other", "direct_io"):
            flags[key] = True
        elif key == "fsname" and value:
            flags["fsname"] = value
        elif key == "default_permissions":
            pass  # always on
        else:
            raise ConfigError(f"-o {opt}: unknown mount option (see `appendfs mount --help`)")
    mcfg = load(MountConfig, "mount", file=config_file, flags=flags)
    fcfg = load(FsConfig, "fs", file=config_file)
    ccfg = load(ClientConfig, "client", file=config_file)
    setup_logging(mcfg.log_level)
    mountpoint = mountpoint.absolute()
    if not foreground and log_file is None:
        log_file = Path("/var/log/appendfs") / f"mount{str(mountpoint).replace('/', '-')}.log"
    sys.exit(run(meta_url, mountpoint, mcfg, fcfg, ccfg, foreground=foreground, kernel_options=frozenset(kernel),
                 log_file=log_file))


# ---- S3 gateway ---------------------------------------------------------------------------


@main.group("s3", invoke_without_command=True)
@click.option("--meta", "meta_url", envvar="APPENDFS_META", default=None, metavar="META_URL",
              help="database URL (env APPENDFS_META)")
@config_option
@click.option("--listen", default=None, metavar="HOST:PORT", help="address to serve HTTP on [127.0.0.1:9000]")
@click.option("--region", default=None, help="region clients sign for [us-east-1]")
@click.option("--tls-cert-file", default=None, metavar="PEM", help="serve HTTPS with this certificate")
@click.option("--tls-key-file", default=None, metavar="PEM", help="private key of --tls-cert-file")
@click.option("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus /metrics here")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="gateway processes sharing the socket [0: one per CPU, at most 8]")
@click.option("--log-level", default=None)
@click.pass_context
@guarded
def s3_group(ctx: click.Context, meta_url: str | None, config_file: Path | None, **flags: Any) -> None:
    """Run an S3 gateway over the namespace (`appendfs s3 --meta URL --listen HOST:PORT`);
    `appendfs s3 keys ...` manages access keys."""
    if ctx.invoked_subcommand is not None:
        return
    if not meta_url:
        raise ConfigError("--meta META_URL (or APPENDFS_META) is required to run the gateway")
    from appendfs.config import load
    from appendfs.fs import FsConfig
    from appendfs.s3.config import S3Config
    from appendfs.s3.server import run_gateway
    from appendfs.store.client.config import ClientConfig

    cfg = load(S3Config, "s3", file=config_file, flags=flags)
    fcfg = load(FsConfig, "fs", file=config_file)
    ccfg = load(ClientConfig, "client", file=config_file)
    setup_logging(cfg.log_level)

    sys.exit(run_gateway(meta_url, cfg, fcfg, ccfg, run_daemon))


@s3_group.group("keys")
def s3_keys() -> None:
    """Create, list and delete S3 access keys (each belongs to a tenant)."""


def _meta(meta_url: str) -> Any:
    from appendfs.meta import Meta, check_schema

    meta = Meta.from_url(meta_url)
    check_schema(meta.engine)
    return meta


@s3_keys.command("create")
@meta_option
@click.option("--tenant", default="default", show_default=True, help="tenant the key acts for (created if new)")
@click.option("--uid", type=click.IntRange(0), default=None, help="uid of objects the tenant creates [0 for a new tenant]")
@click.option("--gid", type=click.IntRange(0), default=None, help="gid of objects the tenant creates [0 for a new tenant]")
@click.option("--file-mode", default=None, help="mode of new objects, octal [0644 for a new tenant]")
@click.option("--dir-mode", default=None, help="mode of new directories, octal [0755 for a new tenant]")
@guarded
def s3_keys_create(meta_url: str, tenant: str, uid: int | None, gid: int | None, file_mode: str | None,
                   dir_mode: str | None) -> None:
    """Create a key pair; prints the access key id and the secret (shown only now)."""
    from appendfs.s3.keys import create_key

    key = create_key(_meta(meta_url), tenant, uid, gid, file_mode, dir_mode)
    click.echo(f"access_key_id = {key.access_key}")
    click.echo(f"secret_access_key = {key.secret_key}")
    t = key.tenant
    click.echo(f"# tenant {t.name}: objects uid {t.uid} gid {t.gid} mode {t.file_mode:04o}, "
               f"directories mode {t.dir_mode:04o}", err=True)


@s3_keys.command("list")
@meta_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@guarded
def s3_keys_list(meta_url: str, as_json: bool) -> None:
    """Access keys with their tenants (secrets are not shown)."""
    from appendfs.s3.keys import render_keys

    keys = _meta(meta_url).s3_keys()
    click.echo(render_keys(keys, as_json))


@s3_keys.command("delete")
@meta_option
@click.argument("access_key")
@guarded
def s3_keys_delete(meta_url: str, access_key: str) -> None:
    """Delete an access key (gateways stop accepting it within 10 s)."""
    if not _meta(meta_url).s3_key_delete(access_key):
        fail(f"no access key {access_key} (see `appendfs s3 keys list`)", 1)
    click.echo(f"deleted {access_key}")


@main.command("up")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True, help="directory for everything")
@click.option("--mount", "mountpoint", type=click.Path(path_type=Path), default=None, help="mount the filesystem here")
@click.option("--s3", "s3_address", default=None, metavar="HOST:PORT", help="serve S3 here")
@guarded
def up_cmd(data_dir: Path, mountpoint: Path | None, s3_address: str | None) -> None:
    """Run a whole single-host cluster (MetaNode, 3 DataNodes, the mount) on the embedded SQLite default."""
    from appendfs.config import parse_host_port
    from appendfs.up import run_up

    if s3_address is not None:
        try:
            parse_host_port(s3_address)
        except ValueError as exc:
            raise ConfigError(f"--s3 {s3_address}: {exc}") from None
    sys.exit(run_up(data_dir, mountpoint, s3_address))
