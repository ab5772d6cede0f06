#!/usr/bin/env python3
"""Unlink speed in any directory (a mount, or a local one to compare): files/s removed.

Creates ``--files`` files of 4 KiB in two fresh subdirectories of ``--dir`` (created,
written and closed one after the other, reported as files/s too), then removes the first
with one ``rm -rf`` and the second with four parallel ``rm`` (``ls | xargs -P4 -n 50 rm
-f``), and prints a Markdown table. Each unlink through appendfs is a namespace
transaction; a file's last unlink also keeps it for the kernel until it forgets the inode
(docs/mount.md, "Open files, unlink while open, sessions"), released in batches.

Start a cluster and a mount first, e.g. ``appendfs up --data /var/tmp/up --mount
/var/tmp/mnt``, then:

    .venv/bin/python bench/rm_bench.py --dir /var/tmp/mnt [--files 3000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def create(d: Path, n: int) -> float:
    d.mkdir()
    data = b"x" * 4096
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return n / (time.perf_counter() - t)


def timed(cmd: str, cwd: Path, n: int) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, cwd=cwd, check=True)
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="directory to work in (a mount)")
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not args.dir.is_dir():
        print(f"rm_bench: {args.dir} is not a directory (start a mount first?)", file=sys.stderr)
        return 2
    work = args.dir / f"rm-bench-{os.getpid()}"
    work.mkdir()
    rows = []
    try:
        for r in range(1, args.rounds + 1):
            print(f"round {r}: creating 2 x {args.files} files", file=sys.stderr)
            made = (create(work / "a", args.files) + create(work / "b", args.files)) / 2
            subprocess.run(["sync"], check=True)
            print(f"round {r}: removing", file=sys.stderr)
            serial = timed("rm -rf a", work, args.files)
            parallel = timed("ls | xargs -P4 -n 50 rm -f", work / "b", args.files)
            (work / "b").rmdir()
            rows.append((r, made, serial, parallel))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| round | create files/s | `rm -rf` unlinks/s | 4 parallel `rm` unlinks/s |  ({args.files} files)")
    print("|---:|---:|---:|---:|")
    for r, made, serial, parallel in rows:
        print(f"| {r} | {made:,.0f} | {serial:,.0f} | {parallel:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
