"""The `file` backend: one data file, one checksum file and one record per extent.

Layout under the device directory ``DIR/extents/``::

    <extent id, 16 hex>.dat   extent bytes at their offsets
    <extent id, 16 hex>.sum   16-byte block entries, entry i at offset 16*i
    <extent id, 16 hex>.meta  JSON ExtentMeta, replaced atomically (tmp, fsync, rename, fsync dir)

File descriptors of recently used extents are cached (bounded). ``capacity_bytes``, when
set, caps the device below the filesystem's size (several DataNodes can share one disk,
and tests can fill a device without filling the disk).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

from appendfs.errors import VersionMismatch
from appendfs.store.codec import ENTRY_BYTES
from appendfs.store.datanode.backend import (
    META_FORMAT_VERSION,
    Backend,
    BackendError,
    ExtentMeta,
    Usage,
)

_MAX_OPEN_EXTENTS = 256


class FileBackend(Backend):
    kind = "file"

    def __init__(self, root: Path, capacity_bytes: int | None = None) -> None:
        self.dir = Path(root) / "extents"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self._fds: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._lock = threading.Lock()
        self._used = sum(p.stat().st_size for p in self.dir.glob("*.dat"))
        self._sizes: dict[int, int] = {}

    def _path(self, extent_id: int, suffix: str) -> Path:
        return self.dir / f"{extent_id:016x}.{suffix}"

    def _fd(self, extent_id: int, suffix: str) -> int:
        key = (extent_id, suffix)
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
                return fd
        try:
            fd = os.open(self._path(extent_id, suffix), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BackendError(f"extent {extent_id} not found") from None
        with self._lock:
            other = self._fds.get(key)
            if other is not None:
                os.close(fd)
                return other
            self._fds[key] = fd
            while len(self._fds) > _MAX_OPEN_EXTENTS:
                _, old = self._fds.popitem(last=False)
                os.close(old)
        return fd

    def _forget(self, extent_id: int) -> None:
        with self._lock:
            for suffix in ("dat", "sum"):
                fd = self._fds.pop((extent_id, suffix), None)
                if fd is not None:
                    os.close(fd)

    def create(self, meta: ExtentMeta) -> None:
        for suffix in ("dat", "sum"):
            fd = os.open(self._path(meta.extent_id, suffix), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fsync(fd)
            os.close(fd)
        with self._lock:
            self._sizes[meta.extent_id] = 0
        self.set_meta(meta)  # fsyncs the directory, which also makes the new files durable

    def write_data(self, extent_id: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        fd = self._fd(extent_id, "dat")
        known = self._sizes.get(extent_id)
        if known is None:  # first write since start: an overwrite must not count as growth
            known = os.fstat(fd).st_size
        written = os.pwrite(fd, data, offset)
        if written != len(data):
            raise BackendError(f"short write on extent {extent_id}: {written} of {len(data)}")
        end = offset + len(data)
        with self._lock:
            if end > known:
                self._used += end - known
                self._sizes[extent_id] = end

    def sync_data(self, extent_ids: list[int]) -> None:
        for extent_id in extent_ids:
            os.fdatasync(self._fd(extent_id, "dat"))

    def write_checksums(self, extent_id: int, first_block: int, entries: bytes) -> None:
        os.pwrite(self._fd(extent_id, "sum"), entries, first_block * ENTRY_BYTES)

    def sync_checksums(self, extent_ids: list[int]) -> None:
        for extent_id in extent_ids:
            os.fdatasync(self._fd(extent_id, "sum"))

    def read_data(self, extent_id: int, offset: int, length: int) -> bytes:
        return os.pread(self._fd(extent_id, "dat"), length, offset)

    def read_checksums(self, extent_id: int, first_block: int, count: int) -> bytes:
        return os.pread(self._fd(extent_id, "sum"), count * ENTRY_BYTES, first_block * ENTRY_BYTES)

    def data_size(self, extent_id: int) -> int:
        size = os.fstat(self._fd(extent_id, "dat")).st_size
        with self._lock:
            self._sizes[extent_id] = size
        return size

    def truncate(self, extent_id: int, length: int, blocks: int) -> None:
        old = self.data_size(extent_id)
        fd = self._fd(extent_id, "dat")
        os.ftruncate(fd, length)
        os.fsync(fd)
        sfd = self._fd(extent_id, "sum")
        os.ftruncate(sfd, blocks * ENTRY_BYTES)
        os.fsync(sfd)
        with self._lock:
            self._sizes[extent_id] = length
            self._used -= max(0, old - length)

    def set_meta(self, meta: ExtentMeta) -> None:
        path = self._path(meta.extent_id, "meta")
        tmp = path.with_suffix(".meta.tmp")
        with open(tmp, "w") as f:
            json.dump(meta.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def get_meta(self, extent_id: int) -> ExtentMeta:
        try:
            with open(self._path(extent_id, "meta")) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise BackendError(f"extent {extent_id} not found") from None
        except (ValueError, OSError) as exc:
            raise BackendError(f"extent {extent_id}: unreadable record: {exc}") from None
        version = raw.get("version") if isinstance(raw, dict) else None
        if version != META_FORMAT_VERSION:
            raise VersionMismatch(f"extent record {self._path(extent_id, 'meta')}", META_FORMAT_VERSION,
                                  version if isinstance(version, int) else -1)
        try:
            return ExtentMeta(**raw)
        except TypeError as exc:
            raise BackendError(f"extent {extent_id}: malformed record: {exc}") from None

    def list(self) -> list[int]:
        return sorted(int(p.stem, 16) for p in self.dir.glob("*.meta"))

    def delete(self, extent_id: int) -> None:
        self._forget(extent_id)
        size = 0
        try:
            size = self._path(extent_id, "dat").stat().st_size
        except FileNotFoundError:
            pass
        # The record goes first: an extent without a record is invisible and its files
        # are swept at the next start; a record without files would be a lie.
        for suffix in ("meta", "dat", "sum"):
            try:
                self._path(extent_id, suffix).unlink()
            except FileNotFoundError:
                pass
        with self._lock:
            self._used -= size
            self._sizes.pop(extent_id, None)

    def sweep_orphans(self) -> int:
        """Remove data/checksum files without a record (an interrupted create or delete)."""
        known = {p.stem for p in self.dir.glob("*.meta")}
        removed = 0
        for p in list(self.dir.glob("*.dat")) + list(self.dir.glob("*.sum")) + list(self.dir.glob("*.tmp")):
            # A .tmp is never a record: left by a set_meta interrupted before its rename.
            if p.suffix == ".tmp" or p.stem.split(".")[0] not in known:
                p.unlink(missing_ok=True)
                removed += 1
        self._used = sum(p.stat().st_size for p in self.dir.glob("*.dat"))
        return removed

    def usage(self) -> Usage:
        st = os.statvfs(self.dir)
        fs_free = st.f_bavail * st.f_frsize
        fs_total = st.f_blocks * st.f_frsize
        with self._lock:
            used = self._used
        if self.capacity_bytes is None:
            return Usage(capacity_bytes=fs_total, used_bytes=fs_total - fs_free, free_bytes=fs_free)
        free = max(0, min(self.capacity_bytes - used, fs_free))
        return Usage(capacity_bytes=self.capacity_bytes, used_bytes=used, free_bytes=free)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
