"""Run one sequence of POSIX operations on the mount and on a local directory; compare.

A *scenario* is a function of a :class:`Recorder`. :func:`run_both` runs it twice: in a
fresh directory on the local file system (the reference: ext4 or whatever ``/tmp`` is)
and in a fresh directory of the same name on the mount. During a run the process's
working directory is the scenario's directory, so scenarios use relative paths and are
written once for both sides.

Every operation goes through the recorder, which logs ``(label, outcome)``: the value
returned (a stat as its comparable fields, an fd as ``"fd"``) or ``"!ERRNO"`` for an
OSError. Timestamps are never logged as values: scenarios log *relations* ("mtime
advanced", "ctime unchanged"), since the two sides run at different times.
:func:`run_both` then asserts that both logs are equal, step by step, and that every
outcome a scenario declared with ``expect=`` happened on both sides (so a scenario that
stopped testing what it claims to fails too).

Unprivileged steps run in a child process as uid/gid 65534 (:meth:`Recorder.as_user`):
the child starts in the scenario directory (``cwd`` is entered before privileges are
dropped), so the parents of the directory need not be traversable by that user.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

NOBODY = 65534
#: Another group 65534 is not a member of (Debian's "users").
OTHER_GID = 100
#: Long enough for both clocks to move between two operations whose times we compare
#: (ext4 stamps with the coarse kernel clock; the mount's directory mtimes move at most
#: every 100 ms, MetaConfig.dir_mtime_granularity_ns). Only a pause, never asserted on.
TICK_S = 0.12
#: An instant long past, to which scenarios set atime/mtime before an operation so that
#: "advanced" needs no pause.
PAST_NS = 1_000_000_000

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int

_UNSET: Any = object()


def renameat2(old: str, new: str, flags: int) -> None:
    """renameat2(2) relative to the working directory; raises OSError like os.rename."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def errname(exc: OSError) -> str:
    """``"!ENOENT"``; ENOTSUP and EOPNOTSUPP are one number on Linux, named EOPNOTSUPP."""
    code = exc.errno or 0
    return "!EOPNOTSUPP" if code == errno.EOPNOTSUPP else "!" + errno.errorcode.get(code, str(code))


def stat_view(mode: int, nlink: int, uid: int, gid: int, size: int, rdev: int) -> dict[str, Any]:
    """The stat fields both sides must agree on (directory sizes and st_blocks differ by design)."""
    view: dict[str, Any] = {"mode": stat.filemode(mode), "nlink": nlink, "uid": uid, "gid": gid}
    if not stat.S_ISDIR(mode):
        view["size"] = size
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        view["rdev"] = (os.major(rdev), os.minor(rdev))
    return view


def normalize(value: Any) -> Any:
    if isinstance(value, os.stat_result):
        return stat_view(value.st_mode, value.st_nlink, value.st_uid, value.st_gid, value.st_size, value.st_rdev)
    if isinstance(value, tuple):
        return [normalize(v) for v in value]
    return value


class Fd(int):
    """A file descriptor that shows in labels by its order of opening, not its number."""

    tag: str

    def __repr__(self) -> str:
        return self.tag


