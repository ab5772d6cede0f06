"""First contact with a real mount: files, directories and big data round-trip."""

from __future__ import annotations

import os
from pathlib import Path

from cluster import files_equal, random_file
from mounts import Mount


def test_write_read_list(mounted: Mount, tmp_path: Path) -> None:
    root = mounted.path
    (root / "a.txt").write_bytes(b"hello\n")
    assert (root / "a.txt").read_bytes() == b"hello\n"
    (root / "d" / "e").mkdir(parents=True)
    src = random_file(tmp_path / "src", 20 << 20, seed=1)
    dst = root / "d" / "e" / "big"
    dst.write_bytes(src.read_bytes())
    assert files_equal(src, dst)
    assert sorted(os.listdir(root)) == ["a.txt", "d"]
    assert os.stat(dst).st_size == 20 << 20


def test_module_mount_serves(module_mount: Mount) -> None:
    d = module_mount.path / "smoke"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 5000)
    assert (d / "f").stat().st_size == 5000
