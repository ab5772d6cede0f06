"""Process-wide runtime settings every appendfs process applies at start.

glibc serves allocations above its mmap threshold (128 KiB, growing dynamically) with a
fresh ``mmap`` and returns them with ``munmap``; every MiB-sized buffer of the data path
(a received frame, a read, an append) then pays page faults on first touch. Measured on
this project's machines: 1.25 ms per MiB for a copy plus an extraction, against
0.07 ms with the settings below — the difference was most of the store's CPU per GiB.
Keeping large blocks in the heap (and not trimming it eagerly) lets them be reused. Peak
RSS still follows the bounded in-flight windows; the heap only stops shrinking between
bursts.

One arena (``M_ARENA_MAX``): glibc gives worker threads arenas of their own, and each
keeps its untrimmed heap. Reads in worker threads (the client's short-circuit reads of
1 MiB blocks) grew the mount's peak RSS from 159 to 339 and 440 MiB that way. Python
allocates under the GIL, so the extra arenas bought no concurrency.

Transparent huge pages (:func:`with_huge_pages`, applied by :func:`main`, the ``appendfs``
command, before a daemon starts): glibc's ``glibc.malloc.hugetlb=1`` tunable makes the
heap ``madvise(MADV_HUGEPAGE)``, so the MiB-sized buffers of the data path sit in 2 MiB
pages. An ``O_DIRECT`` read into a buffer of 4 KiB pages is cut into requests of at most
``max_segments`` pages (254 on this machine's virtio disk: just under 1 MiB); into huge
pages it goes to the disk in requests of up to ``max_sectors_kb`` (4 MiB). Measured here
(docs/benchmarks.md, session 17): the store client read a cold 1 GiB stream at 914-972
MiB/s without, 1,961-2,219 MiB/s with; a ``dd`` through the mount 0.75-1.4 GB/s without,
1.3-1.8 GB/s with, and the mount's CPU per GiB fell by 0.1 s (fewer page faults, cheaper
page pinning for the FUSE reply). Tunables are read when a process starts, so the
command re-executes itself once with the variable set. A ``GLIBC_TUNABLES`` that already
names ``glibc.malloc.hugetlb`` is left as it is (``=0`` turns this off), and nothing
changes where the kernel has no THP or has it ``never``, or the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_tuned = False


def tune_allocator(mmap_threshold_bytes: int = 32 << 20, trim_threshold_bytes: int = 128 << 20,
                   arenas: int = 1) -> bool:
    """Apply the allocator settings once; False where glibc's mallopt is unavailable."""
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes)) \
        and bool(mallopt(_M_ARENA_MAX, arenas))
    _tuned = ok
    return ok


#: The subcommands that run a data-path daemon (or start them: ``up``); tools stay as run.
DAEMONS = frozenset({"up", "mount", "datanode", "metanode", "s3"})
_TUNABLE = "glibc.malloc.hugetlb"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def with_huge_pages(environ: Mapping[str, str], thp: Path = _THP) -> dict[str, str] | None:
    """``environ`` with glibc's huge-page tunable added, or None when it should not (or
    need not) change: already set either way by the user, no glibc, no THP."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _TUNABLE in tunables or not _glibc():
        return None
    try:
        mode = thp.read_text()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{_TUNABLE}=1" if tunables else f"{_TUNABLE}=1"
    return env


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # not a glibc system
        return False


def reexec_with_huge_pages() -> None:
    """Re-execute this process (same interpreter, same arguments) with the huge-page
    tunable, unless it has it already or should not: see the module docstring."""
    env = with_huge_pages(os.environ)
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # (not expected: the interpreter runs now) go on as started
        pass


def main() -> None:
    """The ``appendfs`` command: daemons start with huge pages, then the CLI runs
    (imported only now: a re-exec before it costs ~40 ms, after it ~200)."""
    if len(sys.argv) > 1 and sys.argv[1] in DAEMONS:
        reexec_with_huge_pages()
    from appendfs.cli import main as cli_main

    cli_main()
