"""Permissions and ownership as an unprivileged user, compared with a local directory.

The mount runs with ``allow_other`` and ``default_permissions``: the kernel checks
permissions against the attributes the mount returns, and the mount sets owners, keeps
modes and clears privilege bits. Each scenario prepares files as root (identically on
both sides), then runs steps as uid/gid 65534 without supplementary groups in a child
process (:meth:`posix_harness.Recorder.as_user`), then looks at the result as root.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounts import Mount
from posix_harness import NOBODY, OTHER_GID, Recorder, Scenario, run_both

Run = Callable[[Scenario], dict[str, Recorder]]
W_CREAT_EXCL = os.O_WRONLY | os.O_CREAT | os.O_EXCL


@pytest.fixture
def posix(module_mount: Mount, request: pytest.FixtureRequest) -> Iterator[Run]:
    """run(scenario): the scenario on the mount and in a local directory under /tmp whose
    parents 65534 may traverse (pytest's tmp_path lies below a 0700 directory)."""
    if shutil.which("python3", path="/usr/bin:/bin") is None:
        print("SKIP REASON: no system python3 the unprivileged user may run")
        pytest.skip("no /usr/bin/python3")
    local = Path(tempfile.mkdtemp(prefix="posix-users-", dir="/tmp"))
    os.chmod(local, 0o755)
    name = request.node.originalname
    yield lambda scenario: run_both(module_mount.path, local, name, scenario)
    shutil.rmtree(local, ignore_errors=True)


def test_private_directory_of_root(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "private", 0o700)
        r.write("private/f", b"secret")
        r.do(os.mkdir, "listonly", 0o704)  # r but no x for others: names, no access
        r.do(os.chmod, "listonly", 0o704)
        r.write("listonly/g", b"g")
        r.do(os.mkdir, "traverse", 0o711)  # x but no r: access by name only
        r.write("traverse/h", b"h")
        r.as_user([
            ("stat", "private"),
            ("stat", "private/f"),
            ("listdir", "private"),
            ("read_file", "private/f"),
            ("create", "private/new", 0o644),
            ("unlink", "private/f"),
            ("access", "private", os.R_OK),
            ("access", "private", os.X_OK),
            ("listdir", "listonly"),
            ("stat", "listonly/g"),
            ("listdir", "traverse"),
            ("read_file", "traverse/h"),
            ("create", ".", 0o644),
            ("create", "in_parent", 0o644),  # the scenario directory is root's 0755
            ("mkdir", "newdir"),
        ], expect={1: "!EACCES", 2: "!EACCES", 4: "!EACCES", 9: "!EACCES", 10: "!EACCES",
                   11: "h", 13: "!EACCES"})
        r.listdir("private")

    posix(s)


def test_create_as_user_owner_and_umask(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "open")
        r.do(os.chmod, "open", 0o777)
        r.do(os.mkdir, "sgid")
        r.do(os.chown, "sgid", 0, OTHER_GID)
        r.do(os.chmod, "sgid", 0o2777)
        r.as_user([
            ("create", "open/f", 0o666),
            ("stat", "open/f"),
            ("mkdir", "open/d", 0o777),
            ("stat", "open/d"),
            ("mkfifo", "open/p", 0o666),
            ("stat", "open/p"),
            ("symlink", "f", "open/l"),
            ("lstat", "open/l"),
            ("create", "open/exec", 0o777),
            ("stat", "open/exec"),
            # in a setgid directory: the directory's group, even though 65534 is no member
            ("create", "sgid/f", 0o666),
            ("stat", "sgid/f"),
            ("mkdir", "sgid/d", 0o777),
            ("stat", "sgid/d"),
            ("create", "sgid/g", 0o2775),  # setgid asked for, on a group the user is not in
            ("stat", "sgid/g"),
            ("mknod", "open/chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3)),
        ], umask=0o027, expect={16: "!EPERM"})
        for p in ("open/f", "open/d", "open/exec", "sgid/f", "sgid/d", "sgid/g"):
            r.stat(p)

    posix(s)


def test_chmod_chown_utime_by_non_owner(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "d")
        r.do(os.chmod, "d", 0o777)
        r.write("d/root644", b"root's")
        r.write("d/root666", b"everyone's")
        r.do(os.chmod, "d/root666", 0o666)
        r.write("d/mine", b"mine")
        r.do(os.chown, "d/mine", NOBODY, NOBODY)
        r.write("d/mine_other_group", b"x")
        r.do(os.chown, "d/mine_other_group", NOBODY, OTHER_GID)
        r.as_user([
            ("chmod", "d/root644", 0o777),
            ("chown", "d/root644", NOBODY, -1),
            ("chown", "d/mine", 0, -1),
            ("chown", "d/mine", -1, OTHER_GID),
            ("chown", "d/mine", -1, NOBODY),
            ("chmod", "d/mine", 0o4755),
            ("stat", "d/mine"),
            ("chmod", "d/mine_other_group", 0o2755),  # silently loses setgid: not in the group
            ("stat", "d/mine_other_group"),
            ("chmod", "d/mine_other_group", 0o1755),  # sticky on a file: allowed to the owner
            ("stat", "d/mine_other_group"),
            ("utime_now", "d/root666"),  # writable: "now" is allowed
            ("utime_ns", "d/root666", 10**9, 10**9),  # explicit times: owner only
            ("utime_now", "d/root644"),
            ("utime_ns", "d/mine", 10**9, 2 * 10**9),
            ("open_flags", "d/root644", os.O_WRONLY),
            ("open_flags", "d/root644", os.O_RDONLY | os.O_TRUNC),
            ("truncate", "d/root644", 0),
            ("truncate", "d/root666", 3),
            ("write_file", "d/root666", "EV"),
            ("read_file", "d/root666"),
            ("setxattr", "d/root644", "user.u", "v"),
            ("setxattr", "d/root666", "user.u", "v"),
            ("getxattr", "d/root666", "user.u"),
            ("setxattr", "d/mine", "trusted.t", "v"),
            ("getxattr", "d/mine", "trusted.none"),
            ("rename", "d/root644", "d/renamed"),  # not sticky: the directory's permission decides
            ("link", "d/renamed", "d/hardlink"),  # protected_hardlinks: not the user's, not writable
            ("link", "d/root666", "d/hardlink2"),
            ("unlink", "d/renamed"),
        ], expect={0: "!EPERM", 1: "!EPERM", 2: "!EPERM", 3: "!EPERM", 12: "!EPERM", 13: "!EACCES",
                   15: "!EACCES", 17: "!EACCES", 21: "!EACCES", 24: "!EPERM"})
        r.listdir("d")
        for p in ("d/root644", "d/root666", "d/mine", "d/mine_other_group"):
            r.stat(p)
        st = os.stat("d/mine")
        r.note("explicit times of the owner", (st.st_atime_ns, st.st_mtime_ns), expect=(10**9, 2 * 10**9))

    posix(s)


def test_write_and_truncate_by_user_clear_setuid(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "d")
        r.do(os.chmod, "d", 0o777)
        for name in ("w", "t", "ot", "nx", "own"):
            r.write(f"d/{name}", b"0123456789")
        for name in ("w", "t", "ot"):
            r.do(os.chmod, f"d/{name}", 0o6777)  # setuid, setgid + group exec
        r.do(os.chmod, "d/nx", 0o6766)  # setgid without group exec is no privilege
        r.do(os.chown, "d/own", NOBODY, NOBODY)
        r.do(os.chmod, "d/own", 0o6777)
        r.as_user([
            ("write_file", "d/w", "ab"),
            ("truncate", "d/t", 4),
            ("open_flags", "d/ot", os.O_WRONLY | os.O_TRUNC),
            ("write_file", "d/nx", "ab", True),
            ("write_file", "d/own", "ab"),
        ])
        for name in ("w", "t", "ot", "nx", "own"):
            r.stat(f"d/{name}")
        r.read("d/w")
        r.read("d/nx")

    posix(s)


def test_sticky_directory(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "tmp")
        r.do(os.chmod, "tmp", 0o1777)
        r.write("tmp/roots", b"root's")
        r.do(os.chmod, "tmp/roots", 0o666)
        r.do(os.mkdir, "tmp/rootdir")
        r.do(os.mkdir, "tmp/otherdir")
        r.do(os.chown, "tmp/otherdir", 1, 1)
        r.as_user([
            ("unlink", "tmp/roots"),
            ("rename", "tmp/roots", "tmp/stolen"),
            ("rmdir", "tmp/rootdir"),
            ("rename", "tmp/rootdir", "tmp/moved"),
            ("create", "tmp/mine", 0o644),
            ("rename", "tmp/mine", "tmp/mine2"),
            ("rename", "tmp/mine2", "tmp/roots"),  # replacing someone else's file: no
            ("write_file", "tmp/roots", "still writable"),
            ("mkdir", "tmp/mydir"),
            ("rmdir", "tmp/otherdir"),
            ("create", "tmp/gone", 0o644),
            ("unlink", "tmp/gone"),
            ("listdir", "tmp"),
        ], expect={0: "!EPERM", 1: "!EPERM", 2: "!EPERM", 3: "!EPERM", 6: "!EPERM", 9: "!EPERM"})
        r.read("tmp/roots")
        r.do(os.unlink, "tmp/mine2")  # root may
        r.listdir("tmp")
        r.stat("tmp/mydir")

    posix(s)


def test_access_as_user(posix: Run) -> None:
    files = {"r644": (0o644, 0, 0), "o604": (0o604, 0, 0), "o600": (0o600, 0, 0), "g640": (0o640, 0, NOBODY),
             "g070": (0o070, 0, NOBODY), "mine400": (0o400, NOBODY, NOBODY), "mine070": (0o070, NOBODY, 0),
             "x711": (0o711, 0, 0), "none": (0o000, 0, 0)}

    def s(r: Recorder) -> None:
        for name, (mode, uid, gid) in files.items():
            r.write(name, b"x")
            r.do(os.chown, name, uid, gid)
            r.do(os.chmod, name, mode)
        r.do(os.mkdir, "dir711")
        r.do(os.chmod, "dir711", 0o711)
        steps = [("access", name, m) for name in [*files, "dir711", "missing"]
                 for m in (os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK)]
        results = r.as_user(steps)
        # the owner class decides alone: an owner with no rights gets none from the group
        r.note("mine070 unreadable to its owner", results[steps.index(("access", "mine070", os.R_OK))],
               expect=False)
        r.note("g640 readable through the group", results[steps.index(("access", "g640", os.R_OK))],
               expect=True)
        r.as_user([("read_file", "g640"), ("read_file", "o600"), ("read_file", "mine070"),
                   ("open_flags", "g070", os.O_RDWR)],
                  expect={0: "x", 1: "!EACCES", 2: "!EACCES", 3: "ok"})

    posix(s)


def test_xattr_namespaces_as_user(posix: Run) -> None:
    def s(r: Recorder) -> None:
        r.do(os.mkdir, "d")
        r.do(os.chmod, "d", 0o777)
        r.write("d/f", b"x")
        r.do(os.chmod, "d/f", 0o666)
        r.do(os.setxattr, "d/f", "user.shared", b"u")
        r.do(os.setxattr, "d/f", "trusted.hidden", b"t")
        r.do(os.mkdir, "d/sticky")
        r.do(os.chmod, "d/sticky", 0o1777)
        r.as_user([
            ("getxattr", "d/f", "user.shared"),
            ("getxattr", "d/f", "trusted.hidden"),
            ("listxattr", "d/f"),  # trusted.* names are not shown to unprivileged users
            ("setxattr", "d/f", "user.mine", "m"),
            ("removexattr", "d/f", "user.shared"),
            ("setxattr", "d/sticky", "user.x", "x"),  # sticky directory: owner only
            ("listxattr", "d/f"),
        ], expect={1: "!ENODATA", 5: "!EPERM"})
        r.do(lambda p: sorted(os.listxattr(p)), "d/f", label="listxattr(d/f)")

    posix(s)
