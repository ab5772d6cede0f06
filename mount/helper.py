"""``mount.appendfs``: the helper mount(8) runs for fstab entries of type ``appendfs``.

mount(8) calls ``/sbin/mount.appendfs SPEC DIR [-sfnv] [-o OPTIONS]``; SPEC is the
META_URL. An /etc/fstab line looks like::

    sqlite:////var/lib/appendfs/meta.db  /mnt/appendfs  appendfs  _netdev,allow_other  0  0

Link the helper once: ``ln -s $(command -v mount.appendfs) /sbin/mount.appendfs``. It runs
``appendfs mount --meta SPEC DIR -o OPTIONS`` in daemon mode (it returns once mounted).
Our own keys inside -o: ``config=FILE`` (TOML config) and ``log=FILE`` (daemon log).
"""

from __future__ import annotations

import os
import sys

USAGE = "usage: mount.appendfs META_URL MOUNTPOINT [-sfnv] [-o OPT[,OPT...]]"


def build_argv(args: list[str]) -> list[str]:
    """The `appendfs mount` argv for mount(8)'s arguments (raises ValueError on bad ones)."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o":
            if i + 1 >= len(args):
                raise ValueError("-o needs a value")
            options.extend(o for o in args[i + 1].split(",") if o)
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options.extend(o for o in a[2:].split(",") if o)
        elif a.startswith("-") and len(a) > 1:
            fake = fake or "f" in a[1:]  # -f: fake mount (do everything but the mount call)
            # -s (sloppy), -n (no mtab), -v (verbose): nothing to do for a FUSE mount
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise ValueError(USAGE)
    spec, mountpoint = positional
    argv = ["mount", "--meta", spec]
    passed: list[str] = []
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "config":
            argv += ["--config", value]
        elif key == "log":
            argv += ["--log-file", value]
        else:
            passed.append(opt)
    if passed:
        argv += ["-o", ",".join(passed)]
    argv.append(mountpoint)
    return ["--fake", *argv] if fake else argv


def main() -> None:
    try:
        argv = build_argv(sys.argv[1:])
    except ValueError as exc:
        print(f"mount.appendfs: {exc}", file=sys.stderr)
        sys.exit(2)
    if argv[0] == "--fake":
        print("mount.appendfs: fake mount (-f): would run appendfs " + " ".join(argv[1:]), file=sys.stderr)
        sys.exit(0)
    exe = os.path.join(os.path.dirname(os.path.realpath(sys.argv[0])), "appendfs")
    if os.access(exe, os.X_OK):
        os.execv(exe, [exe, *argv])
    os.execv(sys.executable, [sys.executable, "-m", "appendfs", *argv])
