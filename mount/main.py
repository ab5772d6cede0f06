"""Running a mount: checks before mounting, the trio main loop, daemon mode, clean unmount.

``appendfs mount --meta META_URL MOUNTPOINT`` (and ``mount.appendfs`` from /etc/fstab) end
here. Order of a mount's life:

1. :func:`preflight` — the mountpoint is a directory, not already (or formerly, by a
   dead process) a mount; ``/dev/fuse`` can be opened. Each failure is one clear line.
2. Daemon mode forks before any thread or trio run; the parent waits on a pipe until the
   child reports "mounted" (exit 0) or the reason it could not mount (exit 1).
3. :func:`serve` connects the :class:`~appendfs.fs.FileSystem`, mounts with pyfuse3 and
   serves until SIGTERM/SIGINT or an external ``umount``; then it stops taking requests,
   unmounts, commits buffered data and releases its session and streams.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from appendfs.errors import AppendfsError
from appendfs.fs import FileSystem, FsConfig
from appendfs.mount.config import MountConfig
from appendfs.mount.ops import Operations
from appendfs.store.client import ClientConfig

log = logging.getLogger(__name__)

#: Options passed through to the kernel mount as they are.
KERNEL_OPTIONS = frozenset({"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime",
                            "atime", "relatime", "sync", "async", "dirsync"})
#: fstab options that concern mount(8) or systemd, not us.
IGNORED_OPTIONS = frozenset({"defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail"})


class MountError(AppendfsError):
    """The mount cannot start; the message says why and what to do."""


def _dead_mount(mountpoint: Path) -> MountError:
    return MountError(f"{mountpoint} is a dead FUSE mount (its process died): run "
                      f"`fusermount3 -u {mountpoint}` (or `umount -l {mountpoint}`), then mount again")


def preflight(mountpoint: Path) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist (mkdir -p {mountpoint})") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _dead_mount(mountpoint) from None
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint) or not (st.st_mode & 0o040000):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        # stat may have been answered from the kernel's attribute cache (for up to the
        # attribute TTL after the server died); statfs always asks the FUSE server.
        try:
            os.statvfs(mountpoint)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise _dead_mount(mountpoint) from None
        raise MountError(f"{mountpoint} is busy: something is already mounted there (see `findmnt {mountpoint}`)")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except FileNotFoundError:
        raise MountError("FUSE is not available: /dev/fuse is missing (apt-get install fuse3; modprobe fuse)") from None
    except OSError as exc:
        raise MountError(f"FUSE is not available: /dev/fuse: {exc.strerror} (in a container, pass --device /dev/fuse)") from None


def detach_mount(mountpoint: Path) -> None:
    """Remove a mount left at ``mountpoint`` — typically a dead FUSE mount (ENOTCONN) of a
    killed mount process — so the directory can be mounted again (lazy unmount)."""
    try:
        os.stat(mountpoint)
        mounted = os.path.ismount(mountpoint)
    except OSError:
        mounted = True
    if mounted:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def fuse_options(mcfg: MountConfig, extra: frozenset[str] = frozenset()) -> set[str]:
    opts = {"default_permissions", f"fsname={mcfg.fsname}", "subtype=appendfs", *extra}
    if mcfg.allow_other:
        opts.add("allow_other")
    return opts


async def serve(meta_url: str, mountpoint: Path, mcfg: MountConfig, fcfg: FsConfig, ccfg: ClientConfig,
                kernel_options: frozenset[str] = frozenset(), ready: Callable[[], None] | None = None) -> None:
    # The signals stay caught until the buffered data is committed: the first unmounts; a
    # second (an impatient Ctrl-C) is logged, not obeyed — with the default action back it
    # used to end the process in the middle of the shutdown's commits.
    state = _Session()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as watcher:
            async def on_signals() -> None:
                stopping = False
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stopping:
                        log.warning("%s: already stopping; committing buffered data first (kill -9 abandons it)",
                                    name)
                        continue
                    stopping = True
                    if state.mounted:
                        log.info("%s: unmounting %s", name, mountpoint)
                        pyfuse3.terminate()  # (only between init and close: the session exists)
                    elif not state.started:
                        log.info("%s: stopping before the mount was up", name)
                        watcher.cancel_scope.cancel()
                    else:
                        log.info("%s: already unmounted; committing buffered data", name)
            watcher.start_soon(on_signals)
            try:
                await _serve(meta_url, mountpoint, mcfg, fcfg, ccfg, kernel_options, ready, state)
            finally:
                watcher.cancel_scope.cancel()


@dataclass
class _Session:
    """Where the FUSE session is, for the signal handler: pyfuse3.terminate() needs one."""

    started: bool = False  # pyfuse3.init was called
    mounted: bool = False  # ... and pyfuse3.close not yet


async def _serve(meta_url: str, mountpoint: Path, mcfg: MountConfig, fcfg: FsConfig, ccfg: ClientConfig,
                 kernel_options: frozenset[str], ready: Callable[[], None] | None, state: _Session) -> None:
    from appendfs.metrics import serve_metrics
    from appendfs.mount.opstats import metric_families

    async with FileSystem.connect(meta_url, fcfg, ccfg, owner=f"mount:{os.uname().nodename}:{mountpoint}") as fs:
        ops = Operations(fs, mcfg.slow_request_s, direct_io=mcfg.direct_io)
        serve_metrics(mcfg.metrics, "appendfs_mount", lambda: {**fs.stats(), **fs.client.stats},
                      lambda: metric_families(ops.op_stats))
        state.started = True
        try:
            pyfuse3.init(ops, str(mountpoint), fuse_options(mcfg, kernel_options))
        except RuntimeError as exc:
            raise MountError(f"cannot mount {mountpoint}: {exc}") from None
        state.mounted = True
        log.info("mounted %s at %s", meta_url, mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tune_read_ahead, mountpoint, mcfg.read_ahead_kb)
                if ready is not None:
                    ready()
                await pyfuse3.main(min_tasks=4, max_tasks=mcfg.max_tasks)
                nursery.cancel_scope.cancel()
        finally:
            state.mounted = False
            pyfuse3.close(unmount=True)
        log.info("unmounted %s; committing buffered data", mountpoint)


async def tune_read_ahead(mountpoint: Path, kb: int) -> None:
    """Set the readahead once the kernel has processed FUSE INIT (its reply resets it):
    checked for two seconds after mounting, set again if it was reset."""
    for _ in range(20):
        await trio.sleep(0.1)
        if not set_read_ahead(mountpoint, kb):
            return


def set_read_ahead(mountpoint: Path, kb: int) -> bool:
    """Raise the kernel's readahead for this mount (its backing-device info). With the
    default 128 KiB every sequential FUSE read is 128 KiB and a cold 1 GiB read takes
    8,192 requests; with 4 MiB the kernel asks for 1 MiB at a time (max_write/max_pages)
    and keeps several in flight: 428 → 746 MB/s in docs/benchmarks.md. Needs root.
    Returns False when it cannot be set (stop trying)."""
    if kb <= 0:
        return True
    # Not os.stat(mountpoint): that would ask our own FUSE server, which is not serving yet.
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint) and " - fuse" in line:
                dev = fields[2]
    if dev is None:
        return True  # not visible yet: try again
    path = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    try:
        if int(path.read_text()) != kb:
            path.write_text(str(kb))
        return True
    except (OSError, ValueError) as exc:
        log.warning("could not set %s to %d (%s): sequential reads use the kernel's default readahead",
                    path, kb, getattr(exc, "strerror", exc))
        return False


def run(meta_url: str, mountpoint: Path, mcfg: MountConfig, fcfg: FsConfig, ccfg: ClientConfig, *,
        foreground: bool, kernel_options: frozenset[str] = frozenset(), log_file: Path | None = None) -> int:
    """Mount; in daemon mode return in the parent once the child mounted (or failed)."""
    preflight(mountpoint)
    if foreground:
        trio.run(serve, meta_url, mountpoint, mcfg, fcfg, ccfg, kernel_options)
        return 0
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            answer = pipe.read().decode(errors="replace")
        if answer.startswith("ok"):
            print(f"appendfs: mounted at {mountpoint} (pid {pid}; log {log_file or 'discarded'})", file=sys.stderr)
            return 0
        os.waitpid(pid, 0)
        print(f"appendfs: error: {answer or 'the mount process died before mounting'}", file=sys.stderr)
        return 1
    os.close(r)
    os.setsid()
    _redirect(log_file)

    def ready() -> None:
        os.write(w, b"ok")
        os.close(w)

    code = 0
    try:
        trio.run(serve, meta_url, mountpoint, mcfg, fcfg, ccfg, kernel_options, ready)
    except BaseException as exc:  # report to the waiting parent, if it still waits
        from appendfs.cli import own_error

        ours = own_error(exc)
        msg = str(ours) if ours is not None else f"{type(exc).__name__}: {exc}"
        log.error("mount failed: %s", msg, exc_info=ours is None)
        try:
            os.write(w, msg.encode())
            os.close(w)
        except OSError:
            pass
        code = 1
    os._exit(code)


def _redirect(log_file: Path | None) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    else:
        out = devnull
    os.dup2(out, 1)
    os.dup2(out, 2)