class Recorder:
    """One side of a comparison: runs operations in ``root`` and logs their outcomes."""

    def __init__(self, root: Path, side: str) -> None:
        self.root = root
        self.side = side
        self.log: list[tuple[str, Any]] = []
        self.expects: list[tuple[int, Any]] = []
        self.fds: set[int] = set()
        self._opened = 0

    # ---- recording ------------------------------------------------------------------

    def note(self, label: str, outcome: Any, expect: Any = _UNSET) -> None:
        """Log an outcome computed by the scenario (a relation, a digest …)."""
        self.log.append((label, outcome))
        if expect is not _UNSET:
            self.expects.append((len(self.log) - 1, expect))

    def do(self, fn: Callable[..., Any], *args: Any, label: str | None = None, expect: Any = _UNSET,
           **kw: Any) -> Any:
        """Call ``fn``; log its normalized result or its errno. Returns the raw result (None on error)."""
        if label is None:
            shown = [repr(a) if not isinstance(a, bytes) or len(a) <= 40 else f"<{len(a)} bytes>" for a in args]
            shown += [f"{k}={v!r}" for k, v in kw.items()]
            label = f"{getattr(fn, '__name__', fn)}({', '.join(shown)})"
        try:
            value = fn(*args, **kw)
        except OSError as exc:
            self.note(label, errname(exc), expect)
            return None
        self.note(label, normalize(value), expect)
        return value

    # ---- common operations ----------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o644, expect: Any = _UNSET) -> Fd | None:
        label = f"open({path!r}, {_flag_names(flags)}, {mode:o})"
        try:
            fd = os.open(path, flags, mode)
        except OSError as exc:
            self.note(label, errname(exc), expect)
            return None
        return self.adopt(fd, label, expect)

    def adopt(self, fd: int, label: str, expect: Any = _UNSET) -> Fd:
        """Track a descriptor made outside :meth:`open` (os.dup …); closed at the end."""
        self.fds.add(fd)
        self._opened += 1
        out = Fd(fd)
        out.tag = f"fd{self._opened}"
        self.note(label, out.tag, expect)
        return out

    def close(self, fd: int, expect: Any = _UNSET) -> None:
        self.fds.discard(fd)
        self.do(os.close, fd, label="close", expect=expect)

    def stat(self, path: str, follow: bool = True, expect: Any = _UNSET) -> os.stat_result | None:
        fn = os.stat if follow else os.lstat
        return self.do(fn, path, expect=expect)

    def write(self, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
              mode: int = 0o644) -> None:
        """open + write + close, each logged."""
        fd = self.open(path, flags, mode)
        if fd is not None:
            self.do(os.write, fd, data)
            self.close(fd)

    def read(self, path: str, expect: Any = _UNSET) -> bytes | None:
        """The whole file (logged in full when short, else as length + a digest)."""
        label = f"read_file({path!r})"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self.note(label, errname(exc), expect)
            return None
        self.note(label, digest(data), expect)
        return data

    def times(self, path: str, follow: bool = True) -> os.stat_result:
        """A stat for timestamp relations (not logged; raises if the path is missing)."""
        return os.stat(path) if follow else os.lstat(path)

    def relation(self, what: str, before: os.stat_result, after: os.stat_result, field: str,
                 expect: str | None) -> None:
        """Log whether ``field`` (mtime, ctime, atime) advanced, stayed, or went back;
        ``expect=None``: whatever the local file system does is the rule."""
        a, b = getattr(before, f"st_{field}_ns"), getattr(after, f"st_{field}_ns")
        outcome = "advanced" if b > a else "unchanged" if b == a else "went back"
        self.note(f"{what}: {field}", outcome, _UNSET if expect is None else expect)

    def listdir(self, path: str = ".", expect: Any = _UNSET) -> list[str] | None:
        return self.do(lambda p: sorted(os.listdir(p)), path, label=f"listdir({path!r})", expect=expect)

    def same_file(self, a: str, b: str, follow: bool = True) -> None:
        f = os.stat if follow else os.lstat
        sa, sb = f(a), f(b)
        self.note(f"{a!r} and {b!r} are one inode", (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino))

    def set_past(self, *paths: str) -> None:
        """atime = mtime = PAST_NS (then ctime is 'now'); pause so later changes are later."""
        for p in paths:
            os.utime(p, ns=(PAST_NS, PAST_NS), follow_symlinks=False)
        time.sleep(TICK_S)

    def close_all(self) -> None:
        for fd in list(self.fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    # ---- as an unprivileged user ----------------------------------------------------

    def as_user(self, steps: list[tuple[Any, ...]], *, umask: int = 0o022, uid: int = NOBODY,
                gid: int = NOBODY, expect: dict[int, Any] | None = None) -> list[Any]:
        """Run ``steps`` (``(op, *args)``, see :data:`_CHILD`) in one child process as
        ``uid``/``gid`` with no supplementary groups; log ``user <op>(args)`` per step.

        ``expect`` maps a step's index to the outcome it must have on both sides."""
        python = shutil.which("python3", path="/usr/bin:/bin")
        if python is None:
            raise AssertionError("no /usr/bin/python3 for the unprivileged child (the venv's lies under /root)")
        proc = subprocess.run(
            [python, "-I", "-c", _CHILD], input=json.dumps([list(s) for s in steps]).encode(),
            capture_output=True, cwd=self.root, user=uid, group=gid, extra_groups=[], umask=umask,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, timeout=120, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"unprivileged child failed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
        results = json.loads(proc.stdout)
        out = []
        for i, (step, res) in enumerate(zip(steps, results, strict=True)):
            if isinstance(res, dict) and "stat" in res:
                res = stat_view(*res["stat"])
            want = expect.get(i, _UNSET) if expect else _UNSET
            self.note(f"user {step[0]}{tuple(step[1:])!r}", res, want)
            out.append(res)
        return out


#: The unprivileged child: reads ``[[op, *args], ...]`` as JSON on stdin, runs each with
#: paths relative to its cwd, prints a JSON list of outcomes (a stat as {"stat": fields},
#: bytes decoded, errors as "!ERRNO"). Ops: any ``os`` function, plus the ones below.
_CHILD = r"""
import errno, json, os, sys

def st(s):
    return {"stat": [s.st_mode, s.st_nlink, s.st_uid, s.st_gid, s.st_size, s.st_rdev]}

def create(path, mode):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))

def write_file(path, text, append=False):
    flags = os.O_WRONLY | (os.O_APPEND if append else 0)
    fd = os.open(path, flags)
    try:
        return os.write(fd, text.encode())
    finally:
        os.close(fd)

def read_file(path):
    with open(path, "rb") as f:
        return f.read().decode()

def open_flags(path, flags):
    os.close(os.open(path, flags))
    return "ok"

SPECIAL = {
    "stat": lambda p: st(os.stat(p)),
    "lstat": lambda p: st(os.lstat(p)),
    "listdir": lambda p: sorted(os.listdir(p)),
    "create": create,
    "write_file": write_file,
    "read_file": read_file,
    "open_flags": open_flags,
    "setxattr": lambda p, n, v: os.setxattr(p, n, v.encode()),
    "getxattr": lambda p, n: os.getxattr(p, n).decode(),
    "listxattr": lambda p: sorted(os.listxattr(p)),
    "utime_now": lambda p: os.utime(p, None),
    "utime_ns": lambda p, a, m: os.utime(p, ns=(a, m)),
}

out = []
for op, *args in json.loads(sys.stdin.read()):
    try:
        value = SPECIAL[op](*args) if op in SPECIAL else getattr(os, op)(*args)
    except OSError as exc:
        code = exc.errno
        value = "!EOPNOTSUPP" if code == errno.EOPNOTSUPP else "!" + errno.errorcode.get(code, str(code))
    out.append(value)
print(json.dumps(out))
"""


def digest(data: bytes) -> Any:
    """Short data as itself; long data as (length, a fingerprint of its bytes)."""
    if len(data) <= 64:
        return data
    import hashlib

    return [len(data), hashlib.sha256(data).hexdigest()[:16]]


def _flag_names(flags: int) -> str:
    names = [n for n in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND", "O_DIRECTORY",
                         "O_NOFOLLOW", "O_NONBLOCK") if flags & getattr(os, n)]
    return "|".join(names) or "O_RDONLY"


Scenario = Callable[[Recorder], None]


@contextlib.contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def run_both(mount_base: Path, local_base: Path, name: str, scenario: Scenario) -> dict[str, Recorder]:
    """Run ``scenario`` in ``local_base/name`` then ``mount_base/name``; assert the logs agree."""
    recs: dict[str, Recorder] = {}
    old_umask = os.umask(0o022)
    try:
        for side, base in (("local", local_base), ("mount", mount_base)):
            root = base / name
            root.mkdir()
            os.chmod(root, 0o755)
            r = recs[side] = Recorder(root, side)
            try:
                with _in_dir(root):
                    scenario(r)
            finally:
                r.close_all()
    finally:
        os.umask(old_umask)
    for i, (label, outcome) in enumerate(recs["mount"].log):  # shown by pytest on failure
        print(f"{i:3d} {label} -> {outcome!r}")
    check_logs(recs["local"], recs["mount"])
    return recs


def check_logs(local: Recorder, mount: Recorder) -> None:
    problems: list[str] = []
    for i in range(max(len(local.log), len(mount.log))):
        lo = local.log[i] if i < len(local.log) else ("<nothing>", None)
        mo = mount.log[i] if i < len(mount.log) else ("<nothing>", None)
        if lo[0] != mo[0]:
            problems.append(f"step {i}: the runs diverged: local did {lo[0]}, mount did {mo[0]}")
            break
        if lo[1] != mo[1]:
            problems.append(f"step {i}: {lo[0]}\n    mount: {mo[1]!r}\n    local: {lo[1]!r}")
    for rec in (local, mount):
        for i, want in rec.expects:
            label, got = rec.log[i]
            if got != want:
                problems.append(f"step {i} on {rec.side}: {label} gave {got!r}, the scenario expects {want!r}")
    if problems:
        raise AssertionError("mount and local directory differ:\n" + "\n".join(problems))
