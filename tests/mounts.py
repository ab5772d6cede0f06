"""Real FUSE mounts for tests: `appendfs mount --foreground` as a child process.

A :class:`Mount` starts the mount against a running :class:`cluster.Cluster`, waits until
the kernel shows it mounted, and stops it with SIGTERM (a clean unmount). ``kill()``
SIGKILLs it and detaches the dead mount so the directory can be mounted again.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

from cluster import APPENDFS, Cluster, wait_for

from appendfs.mount.main import detach_mount


def drop_page_cache(root: Path) -> None:
    """Forget the kernel's cached pages of the file ``root`` or of every file below it, so
    the next reads go through the mount to the file layer and the store."""
    paths = [root] if root.is_file() else [Path(dp, n) for dp, _, ns in os.walk(root) for n in ns]
    for p in paths:
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fuse_available() -> str | None:
    """None when FUSE mounts can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "FUSE tests mount as root (run the suite with sudo ./dev test)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


class Mount:
    #: Mounts started and not yet stopped or killed, for the suite's hang guard (conftest).
    live: ClassVar[set[Mount]] = set()

    def __init__(self, cluster: Cluster, path: Path, *args: str, env: dict[str, str] | None = None,
                 name: str = "mount") -> None:
        self.cluster = cluster
        self.path = path
        self.args = list(args)
        self.env = {**cluster.env, "APPENDFS_FS_FLUSH_AGE_S": "1", **(env or {})}
        self.log = cluster.root / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        path.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 60) -> Mount:
        with open(self.log, "ab") as f:
            self.popen = subprocess.Popen(
                [*APPENDFS, "mount", "--meta", self.cluster.meta_url, "--foreground", *self.args, str(self.path)],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)

        def up() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"mount exited with {self.popen.returncode}:\n{self.text()[-3000:]}")
            return os.path.ismount(self.path)
        Mount.live.add(self)
        wait_for(up, f"{self.path} to be mounted", timeout_s)
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> int | None:
        """SIGTERM: unmount cleanly; returns the exit status (None if it had to be killed)."""
        if self.popen is None:
            return None
        code: int | None = None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                code = self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        else:
            code = self.popen.returncode
        Mount.live.discard(self)
        self.detach()
        return code

    def kill(self) -> None:
        """SIGKILL: the kernel aborts every request the mount had not answered (a program
        blocked in one gets ENOTCONN — the one way to end a call stuck in a FUSE request,
        which not even SIGKILL of the program interrupts)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()
        Mount.live.discard(self)
        self.detach()

    def detach(self) -> None:
        """Remove a (dead) mount from the kernel's table so the directory is usable again."""
        detach_mount(self.path)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
