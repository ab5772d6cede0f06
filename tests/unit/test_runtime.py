"""Process-wide runtime settings (appendfs/runtime.py): when daemons ask glibc for huge pages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appendfs.runtime import DAEMONS, with_huge_pages

glibc = pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
                           reason="not a glibc system: the tunable does not exist here")


@glibc
def test_the_huge_page_tunable_is_added_where_the_kernel_offers_transparent_huge_pages(tmp_path: Path) -> None:
    thp = tmp_path / "enabled"
    for mode in ("always [madvise] never\n", "[always] madvise never\n"):
        thp.write_text(mode)
        assert with_huge_pages({"PATH": "/bin"}, thp) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Other tunables the user set are kept.
    env = with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp)
    assert env is not None and env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@glibc
def test_nothing_changes_when_set_already_or_without_transparent_huge_pages(tmp_path: Path) -> None:
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    # The user's choice stands either way (=0 turns it off); set already, no re-exec loop.
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp) is None
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}, thp) is None
    thp.write_text("always madvise [never]\n")
    assert with_huge_pages({}, thp) is None
    assert with_huge_pages({}, tmp_path / "no-thp-in-this-kernel") is None


def test_only_daemons_are_re_executed() -> None:
    assert {"up", "mount", "datanode", "metanode", "s3"} == DAEMONS  # not format, store, stats, fsck...
